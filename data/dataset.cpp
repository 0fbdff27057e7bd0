#include "data/dataset.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <oneapi/tbb/parallel_for.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/augment.h"
#include "data/image_decode.h"
#include "data/sha256.h"
#include "graph/input_file.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

bool is_supported_extension(const fs::path& path) {
    std::string ext = path.extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
    return ext == ".jpg" || ext == ".jpeg" || ext == ".png" || ext == ".tif" || ext == ".tiff" || ext == ".bmp";
}

// stem -> file names (sorted), for the supported, non-hidden regular files of one directory.
std::map<std::string, std::vector<std::string>> list_images(const fs::path& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) throw Error(fmt::format("{}: not a directory", dir.string()));
    std::map<std::string, std::vector<std::string>> by_stem;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
        const fs::path& path = it->path();
        const std::string name = path.filename().string();
        if (name.empty() || name[0] == '.' || !is_supported_extension(path)) continue;
        std::error_code type_ec;
        if (!it->is_regular_file(type_ec)) continue;
        by_stem[path.stem().string()].push_back(name);
    }
    if (ec) throw Error(fmt::format("{}: cannot list directory: {}", dir.string(), ec.message()));
    for (auto& [stem, names] : by_stem) std::sort(names.begin(), names.end());
    return by_stem;
}

int read_u8(std::istream& in) { return in.get(); }

bool read_be16(std::istream& in, int& value) {
    int hi = in.get(), lo = in.get();
    if (hi < 0 || lo < 0) return false;
    value = (hi << 8) | lo;
    return true;
}

// Width and height from the first SOFn segment of a JPEG; false if none is found before the scan.
// The size as decoded: EXIF orientation 5 to 8 (an APP1 segment before the frame header) swaps it, as the
// decoder does (data/image_decode.h), so the header scan and every decode agree.
bool jpeg_size(std::istream& in, cv::Size& size) {
    if (read_u8(in) != 0xFF || read_u8(in) != 0xD8) return false;
    int orientation = 1;
    for (;;) {
        if (read_u8(in) != 0xFF) return false;
        int marker = read_u8(in);
        while (marker == 0xFF) marker = read_u8(in);
        if (marker < 0) return false;
        if (marker == 0xD8 || marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) continue;
        if (marker == 0xD9 || marker == 0xDA) return false;
        int length = 0;
        if (!read_be16(in, length) || length < 2) return false;
        const bool is_frame = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
        if (is_frame) {
            int height = 0, width = 0;
            if (read_u8(in) < 0 || !read_be16(in, height) || !read_be16(in, width)) return false;
            if (width <= 0 || height <= 0) return false;  // height 0 needs a DNL segment, which the decoder refuses
            size = orientation >= 5 ? cv::Size(height, width) : cv::Size(width, height);
            return true;
        }
        if (marker == 0xE1 && orientation == 1) {
            std::string segment(static_cast<size_t>(length - 2), '\0');
            if (!in.read(segment.data(), static_cast<std::streamsize>(segment.size()))) return false;
            orientation = exif_orientation(reinterpret_cast<const uint8_t*>(segment.data()), segment.size());
            continue;
        }
        in.seekg(length - 2, std::ios::cur);
        if (!in) return false;
    }
}

uint32_t load_be32(const unsigned char* p) {
    return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}
uint32_t load_le32(const unsigned char* p) {
    return (uint32_t(p[3]) << 24) | (uint32_t(p[2]) << 16) | (uint32_t(p[1]) << 8) | uint32_t(p[0]);
}
uint32_t load_le16(const unsigned char* p) { return (uint32_t(p[1]) << 8) | uint32_t(p[0]); }

// A classic TIFF's 16- and 32-bit fields in the file's byte order.
uint32_t tiff_u32(const unsigned char* p, bool big_endian) { return big_endian ? load_be32(p) : load_le32(p); }
uint32_t tiff_u16(const unsigned char* p, bool big_endian) {
    return big_endian ? (uint32_t(p[0]) << 8) | uint32_t(p[1]) : load_le16(p);
}

// ImageWidth (tag 256) and ImageLength (257) of a classic TIFF's first IFD; false if either is missing.
bool tiff_size(std::istream& in, bool big_endian, uint64_t& width, uint64_t& height) {
    unsigned char head[8];
    in.clear();
    in.seekg(0);
    if (!in.read(reinterpret_cast<char*>(head), sizeof(head))) return false;
    in.seekg(tiff_u32(head + 4, big_endian));
    unsigned char count_bytes[2];
    if (!in.read(reinterpret_cast<char*>(count_bytes), sizeof(count_bytes))) return false;
    const uint32_t count = tiff_u16(count_bytes, big_endian);
    std::optional<uint64_t> found_width, found_height;
    for (uint32_t i = 0; i < count && !(found_width && found_height); ++i) {
        unsigned char entry[12];
        if (!in.read(reinterpret_cast<char*>(entry), sizeof(entry))) return false;
        const uint32_t tag = tiff_u16(entry, big_endian), type = tiff_u16(entry + 2, big_endian);
        if (tag != 256 && tag != 257) continue;
        if (tiff_u32(entry + 4, big_endian) != 1) return false;  // one value per dimension
        uint64_t value = 0;
        if (type == 3)
            value = tiff_u16(entry + 8, big_endian);  // SHORT, left-justified in the value field
        else if (type == 4)
            value = tiff_u32(entry + 8, big_endian);  // LONG
        else
            return false;
        (tag == 256 ? found_width : found_height) = value;
    }
    if (!found_width || !found_height) return false;
    width = *found_width;
    height = *found_height;
    return true;
}

enum class ImageFormat { unknown, jpeg, png, tiff, bmp };

const char* format_name(ImageFormat format) {
    switch (format) {
        case ImageFormat::jpeg: return "JPEG";
        case ImageFormat::png: return "PNG";
        case ImageFormat::tiff: return "TIFF";
        case ImageFormat::bmp: return "BMP";
        case ImageFormat::unknown: break;
    }
    return "unknown";
}

// What a file's first bytes declare, read without decoding any pixel.
struct ImageHeader {
    bool regular = false;                       // false: missing, or a folder, pipe or device
    bool opened = false;                        // false: the file cannot be opened
    uint64_t file_bytes = 0;                    // size of the file
    ImageFormat format = ImageFormat::unknown;  // from the signature, whatever the extension says
    std::string first_bytes;                    // hex of up to 8 leading bytes, for errors
    bool has_size = false;                      // width and height were found in the header
    uint64_t width = 0, height = 0;             // declared size in pixels
};

ImageHeader read_header(const std::string& path) {
    ImageHeader header;
    std::error_code ec;
    header.regular = fs::is_regular_file(path, ec);  // a FIFO would block the decoder forever
    if (!header.regular) return header;
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) return header;
    const std::streamoff end = in.tellg();
    if (end < 0) return header;
    header.opened = true;
    header.file_bytes = static_cast<uint64_t>(end);
    in.seekg(0);
    unsigned char head[26] = {};
    in.read(reinterpret_cast<char*>(head), sizeof(head));
    const std::streamsize got = in.gcount();
    for (std::streamsize i = 0; i < std::min<std::streamsize>(got, 8); ++i)
        header.first_bytes += fmt::format("{}{:02x}", i ? " " : "", head[i]);

    static const unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
    if (got >= 2 && head[0] == 0xFF && head[1] == 0xD8) {
        header.format = ImageFormat::jpeg;
        in.clear();
        in.seekg(0);
        cv::Size size;
        if (jpeg_size(in, size)) {
            header.has_size = true;
            header.width = static_cast<uint64_t>(size.width);
            header.height = static_cast<uint64_t>(size.height);
        }
    } else if (got >= 8 && std::equal(kPngSignature, kPngSignature + 8, head)) {
        header.format = ImageFormat::png;
        if (got >= 24 && std::equal(head + 12, head + 16, "IHDR")) {
            header.has_size = true;
            header.width = load_be32(head + 16);
            header.height = load_be32(head + 20);
        }
    } else if (got >= 2 && head[0] == 'B' && head[1] == 'M') {
        header.format = ImageFormat::bmp;
        const uint32_t info_bytes = got >= 18 ? load_le32(head + 14) : 0;
        if (got >= 26 && info_bytes >= 40) {  // BITMAPINFOHEADER and later: signed 32-bit sizes
            const int32_t width = static_cast<int32_t>(load_le32(head + 18));
            const int32_t height = static_cast<int32_t>(load_le32(head + 22));  // negative: top-down rows
            if (width >= 0 && height != INT32_MIN) {
                header.has_size = true;
                header.width = static_cast<uint64_t>(width);
                header.height = static_cast<uint64_t>(height < 0 ? -height : height);
            }
        } else if (got >= 22 && info_bytes == 12) {  // OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
            header.has_size = true;
            header.width = load_le16(head + 18);
            header.height = load_le16(head + 20);
        }
    } else if (got >= 8 && ((head[0] == 'I' && head[1] == 'I' && head[2] == 42 && head[3] == 0) ||
                            (head[0] == 'M' && head[1] == 'M' && head[2] == 0 && head[3] == 42))) {
        header.format = ImageFormat::tiff;
        header.has_size = tiff_size(in, head[0] == 'M', header.width, header.height);
    }
    return header;
}

// Why a file must not be decoded (unreadable, not one of the accepted formats, no size, too large).
std::optional<std::string> header_problem(const ImageHeader& header, int64_t max_pixels) {
    if (!header.regular) return "cannot open it as a regular file (missing, a folder, a pipe or a device)";
    if (!header.opened) return "cannot open the file";
    if (header.file_bytes == 0) return "the file is empty (0 bytes)";
    if (header.format == ImageFormat::unknown)
        return fmt::format("not a JPEG, PNG, TIFF or BMP file (it starts with {})", header.first_bytes);
    if (!header.has_size) return fmt::format("no image size in its {} header", format_name(header.format));
    if (header.width == 0 || header.height == 0)
        return fmt::format("its {} header declares an empty {}x{} image", format_name(header.format), header.width,
                           header.height);
    if (header.width > static_cast<uint64_t>(max_pixels) / header.height || header.width > INT32_MAX ||
        header.height > INT32_MAX)
        return fmt::format("its {} header declares {}x{} pixels (WxH), more than the limit of {}",
                           format_name(header.format), header.width, header.height, max_pixels);
    return std::nullopt;
}

// Decodes after the header checks, from the bytes the file opener read (one open, regular files only), with
// the one decoder of data/image_decode.h; throws resunet::Error naming the file and what is wrong with it.
DecodedImage decode_checked(const std::string& path, const DecodeOptions& options, const char* kind, int64_t max_pixels) {
    const ImageHeader header = read_header(path);
    if (auto problem = header_problem(header, max_pixels))
        throw Error(fmt::format("{}: cannot read or decode {}: {}", path, kind, *problem));
    if (header.format != ImageFormat::jpeg && options.reduction != 1)
        return decode_checked(path, DecodeOptions{options.grey, 1}, kind, max_pixels);
    // Raw 16-bit RGBA TIFF is the largest encoding: 8 bytes a pixel.
    const uint64_t max_bytes = std::min<uint64_t>(static_cast<uint64_t>(max_pixels) * 8 + (uint64_t{64} << 20), INT32_MAX);
    std::string bytes;
    try {
        bytes = read_input_file(path, kind, max_bytes);
    } catch (const Error& e) {
        throw Error(fmt::format("{}: cannot read or decode {}: {}", path, kind, e.what()));
    }
    return decode_image_bytes(bytes, options, fmt::format("{}: cannot read or decode {}", path, kind));
}

// Size of one file, or the reason it cannot be used.
struct Probe {
    cv::Size size;       // empty on failure
    std::string reason;  // why, when size is empty
};

Probe probe_size(const std::string& path, bool is_mask, const ScanOptions& options) {
    const char* kind = is_mask ? "mask" : "image";
    if (!options.full_decode) {
        const ImageHeader header = read_header(path);
        if (auto problem = header_problem(header, options.max_pixels))
            return {cv::Size(), fmt::format("cannot read or decode {}: {}", kind, *problem)};
        return {cv::Size(static_cast<int>(header.width), static_cast<int>(header.height)), {}};
    }
    try {
        return {decode_checked(path, DecodeOptions{is_mask, 1}, kind, options.max_pixels).pixels.size(), {}};
    } catch (const Error& e) {
        // The message starts with the path, which the problem list names separately.
        std::string reason = e.what();
        if (reason.rfind(path + ": ", 0) == 0) reason.erase(0, path.size() + 2);
        return {cv::Size(), reason};
    }
}

struct ManifestEntry {
    std::string digest;         // lowercase hex
    std::string relative_path;  // "images/x.jpg"
};

std::vector<ManifestEntry> read_manifest(const std::string& path) {
    std::istringstream in(read_input_file(path, "manifest", uint64_t{256} << 20));
    std::vector<ManifestEntry> entries;
    std::string line;
    for (int line_number = 1; std::getline(in, line); ++line_number) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty()) continue;
        const bool hex_ok = line.size() > 66 && std::all_of(line.begin(), line.begin() + 64, [](unsigned char c) {
                                return std::isxdigit(c) != 0;
                            });
        if (!hex_ok || line[64] != ' ' || (line[65] != ' ' && line[65] != '*'))
            throw Error(fmt::format("{}:{}: not a sha256sum line ('<64 hex digits>  <path>')", path, line_number));
        ManifestEntry entry;
        entry.digest = line.substr(0, 64);
        std::transform(entry.digest.begin(), entry.digest.end(), entry.digest.begin(),
                       [](unsigned char c) { return std::tolower(c); });
        entry.relative_path = line.substr(66);
        while (entry.relative_path.rfind("./", 0) == 0) entry.relative_path.erase(0, 2);
        entries.push_back(std::move(entry));
    }
    return entries;
}

struct Problem {
    std::string file;
    std::string reason;
};

// What is known about one stem after the parallel checks.
struct StemCheck {
    std::string id;
    std::vector<std::string> image_names, mask_names;
    Probe image, mask;
    std::string image_digest, mask_digest;
};

}  // namespace

std::optional<size_t> Dataset::find(const std::string& id) const {
    auto it = std::lower_bound(samples.begin(), samples.end(), id,
                               [](const SampleInfo& s, const std::string& key) { return s.id < key; });
    if (it == samples.end() || it->id != id) return std::nullopt;
    return static_cast<size_t>(it - samples.begin());
}

std::vector<std::string> Dataset::ids() const {
    std::vector<std::string> out;
    out.reserve(samples.size());
    for (const SampleInfo& s : samples) out.push_back(s.id);
    return out;
}

Dataset scan_dataset(const std::string& root, const ScanOptions& options) {
    const fs::path root_path(root);
    const fs::path image_dir = root_path / "images", mask_dir = root_path / "masks";
    const auto images = list_images(image_dir);
    const auto masks = list_images(mask_dir);

    std::vector<StemCheck> checks;
    {
        std::set<std::string> stems;
        for (const auto& [stem, names] : images) stems.insert(stem);
        for (const auto& [stem, names] : masks) stems.insert(stem);
        for (const std::string& stem : stems) {
            StemCheck check;
            check.id = stem;
            if (auto it = images.find(stem); it != images.end()) check.image_names = it->second;
            if (auto it = masks.find(stem); it != masks.end()) check.mask_names = it->second;
            checks.push_back(std::move(check));
        }
    }

    std::map<std::string, std::string> manifest;  // relative path -> digest
    std::vector<ManifestEntry> manifest_entries;
    std::string manifest_path;
    if (options.verify_manifest) {
        manifest_path = options.manifest_path.empty() ? (root_path / "manifest.sha256").string() : options.manifest_path;
        manifest_entries = read_manifest(manifest_path);
        for (const ManifestEntry& entry : manifest_entries) {
            if (!manifest.emplace(entry.relative_path, entry.digest).second)
                throw Error(fmt::format("{}: '{}' is listed twice", manifest_path, entry.relative_path));
        }
    }

    auto image_path = [&](const std::string& name) { return (image_dir / name).string(); };
    auto mask_path = [&](const std::string& name) { return (mask_dir / name).string(); };

    // Decoding and hashing dominate; each stem is independent.
    tbb::parallel_for(size_t(0), checks.size(), [&](size_t i) {
        StemCheck& check = checks[i];
        if (check.image_names.size() != 1 || check.mask_names.size() != 1) return;
        const std::string image_file = image_path(check.image_names[0]);
        const std::string mask_file = mask_path(check.mask_names[0]);
        check.image = probe_size(image_file, false, options);
        check.mask = probe_size(mask_file, true, options);
        if (options.verify_manifest) {
            try {
                check.image_digest = sha256_file_hex(image_file);
                check.mask_digest = sha256_file_hex(mask_file);
            } catch (const Error&) {
                // An unreadable file is reported by the size check above.
            }
        }
    });

    Dataset dataset;
    dataset.root = root;
    std::vector<Problem> problems;
    for (const StemCheck& check : checks) {
        const size_t problems_before = problems.size();
        auto report = [&](std::string file, std::string reason) {
            if (problems.size() == problems_before) problems.push_back({std::move(file), std::move(reason)});
        };
        if (check.image_names.size() > 1)
            report(image_path(check.image_names[1]),
                   fmt::format("duplicate image stem '{}' (also {})", check.id, check.image_names[0]));
        if (check.mask_names.size() > 1)
            report(mask_path(check.mask_names[1]),
                   fmt::format("duplicate mask stem '{}' (also {})", check.id, check.mask_names[0]));
        if (check.mask_names.empty())
            report(image_path(check.image_names[0]),
                   fmt::format("orphan image: no mask with stem '{}' in {}", check.id, mask_dir.string()));
        if (check.image_names.empty())
            report(mask_path(check.mask_names[0]),
                   fmt::format("orphan mask: no image with stem '{}' in {}", check.id, image_dir.string()));
        if (problems.size() != problems_before) continue;

        SampleInfo info;
        info.id = check.id;
        info.image_path = image_path(check.image_names[0]);
        info.mask_path = mask_path(check.mask_names[0]);
        if (check.image.size.empty()) report(info.image_path, check.image.reason);
        if (check.mask.size.empty()) report(info.mask_path, check.mask.reason);
        if (problems.size() == problems_before && check.image.size != check.mask.size)
            report(info.mask_path, fmt::format("mask is {}x{} but image {} is {}x{} (WxH)", check.mask.size.width,
                                               check.mask.size.height, info.image_path, check.image.size.width,
                                               check.image.size.height));
        if (options.verify_manifest && problems.size() == problems_before) {
            const std::pair<std::string, const std::string*> files[2] = {
                {"images/" + check.image_names[0], &check.image_digest},
                {"masks/" + check.mask_names[0], &check.mask_digest}};
            for (const auto& [relative, digest] : files) {
                const std::string full = (root_path / relative).string();
                auto it = manifest.find(relative);
                if (it == manifest.end())
                    report(full, fmt::format("not listed in manifest {}", manifest_path));
                else if (it->second != *digest)
                    report(full, fmt::format("SHA-256 {} differs from {} in manifest {}", *digest, it->second,
                                             manifest_path));
            }
        }
        if (problems.size() != problems_before) continue;
        info.width = check.image.size.width;
        info.height = check.image.size.height;
        dataset.samples.push_back(std::move(info));
    }

    if (options.verify_manifest) {
        // Manifest entries that are not image/mask pairs (kavsir_bboxes.json) or that are missing.
        std::vector<const ManifestEntry*> others;
        for (const ManifestEntry& entry : manifest_entries) {
            const fs::path relative(entry.relative_path);
            const std::string folder = relative.parent_path().generic_string();
            const bool is_pair_file = (folder == "images" && images.count(relative.stem().string())) ||
                                      (folder == "masks" && masks.count(relative.stem().string()));
            bool listed_by_name = false;
            if (is_pair_file) {
                const auto& names = folder == "images" ? images.at(relative.stem().string())
                                                       : masks.at(relative.stem().string());
                listed_by_name = std::find(names.begin(), names.end(), relative.filename().string()) != names.end();
            }
            if (!listed_by_name) others.push_back(&entry);
        }
        std::vector<std::string> other_digests(others.size());
        tbb::parallel_for(size_t(0), others.size(), [&](size_t i) {
            const std::string full = (root_path / others[i]->relative_path).string();
            std::error_code ec;
            if (!fs::is_regular_file(full, ec)) return;
            try {
                other_digests[i] = sha256_file_hex(full);
            } catch (const Error&) {
                other_digests[i] = "unreadable";
            }
        });
        for (size_t i = 0; i < others.size(); ++i) {
            const std::string full = (root_path / others[i]->relative_path).string();
            if (other_digests[i].empty())
                problems.push_back({full, fmt::format("listed in manifest {} but missing", manifest_path)});
            else if (other_digests[i] != others[i]->digest)
                problems.push_back({full, fmt::format("SHA-256 {} differs from {} in manifest {}", other_digests[i],
                                                      others[i]->digest, manifest_path)});
        }
    }

    if (!problems.empty() && !options.skip_bad) {
        const Problem& first = problems.front();
        std::string more = problems.size() > 1
                               ? fmt::format(" ({} more problem(s); ScanOptions::skip_bad skips them)", problems.size() - 1)
                               : std::string();
        throw Error(fmt::format("{}: {}{}", first.file, first.reason, more));
    }
    for (Problem& problem : problems) dataset.skipped.push_back({std::move(problem.file), std::move(problem.reason)});
    if (dataset.samples.empty())
        throw Error(fmt::format("{}: no usable image/mask pairs ({} skipped)", root, dataset.skipped.size()));
    return dataset;
}

cv::Mat read_image(const std::string& path, int64_t max_pixels) {
    return decode_checked(path, DecodeOptions{false, 1}, "image", max_pixels).pixels;
}

cv::Mat read_image_reduced(const std::string& path, int min_side, cv::Size& original, int64_t max_pixels) {
    const ImageHeader header = read_header(path);
    if (auto problem = header_problem(header, max_pixels))
        throw Error(fmt::format("{}: cannot read or decode image: {}", path, *problem));
    int reduction = 1;
    if (header.format == ImageFormat::jpeg && min_side > 0) {
        const int64_t smaller = std::min<int64_t>(header.width, header.height);
        reduction = smaller / 8 >= min_side ? 8 : smaller / 4 >= min_side ? 4 : smaller / 2 >= min_side ? 2 : 1;
    }
    DecodedImage decoded = decode_checked(path, DecodeOptions{false, reduction}, "image", max_pixels);
    original = decoded.full_size;  // oriented as the pixels are (EXIF), whatever the reduction
    return std::move(decoded.pixels);
}

cv::Mat read_mask(const std::string& path, int64_t max_pixels) {
    const cv::Mat grey = decode_checked(path, DecodeOptions{true, 1}, "mask", max_pixels).pixels;
    cv::Mat binary;
    cv::threshold(grey, binary, 127, 1, cv::THRESH_BINARY);  // value >= 128 -> 1
    return binary;
}

HostTensor image_to_tensor(const cv::Mat& bgr, const std::array<float, 3>& mean, const std::array<float, 3>& stddev) {
    if (bgr.type() != CV_8UC3)
        throw Error(fmt::format("image_to_tensor: expected an 8-bit 3-channel image, got type {}", bgr.type()));
    const int height = bgr.rows, width = bgr.cols;
    HostTensor tensor = HostTensor::zeros({3, height, width});
    float* dst = tensor.f32();
    const size_t plane = static_cast<size_t>(height) * static_cast<size_t>(width);
    float scale[3], offset[3];
    for (int c = 0; c < 3; ++c) {
        scale[c] = 1.0f / (255.0f * stddev[c]);
        offset[c] = -mean[c] / stddev[c];
    }
    for (int y = 0; y < height; ++y) {
        const uint8_t* row = bgr.ptr<uint8_t>(y);
        float* r = dst + static_cast<size_t>(y) * width;
        float* g = r + plane;
        float* b = g + plane;
        for (int x = 0; x < width; ++x) {
            b[x] = row[3 * x + 0] * scale[2] + offset[2];
            g[x] = row[3 * x + 1] * scale[1] + offset[1];
            r[x] = row[3 * x + 2] * scale[0] + offset[0];
        }
    }
    return tensor;
}

namespace {

Sample load_sample_impl(const Dataset& dataset, size_t index, const PreprocessOptions& options,
                        const AugmentParams* augment) {
    if (index >= dataset.samples.size())
        throw Error(fmt::format("{}: sample index {} out of range (dataset has {})", dataset.root, index,
                                dataset.samples.size()));
    if (options.width <= 0 || options.height <= 0)
        throw Error(fmt::format("load_sample: model size must be positive, got {}x{}", options.width, options.height));
    for (int c = 0; c < 3; ++c)
        if (!(options.stddev[c] > 0.0f))
            throw Error(fmt::format("load_sample: channel {} standard deviation must be positive", c));
    const SampleInfo& info = dataset.samples[index];
    cv::Mat image = read_image(info.image_path);
    cv::Mat mask = read_mask(info.mask_path);
    if (image.size() != mask.size())
        throw Error(fmt::format("{}: mask is {}x{} but image {} is {}x{} (WxH)", info.mask_path, mask.cols, mask.rows,
                                info.image_path, image.cols, image.rows));

    Sample sample;
    sample.index = index;
    sample.id = info.id;
    sample.original_width = image.cols;
    sample.original_height = image.rows;

    const cv::Size model_size(options.width, options.height);
    cv::Mat resized_image, resized_mask;
    cv::resize(image, resized_image, model_size, 0, 0, cv::INTER_AREA);
    cv::resize(mask, resized_mask, model_size, 0, 0, cv::INTER_NEAREST);
    if (augment) apply_augment(*augment, resized_image, resized_mask);

    sample.image = image_to_tensor(resized_image, options.mean, options.stddev);
    sample.mask = HostTensor::zeros({options.height, options.width});
    float* mask_dst = sample.mask.f32();
    for (int y = 0; y < options.height; ++y) {
        const uint8_t* row = resized_mask.ptr<uint8_t>(y);
        for (int x = 0; x < options.width; ++x) mask_dst[static_cast<size_t>(y) * options.width + x] = row[x] ? 1.0f : 0.0f;
    }
    if (options.keep_original_mask) sample.original_mask = std::move(mask);
    return sample;
}

}  // namespace

Sample load_sample(const Dataset& dataset, size_t index, const PreprocessOptions& options) {
    return load_sample_impl(dataset, index, options, nullptr);
}

Sample load_sample(const Dataset& dataset, size_t index, const PreprocessOptions& options,
                   const AugmentParams& augment) {
    return load_sample_impl(dataset, index, options, &augment);
}

}  // namespace resunet
