// Hostile files through the readers of untrusted data: empty files, every truncation of each image
// format, headers that lie about the size or the layout, huge declared sizes, odd pixel formats, masks
// with values other than 0 and 255, broken weight and split files. The corpus is generated here. Each
// case must end in a resunet::Error naming the file or in the documented result; never a crash, a hang
// or another exception type (the sanitizer build of tests/run_all.sh runs this file too).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/dataset.h"
#include "data/split.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace fs = std::filesystem;
using namespace resunet;

namespace {

using Bytes = std::vector<uint8_t>;

// A scratch folder with images/ and masks/, removed when the test ends.
struct TempDir {
    fs::path path;
    TempDir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("resunet_test_hostile_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
        fs::remove_all(path);
        fs::create_directories(path / "images");
        fs::create_directories(path / "masks");
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string str() const { return path.string(); }
};

void write_bytes(const fs::path& path, const Bytes& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good()) << path;
}

// The message of the resunet::Error that f throws, or nullopt when f returns. Any other exception
// escapes and fails the test: only resunet::Error is an acceptable answer to bad input.
std::optional<std::string> error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return std::string(e.what());
    }
    return std::nullopt;
}

void expect_error_mentions(const std::function<void()>& f, const std::string& text, const char* expression) {
    const std::optional<std::string> message = error_of(f);
    if (!message) {
        ADD_FAILURE() << expression << " did not throw resunet::Error";
        return;
    }
    EXPECT_NE(message->find(text), std::string::npos) << "message: " << *message << "\nexpected to mention: " << text;
}

#define EXPECT_ERROR_MENTIONS(expr, text) expect_error_mentions([&] { (void)(expr); }, (text), #expr)

cv::Mat noise(int width, int height, int type, int seed) {
    cv::Mat image(height, width, type);
    cv::RNG rng(static_cast<uint64_t>(seed) + 1);
    rng.fill(image, cv::RNG::UNIFORM, 0, CV_MAT_DEPTH(type) == CV_16U ? 65536 : 256);
    return image;
}

cv::Mat disc_mask(int width, int height) {
    cv::Mat mask(height, width, CV_8UC1, cv::Scalar(0));
    cv::circle(mask, {width / 2, height / 2}, std::min(width, height) / 3, cv::Scalar(255), cv::FILLED);
    return mask;
}

Bytes encode(const std::string& ext, const cv::Mat& image) {
    Bytes bytes;
    EXPECT_TRUE(cv::imencode(ext, image, bytes)) << ext;
    return bytes;
}

void put_be32(Bytes& bytes, size_t at, uint32_t value) {
    for (int i = 0; i < 4; ++i) bytes[at + i] = static_cast<uint8_t>(value >> (24 - 8 * i));
}

void append_le(Bytes& bytes, uint64_t value, int count) {
    for (int i = 0; i < count; ++i) bytes.push_back(static_cast<uint8_t>(value >> (8 * i)));
}

// A PNG whose IHDR declares width x height (CRC fixed, so only the pixel data disagrees).
Bytes png_declaring(Bytes png, uint32_t width, uint32_t height) {
    put_be32(png, 16, width);
    put_be32(png, 20, height);
    put_be32(png, 29, crc32(png.data() + 12, 17));  // over "IHDR" and its 13 data bytes
    return png;
}

// A JPEG whose first SOF segment declares width x height.
Bytes jpeg_declaring(Bytes jpeg, uint16_t width, uint16_t height) {
    for (size_t at = 2; at + 9 < jpeg.size();) {
        const uint8_t marker = jpeg[at + 1];
        const size_t length = (size_t{jpeg[at + 2]} << 8) | jpeg[at + 3];
        if (marker >= 0xC0 && marker <= 0xC2) {
            jpeg[at + 5] = static_cast<uint8_t>(height >> 8);
            jpeg[at + 6] = static_cast<uint8_t>(height);
            jpeg[at + 7] = static_cast<uint8_t>(width >> 8);
            jpeg[at + 8] = static_cast<uint8_t>(width);
            return jpeg;
        }
        at += 2 + length;
    }
    ADD_FAILURE() << "no SOF segment";
    return jpeg;
}

// A 24-bit BMP header (BITMAPINFOHEADER) declaring width x height, pixel data at `data_offset`,
// followed by `payload` bytes.
Bytes bmp_declaring(int32_t width, int32_t height, uint32_t data_offset, size_t payload) {
    Bytes bmp = {'B', 'M'};
    append_le(bmp, 54 + payload, 4);
    append_le(bmp, 0, 4);
    append_le(bmp, data_offset, 4);
    append_le(bmp, 40, 4);
    append_le(bmp, static_cast<uint32_t>(width), 4);
    append_le(bmp, static_cast<uint32_t>(height), 4);
    append_le(bmp, 1, 2);   // planes
    append_le(bmp, 24, 2);  // bits per pixel
    append_le(bmp, 0, 4);   // BI_RGB
    append_le(bmp, payload, 4);
    for (int i = 0; i < 4; ++i) append_le(bmp, 0, 4);
    bmp.resize(bmp.size() + payload, 0x7f);
    return bmp;
}

// A little-endian, uncompressed RGB TIFF of width x height whose single strip is at `strip_offset`
// with `strip_bytes` bytes; the file itself holds only the header and 16 bytes of data.
Bytes tiff_declaring(uint32_t width, uint32_t height, uint32_t strip_offset, uint32_t strip_bytes) {
    Bytes tiff = {'I', 'I', 42, 0};
    append_le(tiff, 8, 4);  // first IFD right after the header
    const std::vector<std::array<uint32_t, 3>> entries = {
        // tag, type (3 SHORT, 4 LONG), value
        {256, 4, width}, {257, 4, height}, {258, 3, 8}, {259, 3, 1}, {262, 3, 2},
        {273, 4, strip_offset}, {277, 3, 3}, {278, 4, height}, {279, 4, strip_bytes}};
    append_le(tiff, entries.size(), 2);
    for (const auto& [tag, type, value] : entries) {
        append_le(tiff, tag, 2);
        append_le(tiff, type, 2);
        append_le(tiff, 1, 4);
        append_le(tiff, value, type == 3 ? 2 : 4);
        if (type == 3) append_le(tiff, 0, 2);
    }
    append_le(tiff, 0, 4);  // no next IFD
    tiff.resize(tiff.size() + 16, 0x40);
    return tiff;
}

// What happened to one file: the decoded image, or the error.
struct ReadResult {
    std::optional<std::string> error;
    cv::Mat image;
};

ReadResult try_read(const std::function<cv::Mat()>& read) {
    ReadResult result;
    result.error = error_of([&] { result.image = read(); });
    return result;
}

// The documented outcomes of read_image: an Error naming the file, or an 8-bit BGR image of the size
// the file declares.
void expect_error_or_image(const std::string& path, cv::Size declared, const std::string& label) {
    const ReadResult image = try_read([&] { return read_image(path); });
    if (image.error) {
        EXPECT_NE(image.error->find(path), std::string::npos) << label << ": " << *image.error;
    } else {
        EXPECT_EQ(image.image.type(), CV_8UC3) << label;
        EXPECT_EQ(image.image.size(), declared) << label;
    }
    const ReadResult mask = try_read([&] { return read_mask(path); });
    EXPECT_EQ(mask.error.has_value(), image.error.has_value()) << label;
    if (!mask.error) {
        double low = 0, high = 0;
        cv::minMaxLoc(mask.image, &low, &high);
        EXPECT_EQ(mask.image.type(), CV_8UC1) << label;
        EXPECT_TRUE(low >= 0 && high <= 1) << label;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------- images

TEST(HostileImages, EmptyFilesAreNamedByScanAndReaders) {
    TempDir dir;
    ASSERT_TRUE(cv::imwrite((dir.path / "images" / "a.png").string(), noise(16, 12, CV_8UC3, 1)));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "a.png").string(), disc_mask(16, 12)));
    write_bytes(dir.path / "images" / "e.jpg", {});
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "e.png").string(), disc_mask(16, 12)));
    const std::string empty = (dir.path / "images" / "e.jpg").string();
    for (bool full_decode : {false, true}) {
        ScanOptions options;
        options.full_decode = full_decode;
        EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), empty);
        EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), "empty");
        options.skip_bad = true;
        const Dataset data = scan_dataset(dir.str(), options);
        EXPECT_EQ(data.ids(), std::vector<std::string>{"a"});
        ASSERT_EQ(data.skipped.size(), 1u);
        EXPECT_EQ(data.skipped[0].file, empty);
    }
    EXPECT_ERROR_MENTIONS(read_image(empty), empty);
    EXPECT_ERROR_MENTIONS(read_mask(empty), "empty (0 bytes)");

    // An empty mask next to a good image.
    fs::remove(empty);
    ASSERT_TRUE(cv::imwrite((dir.path / "images" / "e.png").string(), noise(16, 12, CV_8UC3, 2)));
    write_bytes(dir.path / "masks" / "e.png", {});
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str()), (dir.path / "masks" / "e.png").string());
}

TEST(HostileImages, EveryTruncationIsAnErrorOrTheFullImage) {
    TempDir dir;
    const cv::Size size(24, 16);
    for (const std::string ext : {".png", ".jpg", ".bmp", ".tif"}) {
        const Bytes full = encode(ext, noise(size.width, size.height, CV_8UC3, 3));
        ASSERT_GT(full.size(), 64u) << ext;
        const std::string path = (dir.path / "images" / ("t" + ext)).string();
        // Every length near the start and the end, where headers and end markers are; a stride between.
        const size_t stride = std::max<size_t>(1, full.size() / 48);
        for (size_t length = 0; length < full.size(); length += (length < 64 || length + 64 > full.size()) ? 1 : stride) {
            write_bytes(path, Bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(length)));
            const std::string label = ext + " cut to " + std::to_string(length) + " of " + std::to_string(full.size());
            SCOPED_TRACE(label);
            expect_error_or_image(path, size, label);
            // libjpeg would fill a truncated JPEG with grey; the reader must refuse it instead.
            if (ext == ".jpg") EXPECT_ERROR_MENTIONS(read_image(path), path);
        }
        write_bytes(path, full);
        EXPECT_EQ(read_image(path).size(), size) << ext;
    }
}

TEST(HostileImages, TruncatedJpegPassesTheHeaderScanButNotLoadOrFullDecode) {
    TempDir dir;
    const Bytes full = encode(".jpg", noise(32, 24, CV_8UC3, 4));
    write_bytes(dir.path / "images" / "t.jpg", Bytes(full.begin(), full.end() - 40));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "t.png").string(), disc_mask(32, 24)));
    const Dataset data = scan_dataset(dir.str());  // sizes come from the header, which is intact
    ASSERT_EQ(data.size(), 1u);
    EXPECT_EQ(data.samples[0].width, 32);
    EXPECT_ERROR_MENTIONS(load_sample(data, 0, PreprocessOptions{}), "truncated JPEG");
    ScanOptions options;
    options.full_decode = true;
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), (dir.path / "images" / "t.jpg").string());

    // Zero padding after the end-of-image marker is allowed.
    Bytes padded = full;
    padded.resize(padded.size() + 100, 0);
    write_bytes(dir.path / "images" / "t.jpg", padded);
    EXPECT_EQ(read_image((dir.path / "images" / "t.jpg").string()).size(), cv::Size(32, 24));
}

TEST(HostileImages, HeadersThatLieAboutTheData) {
    TempDir dir;
    const fs::path file = dir.path / "images" / "x";
    const std::string path = file.string();

    // PNG: IHDR says 100x100, the compressed rows are for 10x10.
    write_bytes(file, png_declaring(encode(".png", noise(10, 10, CV_8UC3, 5)), 100, 100));
    EXPECT_ERROR_MENTIONS(read_image(path), path);
    EXPECT_ERROR_MENTIONS(read_mask(path), path);

    // JPEG: SOF says 1000x600, the entropy-coded data is for 16x16. libjpeg pads the missing blocks and
    // warns: the documented result is an image of the declared size (or an Error).
    write_bytes(file, jpeg_declaring(encode(".jpg", noise(16, 16, CV_8UC3, 6)), 1000, 600));
    expect_error_or_image(path, {1000, 600}, "JPEG with a lying SOF");

    // BMP: 4000x4000 declared, 100 bytes of pixels; pixel data past the end of the file; negative width.
    write_bytes(file, bmp_declaring(4000, 4000, 54, 100));
    EXPECT_ERROR_MENTIONS(read_image(path), path);
    write_bytes(file, bmp_declaring(4, 4, 1u << 30, 48));
    EXPECT_ERROR_MENTIONS(read_image(path), path);
    write_bytes(file, bmp_declaring(-4, 4, 54, 48));
    EXPECT_ERROR_MENTIONS(read_image(path), "no image size");

    // TIFF: strip beyond the end of the file, strip longer than the file, IFD beyond the end.
    write_bytes(file, tiff_declaring(4, 4, 1u << 30, 48));
    EXPECT_ERROR_MENTIONS(read_image(path), path);
    write_bytes(file, tiff_declaring(64, 64, 8, 64 * 64 * 3));
    EXPECT_ERROR_MENTIONS(read_image(path), path);
    Bytes far_ifd = tiff_declaring(4, 4, 8, 48);
    far_ifd[4] = far_ifd[5] = far_ifd[6] = 0x7f;
    write_bytes(file, far_ifd);
    EXPECT_ERROR_MENTIONS(read_image(path), "no image size in its TIFF header");

    // A pair whose headers agree passes the fast scan; loading it then fails on the image.
    write_bytes(dir.path / "images" / "p.png", png_declaring(encode(".png", noise(10, 10, CV_8UC3, 7)), 40, 30));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "p.png").string(), disc_mask(40, 30)));
    fs::remove(file);
    const Dataset data = scan_dataset(dir.str());
    ASSERT_EQ(data.size(), 1u);
    EXPECT_ERROR_MENTIONS(load_sample(data, 0, PreprocessOptions{}), (dir.path / "images" / "p.png").string());
}

TEST(HostileImages, HugeDeclaredSizesAreRefusedBeforeDecoding) {
    TempDir dir;
    const fs::path file = dir.path / "images" / "h.png";
    const std::string path = file.string();
    const Bytes small_png = encode(".png", noise(8, 8, CV_8UC3, 8));
    const Bytes small_jpeg = encode(".jpg", noise(16, 16, CV_8UC3, 9));
    struct Case {
        std::string label;
        Bytes bytes;
    };
    const std::vector<Case> cases = {
        {"PNG 2^31-1 square", png_declaring(small_png, 0x7fffffff, 0x7fffffff)},
        {"PNG 4294967295 x 1", png_declaring(small_png, 0xffffffff, 1)},
        {"PNG 20000 x 20000", png_declaring(small_png, 20000, 20000)},
        // 20000 x 20000 from 600 bytes: libjpeg would allocate and grey-fill 1.2 GB.
        {"JPEG 20000 x 20000", jpeg_declaring(small_jpeg, 20000, 20000)},
        {"JPEG 65535 x 65535", jpeg_declaring(small_jpeg, 65535, 65535)},
        {"BMP 2^30 x 2", bmp_declaring(1 << 30, 2, 54, 64)},
        {"BMP 20000 x -20000 (top-down)", bmp_declaring(20000, -20000, 54, 64)},
        {"TIFF 100000 x 100000", tiff_declaring(100000, 100000, 8, 16)},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.label);
        write_bytes(file, c.bytes);
        EXPECT_ERROR_MENTIONS(read_image(path), "more than the limit");
        EXPECT_ERROR_MENTIONS(read_mask(path), "more than the limit");
    }

    // Through the scan, with the mask declaring the same size.
    write_bytes(file, png_declaring(small_png, 20000, 20000));
    write_bytes(dir.path / "masks" / "h.png", png_declaring(encode(".png", disc_mask(8, 8)), 20000, 20000));
    for (bool full_decode : {false, true}) {
        ScanOptions options;
        options.full_decode = full_decode;
        EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), path);
        EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), "more than the limit");
    }

    // Zero sizes, and a caller's own, lower limit.
    write_bytes(file, png_declaring(small_png, 0, 8));
    EXPECT_ERROR_MENTIONS(read_image(path), "empty 0x8 image");
    write_bytes(file, small_png);
    EXPECT_EQ(read_image(path).size(), cv::Size(8, 8));
    EXPECT_ERROR_MENTIONS(read_image(path, 63), "more than the limit of 63");
    EXPECT_EQ(read_mask(path, 64).size(), cv::Size(8, 8));
}

TEST(HostileImages, OddFormatsDecodeToEightBitOrAreRefused) {
    TempDir dir;
    const fs::path file = dir.path / "images" / "o.png";
    const std::string path = file.string();
    const cv::Size size(12, 10);
    // Decoded to 8-bit BGR by OpenCV: deeper, wider or narrower pixels, and content under another extension.
    const std::vector<std::pair<std::string, cv::Mat>> decodable = {
        {".png", noise(12, 10, CV_16UC3, 10)}, {".png", noise(12, 10, CV_8UC4, 11)},
        {".png", noise(12, 10, CV_16UC1, 12)}, {".jpg", noise(12, 10, CV_8UC1, 13)},
        {".bmp", noise(12, 10, CV_8UC1, 14)},  {".tif", noise(12, 10, CV_16UC3, 15)},
        {".tif", noise(12, 10, CV_8UC4, 16)},  {".jpg", noise(12, 10, CV_8UC3, 17)},  // a JPEG named .png
    };
    for (const auto& [ext, mat] : decodable) {
        write_bytes(file, encode(ext, mat));
        const cv::Mat image = read_image(path);
        EXPECT_EQ(image.type(), CV_8UC3) << ext << " type " << mat.type();
        EXPECT_EQ(image.size(), size) << ext << " type " << mat.type();
        EXPECT_EQ(read_mask(path).type(), CV_8UC1) << ext << " type " << mat.type();
    }
    // A float TIFF: whatever OpenCV makes of it, the documented answers only.
    write_bytes(file, encode(".tif", noise(12, 10, CV_32FC1, 18)));
    expect_error_or_image(path, size, "float TIFF");

    // Formats OpenCV could decode but the reader does not accept, whatever the extension says.
    const std::vector<std::pair<std::string, Bytes>> refused = {
        {"PPM", encode(".ppm", noise(12, 10, CV_8UC3, 19))},
        {"PGM header only", Bytes{'P', '5', '\n', '9', '9', '9', '9', '9', ' ', '9', '9', '9', '9', '9', '\n', '2', '5', '5', '\n'}},
        {"GIF signature", Bytes{'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0, 0, 0}},
        {"text", Bytes{'h', 'e', 'l', 'l', 'o', '\n'}},
        {"one byte", Bytes{0xFF}},
        {"JPEG SOI only", Bytes{0xFF, 0xD8}},
        {"PNG signature only", Bytes{0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A}},
        {"BMP magic only", Bytes{'B', 'M'}},
        {"TIFF header only", Bytes{'I', 'I', 42, 0, 8, 0, 0, 0}},
    };
    for (const auto& [label, bytes] : refused) {
        SCOPED_TRACE(label);
        write_bytes(file, bytes);
        EXPECT_ERROR_MENTIONS(read_image(path), path);
        EXPECT_ERROR_MENTIONS(read_mask(path), path);
    }
    EXPECT_ERROR_MENTIONS(read_image(path), "no image size in its TIFF header");
    write_bytes(file, Bytes{'P', '6', '\n', '4', ' ', '4', '\n', '2', '5', '5', '\n'});
    EXPECT_ERROR_MENTIONS(read_image(path), "not a JPEG, PNG, TIFF or BMP file (it starts with 50 36 0a 34");

    // A folder named like an image, and a missing file.
    fs::create_directories(dir.path / "images" / "folder.png");
    EXPECT_ERROR_MENTIONS(read_image((dir.path / "images" / "folder.png").string()), "folder.png");
    EXPECT_ERROR_MENTIONS(read_mask((dir.path / "masks" / "missing.png").string()), "cannot open");
}

TEST(HostileImages, MaskValuesOtherThanZeroAnd255AreThresholdedAt128) {
    TempDir dir;
    // Every grey level once: 0..127 -> 0, 128..255 -> 1.
    cv::Mat levels(16, 16, CV_8UC1);
    for (int i = 0; i < 256; ++i) levels.at<uint8_t>(i / 16, i % 16) = static_cast<uint8_t>(i);
    const std::string png = (dir.path / "masks" / "levels.png").string();
    ASSERT_TRUE(cv::imwrite(png, levels));
    const cv::Mat mask = read_mask(png);
    ASSERT_EQ(mask.type(), CV_8UC1);
    for (int i = 0; i < 256; ++i) EXPECT_EQ(mask.at<uint8_t>(i / 16, i % 16), i >= 128 ? 1 : 0) << "grey " << i;

    // 16-bit masks scale to 8 bits first; colour masks go through the grey conversion.
    cv::Mat deep(2, 2, CV_16UC1);
    deep.at<uint16_t>(0, 0) = 0;
    deep.at<uint16_t>(0, 1) = 32767;  // 127 after >> 8
    deep.at<uint16_t>(1, 0) = 32768;  // 128
    deep.at<uint16_t>(1, 1) = 65535;
    const std::string deep_png = (dir.path / "masks" / "deep.png").string();
    ASSERT_TRUE(cv::imwrite(deep_png, deep));
    const cv::Mat deep_expected = (cv::Mat_<uint8_t>(2, 2) << 0, 0, 1, 1);
    EXPECT_EQ(cv::countNonZero(read_mask(deep_png) != deep_expected), 0);
    cv::Mat colour(2, 2, CV_8UC3, cv::Scalar(0, 0, 0));
    colour.at<cv::Vec3b>(0, 1) = {255, 255, 255};
    colour.at<cv::Vec3b>(1, 0) = {0, 0, 255};  // pure red: grey 76
    colour.at<cv::Vec3b>(1, 1) = {0, 255, 0};  // pure green: grey 150
    const std::string colour_png = (dir.path / "masks" / "colour.png").string();
    ASSERT_TRUE(cv::imwrite(colour_png, colour));
    const cv::Mat colour_expected = (cv::Mat_<uint8_t>(2, 2) << 0, 1, 0, 1);
    EXPECT_EQ(cv::countNonZero(read_mask(colour_png) != colour_expected), 0);

    // Through load_sample: the model-size mask is exactly {0, 1}.
    ASSERT_TRUE(cv::imwrite((dir.path / "images" / "levels.png").string(), noise(16, 16, CV_8UC3, 20)));
    fs::remove(deep_png);
    fs::remove(colour_png);
    const Dataset data = scan_dataset(dir.str());
    PreprocessOptions options;
    options.width = options.height = 16;
    const Sample sample = load_sample(data, 0, options);
    int ones = 0;
    for (int64_t i = 0; i < sample.mask.num_elements(); ++i) {
        const float value = sample.mask.f32()[i];
        EXPECT_TRUE(value == 0.0f || value == 1.0f) << value;
        ones += value == 1.0f;
    }
    EXPECT_EQ(ones, 128);
}

// ---------------------------------------------------------------------------------------------- weights

TEST(HostileWeights, EmptyTruncatedLyingAndHugeFiles) {
    TempDir dir;
    const std::string path = (dir.path / "w.safetensors").string();
    TensorMap tensors;
    tensors["a.weight"] = HostTensor::zeros({2, 3});
    tensors["b.bias"] = HostTensor::zeros({3}, DType::s8);
    for (int i = 0; i < 6; ++i) tensors["a.weight"].f32()[i] = 0.5f * static_cast<float>(i);
    save_safetensors(path, tensors);
    std::ifstream in(path, std::ios::binary);
    const Bytes full((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_EQ(load_safetensors(path).tensors.size(), 2u);

    // Every truncation is refused, naming the file.
    for (size_t length = 0; length < full.size(); ++length) {
        SCOPED_TRACE("cut to " + std::to_string(length));
        write_bytes(path, Bytes(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(length)));
        EXPECT_ERROR_MENTIONS(load_safetensors(path), path);
    }

    auto with_header = [](const std::string& header, size_t data_bytes, std::optional<uint64_t> declared = {}) {
        Bytes bytes;
        append_le(bytes, declared.value_or(header.size()), 8);
        bytes.insert(bytes.end(), header.begin(), header.end());
        bytes.resize(bytes.size() + data_bytes, 0);
        return bytes;
    };
    const std::vector<std::pair<Bytes, std::string>> cases = {
        {with_header("{}", 0, UINT64_MAX), "header length"},
        {with_header("{}", 0, 1ull << 40), "header length"},
        {with_header(R"({"t":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}})", 4),
         "overflows"},
        {with_header(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "exceed"},
        {with_header(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 8), "begin after"},
        {with_header(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}})", 8), "needs 16"},
        {with_header(R"({"t":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8), "unsupported dtype"},
        {with_header(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), "non-negative"},
        {with_header(R"([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]])", 0), "nests deeper"},
        {with_header("{\"t\":", 0), "not valid JSON"},
    };
    for (const auto& [bytes, text] : cases) {
        SCOPED_TRACE(text);
        write_bytes(path, bytes);
        EXPECT_ERROR_MENTIONS(load_safetensors(path), path);
        EXPECT_ERROR_MENTIONS(load_safetensors(path), text);
    }
    EXPECT_ERROR_MENTIONS(load_safetensors(dir.str()), dir.str());  // a folder
    EXPECT_ERROR_MENTIONS(load_safetensors(path + ".missing"), ".missing");
}

// A copy of the safetensors file at `from` in which element `index` of tensor `name` (F32) is `value`, with
// the checksum recomputed over the changed data: a file that another tool wrote, or one damaged before its
// checksum was taken. Byte surgery, since save_safetensors refuses non-finite values.
void write_poisoned(const fs::path& from, const fs::path& to, const std::string& name, size_t index, float value) {
    std::ifstream in(from, std::ios::binary);
    Bytes bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_GE(bytes.size(), 8u);
    uint64_t header_length = 0;
    for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | bytes[static_cast<size_t>(i)];
    const std::string header_text(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_length));
    const nlohmann::json header = nlohmann::json::parse(header_text);
    ASSERT_TRUE(header.contains(name)) << name;
    ASSERT_EQ(header[name]["dtype"], "F32");
    const size_t data_start = 8 + header_length;
    const size_t at = data_start + header[name]["data_offsets"][0].get<size_t>() + 4 * index;
    ASSERT_LT(at + 4, bytes.size() + 1);
    std::memcpy(bytes.data() + at, &value, sizeof(value));
    const std::string old_sum = header["__metadata__"][kSafetensorsChecksumKey].get<std::string>();
    const std::string new_sum = fmt::format("{:08x}", crc32(bytes.data() + data_start, bytes.size() - data_start));
    const size_t where = header_text.find("\"" + old_sum + "\"");
    ASSERT_NE(where, std::string::npos);
    std::memcpy(bytes.data() + 8 + where + 1, new_sum.data(), 8);  // same length: the header keeps its size
    write_bytes(to, bytes);
}

// Every loader refuses a model whose checksum is valid but which holds a NaN or an Inf: `predict` with an
// fp32 and with an int8 file, `train --init`, `train --resume`. Each is a one-line error naming the tensor
// and the first bad element, exit status 2 (bad input found before any work), nothing written, and the
// poisoned checkpoint is left as it was.
TEST(HostileWeights, NonFiniteValuesAreRefusedByEveryLoader) {
    const fs::path binary = fs::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet";
    if (!fs::exists(binary)) GTEST_SKIP() << binary << " is not built";
    TempDir dir;
    auto run = [&](const std::string& arguments, std::string* err) {
        const std::string command = binary.string() + " " + arguments + " >" + (dir.path / "stdout").string() + " 2>" +
                                    (dir.path / "stderr").string();
        const int status = std::system(command.c_str());
        std::ifstream in(dir.path / "stderr");
        *err = std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    };
    ResUNetConfig config;
    config.width = 4;
    config.depth = 2;
    config.height = config.width_px = 32;
    const Graph graph = build_resunet(config);
    const TensorMap weights = init_weights(graph, 7);
    const fs::path good = dir.path / "good.safetensors";
    save_safetensors(good.string(), weights, resunet_metadata(config));
    const fs::path good_int8 = dir.path / "good.int8.safetensors";
    const TensorMap int8 = quantize_model_weights(graph, weights);
    save_safetensors(good_int8.string(), int8, resunet_metadata(config));
    const std::string image = (dir.path / "images" / "a.png").string();
    cv::imwrite(image, noise(40, 30, CV_8UC3, 1));
    std::string err;
    ASSERT_EQ(run("predict " + image + " --model " + good.string() + " --out " + (dir.path / "ok").string(), &err), 0)
        << err;

    auto expect_refused = [&](const std::string& arguments, const std::string& tensor, const std::string& what,
                              const fs::path& not_created) {
        SCOPED_TRACE(arguments);
        EXPECT_EQ(run(arguments, &err), 2) << err;
        EXPECT_NE(err.find("tensor '" + tensor + "'"), std::string::npos) << err;
        EXPECT_NE(err.find(what), std::string::npos) << err;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
        if (!not_created.empty()) {
            EXPECT_FALSE(fs::exists(not_created)) << not_created;
        }
        std::cout << "  refused: " << err;
    };
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();

    // predict, fp32 file: one NaN in d2.conv_a.weight (element 13 of [4, 8, 3, 3] is [0, 1, 1, 1]).
    const fs::path bad = dir.path / "nan.safetensors";
    write_poisoned(good, bad, "d2.conv_a.weight", 13, nan);
    expect_refused("predict " + image + " --model " + bad.string() + " --out " + (dir.path / "pred").string(),
                   "d2.conv_a.weight", "element 13 (index [0, 1, 1, 1]) is NaN", dir.path / "pred");

    // predict, int8 file: an Inf in the first F32 tensor that is not a weight (a scale or a bias).
    std::string float_tensor;
    for (const auto& [name, tensor] : int8)
        if (tensor.dtype == DType::f32 && float_tensor.empty()) float_tensor = name;
    ASSERT_FALSE(float_tensor.empty());
    const fs::path bad_int8 = dir.path / "inf.int8.safetensors";
    write_poisoned(good_int8, bad_int8, float_tensor, 0, inf);
    expect_refused("predict " + image + " --model " + bad_int8.string() + " --out " + (dir.path / "pred8").string(),
                   float_tensor, "element 0 (index [0", dir.path / "pred8");

    // train --init with the NaN file: refused before the run starts.
    const std::string data = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";
    const std::string train = "train --data " + data + " --width 4 --depth 2 --size 32 --batch 4 --limit 8 --threads 1 "
                              "--loader-threads 1 --epochs ";
    expect_refused(train + "1 --out " + (dir.path / "init").string() + " --init " + bad.string(), "d2.conv_a.weight",
                   "is NaN", {});
    EXPECT_FALSE(fs::exists(dir.path / "init" / "last.safetensors"));

    // train --resume from a checkpoint with -Inf in an Adam moment: refused, the checkpoint kept as it was.
    const fs::path run_dir = dir.path / "run";
    ASSERT_EQ(run(train + "1 --out " + run_dir.string(), &err), 0) << err;
    const fs::path last = run_dir / "last.safetensors";
    write_poisoned(last, dir.path / "poisoned", "adam.exp_avg_sq.e1.conv_a.weight", 5, -inf);
    fs::rename(dir.path / "poisoned", last);
    std::ifstream before_in(last, std::ios::binary);
    const Bytes before((std::istreambuf_iterator<char>(before_in)), std::istreambuf_iterator<char>());
    expect_refused(train + "2 --resume --out " + run_dir.string(), "adam.exp_avg_sq.e1.conv_a.weight",
                   "element 5 (index [0, 0, 1, 2]) is -Inf", {});
    std::ifstream after_in(last, std::ios::binary);
    EXPECT_EQ(Bytes((std::istreambuf_iterator<char>(after_in)), std::istreambuf_iterator<char>()), before);
}

// ---------------------------------------------------------------------------------------------- splits

TEST(HostileSplits, BrokenAndLyingSplitFiles) {
    TempDir dir;
    Dataset data;
    data.root = dir.str();
    for (const char* id : {"a", "b", "c"}) data.samples.push_back({id, "", "", 8, 8});
    const std::string path = (dir.path / "split.json").string();
    const std::string good = R"({"format":"resunet-split","version":1,"train":["a","b"],"test":["c"]})";
    const std::vector<std::pair<std::string, std::string>> cases = {
        {"", "not valid JSON"},
        {good.substr(0, good.size() / 2), "not valid JSON"},
        {R"({"format":7,"version":1,"train":[],"test":[]})", "\"format\" must be"},
        {R"({"format":["resunet-split"],"version":1,"train":[],"test":[]})", "\"format\" must be"},
        {R"({"format":"resunet-split","version":4294967297,"train":[],"test":[]})", "unsupported \"version\""},
        {R"({"format":"resunet-split","version":1.0,"train":[],"test":[]})", "unsupported \"version\""},
        {R"({"format":"resunet-split","version":1,"seed":-1,"train":[],"test":[]})", "\"seed\""},
        {R"({"format":"resunet-split","version":1,"train":"a","test":[]})", "\"train\" must be an array"},
        {R"({"format":"resunet-split","version":1,"train":[1],"test":[]})", "non-string"},
        {R"({"format":"resunet-split","version":1,"train":["a","a"],"test":[]})", "appears twice"},
        {R"({"format":"resunet-split","version":1,"train":["a"],"test":["a"]})", "both"},
        {R"({"format":"resunet-split","version":1,"train":["zz"],"test":[]})", "unknown id"},
        {std::string(100000, '['), "not valid JSON"},
    };
    for (const auto& [text, expected] : cases) {
        SCOPED_TRACE(text.substr(0, 80));
        std::ofstream(path, std::ios::trunc) << text;
        EXPECT_ERROR_MENTIONS(load_split(path, data), path);
        EXPECT_ERROR_MENTIONS(load_split(path, data), expected);
    }
    std::ofstream(path, std::ios::trunc) << good;
    EXPECT_EQ(load_split(path, data).test_ids, std::vector<std::string>{"c"});
}
