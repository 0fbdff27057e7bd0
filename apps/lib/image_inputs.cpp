// Input image lists and header probes: see image_inputs.h.
#include "apps/lib/image_inputs.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "apps/lib/cli_common.h"
#include "graph/input_file.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

// A list of a million paths is some 100 MB; anything larger is not a list.
constexpr uint64_t kMaxListFileBytes = uint64_t{256} << 20;

std::string lower_extension(const fs::path& path) {
    std::string ext = path.extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return ext;
}

void add_path(const fs::path& path, bool from_list, std::vector<std::string>& images) {
    std::error_code ec;
    const fs::file_status status = fs::status(path, ec);
    if (fs::is_directory(status)) {
        for (const fs::path& file : list_image_folder(path)) images.push_back(file.string());
    } else if (fs::exists(status) || from_list) {
        images.push_back(path.string());
    } else {
        throw UsageError(fmt::format("input '{}' does not exist", path.string()));
    }
}

// ---- header probes (no pixel decode) ----

int read_byte(std::istream& in) { return in.get(); }

bool read_be16(std::istream& in, int& value) {
    const int hi = in.get(), lo = in.get();
    if (hi < 0 || lo < 0) return false;
    value = (hi << 8) | lo;
    return true;
}

cv::Size jpeg_size(std::istream& in) {
    if (read_byte(in) != 0xFF || read_byte(in) != 0xD8) return {};
    for (;;) {
        if (read_byte(in) != 0xFF) return {};
        int marker = read_byte(in);
        while (marker == 0xFF) marker = read_byte(in);
        if (marker < 0 || marker == 0xD9 || marker == 0xDA) return {};
        if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) continue;  // no length field
        int length = 0;
        if (!read_be16(in, length) || length < 2) return {};
        const bool is_frame = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
        if (is_frame) {
            int height = 0, width = 0;
            if (read_byte(in) < 0 || !read_be16(in, height) || !read_be16(in, width)) return {};
            return width > 0 && height > 0 ? cv::Size(width, height) : cv::Size();
        }
        in.seekg(length - 2, std::ios::cur);
        if (!in) return {};
    }
}

uint32_t load_u32(const unsigned char* p, bool big_endian) {
    return big_endian ? (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3])
                      : (uint32_t(p[3]) << 24) | (uint32_t(p[2]) << 16) | (uint32_t(p[1]) << 8) | uint32_t(p[0]);
}
uint32_t load_u16(const unsigned char* p, bool big_endian) {
    return big_endian ? (uint32_t(p[0]) << 8) | uint32_t(p[1]) : (uint32_t(p[1]) << 8) | uint32_t(p[0]);
}

// ImageWidth (256) and ImageLength (257) of the first IFD of a classic TIFF.
cv::Size tiff_size(std::istream& in, bool big_endian) {
    unsigned char head[8];
    in.seekg(0);
    if (!in.read(reinterpret_cast<char*>(head), 8)) return {};
    in.seekg(load_u32(head + 4, big_endian));
    unsigned char count_bytes[2];
    if (!in.read(reinterpret_cast<char*>(count_bytes), 2)) return {};
    const uint32_t count = load_u16(count_bytes, big_endian);
    int64_t width = 0, height = 0;
    for (uint32_t i = 0; i < count && i < 4096; ++i) {
        unsigned char entry[12];
        if (!in.read(reinterpret_cast<char*>(entry), 12)) return {};
        const uint32_t tag = load_u16(entry, big_endian), type = load_u16(entry + 2, big_endian);
        const uint32_t value = type == 3 ? load_u16(entry + 8, big_endian) : type == 4 ? load_u32(entry + 8, big_endian) : 0;
        if (tag == 256) width = value;
        if (tag == 257) height = value;
    }
    if (width <= 0 || height <= 0 || width > INT32_MAX || height > INT32_MAX) return {};
    return cv::Size(static_cast<int>(width), static_cast<int>(height));
}

}  // namespace

std::vector<fs::path> list_image_folder(const fs::path& folder) {
    std::vector<fs::path> files;
    std::error_code ec;
    for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
        const fs::path& path = it->path();
        const std::string name = path.filename().string();
        if (name.empty() || name[0] == '.' || !is_supported_image(name)) continue;
        std::error_code type_ec;
        if (!it->is_regular_file(type_ec)) continue;
        files.push_back(path);
    }
    if (ec) throw UsageError(fmt::format("{}: cannot list folder: {}", folder.string(), ec.message()));
    std::sort(files.begin(), files.end());
    return files;
}

bool is_supported_image(const std::string& path) {
    const std::string ext = lower_extension(fs::path(path));
    return ext == ".jpg" || ext == ".jpeg" || ext == ".png" || ext == ".tif" || ext == ".tiff" || ext == ".bmp";
}

std::vector<std::string> collect_input_images(const std::vector<std::string>& inputs) {
    std::vector<std::string> images;
    for (const std::string& input : inputs) {
        if (input.size() > 1 && input[0] == '@') {
            const std::string list_path = input.substr(1);
            std::string text;
            try {
                text = read_input_file(list_path, "list file", kMaxListFileBytes);  // a FIFO is refused, not waited on
            } catch (const Error& e) {
                throw UsageError(one_line(e.what()));
            }
            std::istringstream list(text);
            std::string line;
            while (std::getline(list, line)) {
                const size_t begin = line.find_first_not_of(" \t\r");
                if (begin == std::string::npos || line[begin] == '#') continue;
                const size_t end = line.find_last_not_of(" \t\r");
                add_path(fs::path(line.substr(begin, end - begin + 1)), true, images);
            }
        } else {
            add_path(fs::path(input), false, images);
        }
    }
    return images;
}

cv::Size probe_image_size(const std::string& path) {
    if (!input_file_problem(path).empty()) return {};  // a FIFO would block the read below forever
    std::ifstream in(path, std::ios::binary);
    if (!in) return {};
    unsigned char head[26] = {};
    in.read(reinterpret_cast<char*>(head), sizeof(head));
    const std::streamsize got = in.gcount();
    in.clear();
    if (got >= 2 && head[0] == 0xFF && head[1] == 0xD8) {
        in.seekg(0);
        return jpeg_size(in);
    }
    static const unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
    if (got >= 24 && std::equal(kPngSignature, kPngSignature + 8, head) && std::memcmp(head + 12, "IHDR", 4) == 0) {
        const uint32_t width = load_u32(head + 16, true), height = load_u32(head + 20, true);
        if (width == 0 || height == 0 || width > INT32_MAX || height > INT32_MAX) return {};
        return cv::Size(static_cast<int>(width), static_cast<int>(height));
    }
    if (got >= 26 && head[0] == 'B' && head[1] == 'M' && load_u32(head + 14, false) >= 40) {
        const auto width = static_cast<int32_t>(load_u32(head + 18, false));
        auto height = static_cast<int32_t>(load_u32(head + 22, false));
        if (height < 0 && height != INT32_MIN) height = -height;  // top-down bitmap
        return width > 0 && height > 0 ? cv::Size(width, height) : cv::Size();
    }
    if (got >= 8 && ((head[0] == 'I' && head[1] == 'I' && head[2] == 42 && head[3] == 0) ||
                     (head[0] == 'M' && head[1] == 'M' && head[2] == 0 && head[3] == 42)))
        return tiff_size(in, head[0] == 'M');
    return {};
}

}  // namespace resunet
