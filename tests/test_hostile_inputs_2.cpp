// Hostile inputs, round two (issue 35): model files that build a graph the programs cannot feed or that fold
// to Inf, int8 files with partial, implausible or extra tensors, strict metadata, FIFOs where files are
// expected, JPEGs truncated behind an appended end marker, EXIF orientation at every decode scale, split ids
// with NUL bytes, multi-file outputs and long names. Every hostile file is generated here.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/dataset.h"
#include "data/split.h"
#include "graph/atomic_file.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/input_file.h"
#include "graph/model_check.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace fs = std::filesystem;
using namespace resunet;

namespace {

using Bytes = std::vector<uint8_t>;

struct TempDir {
    fs::path path;
    TempDir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() / fmt::format("resunet_test_hostile2_{}_{}", ::getpid(), counter++);
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void write_bytes(const std::string& path, const Bytes& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good()) << path;
}

void write_text(const std::string& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
}

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

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

// ---- model files ----

ResUNetConfig small_config() {
    ResUNetConfig config;
    config.width = 8;
    config.depth = 2;
    config.height = config.width_px = 32;
    return config;
}

TensorMap small_weights(const ResUNetConfig& config) { return init_weights(build_resunet(config), 7); }

ResUNetConfig infer(const TensorMap& tensors, const std::map<std::string, std::string>& metadata = {}) {
    return infer_resunet_config(tensors, metadata, 32);
}

std::vector<float> synthetic_images(int count, int size) {
    std::vector<float> images(static_cast<size_t>(count) * 3 * size * size);
    for (size_t i = 0; i < images.size(); ++i) images[i] = static_cast<float>((i * 2654435761u) % 1000) / 500.0f - 1.0f;
    return images;
}

// An int8 file as `resunet quantize` writes it: quantized weights and calibrated static scales.
TensorMap small_int8_file(const ResUNetConfig& config, const TensorMap& fp32) {
    const Graph graph = build_resunet(config);
    QuantOptions options;
    options.threads = 1;
    QuantEngine engine(graph, fp32, options);
    const std::vector<float> images = synthetic_images(2, config.height);
    engine.calibrate(images.data(), 2);
    TensorMap int8 = quantize_model_weights(graph, fp32, options);
    for (auto& [name, tensor] : engine.static_scales()) int8[name] = tensor;
    return int8;
}

TEST(HostileModelFiles, FirstLayerMustTakeThreeChannels) {
    for (int channels : {1, 4, 256}) {
        ResUNetConfig config = small_config();
        config.in_channels = channels;
        const TensorMap weights = small_weights(config);
        SCOPED_TRACE(channels);
        EXPECT_ERROR_MENTIONS(infer(weights), "3-channel");
    }
    ResUNetConfig two_outputs = small_config();
    two_outputs.out_channels = 2;
    EXPECT_ERROR_MENTIONS(infer(small_weights(two_outputs)), "one output channel");
    EXPECT_NO_THROW(infer(small_weights(small_config())));
}

TEST(HostileModelFiles, BatchNormThatFoldsToInfIsRefused) {
    TensorMap weights = small_weights(small_config());
    weights.at("e1.bn_a.weight").f32()[0] = 1e30f;  // finite, but gamma / sqrt(var + eps) * w overflows
    weights.at("e1.bn_a.running_var").f32()[0] = 0.0f;
    weights.at("e1.conv_a.weight").f32()[0] = 1e10f;
    EXPECT_ERROR_MENTIONS(infer(weights), "overflows");
    // The same check for F16 files (widened at load) and through the file reader.
    TempDir dir;
    save_safetensors(dir / "bad.safetensors", weights, {}, SaveOptions{FloatStorage::bf16});
    const SafetensorsFile file = load_safetensors(dir / "bad.safetensors");
    EXPECT_ERROR_MENTIONS(infer(file.tensors, file.metadata), "e1.bn_a");
}

TEST(HostileModelFiles, MetadataIsParsedStrictlyAndMustAgreeWithTheTensors) {
    const TensorMap weights = small_weights(small_config());
    for (const char* size : {"32abc", "+32", " 32", "-32", "0", "3.2e1", "", "99999999999999999999"}) {
        SCOPED_TRACE(size);
        EXPECT_ERROR_MENTIONS(infer(weights, {{"resunet.size", size}}), "resunet.size");
    }
    EXPECT_EQ(infer(weights, {{"resunet.size", "64"}}).height, 64);
    EXPECT_ERROR_MENTIONS(infer(weights, {{"resunet.width", "16"}}), "resunet.width");
    EXPECT_ERROR_MENTIONS(infer(weights, {{"resunet.depth", "3"}}), "resunet.depth");
    EXPECT_ERROR_MENTIONS(infer(weights, {{"resunet.width", "8x"}}), "resunet.width");
    EXPECT_NO_THROW(infer(weights, {{"resunet.width", "8"}, {"resunet.depth", "2"}, {"resunet.size", "32"}}));
}

TEST(HostileModelFiles, Int8FilesAreCheckedAsStrictlyAsFp32Files) {
    const ResUNetConfig config = small_config();
    const TensorMap fp32 = small_weights(config);
    const TensorMap good = small_int8_file(config, fp32);
    ASSERT_NO_THROW(infer(good));

    // A partial set of static scales: refused, not silently dynamic everywhere.
    std::string scaled;
    for (const auto& [name, tensor] : good)
        if (name.ends_with(".input_scale")) scaled = name.substr(0, name.size() - 12);
    ASSERT_FALSE(scaled.empty());
    TensorMap partial = good;
    partial.erase(scaled + ".input_scale");
    partial.erase(scaled + ".input_zero_point");
    EXPECT_ERROR_MENTIONS(infer(partial), "static scales for");
    TensorMap half_pair = good;
    half_pair.erase(scaled + ".input_zero_point");
    EXPECT_ERROR_MENTIONS(infer(half_pair), "must come together");

    // Implausible scales (no upper bound before), and a bad zero point.
    std::string quantized;
    for (const auto& [name, tensor] : good)
        if (name.ends_with(".weight_q")) quantized = name.substr(0, name.size() - 9);
    ASSERT_FALSE(quantized.empty());
    TensorMap big_weight_scale = good;
    big_weight_scale.at(quantized + ".weight_scale").f32()[0] = 1e30f;
    EXPECT_ERROR_MENTIONS(infer(big_weight_scale), "weight_scale");
    TensorMap big_input_scale = good;
    big_input_scale.at(scaled + ".input_scale").f32()[0] = 1e30f;
    EXPECT_ERROR_MENTIONS(infer(big_input_scale), "input_scale");
    TensorMap zero_scale = good;
    zero_scale.at(quantized + ".weight_scale").f32()[0] = 0.0f;
    EXPECT_ERROR_MENTIONS(infer(zero_scale), "weight_scale");
    TensorMap bad_zero_point = good;
    const int32_t zero_point = 300;
    std::memcpy(bad_zero_point.at(scaled + ".input_zero_point").bytes.data(), &zero_point, sizeof zero_point);
    EXPECT_ERROR_MENTIONS(infer(bad_zero_point), "input_zero_point");

    // Extra tensors, and a layer stored both ways.
    TensorMap extra = good;
    extra["junk"] = HostTensor::zeros({2});
    EXPECT_ERROR_MENTIONS(infer(extra), "unexpected tensor 'junk'");
    TensorMap both = good;
    both[quantized + ".weight"] = HostTensor::zeros(both.at(quantized + ".weight_q").shape);
    EXPECT_ERROR_MENTIONS(infer(both), "both");
    TensorMap wrong_dtype = good;
    wrong_dtype[quantized + ".weight_q"] = HostTensor::zeros(good.at(quantized + ".weight_q").shape);  // F32
    EXPECT_ERROR_MENTIONS(infer(wrong_dtype), "weight_q");
    TensorMap minus_128 = good;
    minus_128.at(quantized + ".weight_q").s8()[0] = -128;
    EXPECT_ERROR_MENTIONS(infer(minus_128), "-128");

    // Without any static scale the file is a valid dynamic-scale file.
    TensorMap dynamic = good;
    for (auto it = dynamic.begin(); it != dynamic.end();)
        it = it->first.ends_with(".input_scale") || it->first.ends_with(".input_zero_point") ? dynamic.erase(it) : std::next(it);
    EXPECT_NO_THROW(infer(dynamic));
}

TEST(HostileModelFiles, FoldConvRefusesNonFiniteResultsForEveryEngine) {
    const ResUNetConfig config = small_config();
    TensorMap weights = small_weights(config);
    weights.at("b.bn_a.weight").f32()[1] = 3e38f;
    weights.at("b.bn_a.running_var").f32()[1] = 0.0f;
    QuantOptions options;
    options.threads = 1;
    EXPECT_ERROR_MENTIONS(QuantEngine(build_resunet(config), weights, options), "overflows");
}

// ---- input files that are not regular files ----

TEST(HostileInputFiles, FifosAreRefusedBeforeTheyAreOpened) {
    TempDir dir;
    const std::string fifo = dir / "pipe.safetensors";
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    // Each of these would block forever in open() or read() if the FIFO were opened for reading.
    EXPECT_ERROR_MENTIONS(load_safetensors(fifo), "FIFO");
    EXPECT_ERROR_MENTIONS(read_image(fifo), "pipe");
    EXPECT_ERROR_MENTIONS(read_input_file(fifo, "--config", 1024), "FIFO");
    Dataset dataset;
    dataset.root = dir.path.string();
    EXPECT_ERROR_MENTIONS(load_split(fifo, dataset), "FIFO");
    EXPECT_ERROR_MENTIONS(open_input_file(dir.path.string(), "--split"), "folder");
    EXPECT_NE(input_file_problem(fifo), "");
    EXPECT_EQ(input_file_problem(dir / "missing"), "cannot open: No such file or directory");
}

// ---- images ----

cv::Mat gradient(int width, int height) {
    cv::Mat image(height, width, CV_8UC3);
    for (int y = 0; y < height; ++y)
        for (int x = 0; x < width; ++x) image.at<cv::Vec3b>(y, x) = cv::Vec3b(uint8_t(x * 4), uint8_t(y * 4), uint8_t((x + y) * 2));
    return image;
}

Bytes encode_jpeg(const cv::Mat& image) {
    Bytes bytes;
    EXPECT_TRUE(cv::imencode(".jpg", image, bytes, {cv::IMWRITE_JPEG_QUALITY, 90}));
    return bytes;
}

// The JPEG with an APP1 Exif segment (IFD0 with Orientation = `orientation`) right after SOI.
Bytes with_exif_orientation(const Bytes& jpeg, uint16_t orientation) {
    const Bytes tiff = {'I', 'I', 42, 0, 8, 0, 0, 0,                           // header, IFD0 at 8
                        1, 0,                                                 // one entry
                        0x12, 0x01, 3, 0, 1, 0, 0, 0, uint8_t(orientation), 0, 0, 0,  // Orientation SHORT
                        0, 0, 0, 0};                                          // no next IFD
    Bytes segment = {0xFF, 0xE1, 0, 0, 'E', 'x', 'i', 'f', 0, 0};
    segment.insert(segment.end(), tiff.begin(), tiff.end());
    const size_t length = segment.size() - 2;
    segment[2] = uint8_t(length >> 8);
    segment[3] = uint8_t(length & 0xff);
    Bytes out(jpeg.begin(), jpeg.begin() + 2);
    out.insert(out.end(), segment.begin(), segment.end());
    out.insert(out.end(), jpeg.begin() + 2, jpeg.end());
    return out;
}

TEST(HostileImageDecode, JpegTruncatedMidStreamWithAnEndMarkerAppendedIsRefused) {
    TempDir dir;
    const Bytes full = encode_jpeg(gradient(96, 64));
    Bytes cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(full.size() / 2));
    cut.push_back(0xFF);
    cut.push_back(0xD9);
    write_bytes(dir / "cut.jpg", cut);
    EXPECT_ERROR_MENTIONS(read_image(dir / "cut.jpg"), "truncated JPEG");
    EXPECT_ERROR_MENTIONS(read_mask(dir / "cut.jpg"), "truncated JPEG");
    cv::Size original;
    EXPECT_ERROR_MENTIONS(read_image_reduced(dir / "cut.jpg", 8, original), "truncated JPEG");
}

TEST(HostileImageDecode, JpegWithBytesAfterItsEndMarkerIsAccepted) {
    TempDir dir;
    const cv::Mat image = gradient(48, 32);
    Bytes motion = encode_jpeg(image);
    const cv::Mat expected = cv::imdecode(motion, cv::IMREAD_COLOR);
    for (int i = 0; i < 5000; ++i) motion.push_back(uint8_t(i * 7 + 1));  // a "motion photo"'s video, say
    write_bytes(dir / "motion.jpg", motion);
    const cv::Mat decoded = read_image(dir / "motion.jpg");
    ASSERT_EQ(decoded.size(), cv::Size(48, 32));
    EXPECT_EQ(cv::norm(decoded, expected, cv::NORM_INF), 0.0);  // pixel for pixel what OpenCV decodes
}

TEST(HostileImageDecode, ExifOrientationIsTheSameAtEveryDecodeScale) {
    TempDir dir;
    const cv::Mat image = gradient(96, 64);  // wider than high; orientation 6 makes it 64 x 96
    write_bytes(dir / "rotated.jpg", with_exif_orientation(encode_jpeg(image), 6));
    const cv::Mat full = read_image(dir / "rotated.jpg");
    EXPECT_EQ(full.size(), cv::Size(64, 96));
    EXPECT_EQ(full.size(), cv::imread(dir / "rotated.jpg", cv::IMREAD_COLOR).size());  // as OpenCV orients it
    for (int min_side : {8, 16, 32}) {
        cv::Size original;
        const cv::Mat reduced = read_image_reduced(dir / "rotated.jpg", min_side, original);
        EXPECT_EQ(original, cv::Size(64, 96)) << min_side;  // the mask is resized to this size
        EXPECT_EQ(reduced.cols * 3, reduced.rows * 2) << min_side;  // rotated too, not stretched
    }
    EXPECT_EQ(read_mask(dir / "rotated.jpg").size(), cv::Size(64, 96));

    // The header scan (sizes without decoding) says the same: the pair below matches.
    fs::create_directories(dir.path / "set/images");
    fs::create_directories(dir.path / "set/masks");
    fs::copy_file(dir / "rotated.jpg", dir / "set/images/r.jpg");
    ASSERT_TRUE(cv::imwrite(dir / "set/masks/r.png", cv::Mat(96, 64, CV_8UC1, cv::Scalar(255))));
    for (bool full_decode : {false, true}) {
        ScanOptions scan;
        scan.full_decode = full_decode;
        const Dataset data = scan_dataset((dir.path / "set").string(), scan);
        ASSERT_EQ(data.size(), 1u);
        EXPECT_EQ(data.samples[0].width, 64) << full_decode;
        EXPECT_EQ(data.samples[0].height, 96) << full_decode;
    }
}

TEST(HostileImageDecode, PngDecodesAsOpenCvDoesAndFailsWithOneMessage) {
    TempDir dir;
    cv::Mat deep(20, 30, CV_16UC3);
    cv::randu(deep, 0, 65535);
    cv::Mat rgba(20, 30, CV_8UC4);
    cv::randu(rgba, 0, 255);
    cv::Mat grey(20, 30, CV_8UC1);
    cv::randu(grey, 0, 255);
    const cv::Mat kinds[] = {gradient(30, 20), deep, rgba, grey};
    for (const cv::Mat& kind : kinds) {
        Bytes png;
        ASSERT_TRUE(cv::imencode(".png", kind, png));
        write_bytes(dir / "k.png", png);
        for (bool as_grey : {false, true}) {
            const cv::Mat ours = as_grey ? read_mask(dir / "k.png") * 255 : read_image(dir / "k.png");
            cv::Mat theirs = cv::imdecode(png, as_grey ? cv::IMREAD_GRAYSCALE : cv::IMREAD_COLOR);
            if (as_grey) cv::threshold(theirs, theirs, 127, 255, cv::THRESH_BINARY);
            ASSERT_EQ(ours.size(), theirs.size());
            EXPECT_EQ(cv::norm(ours, theirs, cv::NORM_INF), 0.0) << "type " << kind.type() << " grey " << as_grey;
        }
    }
    // Damaged pixel data (a bit flipped in IDAT: CRC error) and a file cut inside IDAT.
    Bytes png;
    ASSERT_TRUE(cv::imencode(".png", gradient(30, 20), png));
    Bytes flipped = png;
    flipped[png.size() - 20] ^= 0x40;
    write_bytes(dir / "bad.png", flipped);
    EXPECT_ERROR_MENTIONS(read_image(dir / "bad.png"), "libpng");
    write_bytes(dir / "cut.png", Bytes(png.begin(), png.begin() + static_cast<std::ptrdiff_t>(png.size() * 2 / 3)));
    EXPECT_ERROR_MENTIONS(read_image(dir / "cut.png"), "truncated");
}

// ---- splits ----

TEST(HostileSplitIds, AnIdWithANulByteIsReportedWhole) {
    TempDir dir;
    Dataset dataset;
    dataset.root = dir.path.string();
    for (const char* id : {"a", "b", "c"}) dataset.samples.push_back({id, std::string(id) + ".png", std::string(id) + ".png", 8, 8});
    const std::string path = dir / "split.json";
    write_text(path, R"({"format":"resunet-split","version":1,"train":["a\u0000evil"],"test":["c"]})");
    const std::optional<std::string> message = error_of([&] { load_split(path, dataset); });
    ASSERT_TRUE(message);
    EXPECT_NE(message->find("a\\u0000evil"), std::string::npos) << *message;  // escaped, not cut at the NUL
    EXPECT_NE(message->find("unknown id"), std::string::npos) << *message;
}

// ---- outputs: names and sets ----

TEST(HostileOutputFiles, LongestLegalFileNamesCanBeWrittenAtomically) {
    TempDir dir;
    for (size_t length : {200u, 244u, 255u}) {
        const std::string name = std::string(length - 4, 'n') + ".png";
        const std::string path = dir / name;
        ASSERT_NO_THROW(write_file_atomic(path, "content")) << length;
        EXPECT_EQ(read_text(path), "content");
        const std::string temp = new_temp_file_beside(path);
        EXPECT_LE(fs::path(temp).filename().string().size(), 255u);
        fs::remove(temp);
    }
    EXPECT_EQ(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()), 3);  // no temp left
}

TEST(HostileOutputFiles, StaleTempFilesOfDeadProcessesAreRemovedWhateverTheirScheme) {
    TempDir dir;
    const pid_t child = ::fork();
    if (child == 0) ::_exit(0);
    ASSERT_GT(child, 0);
    ::waitpid(child, nullptr, 0);  // a pid that is now dead
    write_text(dir / fmt::format(".metrics.csv.partial.{}", child), "x");
    write_text(dir / fmt::format(".mask.png.tmp.{}.0.abc", child), "x");
    write_text(dir / fmt::format(".metrics.csv.partial.{}", ::getpid()), "x");  // alive: kept
    write_text(dir / "metrics.csv.partial.1", "x");  // not hidden: not ours
    EXPECT_EQ(remove_stale_temp_files(dir.path.string()), 2);
    EXPECT_TRUE(fs::exists(dir / fmt::format(".metrics.csv.partial.{}", ::getpid())));
    EXPECT_TRUE(fs::exists(dir / "metrics.csv.partial.1"));
}

TEST(HostileOutputFiles, AFileSetAppearsWholeOrNotAtAll) {
    TempDir dir;
    {
        AtomicFileSet set;
        write_file_atomic(set.add(dir / "m.report.md"), "report");
        write_file_atomic(set.add(dir / "m.safetensors"), "model");
    }  // not committed: nothing appears, no temp stays
    EXPECT_TRUE(fs::is_empty(dir.path));

    // Killed by SIGTERM before the commit: no target, and the temps go with the next cleaning.
    pid_t child = ::fork();
    if (child == 0) {
        AtomicFileSet set;
        write_file_atomic(set.add(dir / "m.report.md"), "report");
        write_file_atomic(set.add(dir / "m.safetensors"), "model");
        ::signal(SIGTERM, SIG_DFL);
        ::raise(SIGTERM);
        ::_exit(0);
    }
    int status = 0;
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status));
    EXPECT_FALSE(fs::exists(dir / "m.report.md"));
    EXPECT_FALSE(fs::exists(dir / "m.safetensors"));
    EXPECT_EQ(remove_stale_temp_files(dir.path.string()), 2);

    // SIGTERM in the middle of the renames (the test hook sends it after the first): held until the set is whole.
    child = ::fork();
    if (child == 0) {
        ::signal(SIGTERM, SIG_DFL);
        ::setenv("RESUNET_TEST_SIGNAL_DURING_COMMIT", "1", 1);
        AtomicFileSet set;
        write_file_atomic(set.add(dir / "m.report.md"), "report");
        write_file_atomic(set.add(dir / "m.safetensors"), "model");
        set.commit();
        ::_exit(0);  // not reached: the held SIGTERM takes effect after the last rename
    }
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status));
    EXPECT_EQ(WTERMSIG(status), SIGTERM);
    EXPECT_EQ(read_text(dir / "m.report.md"), "report");
    EXPECT_EQ(read_text(dir / "m.safetensors"), "model");
}

// ---- the programs: one-line refusals, no hang ----

const std::string kKvasirRoot = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";

fs::path resunet_binary() { return fs::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet"; }

struct Outcome {
    int status = -1;  // exit status; 124 when `timeout` had to stop it
    std::string err;
};

// Runs the built program under `timeout`, so a hang fails the test instead of blocking it.
Outcome run_resunet(const TempDir& dir, const std::string& arguments) {
    const std::string command = "timeout 120 " + resunet_binary().string() + " " + arguments + " >" + (dir / "stdout") +
                                " 2>" + (dir / "stderr") + " </dev/null";
    const int status = std::system(command.c_str());
    Outcome outcome;
    outcome.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    outcome.err = read_text(dir / "stderr");
    return outcome;
}

void expect_refused(const Outcome& outcome, int status, const std::string& mention, const std::string& label) {
    EXPECT_EQ(outcome.status, status) << label << "\nstderr: " << outcome.err;
    EXPECT_NE(outcome.err.find(mention), std::string::npos) << label << "\nstderr: " << outcome.err;
    EXPECT_EQ(std::count(outcome.err.begin(), outcome.err.end(), '\n'), 1) << label << ": one line\nstderr: " << outcome.err;
}

class HostileCommands : public ::testing::Test {
  protected:
    void SetUp() override {
        if (!fs::exists(resunet_binary())) GTEST_SKIP() << "resunet is not built";
        model_ = dir_ / "model.safetensors";
        save_safetensors(model_, small_weights(small_config()), resunet_metadata(small_config()));
        fifo_ = dir_ / "fifo";
        ASSERT_EQ(::mkfifo(fifo_.c_str(), 0600), 0);
    }
    TempDir dir_;
    std::string model_, fifo_;
};

TEST_F(HostileCommands, FifosAreRefusedWhereverAFileIsRead) {
    expect_refused(run_resunet(dir_, "summary --model " + fifo_), 2, "FIFO", "summary --model FIFO");
    expect_refused(run_resunet(dir_, "predict " + model_ + " --model " + fifo_ + " --out " + (dir_ / "out1")), 2, "FIFO",
                   "predict --model FIFO");
    expect_refused(run_resunet(dir_, "train --config " + fifo_ + " --data " + kKvasirRoot + " --out " + (dir_ / "run")), 2,
                   "FIFO", "train --config FIFO");
    write_text(dir_ / "list.txt", fifo_ + "\n");
    const Outcome image = run_resunet(dir_, "predict @" + (dir_ / "list.txt") + " --model " + model_ + " --threads 1 --out " +
                                                (dir_ / "out2"));
    EXPECT_EQ(image.status, 1) << image.err;  // the one input failed; nothing hung
    EXPECT_NE(image.err.find("FIFO"), std::string::npos) << image.err;
    expect_refused(run_resunet(dir_, "predict @" + fifo_ + " --model " + model_ + " --out " + (dir_ / "out3")), 2, "FIFO",
                   "predict @FIFO");
    if (fs::is_directory(kKvasirRoot))
        expect_refused(run_resunet(dir_, "eval --model " + model_ + " --data " + kKvasirRoot + " --split " + fifo_ +
                                             " --precision fp32 --threads 1"),
                       2, "FIFO", "eval --split FIFO");
}

TEST_F(HostileCommands, ModelsTheProgramsCannotFeedAreRefused) {
    ResUNetConfig four = small_config();
    four.in_channels = 4;
    save_safetensors(dir_ / "four.safetensors", small_weights(four));
    expect_refused(run_resunet(dir_, "summary --model " + (dir_ / "four.safetensors")), 2, "3-channel", "summary, 4 channels");
    cv::imwrite(dir_ / "a.png", gradient(40, 30));
    expect_refused(run_resunet(dir_, "predict " + (dir_ / "a.png") + " --model " + (dir_ / "four.safetensors") + " --out " +
                                         (dir_ / "out")),
                   2, "3-channel", "predict, 4 channels");
    EXPECT_FALSE(fs::exists(dir_ / "out/a.png"));
    save_safetensors(dir_ / "size.safetensors", small_weights(small_config()), {{"resunet.size", "32abc"}});
    expect_refused(run_resunet(dir_, "summary --model " + (dir_ / "size.safetensors")), 2, "resunet.size", "size 32abc");
}

TEST_F(HostileCommands, ConfigAndFlagValuesAreParsedStrictly) {
    const std::string base = "train --data " + kKvasirRoot + " --out " + (dir_ / "run") + " --epochs 1 ";
    const std::pair<const char*, const char*> configs[] = {
        {"seed = -1\n", "seed"},
        {"seed = 18446744073709551616\n", "seed"},
        {"skip-bad = 2\n", "skip-bad"},
        {"width = 8abc\n", "width"},
        {"lr = nan\n", "lr"},
        {"[other]\nwidth = 8\n", "other"},
        {"[train]\nwidht = 8\n", "widht"},
    };
    for (const auto& [text, mention] : configs) {
        write_text(dir_ / "c.toml", text);
        const Outcome outcome = run_resunet(dir_, base + "--config " + (dir_ / "c.toml"));
        EXPECT_EQ(outcome.status, 2) << text << "\nstderr: " << outcome.err;
        EXPECT_NE(outcome.err.find(mention), std::string::npos) << text << "\nstderr: " << outcome.err;
        EXPECT_FALSE(fs::exists(dir_ / "run/last.safetensors")) << text;
    }
    for (const char* flag : {"--seed -1", "--seed 18446744073709551616", "--seed 12x"}) {
        const Outcome outcome = run_resunet(dir_, base + flag);
        EXPECT_EQ(outcome.status, 2) << flag << "\nstderr: " << outcome.err;
    }
    cv::imwrite(dir_ / "a.png", gradient(40, 30));
    for (const char* budget : {"nan", "inf", "-nan"}) {
        const Outcome outcome = run_resunet(dir_, "predict " + (dir_ / "a.png") + " --model " + model_ + " --precision fp32 --out " +
                                                      (dir_ / "out") + " --memory-budget " + budget);
        EXPECT_EQ(outcome.status, 2) << budget << "\nstderr: " << outcome.err;
        EXPECT_NE(outcome.err.find("memory-budget"), std::string::npos) << outcome.err;
    }
}

TEST_F(HostileCommands, ACorruptPngIsReportedInOneLine) {
    Bytes png;
    ASSERT_TRUE(cv::imencode(".png", gradient(30, 20), png));
    png[png.size() - 20] ^= 0x40;
    write_bytes(dir_ / "bad.png", png);
    const Outcome outcome = run_resunet(dir_, "predict " + (dir_ / "bad.png") + " --model " + model_ + " --threads 1 --out " +
                                                  (dir_ / "out"));
    EXPECT_EQ(outcome.status, 1) << outcome.err;
    EXPECT_EQ(outcome.err.find("libpng error"), std::string::npos) << outcome.err;  // libpng's own line
    EXPECT_NE(outcome.err.find("bad.png"), std::string::npos) << outcome.err;
}

// Peak RSS in MiB as predict prints it ("  peak RSS    123.4 MiB (VmHWM...)"), or -1.
double printed_peak_mib(const std::string& text) {
    const size_t at = text.find("peak RSS");
    if (at == std::string::npos) return -1;
    return std::atof(text.c_str() + text.find_first_of("0123456789", at));
}

TEST_F(HostileCommands, OverlayMemoryDoesNotGrowWithTheImagesInFlight) {
    // 3000 x 3000 originals: 26 MiB each as BGR. The old pipeline kept every original of the batch until its
    // overlay was drawn (here 4 at once); now each is decoded again while its overlay is drawn.
#if defined(__SANITIZE_ADDRESS__)
    GTEST_SKIP() << "AddressSanitizer's quarantine keeps freed images resident, so peak RSS says nothing here";
#endif
    constexpr int kSide = 3000;
    const double image_mib = kSide * kSide * 3 / (1024.0 * 1024.0);
    cv::Mat big(kSide, kSide, CV_8UC3);
    cv::resize(gradient(60, 60), big, big.size(), 0, 0, cv::INTER_NEAREST);
    std::string four;
    for (int i = 0; i < 4; ++i) {
        ASSERT_TRUE(cv::imwrite(dir_ / fmt::format("big{}.png", i), big, {cv::IMWRITE_PNG_COMPRESSION, 1}));
        four += " " + dir_ / fmt::format("big{}.png", i);
    }
    auto peak = [&](const std::string& inputs, const std::string& out) {
        const std::string command = "timeout 300 " + resunet_binary().string() + " predict" + inputs + " --model " + model_ +
                                    " --overlay --threads 1 --batch 4 --precision fp32 --out " + (dir_ / out) + " >" +
                                    (dir_ / "stdout") + " 2>&1";
        EXPECT_EQ(std::system(command.c_str()), 0) << read_text(dir_ / "stdout");
        return printed_peak_mib(read_text(dir_ / "stdout"));
    };
    const double one = peak(" " + dir_ / "big0.png", "one");
    const double all = peak(four, "four");
    ASSERT_GT(one, 0);
    EXPECT_TRUE(fs::exists(dir_ / "four/big3_overlay.png"));
    EXPECT_LT(all - one, image_mib) << "peak RSS " << one << " MiB for one image, " << all << " MiB for four";
}

TEST_F(HostileCommands, PredictWritesOutputsForTheLongestLegalNames) {
    const std::string stem(240, 'x');  // 244 bytes with ".png": legal, but its temp names were not
    ASSERT_TRUE(cv::imwrite(dir_ / (stem + ".png"), gradient(40, 30)));
    const Outcome outcome = run_resunet(dir_, "predict " + dir_ / (stem + ".png") + " --model " + model_ +
                                                  " --threads 1 --precision fp32 --out " + (dir_ / "out"));
    EXPECT_EQ(outcome.status, 0) << outcome.err;
    EXPECT_EQ(cv::imread(dir_ / ("out/" + stem + ".png"), cv::IMREAD_GRAYSCALE).size(), cv::Size(40, 30));
    for (const auto& entry : fs::directory_iterator(dir_.path / "out"))
        EXPECT_NE(entry.path().filename().string()[0], '.') << "temp file left: " << entry.path();
}

}  // namespace
