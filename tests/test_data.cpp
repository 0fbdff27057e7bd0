// Tests for data/: dataset scanning and errors, preprocessing, augmentation, splits, metrics, loader.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/augment.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/metrics.h"
#include "data/random.h"
#include "data/sha256.h"
#include "data/split.h"

namespace fs = std::filesystem;
using namespace resunet;

namespace {

const std::string kKvasirRoot = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";

// Message of the resunet::Error f throws, or "<no error>".
template <typename F>
std::string error_of(F&& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "<no error>";
}

#define EXPECT_ERROR_MENTIONS(expr, text)                                   \
    do {                                                                    \
        std::string message_ = error_of([&] { (void)(expr); });             \
        EXPECT_NE(message_.find(text), std::string::npos)                   \
            << "message: " << message_ << "\nexpected to mention: " << (text); \
    } while (0)

// A scratch directory removed when the test ends.
struct TempDir {
    fs::path path;
    TempDir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("resunet_test_data_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
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

cv::Mat synthetic_image(int width, int height, int seed) {
    cv::Mat image(height, width, CV_8UC3);
    cv::RNG rng(static_cast<uint64_t>(seed) + 1);
    rng.fill(image, cv::RNG::UNIFORM, 0, 256);
    return image;
}

cv::Mat synthetic_mask(int width, int height) {
    cv::Mat mask(height, width, CV_8UC1, cv::Scalar(0));
    cv::circle(mask, cv::Point(width / 2, height / 2), std::min(width, height) / 3, cv::Scalar(255), cv::FILLED);
    return mask;
}

void write_pair(const TempDir& dir, const std::string& stem, const std::string& ext, int width, int height,
                int mask_width = -1, int mask_height = -1) {
    ASSERT_TRUE(cv::imwrite((dir.path / "images" / (stem + ext)).string(), synthetic_image(width, height, width)));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / (stem + ext)).string(),
                            synthetic_mask(mask_width > 0 ? mask_width : width, mask_height > 0 ? mask_height : height)));
}

void write_bytes(const fs::path& path, const std::vector<uint8_t>& bytes) {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<uint8_t> random_bytes(size_t size, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<uint8_t> bytes(size);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
    bytes[0] = 0x00;  // never a JPEG/PNG/BMP/TIFF signature
    return bytes;
}

// A PNG with a valid signature and IHDR (so headers look fine) followed by garbage.
std::vector<uint8_t> truncated_png(int width, int height) {
    std::vector<uint8_t> bytes = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    for (int v : {width, height})
        for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(static_cast<uint8_t>(v >> shift));
    for (uint8_t b : {8, 2, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef}) bytes.push_back(b);
    std::vector<uint8_t> tail = random_bytes(64, 3);
    bytes.insert(bytes.end(), tail.begin(), tail.end());
    return bytes;
}

bool kvasir_available() { return fs::is_directory(kKvasirRoot + "/images"); }

const Dataset& kvasir() {
    static const Dataset dataset = scan_dataset(kKvasirRoot);
    return dataset;
}

#define REQUIRE_KVASIR() \
    if (!kvasir_available()) GTEST_SKIP() << "no dataset at " << kKvasirRoot

bool same_bytes(const HostTensor& a, const HostTensor& b) { return a.shape == b.shape && a.bytes == b.bytes; }

}  // namespace

// ---------------------------------------------------------------------------------------------- SHA-256

TEST(Sha256, KnownVectors) {
    EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    EXPECT_EQ(sha256_hex(two_blocks.data(), two_blocks.size()),
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    std::vector<uint8_t> data = random_bytes(1000, 11);
    Sha256 hasher;
    for (size_t offset = 0, step = 1; offset < data.size(); offset += step, step = step * 2 + 1)
        hasher.update(data.data() + offset, std::min(step, data.size() - offset));
    EXPECT_EQ(hasher.final_hex(), sha256_hex(data.data(), data.size()));
}

// ---------------------------------------------------------------------------------------------- real data

TEST(RealData, ScanFindsAllPairsWithHeaderSizes) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    ASSERT_EQ(data.size(), 1000u);
    EXPECT_TRUE(data.skipped.empty());
    for (size_t i = 1; i < data.size(); ++i) ASSERT_LT(data.samples[i - 1].id, data.samples[i].id);
    // The authors' bounding-box file records every image's size: the JPEG header parser must agree.
    std::ifstream in(kKvasirRoot + "/kavsir_bboxes.json");
    const nlohmann::json boxes = nlohmann::json::parse(in);
    ASSERT_EQ(boxes.size(), 1000u);
    for (const SampleInfo& s : data.samples) {
        ASSERT_TRUE(boxes.contains(s.id)) << s.id;
        EXPECT_EQ(s.width, boxes[s.id]["width"].get<int>()) << s.id;
        EXPECT_EQ(s.height, boxes[s.id]["height"].get<int>()) << s.id;
    }
    ASSERT_TRUE(data.find(data.samples[17].id));
    EXPECT_EQ(*data.find(data.samples[17].id), 17u);
    EXPECT_FALSE(data.find("no-such-id"));
}

TEST(RealData, ManifestVerifies) {
    REQUIRE_KVASIR();
    ScanOptions options;
    options.verify_manifest = true;
    const Dataset data = scan_dataset(kKvasirRoot, options);
    EXPECT_EQ(data.size(), 1000u);
    EXPECT_TRUE(data.skipped.empty());
}

TEST(RealData, LoadSampleShapesRangesAndChannelOrder) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    PreprocessOptions options;
    for (size_t index : {size_t(0), size_t(500), size_t(999)}) {
        const SampleInfo& info = data.samples[index];
        const Sample s = load_sample(data, index, options);
        EXPECT_EQ(s.id, info.id);
        EXPECT_EQ(s.image.shape, (Dims{3, 224, 224}));
        EXPECT_EQ(s.mask.shape, (Dims{224, 224}));
        EXPECT_EQ(s.original_width, info.width);
        EXPECT_EQ(s.original_height, info.height);
        ASSERT_EQ(s.original_mask.type(), CV_8UC1);
        EXPECT_EQ(s.original_mask.cols, info.width);
        EXPECT_EQ(s.original_mask.rows, info.height);

        const float* image = s.image.f32();
        for (int c = 0; c < 3; ++c) {
            const float low = (0.0f - kImageNetMean[c]) / kImageNetStd[c] - 1e-5f;
            const float high = (1.0f - kImageNetMean[c]) / kImageNetStd[c] + 1e-5f;
            for (int i = 0; i < 224 * 224; ++i) {
                const float v = image[c * 224 * 224 + i];
                ASSERT_TRUE(std::isfinite(v) && v >= low && v <= high) << "channel " << c << " value " << v;
            }
        }
        double foreground = 0;
        for (int i = 0; i < 224 * 224; ++i) {
            const float v = s.mask.f32()[i];
            ASSERT_TRUE(v == 0.0f || v == 1.0f) << v;
            foreground += v;
        }
        foreground /= 224.0 * 224.0;
        double max_value;
        cv::minMaxLoc(s.original_mask, nullptr, &max_value);
        EXPECT_EQ(max_value, 1.0);
        const double original_foreground = cv::countNonZero(s.original_mask) / double(info.width * info.height);
        EXPECT_GT(foreground, 0.0);
        EXPECT_LT(foreground, 1.0);
        EXPECT_NEAR(foreground, original_foreground, 0.03);

        // RGB planes: plane 0 is the file's red channel, resized with INTER_AREA, normalised.
        cv::Mat bgr = cv::imread(info.image_path, cv::IMREAD_COLOR), small;
        cv::resize(bgr, small, cv::Size(224, 224), 0, 0, cv::INTER_AREA);
        for (auto [y, x] : {std::pair{0, 0}, std::pair{100, 57}, std::pair{223, 223}}) {
            const cv::Vec3b pixel = small.at<cv::Vec3b>(y, x);
            for (int c = 0; c < 3; ++c) {
                const float expected = (pixel[2 - c] / 255.0f - kImageNetMean[c]) / kImageNetStd[c];
                EXPECT_NEAR(image[(c * 224 + y) * 224 + x], expected, 1e-5f);
            }
        }
    }
    EXPECT_ERROR_MENTIONS(load_sample(data, 1000, options), "out of range");
}

// ---------------------------------------------------------------------------------------------- synthetic data

TEST(Synthetic, MixedFormatsSortedAndIgnoredFiles) {
    TempDir dir;
    write_pair(dir, "d", ".tiff", 40, 30);
    write_pair(dir, "b", ".jpg", 50, 20);
    write_pair(dir, "a", ".png", 33, 41);
    write_pair(dir, "c", ".bmp", 64, 48);
    std::ofstream(dir.path / "images" / "notes.txt") << "not an image";
    std::ofstream(dir.path / "masks" / ".hidden.png") << "ignored";
    for (bool full_decode : {false, true}) {
        ScanOptions options;
        options.full_decode = full_decode;
        const Dataset data = scan_dataset(dir.str(), options);
        ASSERT_EQ(data.ids(), (std::vector<std::string>{"a", "b", "c", "d"}));
        EXPECT_TRUE(data.skipped.empty());
        EXPECT_EQ(data.samples[0].width, 33);
        EXPECT_EQ(data.samples[0].height, 41);
        EXPECT_EQ(data.samples[1].width, 50);
        EXPECT_EQ(data.samples[2].width, 64);
        EXPECT_EQ(data.samples[3].height, 30);
        PreprocessOptions prep;
        prep.width = 32;
        prep.height = 24;
        for (size_t i = 0; i < data.size(); ++i) {
            const Sample s = load_sample(data, i, prep);
            EXPECT_EQ(s.image.shape, (Dims{3, 24, 32}));
            EXPECT_EQ(s.mask.shape, (Dims{24, 32}));
            EXPECT_EQ(s.original_mask.cols, data.samples[i].width);
        }
    }
}

TEST(Synthetic, OrphanImageAndOrphanMask) {
    TempDir dir;
    write_pair(dir, "a", ".png", 20, 20);
    write_pair(dir, "c", ".png", 20, 20);
    ASSERT_TRUE(cv::imwrite((dir.path / "images" / "b.png").string(), synthetic_image(20, 20, 1)));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "z.jpg").string(), synthetic_mask(20, 20)));
    const std::string message = error_of([&] { scan_dataset(dir.str()); });
    EXPECT_NE(message.find("b.png"), std::string::npos) << message;
    EXPECT_NE(message.find("orphan image"), std::string::npos) << message;
    EXPECT_NE(message.find("1 more problem"), std::string::npos) << message;

    ScanOptions options;
    options.skip_bad = true;
    const Dataset data = scan_dataset(dir.str(), options);
    EXPECT_EQ(data.ids(), (std::vector<std::string>{"a", "c"}));
    ASSERT_EQ(data.skipped.size(), 2u);
    EXPECT_EQ(fs::path(data.skipped[0].file).filename(), "b.png");
    EXPECT_NE(data.skipped[0].reason.find("orphan image"), std::string::npos);
    EXPECT_EQ(fs::path(data.skipped[1].file).filename(), "z.jpg");
    EXPECT_NE(data.skipped[1].reason.find("orphan mask"), std::string::npos);
}

TEST(Synthetic, CorruptImageWithAndWithoutSkip) {
    TempDir dir;
    write_pair(dir, "a", ".png", 20, 20);
    write_bytes(dir.path / "images" / "bad.jpg", random_bytes(2000, 7));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "bad.jpg").string(), synthetic_mask(20, 20)));
    for (bool full_decode : {false, true}) {
        ScanOptions options;
        options.full_decode = full_decode;
        EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), (dir.path / "images" / "bad.jpg").string());
        options.skip_bad = true;
        const Dataset data = scan_dataset(dir.str(), options);
        EXPECT_EQ(data.ids(), std::vector<std::string>{"a"});
        ASSERT_EQ(data.skipped.size(), 1u);
        EXPECT_EQ(fs::path(data.skipped[0].file).filename(), "bad.jpg");
        EXPECT_NE(data.skipped[0].reason.find("decode"), std::string::npos);
    }
    // A corrupt mask is named too.
    write_pair(dir, "bad", ".jpg", 20, 20);
    write_bytes(dir.path / "masks" / "bad.jpg", random_bytes(100, 8));
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str()), (dir.path / "masks" / "bad.jpg").string());
}

TEST(Synthetic, SizeMismatchWithAndWithoutSkip) {
    TempDir dir;
    write_pair(dir, "a", ".png", 20, 20);
    write_pair(dir, "m", ".jpg", 30, 20, 20, 30);
    const std::string message = error_of([&] { scan_dataset(dir.str()); });
    EXPECT_NE(message.find((dir.path / "masks" / "m.jpg").string()), std::string::npos) << message;
    EXPECT_NE(message.find("20x30"), std::string::npos) << message;
    ScanOptions options;
    options.skip_bad = true;
    const Dataset data = scan_dataset(dir.str(), options);
    EXPECT_EQ(data.ids(), std::vector<std::string>{"a"});
    ASSERT_EQ(data.skipped.size(), 1u);
    EXPECT_NE(data.skipped[0].reason.find("(WxH)"), std::string::npos);
}

TEST(Synthetic, HeaderOkButDataBrokenIsCaughtByFullDecodeAndLoad) {
    TempDir dir;
    write_pair(dir, "a", ".png", 20, 20);
    write_bytes(dir.path / "images" / "t.png", truncated_png(20, 20));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "t.png").string(), synthetic_mask(20, 20)));
    const Dataset fast = scan_dataset(dir.str());  // header scan cannot tell
    ASSERT_EQ(fast.size(), 2u);
    EXPECT_ERROR_MENTIONS(load_sample(fast, 1, PreprocessOptions{}), (dir.path / "images" / "t.png").string());
    ScanOptions options;
    options.full_decode = true;
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), (dir.path / "images" / "t.png").string());
}

TEST(Synthetic, ManifestMismatchMissingAndUnlisted) {
    TempDir dir;
    write_pair(dir, "a", ".png", 20, 20);
    write_pair(dir, "b", ".png", 21, 21);
    write_bytes(dir.path / "extra.json", {'{', '}'});
    auto write_manifest = [&](const std::vector<std::string>& files) {
        std::ofstream out(dir.path / "manifest.sha256");
        for (const std::string& f : files) out << sha256_file_hex((dir.path / f).string()) << "  " << f << "\n";
    };
    const std::vector<std::string> all = {"extra.json", "images/a.png", "masks/a.png", "images/b.png", "masks/b.png"};
    write_manifest(all);
    ScanOptions options;
    options.verify_manifest = true;
    EXPECT_EQ(scan_dataset(dir.str(), options).size(), 2u);

    // Tampered mask.
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "b.png").string(), synthetic_mask(21, 21) / 2));
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), (dir.path / "masks" / "b.png").string());
    options.skip_bad = true;
    Dataset data = scan_dataset(dir.str(), options);
    EXPECT_EQ(data.ids(), std::vector<std::string>{"a"});
    ASSERT_EQ(data.skipped.size(), 1u);
    EXPECT_NE(data.skipped[0].reason.find("SHA-256"), std::string::npos);

    // Unlisted file, missing listed file, malformed manifest.
    write_manifest({"extra.json", "images/a.png", "masks/a.png", "images/b.png"});
    options.skip_bad = false;
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), "not listed in manifest");
    write_manifest(all);
    std::ofstream(dir.path / "manifest.sha256", std::ios::app) << std::string(64, '0') << "  images/gone.png\n";
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), (dir.path / "images" / "gone.png").string());
    std::ofstream(dir.path / "manifest.sha256") << "not a manifest line\n";
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str(), options), "manifest.sha256:1");
}

TEST(Synthetic, MissingFoldersAndEmptyDataset) {
    EXPECT_ERROR_MENTIONS(scan_dataset("/nonexistent/resunet"), "/nonexistent/resunet/images");
    TempDir dir;
    EXPECT_ERROR_MENTIONS(scan_dataset(dir.str()), "no usable image/mask pairs");
}

// ---------------------------------------------------------------------------------------------- augmentation

TEST(Augment, DrawIsDeterministicAndSpread) {
    const AugmentOptions options;
    int rotations = 0, flips = 0, epoch_changes = 0;
    for (uint64_t index = 0; index < 1000; ++index) {
        const AugmentParams a = draw_augment(options, 7, 3, index);
        const AugmentParams b = draw_augment(options, 7, 3, index);
        ASSERT_EQ(a.rotate, b.rotate);
        ASSERT_EQ(a.flip, b.flip);
        ASSERT_EQ(a.angle_degrees, b.angle_degrees);
        EXPECT_LE(std::abs(a.angle_degrees), kDefaultMaxRotationDegrees);
        if (!a.rotate) {
            EXPECT_EQ(a.angle_degrees, 0.0);
        }
        rotations += a.rotate;
        flips += a.flip;
        const AugmentParams other = draw_augment(options, 7, 4, index);
        epoch_changes += other.flip != a.flip || other.angle_degrees != a.angle_degrees;
    }
    EXPECT_GT(rotations, 430);
    EXPECT_LT(rotations, 570);
    EXPECT_GT(flips, 430);
    EXPECT_LT(flips, 570);
    EXPECT_GT(epoch_changes, 500);
    AugmentOptions never;
    never.rotate_probability = never.flip_probability = 0.0;
    const AugmentParams none = draw_augment(never, 1, 1, 1);
    EXPECT_FALSE(none.rotate || none.flip);
}

TEST(Augment, FlipMatchesCvFlip) {
    cv::Mat image = synthetic_image(31, 17, 5), mask = synthetic_mask(31, 17) / 255;
    cv::Mat expected_image, expected_mask;
    cv::flip(image, expected_image, 1);
    cv::flip(mask, expected_mask, 1);
    AugmentParams params;
    params.flip = true;
    apply_augment(params, image, mask);
    EXPECT_EQ(cv::norm(image, expected_image, cv::NORM_INF), 0.0);
    EXPECT_EQ(cv::norm(mask, expected_mask, cv::NORM_INF), 0.0);
    AugmentParams identity;
    identity.rotate = true;  // angle 0
    cv::Mat before = image.clone();
    apply_augment(identity, image, mask);
    EXPECT_EQ(cv::norm(image, before, cv::NORM_INF), 0.0);
    cv::Mat wrong_mask(5, 5, CV_8U);
    EXPECT_ERROR_MENTIONS(apply_augment(params, image, wrong_mask), "apply_augment");
}

TEST(Augment, RotationMovesImageAndMaskTogether) {
    cv::Mat mask(64, 64, CV_8U, cv::Scalar(0));
    cv::rectangle(mask, cv::Rect(8, 20, 40, 16), cv::Scalar(1), cv::FILLED);
    cv::Mat image;
    cv::cvtColor(mask * 255, image, cv::COLOR_GRAY2BGR);
    AugmentParams params;
    params.rotate = true;
    params.angle_degrees = 12.5;
    apply_augment(params, image, mask);
    double low, high;
    cv::minMaxLoc(mask, &low, &high);
    EXPECT_EQ(low, 0.0);
    EXPECT_EQ(high, 1.0);
    cv::Mat grey;
    cv::cvtColor(image, grey, cv::COLOR_BGR2GRAY);
    int agree = 0;
    for (int y = 0; y < 64; ++y)
        for (int x = 0; x < 64; ++x) agree += (grey.at<uint8_t>(y, x) >= 128) == (mask.at<uint8_t>(y, x) == 1);
    EXPECT_GT(agree, 64 * 64 * 97 / 100);
    // The rectangle really moved: its corner pixel is no longer foreground.
    EXPECT_EQ(mask.at<uint8_t>(20, 8), 0);
}

TEST(Augment, LoadSampleDeterministicAndFlipIsExact) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    const PreprocessOptions prep;
    const AugmentOptions options;
    const size_t index = 42;
    const AugmentParams params = draw_augment(options, 9, 2, index);
    const Sample a = load_sample(data, index, prep, params);
    const Sample b = load_sample(data, index, prep, params);
    EXPECT_TRUE(same_bytes(a.image, b.image));
    EXPECT_TRUE(same_bytes(a.mask, b.mask));

    // Find a draw that flips without rotating; the result must be the mirror of the plain sample.
    uint64_t seed = 0;
    AugmentParams flip_only;
    for (;; ++seed) {
        flip_only = draw_augment(options, seed, 0, index);
        if (flip_only.flip && !flip_only.rotate) break;
    }
    const Sample plain = load_sample(data, index, prep);
    const Sample flipped = load_sample(data, index, prep, flip_only);
    EXPECT_EQ(cv::norm(flipped.original_mask, plain.original_mask, cv::NORM_INF), 0.0);  // not augmented
    const int size = 224;
    for (int c = 0; c < 3; ++c)
        for (int y = 0; y < size; ++y)
            for (int x = 0; x < size; ++x)
                ASSERT_EQ(flipped.image.f32()[(c * size + y) * size + x],
                          plain.image.f32()[(c * size + y) * size + (size - 1 - x)]);
    for (int y = 0; y < size; ++y)
        for (int x = 0; x < size; ++x)
            ASSERT_EQ(flipped.mask.f32()[y * size + x], plain.mask.f32()[y * size + (size - 1 - x)]);
}

// ---------------------------------------------------------------------------------------------- splits

namespace {

bool same_side(const Split& split, const std::vector<std::string>& group) {
    auto in_test = [&](const std::string& id) {
        return std::binary_search(split.test_ids.begin(), split.test_ids.end(), id);
    };
    for (const std::string& id : group)
        if (in_test(id) != in_test(group.front())) return false;
    return true;
}

}  // namespace

TEST(Split, ReproducibleEightyTwenty) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    const Split a = make_split(data, 42), b = make_split(data, 42), c = make_split(data, 43);
    EXPECT_EQ(a.train_ids, b.train_ids);
    EXPECT_EQ(a.test_ids, b.test_ids);
    EXPECT_NE(a.test_ids, c.test_ids);
    EXPECT_EQ(a.train_ids.size(), 800u);
    EXPECT_EQ(a.test_ids.size(), 200u);
    std::vector<std::string> all = a.train_ids;
    all.insert(all.end(), a.test_ids.begin(), a.test_ids.end());
    std::sort(all.begin(), all.end());
    EXPECT_EQ(all, data.ids());  // disjoint and covering
    EXPECT_TRUE(std::is_sorted(a.test_ids.begin(), a.test_ids.end()));
    EXPECT_ERROR_MENTIONS(make_split(data, 1, 1.0), "test_fraction");
}

TEST(Split, NearDuplicatesAndExtraGroupsStayTogether) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    ASSERT_EQ(kvasir_near_duplicate_groups().size(), 3u);
    for (const auto& group : kvasir_near_duplicate_groups())
        for (const std::string& id : group) ASSERT_TRUE(data.find(id)) << id;
    const IdGroups extra = {{data.samples[1].id, data.samples[500].id, data.samples[900].id, data.samples[901].id}};
    int extra_in_test = 0, pair_in_test = 0;
    for (uint64_t seed = 0; seed < 60; ++seed) {
        const Split split = make_split(data, seed, 0.2, extra);
        for (const auto& group : kvasir_near_duplicate_groups()) ASSERT_TRUE(same_side(split, group)) << seed;
        ASSERT_TRUE(same_side(split, extra[0])) << seed;
        extra_in_test += std::binary_search(split.test_ids.begin(), split.test_ids.end(), extra[0][0]);
        const auto& pair = kvasir_near_duplicate_groups()[0];
        pair_in_test += std::binary_search(split.test_ids.begin(), split.test_ids.end(), pair[0]);
        EXPECT_EQ(split.test_ids.size(), 200u);
    }
    EXPECT_GT(pair_in_test, 0);  // the groups do move between sides
    EXPECT_GT(extra_in_test, 0);
}

TEST(Split, SaveLoadRoundTripAndValidation) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    TempDir dir;
    const std::string path = (dir.path / "split.json").string();
    const Split split = make_split(data, 5);
    save_split(split, path);
    const Split loaded = load_split(path, data);
    EXPECT_EQ(loaded.seed, 5u);
    EXPECT_DOUBLE_EQ(loaded.test_fraction, 0.2);
    EXPECT_EQ(loaded.train_ids, split.train_ids);
    EXPECT_EQ(loaded.test_ids, split.test_ids);

    auto rewrite = [&](const std::function<void(nlohmann::json&)>& edit) {
        std::ifstream in(path);
        nlohmann::json json = nlohmann::json::parse(in);
        in.close();
        edit(json);
        const std::string bad = (dir.path / "bad.json").string();
        std::ofstream(bad) << json.dump();
        return bad;
    };
    const std::string unknown = rewrite([](nlohmann::json& j) { j["test"].push_back("not-an-id"); });
    EXPECT_ERROR_MENTIONS(load_split(unknown, data), "not-an-id");
    EXPECT_ERROR_MENTIONS(load_split(unknown, data), unknown);
    const std::string duplicate = rewrite([](nlohmann::json& j) { j["train"].push_back(j["train"][0]); });
    EXPECT_ERROR_MENTIONS(load_split(duplicate, data), "appears twice");
    const std::string overlap = rewrite([](nlohmann::json& j) { j["test"].push_back(j["train"][3]); });
    EXPECT_ERROR_MENTIONS(load_split(overlap, data), "both");
    const auto& pair = kvasir_near_duplicate_groups()[1];
    const std::string separated = rewrite([&](nlohmann::json& j) {
        for (const char* side : {"train", "test"}) {
            auto& list = j[side];
            list.erase(std::remove_if(list.begin(), list.end(),
                                      [&](const nlohmann::json& id) { return id == pair[0] || id == pair[1]; }),
                       list.end());
        }
        j["train"].push_back(pair[0]);
        j["test"].push_back(pair[1]);
    });
    EXPECT_ERROR_MENTIONS(load_split(separated, data), "same side");
    const std::string not_json = (dir.path / "garbage.json").string();
    std::ofstream(not_json) << "{\"train\": [";
    EXPECT_ERROR_MENTIONS(load_split(not_json, data), not_json);
    EXPECT_ERROR_MENTIONS(load_split((dir.path / "missing.json").string(), data), "missing.json");
    EXPECT_ERROR_MENTIONS(save_split(split, (dir.path / "no" / "dir.json").string()), "dir.json");
}

TEST(Split, FoldsDisjointCoveringBalancedAndGrouped) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    const Split split = make_split(data, 11);
    const IdGroups extra = {{split.train_ids[0], split.train_ids[1], split.train_ids[2]}};
    const std::vector<Fold> folds = make_folds(split.train_ids, 5, 3, extra);
    ASSERT_EQ(folds.size(), 5u);
    std::vector<std::string> all_val;
    size_t smallest = SIZE_MAX, largest = 0;
    for (const Fold& fold : folds) {
        all_val.insert(all_val.end(), fold.val_ids.begin(), fold.val_ids.end());
        smallest = std::min(smallest, fold.val_ids.size());
        largest = std::max(largest, fold.val_ids.size());
        EXPECT_EQ(fold.train_ids.size() + fold.val_ids.size(), split.train_ids.size());
        std::vector<std::string> both;
        std::set_intersection(fold.train_ids.begin(), fold.train_ids.end(), fold.val_ids.begin(), fold.val_ids.end(),
                              std::back_inserter(both));
        EXPECT_TRUE(both.empty());
        auto in_val = [&](const std::string& id) { return std::binary_search(fold.val_ids.begin(), fold.val_ids.end(), id); };
        for (const auto& group : extra) EXPECT_EQ(in_val(group[0]), in_val(group[2]));
        for (const auto& group : kvasir_near_duplicate_groups()) EXPECT_EQ(in_val(group[0]), in_val(group[1]));
    }
    std::sort(all_val.begin(), all_val.end());
    EXPECT_EQ(all_val, split.train_ids);  // each training id validated exactly once
    EXPECT_LE(largest - smallest, 3u);
    const std::vector<Fold> again = make_folds(split.train_ids, 5, 3, extra);
    for (size_t f = 0; f < folds.size(); ++f) EXPECT_EQ(again[f].val_ids, folds[f].val_ids);
    EXPECT_NE(make_folds(split.train_ids, 5, 4)[0].val_ids, folds[0].val_ids);
    EXPECT_ERROR_MENTIONS(make_folds(split.train_ids, 1, 0), "k must be");
    EXPECT_ERROR_MENTIONS(make_folds({"a", "b"}, 3, 0), "groups");
    EXPECT_ERROR_MENTIONS(make_folds({"a", "a", "b"}, 2, 0), "more than once");
    EXPECT_ERROR_MENTIONS(indices_of(data, {"nope"}), "nope");
}

// ---------------------------------------------------------------------------------------------- metrics

TEST(Metrics, HandComputedCounts) {
    // prediction 1 1 0 / 0 0 0 vs truth 1 0 0 / 1 0 0: TP 1, FP 1, FN 1, TN 3.
    const cv::Mat prediction = (cv::Mat_<float>(2, 3) << 0.9f, 0.51f, 0.5f, 0.2f, 0.0f, 0.49f);
    const cv::Mat truth = (cv::Mat_<uint8_t>(2, 3) << 1, 0, 0, 1, 0, 0);
    const MaskMetrics m = compute_mask_metrics(prediction, truth);
    EXPECT_EQ(m.counts.true_positive, 1u);
    EXPECT_EQ(m.counts.false_positive, 1u);
    EXPECT_EQ(m.counts.false_negative, 1u);
    EXPECT_EQ(m.counts.true_negative, 3u);
    EXPECT_DOUBLE_EQ(m.dice, 0.5);
    EXPECT_DOUBLE_EQ(m.iou, 1.0 / 3.0);
    EXPECT_DOUBLE_EQ(m.background_iou, 0.6);
    EXPECT_DOUBLE_EQ(m.mean_iou, (0.6 + 1.0 / 3.0) / 2.0);
    // uint8 {0, 255} and float {0, 1} give the same answer.
    const cv::Mat truth_255 = truth * 255;
    cv::Mat truth_float;
    truth.convertTo(truth_float, CV_32F);
    EXPECT_DOUBLE_EQ(compute_mask_metrics(prediction, truth_255).dice, 0.5);
    EXPECT_DOUBLE_EQ(compute_mask_metrics(prediction, truth_float).iou, 1.0 / 3.0);
    // Perfect prediction.
    EXPECT_DOUBLE_EQ(compute_mask_metrics(truth_float, truth).dice, 1.0);
}

TEST(Metrics, EmptyMaskConventions) {
    const cv::Mat empty = cv::Mat::zeros(4, 4, CV_8U), full = cv::Mat::ones(4, 4, CV_8U);
    const MaskMetrics both_empty = compute_mask_metrics(empty, empty);
    EXPECT_EQ(both_empty.dice, 1.0);
    EXPECT_EQ(both_empty.iou, 1.0);
    EXPECT_EQ(both_empty.background_iou, 1.0);
    EXPECT_EQ(both_empty.mean_iou, 1.0);
    const MaskMetrics missed = compute_mask_metrics(empty, full);
    EXPECT_EQ(missed.dice, 0.0);
    EXPECT_EQ(missed.iou, 0.0);
    EXPECT_EQ(missed.background_iou, 0.0);
    const MaskMetrics hallucinated = compute_mask_metrics(full, empty);
    EXPECT_EQ(hallucinated.dice, 0.0);
    EXPECT_EQ(hallucinated.mean_iou, 0.0);
    const MaskMetrics both_full = compute_mask_metrics(full, full);
    EXPECT_EQ(both_full.iou, 1.0);
    EXPECT_EQ(both_full.background_iou, 1.0);
    EXPECT_ERROR_MENTIONS(compute_mask_metrics(empty, cv::Mat::zeros(4, 5, CV_8U)), "4x4");
    EXPECT_ERROR_MENTIONS(compute_mask_metrics(cv::Mat::zeros(4, 4, CV_8UC3), empty), "single-channel");
}

TEST(Metrics, PooledDiceAndSummary) {
    // Image 1: TP 1, FP 1, FN 1, TN 3 (Dice 0.5). Image 2: TP 3, FP 0, FN 0, TN 1 (Dice 1).
    PooledMetrics pooled;
    pooled.add((cv::Mat_<uint8_t>(2, 3) << 1, 1, 0, 0, 0, 0), (cv::Mat_<uint8_t>(2, 3) << 1, 0, 0, 1, 0, 0));
    pooled.add((cv::Mat_<uint8_t>(2, 2) << 1, 1, 1, 0), (cv::Mat_<uint8_t>(2, 2) << 1, 1, 1, 0));
    EXPECT_EQ(pooled.num_images(), 2u);
    EXPECT_EQ(pooled.totals().true_positive, 4u);
    EXPECT_EQ(pooled.totals().total(), 10u);
    EXPECT_DOUBLE_EQ(pooled.dice(), 8.0 / 10.0);  // 2*4 / (2*4 + 1 + 1), not the mean 0.75
    EXPECT_DOUBLE_EQ(pooled.iou(), 4.0 / 6.0);
    EXPECT_DOUBLE_EQ(pooled.mean_iou(), (4.0 / 6.0 + 4.0 / 6.0) / 2.0);  // background: TN 4 / (4 + 1 + 1)
    EXPECT_EQ(PooledMetrics().dice(), 1.0);

    const MetricSummary s = summarize({1.0, 2.0, 3.0, 4.0});
    EXPECT_EQ(s.count, 4u);
    EXPECT_DOUBLE_EQ(s.mean, 2.5);
    EXPECT_DOUBLE_EQ(s.std, std::sqrt(5.0 / 3.0));  // sample std, n - 1
    EXPECT_EQ(s.min, 1.0);
    EXPECT_EQ(s.max, 4.0);
    EXPECT_EQ(summarize({0.7}).std, 0.0);
    EXPECT_TRUE(std::isnan(summarize({}).mean));
}

TEST(Metrics, ResizeMaskNearestBackToOriginal) {
    const cv::Mat small = (cv::Mat_<float>(2, 2) << 0.9f, 0.1f, 0.2f, 0.8f);
    const cv::Mat big = resize_mask_nearest(small, 4, 6);
    ASSERT_EQ(big.cols, 4);
    ASSERT_EQ(big.rows, 6);
    ASSERT_EQ(big.type(), CV_32F);
    for (int y = 0; y < 6; ++y)
        for (int x = 0; x < 4; ++x) EXPECT_EQ(big.at<float>(y, x), small.at<float>(y / 3, x / 2)) << y << "," << x;
    EXPECT_ERROR_MENTIONS(resize_mask_nearest(small, 0, 3), "positive");
}

// ---------------------------------------------------------------------------------------------- loader

namespace {

std::vector<Batch> read_epoch(BatchLoader& loader, uint64_t epoch) {
    loader.start_epoch(epoch);
    std::vector<Batch> batches;
    Batch batch;
    while (loader.next(batch)) batches.push_back(std::move(batch));
    EXPECT_FALSE(loader.next(batch));  // stays finished
    return batches;
}

}  // namespace

TEST(Loader, SameBatchesWithOneAndTwoThreads) {
    REQUIRE_KVASIR();
    const Dataset& data = kvasir();
    const std::vector<size_t> indices = {3, 150, 299, 404, 512, 640, 777, 800, 901, 998};
    LoaderOptions options;
    options.batch_size = 4;
    options.shuffle = true;
    options.augment = AugmentOptions{};
    options.seed = 5;
    options.prefetch_batches = 2;
    options.preprocess.width = options.preprocess.height = 128;
    options.num_threads = 1;
    BatchLoader one(data, indices, options);
    options.num_threads = 2;
    BatchLoader two(data, indices, options);
    EXPECT_EQ(one.num_batches(), 3u);
    const std::vector<Batch> a = read_epoch(one, 2), b = read_epoch(two, 2);
    ASSERT_EQ(a.size(), 3u);
    ASSERT_EQ(b.size(), 3u);
    std::vector<size_t> seen;
    for (size_t i = 0; i < a.size(); ++i) {
        EXPECT_EQ(a[i].batch_index, i);
        EXPECT_EQ(a[i].epoch, 2u);
        EXPECT_EQ(a[i].indices, b[i].indices);
        EXPECT_TRUE(same_bytes(a[i].images, b[i].images)) << "batch " << i;
        EXPECT_TRUE(same_bytes(a[i].masks, b[i].masks)) << "batch " << i;
        const int64_t rows = i < 2 ? 4 : 2;
        EXPECT_EQ(a[i].images.shape, (Dims{rows, 3, 128, 128}));
        EXPECT_EQ(a[i].masks.shape, (Dims{rows, 1, 128, 128}));
        ASSERT_EQ(a[i].original_masks.size(), static_cast<size_t>(rows));
        for (size_t r = 0; r < a[i].size(); ++r) {
            EXPECT_EQ(a[i].ids[r], data.samples[a[i].indices[r]].id);
            EXPECT_EQ(a[i].original_masks[r].cols, data.samples[a[i].indices[r]].width);
        }
        seen.insert(seen.end(), a[i].indices.begin(), a[i].indices.end());
    }
    EXPECT_EQ(seen, one.epoch_order());
    EXPECT_EQ(seen, epoch_order(indices, true, 5, 2));
    EXPECT_GE(one.wait_seconds(), 0.0);

    // A row equals load_sample with the draw for (seed, epoch, dataset index).
    const size_t index = a[1].indices[2];
    const Sample expected = load_sample(data, index, options.preprocess, draw_augment(AugmentOptions{}, 5, 2, index));
    const size_t floats = 3 * 128 * 128;
    EXPECT_EQ(std::memcmp(a[1].images.f32() + 2 * floats, expected.image.f32(), floats * sizeof(float)), 0);
}

TEST(Loader, OrderFixedForEvaluationShuffledPerEpochForTraining) {
    std::vector<size_t> indices(50);
    for (size_t i = 0; i < indices.size(); ++i) indices[i] = i * 3;
    EXPECT_EQ(epoch_order(indices, false, 1, 0), indices);
    EXPECT_EQ(epoch_order(indices, false, 1, 7), indices);
    const auto e0 = epoch_order(indices, true, 1, 0), e1 = epoch_order(indices, true, 1, 1);
    EXPECT_EQ(e0, epoch_order(indices, true, 1, 0));
    EXPECT_NE(e0, e1);
    EXPECT_NE(e0, epoch_order(indices, true, 2, 0));
    std::vector<size_t> sorted = e1;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, indices);
}

TEST(Loader, ErrorArrivesAfterEarlierBatchesAndEpochsRestart) {
    TempDir dir;
    for (const char* stem : {"a", "b", "c", "e"}) write_pair(dir, stem, ".png", 24, 20);
    write_bytes(dir.path / "images" / "d.png", truncated_png(24, 20));
    ASSERT_TRUE(cv::imwrite((dir.path / "masks" / "d.png").string(), synthetic_mask(24, 20)));
    const Dataset data = scan_dataset(dir.str());
    ASSERT_EQ(data.size(), 5u);
    LoaderOptions options;
    options.batch_size = 1;
    options.num_threads = 2;
    options.preprocess.width = options.preprocess.height = 16;
    options.preprocess.keep_original_mask = false;
    BatchLoader loader(data, {0, 1, 2, 3, 4}, options);
    loader.start_epoch(0);
    Batch batch;
    for (const char* id : {"a", "b", "c"}) {
        ASSERT_TRUE(loader.next(batch));
        EXPECT_EQ(batch.ids, std::vector<std::string>{id});
        EXPECT_TRUE(batch.original_masks.empty());
    }
    EXPECT_ERROR_MENTIONS(loader.next(batch), (dir.path / "images" / "d.png").string());
    EXPECT_FALSE(loader.next(batch));

    // Abandoning an epoch midway and restarting works; drop_last drops the short batch.
    BatchLoader good(data, {0, 1, 2, 4}, options);
    good.start_epoch(0);
    ASSERT_TRUE(good.next(batch));
    good.start_epoch(1);
    size_t count = 0;
    while (good.next(batch)) ++count;
    EXPECT_EQ(count, 4u);
    options.batch_size = 3;
    options.drop_last = true;
    BatchLoader dropping(data, {0, 1, 2, 4}, options);
    EXPECT_EQ(dropping.num_batches(), 1u);
    EXPECT_EQ(read_epoch(dropping, 0).size(), 1u);
    BatchLoader abandoned(data, {0, 1, 2, 4}, options);
    abandoned.start_epoch(0);  // destroyed mid-epoch: must not hang
    EXPECT_ERROR_MENTIONS(BatchLoader(data, {9}, options), "out of range");
}
