// Tests for apps/lib/predict (`resunet predict`): masks at input size, 0/255 values, int8 vs fp32 agreement,
// metrics.csv against compute_mask_metrics, unusual and broken images, overwrite protection, usage errors,
// and the built `resunet` binary's exit codes. Real Kvasir-SEG images of six sizes are read in place.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "apps/lib/predict_command.h"
#include "apps/lib/version.h"
#include "data/dataset.h"
#include "data/metrics.h"
#include "engine/engine.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace fs = std::filesystem;
using namespace resunet;

namespace {

const std::string kKvasirRoot = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";
const std::string kKvasirMasks = kKvasirRoot + "/masks";

// Six Kvasir-SEG images of different sizes (332x487 up to 1348x1070).
const std::vector<std::string> kKvasirIds = {
    "cju2htabevq9108015qjei0x7", "cju30lncba3ny0878jwnous8n", "cju0t4oil7vzk099370nun5h9",
    "cju0s2a9ekvms080138tjjpxr", "cjyzjzssvd8pq0838f4nolj5l", "cju0qoxqj9q6s0835b43399p4",
};

std::string kvasir_image(const std::string& id) { return kKvasirRoot + "/images/" + id + ".jpg"; }

std::vector<std::string> kvasir_images() {
    std::vector<std::string> paths;
    for (const std::string& id : kKvasirIds) paths.push_back(kvasir_image(id));
    return paths;
}

// A 16x8 CMYK JPEG (Adobe-inverted, as Photoshop writes them): left half red, right half blue. Made once
// with libjpeg (in_color_space JCS_CMYK, quality 100): cv::imwrite cannot write CMYK.
const unsigned char kCmykJpeg[] = {
    0xff, 0xd8, 0xff, 0xee, 0x00, 0x0e, 0x41, 0x64, 0x6f, 0x62, 0x65, 0x00,
    0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0xff, 0xc0, 0x00, 0x14, 0x08, 0x00, 0x08, 0x00, 0x10,
    0x04, 0x43, 0x11, 0x00, 0x4d, 0x11, 0x00, 0x59, 0x11, 0x00, 0x4b, 0x11,
    0x00, 0xff, 0xc4, 0x00, 0x1f, 0x00, 0x00, 0x01, 0x05, 0x01, 0x01, 0x01,
    0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
    0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xff, 0xc4,
    0x00, 0xb5, 0x10, 0x00, 0x02, 0x01, 0x03, 0x03, 0x02, 0x04, 0x03, 0x05,
    0x05, 0x04, 0x04, 0x00, 0x00, 0x01, 0x7d, 0x01, 0x02, 0x03, 0x00, 0x04,
    0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22,
    0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15,
    0x52, 0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17,
    0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36,
    0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a,
    0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66,
    0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
    0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8,
    0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2,
    0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5,
    0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7,
    0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9,
    0xfa, 0xff, 0xda, 0x00, 0x0e, 0x04, 0x43, 0x00, 0x4d, 0x00, 0x59, 0x00,
    0x4b, 0x00, 0x00, 0x3f, 0x00, 0xfe, 0xfe, 0x2b, 0xfc, 0xff, 0x00, 0xeb,
    0xfc, 0xff, 0x00, 0xeb, 0xfb, 0xf8, 0xaf, 0xf0, 0x07, 0xa2, 0xbf, 0xdf,
    0xe2, 0x8a, 0xff, 0xd9
};

// A scratch folder removed when the test ends.
struct TempDir {
    fs::path path;
    TempDir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("resunet_test_predict_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void write_bytes(const std::string& path, const void* data, size_t size) {
    std::ofstream out(path, std::ios::binary);
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
}

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

// The shared test model: width 8, depth 4, size 64, random weights; the head bias is set to minus the median
// logit over the Kvasir images, so masks are about half foreground and int8/fp32 disagreements can show.
struct TestModel {
    TempDir dir;
    ResUNetConfig config;
    std::string fp32_path, int8_path, int8_static_path;
    double median_logit = 0;
};

const TestModel& test_model() {
    static const std::unique_ptr<TestModel> model = [] {
        auto m = std::make_unique<TestModel>();
        m->config.width = 8;
        m->config.depth = 4;
        m->config.height = m->config.width_px = 64;
        const Graph graph = build_resunet(m->config);
        TensorMap weights = init_weights(graph, 2024);

        std::vector<float> src, logits;
        for (const std::string& path : kvasir_images()) {
            cv::Mat resized;
            cv::resize(read_image(path), resized, cv::Size(64, 64), 0, 0, cv::INTER_AREA);
            const HostTensor t = image_to_tensor(resized, kImageNetMean, kImageNetStd);
            src.insert(src.end(), t.f32(), t.f32() + t.num_elements());
        }
        const int count = static_cast<int>(kKvasirIds.size());
        logits.resize(static_cast<size_t>(count) * 64 * 64);
        EngineOptions engine_options;
        engine_options.threads = 1;
        Engine(graph, weights, engine_options).run(src.data(), count, logits.data());
        std::vector<float> sorted = logits;
        std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
        m->median_logit = sorted[sorted.size() / 2];
        weights.at("head.bias").f32()[0] -= static_cast<float>(m->median_logit);

        m->fp32_path = m->dir / "model.safetensors";
        save_safetensors(m->fp32_path, weights, resunet_metadata(m->config));
        m->int8_path = m->dir / "model.int8.safetensors";
        save_safetensors(m->int8_path, quantize_model_weights(graph, weights), resunet_metadata(m->config));

        QuantOptions static_options;
        static_options.mode = ScaleMode::static_calibrated;
        static_options.threads = 1;
        QuantEngine calibrated(graph, weights, static_options);
        calibrated.calibrate(src.data(), count);
        TensorMap with_scales = quantize_model_weights(graph, weights);
        for (auto& [name, tensor] : calibrated.static_scales()) with_scales[name] = tensor;
        m->int8_static_path = m->dir / "model.int8-static.safetensors";
        save_safetensors(m->int8_static_path, with_scales, resunet_metadata(m->config));
        return m;
    }();
    return *model;
}

// Closes a FILE* on scope exit.
struct FileCloser {
    void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

std::string read_all(std::FILE* f) {
    std::fflush(f);
    std::rewind(f);
    std::string text;
    char buffer[4096];
    size_t got = 0;
    while ((got = std::fread(buffer, 1, sizeof(buffer), f)) > 0) text.append(buffer, got);
    return text;
}

struct Captured {
    PredictReport report;
    std::string log;  // what went to options.log
    std::string out;  // what went to options.out
};

// run_predict with log and summary captured; rethrows UsageError.
Captured predict(PredictOptions options) {
    FilePtr log(std::tmpfile()), out(std::tmpfile());
    options.log = log.get();
    options.out = out.get();
    Captured captured;
    captured.report = run_predict(options);
    captured.log = read_all(log.get());
    captured.out = read_all(out.get());
    return captured;
}

PredictOptions base_options(const std::vector<std::string>& inputs, const std::string& out_dir) {
    PredictOptions options;
    options.inputs = inputs;
    options.model_path = test_model().fp32_path;
    options.out_dir = out_dir;
    options.batch = 4;
    options.threads = 2;
    return options;
}

// Message of the UsageError run_predict throws, or "<no error>".
std::string usage_error_of(const PredictOptions& options) {
    try {
        predict(options);
    } catch (const UsageError& e) {
        return e.what();
    }
    return "<no error>";
}

// "@path": a list-file input.
std::string list_argument(const std::string& path) {
    std::string argument = "@";
    argument += path;
    return argument;
}

std::string stem_of(const std::string& path) { return fs::path(path).stem().string(); }

cv::Mat read_written_mask(const std::string& out_dir, const std::string& input) {
    return cv::imread((fs::path(out_dir) / (stem_of(input) + ".png")).string(), cv::IMREAD_UNCHANGED);
}

bool only_0_and_255(const cv::Mat& mask) {
    return cv::countNonZero(mask == 0) + cv::countNonZero(mask == 255) == mask.rows * mask.cols;
}

struct CsvRow {
    std::string id;
    int width = 0, height = 0;
    double dice = 0, iou = 0, mean_iou = 0;
};

std::vector<CsvRow> read_metrics_csv(const std::string& path, std::string* header) {
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    if (header) *header = line;
    std::vector<CsvRow> rows;
    while (std::getline(in, line)) {
        std::stringstream fields(line);
        std::string field;
        CsvRow row;
        std::getline(fields, row.id, ',');
        std::getline(fields, field, ',');
        row.width = std::stoi(field);
        std::getline(fields, field, ',');
        row.height = std::stoi(field);
        std::getline(fields, field, ',');
        row.dice = std::stod(field);
        std::getline(fields, field, ',');
        row.iou = std::stod(field);
        std::getline(fields, field, ',');
        row.mean_iou = std::stod(field);
        rows.push_back(row);
    }
    return rows;
}

// Share of pixels on which two folders' masks agree, over the given inputs.
double mask_agreement(const std::string& dir_a, const std::string& dir_b, const std::vector<std::string>& inputs) {
    double same = 0, total = 0;
    for (const std::string& input : inputs) {
        const cv::Mat a = read_written_mask(dir_a, input), b = read_written_mask(dir_b, input);
        EXPECT_EQ(a.size(), b.size()) << input;
        if (a.size() != b.size()) return 0;
        same += cv::countNonZero(a == b);
        total += static_cast<double>(a.total());
    }
    return same / total;
}

double foreground_share(const std::string& dir, const std::vector<std::string>& inputs) {
    double foreground = 0, total = 0;
    for (const std::string& input : inputs) {
        const cv::Mat mask = read_written_mask(dir, input);
        foreground += cv::countNonZero(mask);
        total += static_cast<double>(mask.total());
    }
    return foreground / total;
}

}  // namespace

TEST(Predict, MasksHaveInputSizeAndMetricsMatchTheWrittenMasks) {
    TempDir out;
    PredictOptions options = base_options(kvasir_images(), out / "pred");
    options.masks_dir = kKvasirMasks;
    options.overlay = true;
    const Captured run = predict(options);
    const PredictReport& report = run.report;
    EXPECT_EQ(report.images_total, kKvasirIds.size());
    EXPECT_EQ(report.images_ok, kKvasirIds.size());
    EXPECT_EQ(report.images_failed, 0u);
    EXPECT_EQ(report.exit_code(), 0);
    EXPECT_EQ(report.images_inferred, kKvasirIds.size());
    EXPECT_GT(report.peak_rss_bytes, 0u);
    EXPECT_NE(run.out.find("images/s"), std::string::npos) << run.out;
    EXPECT_NE(run.out.find("peak RSS"), std::string::npos) << run.out;

    std::string header;
    const std::vector<CsvRow> rows = read_metrics_csv(options.out_dir + "/metrics.csv", &header);
    EXPECT_EQ(header, "id,width,height,dice,iou,mean_iou");
    ASSERT_EQ(rows.size(), kKvasirIds.size());
    std::vector<double> dice;
    for (size_t i = 0; i < kKvasirIds.size(); ++i) {
        const std::string input = kvasir_image(kKvasirIds[i]);
        const cv::Mat image = read_image(input);
        const cv::Mat mask = read_written_mask(options.out_dir, input);
        ASSERT_FALSE(mask.empty()) << input;
        EXPECT_EQ(mask.type(), CV_8UC1) << input;
        EXPECT_EQ(mask.size(), image.size()) << input;
        EXPECT_TRUE(only_0_and_255(mask)) << input;
        const cv::Mat overlay = cv::imread(options.out_dir + "/" + kKvasirIds[i] + "_overlay.png", cv::IMREAD_UNCHANGED);
        EXPECT_EQ(overlay.size(), image.size()) << input;
        EXPECT_EQ(overlay.type(), CV_8UC3) << input;

        const CsvRow& row = rows[i];  // input order
        EXPECT_EQ(row.id, kKvasirIds[i]);
        EXPECT_EQ(row.width, image.cols);
        EXPECT_EQ(row.height, image.rows);
        const MaskMetrics expected = compute_mask_metrics(mask, read_mask(kKvasirMasks + "/" + kKvasirIds[i] + ".jpg"));
        EXPECT_NEAR(row.dice, expected.dice, 1e-6) << input;
        EXPECT_NEAR(row.iou, expected.iou, 1e-6) << input;
        EXPECT_NEAR(row.mean_iou, expected.mean_iou, 1e-6) << input;
        dice.push_back(row.dice);
    }
    const nlohmann::json summary = nlohmann::json::parse(read_text(options.out_dir + "/summary.json"));
    EXPECT_EQ(summary["images"]["ok"], kKvasirIds.size());
    EXPECT_EQ(summary["tool_version"], tool_version("resunet"));
    EXPECT_EQ(summary["images"]["failed"], 0);
    EXPECT_NEAR(summary["per_image"]["dice"]["mean"].get<double>(), summarize(dice).mean, 1e-6);
    EXPECT_NEAR(summary["per_image"]["dice"]["std"].get<double>(), summarize(dice).std, 1e-6);
    EXPECT_NEAR(report.dice.mean, summarize(dice).mean, 1e-6);
    EXPECT_NE(run.out.find("dice"), std::string::npos);
    EXPECT_NE(run.out.find("±"), std::string::npos);
    std::printf("[          ] foreground share %.3f (head bias shifted by %.3f); dice %.3f ± %.3f\n",
                foreground_share(options.out_dir, kvasir_images()), -test_model().median_logit, report.dice.mean,
                report.dice.std);
}

TEST(Predict, WrittenMaskIsTheResizedLogitMapThresholdedAtZero) {
    // Rebuild by hand what predict does for one image: INTER_AREA to the model size, normalise, fp32 engine,
    // logits_to_mask (bilinear on logits, > 0) at the original size.
    TempDir out;
    const std::string input = kvasir_image(kKvasirIds[0]);
    PredictOptions options = base_options({input}, out / "pred");
    options.precision = Precision::fp32;
    predict(options);

    const TestModel& model = test_model();
    const SafetensorsFile file = load_safetensors(model.fp32_path);
    Engine engine(build_resunet(model.config), file.tensors);
    const cv::Mat image = read_image(input);
    cv::Mat resized;
    cv::resize(image, resized, cv::Size(64, 64), 0, 0, cv::INTER_AREA);
    const HostTensor tensor = image_to_tensor(resized, kImageNetMean, kImageNetStd);
    std::vector<float> logits(64 * 64);
    engine.run(tensor.f32(), 1, logits.data());
    const cv::Mat expected = logits_to_mask(logits.data(), 64, 64, image.cols, image.rows) * 255;  // PNGs are 0/255
    const cv::Mat written = read_written_mask(options.out_dir, input);
    ASSERT_EQ(written.size(), expected.size());
    EXPECT_EQ(cv::countNonZero(written != expected), 0);

    // The rule itself: a left-negative, right-positive 2x2 map splits a 6x3 mask down the middle.
    const float two_by_two[] = {-1.0f, 1.0f, -1.0f, 1.0f};
    const cv::Mat split = logits_to_mask(two_by_two, 2, 2, 6, 3);
    ASSERT_EQ(split.size(), cv::Size(6, 3));
    for (int y = 0; y < 3; ++y)
        for (int x = 0; x < 6; ++x) EXPECT_EQ(split.at<uchar>(y, x), x < 3 ? 0 : 1) << x << "," << y;
}

// --fast-decode: JPEGs decode at 1/2..1/8 scale while still at least the model size. Masks keep the original
// size; the model input (after INTER_AREA to the model size) differs from a full decode's by less than 3 grey
// levels on average (measured: at most 1.98 on these six images at sizes 64, 128 and 224).
TEST(Predict, FastDecodeKeepsOriginalSizesAndNearlyTheSameModelInput) {
    double worst = 0;
    for (const std::string& id : kKvasirIds) {
        const std::string input = kvasir_image(id);
        const cv::Mat full = read_image(input);
        for (int size : {64, 128, 224}) {
            cv::Size original;
            const cv::Mat reduced = read_image_reduced(input, 2 * size, original);  // as predict asks
            EXPECT_EQ(original, full.size()) << input;
            const int factor = static_cast<int>(std::lround(static_cast<double>(full.cols) / reduced.cols));
            EXPECT_TRUE(factor == 1 || factor == 2 || factor == 4 || factor == 8) << input << " " << reduced.size();
            if (factor > 1) {
                EXPECT_GE(std::min(reduced.cols, reduced.rows), 2 * size) << input;
            }
            if (factor < 8) {
                EXPECT_LT(std::min(full.cols, full.rows) / (2 * factor), 2 * size) << "a larger reduction was possible: " << input;
            }
            cv::Mat a, b, difference;
            cv::resize(full, a, cv::Size(size, size), 0, 0, cv::INTER_AREA);
            cv::resize(reduced, b, cv::Size(size, size), 0, 0, cv::INTER_AREA);
            cv::absdiff(a, b, difference);
            const double mean = cv::mean(difference.reshape(1))[0];
            worst = std::max(worst, mean);
            EXPECT_LT(mean, 3.0) << input << " at " << size << ": mean |difference| " << mean << " grey levels";
        }
    }
    std::printf("largest mean |full - reduced decode| after INTER_AREA: %.2f grey levels\n", worst);
    // Not a JPEG: a full decode.
    TempDir dir;
    const cv::Mat png(40, 30, CV_8UC3, cv::Scalar(10, 20, 30));
    cv::imwrite(dir / "small.png", png);
    cv::Size original;
    EXPECT_EQ(read_image_reduced(dir / "small.png", 4, original).size(), cv::Size(30, 40));
    EXPECT_EQ(original, cv::Size(30, 40));

    PredictOptions options = base_options(kvasir_images(), dir / "pred");
    options.fast_decode = true;
    options.masks_dir = kKvasirMasks;
    const Captured run = predict(options);
    EXPECT_EQ(run.report.images_ok, kKvasirIds.size());
    EXPECT_NE(run.out.find("--fast-decode"), std::string::npos) << run.out;
    for (const std::string& input : kvasir_images()) {
        const cv::Mat mask = read_written_mask(options.out_dir, input);
        EXPECT_EQ(mask.size(), read_image(input).size()) << input;
    }
}

TEST(Predict, Int8AndStaticInt8AgreeWithFp32) {
    TempDir out;
    const std::vector<std::string> inputs = kvasir_images();
    PredictOptions options = base_options(inputs, out / "fp32");
    options.precision = Precision::fp32;
    EXPECT_EQ(predict(options).report.engine, "fp32");

    options.out_dir = out / "int8";
    options.precision = Precision::int8;
    // the default --int8-conv (measured) says what it chose after the scales
    const std::string int8_engine = predict(options).report.engine;
    EXPECT_TRUE(int8_engine.starts_with("int8 (dynamic scales); int8 3x3 convolutions: ")) << int8_engine;

    options.out_dir = out / "static";
    options.precision = Precision::static_int8;
    options.calibration_images = 3;
    const Captured calibrated = predict(options);
    EXPECT_NE(calibrated.log.find("calibrated on the fixed synthetic set of 3 images"), std::string::npos) << calibrated.log;
    EXPECT_EQ(calibrated.report.images_ok, inputs.size());

    options.out_dir = out / "int8-file";
    options.model_path = test_model().int8_path;
    options.precision = Precision::int8;
    EXPECT_EQ(predict(options).report.images_ok, inputs.size());

    options.out_dir = out / "int8-file-static";
    options.model_path = test_model().int8_static_path;
    options.precision = Precision::static_int8;
    const Captured stored = predict(options);
    EXPECT_TRUE(stored.report.engine.starts_with("int8 (static scales stored in the model); int8 3x3 convolutions: "))
        << stored.report.engine;
    EXPECT_EQ(stored.log.find("calibrated on"), std::string::npos) << stored.log;

    const double share = foreground_share(out / "fp32", inputs);
    EXPECT_GT(share, 0.05) << "the test model predicts (almost) nothing: agreement would be trivial";
    EXPECT_LT(share, 0.95) << "the test model predicts (almost) everything: agreement would be trivial";
    for (const char* dir : {"int8", "static", "int8-file", "int8-file-static"}) {
        const double agreement = mask_agreement(out / "fp32", out / dir, inputs);
        std::printf("[          ] pixel agreement fp32 vs %-16s %.4f (fp32 foreground share %.3f)\n", dir, agreement, share);
        EXPECT_GE(agreement, 0.95) << dir;
    }
}

TEST(Predict, DecodesGrayscaleRgba16BitCmykTinyAndLargeImages) {
    TempDir dir;
    std::vector<std::string> inputs;
    auto add = [&](const std::string& name, const cv::Mat& image) {
        ASSERT_TRUE(cv::imwrite(dir / name, image)) << name;
        inputs.push_back(dir / name);
    };
    cv::Mat gray(150, 200, CV_8UC1);
    cv::randu(gray, 0, 256);
    add("gray.png", gray);
    cv::Mat rgba(90, 120, CV_8UC4, cv::Scalar(10, 20, 30, 128));
    add("rgba.png", rgba);
    cv::Mat deep(80, 100, CV_16UC3, cv::Scalar(0, 0x8000, 0xFFFF));
    add("deep16.png", deep);
    add("gray16.png", cv::Mat(70, 50, CV_16UC1, cv::Scalar(0x4000)));
    add("tiny.png", cv::Mat(1, 1, CV_8UC3, cv::Scalar(0, 0, 255)));
    add("wide.bmp", cv::Mat(20, 300, CV_8UC3, cv::Scalar(40, 80, 120)));
    add("tall.tif", cv::Mat(333, 17, CV_8UC3, cv::Scalar(5, 6, 7)));
    cv::Mat large;
    cv::resize(read_image(kvasir_image(kKvasirIds[5])), large, cv::Size(3000, 2000), 0, 0, cv::INTER_LINEAR);
    add("large.jpg", large);
    write_bytes(dir / "cmyk.jpg", kCmykJpeg, sizeof(kCmykJpeg));
    inputs.push_back(dir / "cmyk.jpg");

    // What read_image (cv::IMREAD_COLOR) makes of them: always 8-bit BGR.
    for (const std::string& input : inputs) EXPECT_EQ(read_image(input).type(), CV_8UC3) << input;
    EXPECT_EQ(read_image(dir / "deep16.png").at<cv::Vec3b>(0, 0), cv::Vec3b(0, 128, 255));  // 16 -> 8 bit by >> 8
    EXPECT_EQ(read_image(dir / "gray16.png").at<cv::Vec3b>(0, 0), cv::Vec3b(64, 64, 64));
    EXPECT_EQ(read_image(dir / "rgba.png").at<cv::Vec3b>(0, 0), cv::Vec3b(10, 20, 30));  // alpha dropped
    const cv::Mat cmyk = read_image(dir / "cmyk.jpg");
    ASSERT_EQ(cmyk.size(), cv::Size(16, 8));
    const cv::Vec3b red = cmyk.at<cv::Vec3b>(4, 2), blue = cmyk.at<cv::Vec3b>(4, 13);
    EXPECT_GT(red[2], 240);
    EXPECT_LT(red[0] + red[1], 20);
    EXPECT_GT(blue[0], 240);
    EXPECT_LT(blue[1] + blue[2], 20);

    PredictOptions options = base_options(inputs, dir / "pred");
    options.overlay = true;
    const Captured run = predict(options);
    EXPECT_EQ(run.report.images_failed, 0u) << run.log;
    EXPECT_EQ(run.report.images_ok, inputs.size());
    for (const std::string& input : inputs) {
        const cv::Mat mask = read_written_mask(options.out_dir, input);
        ASSERT_FALSE(mask.empty()) << input;
        EXPECT_EQ(mask.size(), read_image(input).size()) << input;
        EXPECT_TRUE(only_0_and_255(mask)) << input;
    }
}

TEST(Predict, BrokenFilesAreReportedAndTheRestContinue) {
    TempDir dir;
    std::vector<unsigned char> noise(4096);
    std::mt19937 rng(7);
    for (unsigned char& byte : noise) byte = static_cast<unsigned char>(rng());
    write_bytes(dir / "corrupt.jpg", noise.data(), noise.size());
    write_bytes(dir / "empty.png", "", 0);
    const std::string missing = dir / "deleted.png";
    {
        std::ofstream list(dir / "list.txt");
        list << missing << "\n" << kvasir_image(kKvasirIds[1]) << "\n";
    }
    PredictOptions options =
        base_options({kvasir_image(kKvasirIds[0]), dir / "corrupt.jpg", dir / "empty.png", list_argument(dir / "list.txt")}, dir / "pred");
    options.masks_dir = kKvasirMasks;
    const std::string masks_only = dir / "masks";  // ground truth must exist for every input, even broken ones
    fs::create_directories(masks_only);
    for (const char* stem : {"corrupt", "empty", "deleted"})
        cv::imwrite(masks_only + "/" + stem + ".png", cv::Mat(4, 4, CV_8UC1, cv::Scalar(0)));
    for (int i = 0; i < 2; ++i) fs::copy_file(kKvasirMasks + "/" + kKvasirIds[i] + ".jpg", masks_only + "/" + kKvasirIds[i] + ".jpg");
    options.masks_dir = masks_only;

    const Captured run = predict(options);
    const PredictReport& report = run.report;
    EXPECT_EQ(report.images_total, 5u);
    EXPECT_EQ(report.images_ok, 2u);
    EXPECT_EQ(report.images_failed, 3u);
    EXPECT_EQ(report.exit_code(), 1);
    ASSERT_EQ(report.failures.size(), 3u);
    const std::vector<std::string> failed = {dir / "corrupt.jpg", dir / "empty.png", missing};  // input order
    for (size_t i = 0; i < failed.size(); ++i) {
        EXPECT_EQ(report.failures[i].path, failed[i]);
        EXPECT_NE(report.failures[i].message.find(failed[i]), std::string::npos) << report.failures[i].message;
        EXPECT_EQ(report.failures[i].message.find('\n'), std::string::npos) << report.failures[i].message;
        EXPECT_NE(run.log.find("error: " + report.failures[i].message + "\n"), std::string::npos) << run.log;
        EXPECT_FALSE(fs::exists(options.out_dir + "/" + stem_of(failed[i]) + ".png")) << failed[i];
    }
    EXPECT_NE(report.failures[2].message.find("No such file"), std::string::npos) << report.failures[2].message;
    EXPECT_NE(run.out.find("2 ok, 3 failed"), std::string::npos) << run.out;
    EXPECT_EQ(read_metrics_csv(options.out_dir + "/metrics.csv", nullptr).size(), 2u);
    EXPECT_TRUE(fs::exists(options.out_dir + "/" + kKvasirIds[0] + ".png"));
    EXPECT_TRUE(fs::exists(options.out_dir + "/" + kKvasirIds[1] + ".png"));
}

TEST(Predict, OversizedImagesAreRefusedPerFile) {
    TempDir dir;
    // A PNG whose header claims 20000 x 20000 (400 megapixels): refused from the header, never decoded.
    const unsigned char huge_png[] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, 'I', 'H', 'D', 'R',
                                      0, 0, 0x4E, 0x20, 0, 0, 0x4E, 0x20, 8, 2, 0, 0, 0, 0, 0, 0, 0};
    write_bytes(dir / "huge.png", huge_png, sizeof(huge_png));
    EXPECT_EQ(probe_image_size(dir / "huge.png"), cv::Size(20000, 20000));
    cv::imwrite(dir / "medium.png", cv::Mat(80, 100, CV_8UC3, cv::Scalar(1, 2, 3)));
    cv::imwrite(dir / "small.png", cv::Mat(10, 10, CV_8UC3, cv::Scalar(1, 2, 3)));
    EXPECT_EQ(probe_image_size(dir / "medium.png"), cv::Size(100, 80));
    EXPECT_EQ(probe_image_size(kvasir_image(kKvasirIds[0])), read_image(kvasir_image(kKvasirIds[0])).size());

    PredictOptions options = base_options({dir / "huge.png", dir / "small.png"}, dir / "pred");
    Captured run = predict(options);
    EXPECT_EQ(run.report.images_ok, 1u);
    ASSERT_EQ(run.report.failures.size(), 1u);
    EXPECT_NE(run.report.failures[0].message.find("400.0 megapixels, over the limit of 100.0"), std::string::npos)
        << run.report.failures[0].message;

    options.inputs = {dir / "medium.png", dir / "small.png"};
    options.out_dir = dir / "pred-limited";
    options.max_pixels = 1000;  // 100x80 is over, 10x10 is under
    run = predict(options);
    EXPECT_EQ(run.report.images_ok, 1u);
    ASSERT_EQ(run.report.failures.size(), 1u);
    EXPECT_EQ(run.report.failures[0].path, dir / "medium.png");
}

TEST(Predict, RefusesToOverwriteUnlessAsked) {
    TempDir dir;
    const std::vector<std::string> inputs = {kvasir_image(kKvasirIds[0]), kvasir_image(kKvasirIds[1])};
    PredictOptions options = base_options(inputs, dir / "pred");
    options.masks_dir = kKvasirMasks;
    ASSERT_EQ(predict(options).report.images_ok, 2u);

    // Only the second image's mask exists now: the message names it, and nothing is touched.
    const std::string first_mask = options.out_dir + "/" + kKvasirIds[0] + ".png";
    const std::string second_mask = options.out_dir + "/" + kKvasirIds[1] + ".png";
    fs::remove(first_mask);
    write_bytes(second_mask, "old", 3);
    const std::string message = usage_error_of(options);
    EXPECT_NE(message.find(second_mask + " exists"), std::string::npos) << message;
    EXPECT_NE(message.find("and 2 more outputs"), std::string::npos) << message;  // metrics.csv, summary.json
    EXPECT_NE(message.find("--overwrite"), std::string::npos) << message;
    EXPECT_FALSE(fs::exists(first_mask)) << "work started before the overwrite check";
    EXPECT_EQ(read_text(second_mask), "old");

    options.overwrite = true;
    const Captured run = predict(options);
    EXPECT_EQ(run.report.images_ok, 2u);
    const cv::Mat rewritten = cv::imread(second_mask, cv::IMREAD_UNCHANGED);
    EXPECT_EQ(rewritten.size(), read_image(inputs[1]).size());
    EXPECT_TRUE(fs::exists(first_mask));
    EXPECT_EQ(read_metrics_csv(options.out_dir + "/metrics.csv", nullptr).size(), 2u);
}

TEST(Predict, UsageErrorsComeBeforeAnyWork) {
    TempDir dir;
    const std::string image = kvasir_image(kKvasirIds[0]);
    PredictOptions good = base_options({image}, dir / "pred");
    auto expect_refused = [&](PredictOptions options, const std::string& text, bool check_no_output = true) {
        const std::string message = usage_error_of(options);
        EXPECT_NE(message.find(text), std::string::npos) << "message: " << message << "\nexpected: " << text;
        EXPECT_EQ(message.find('\n'), std::string::npos) << message;
        std::error_code ec;
        if (check_no_output) {
            EXPECT_FALSE(fs::exists(fs::path(options.out_dir) / (kKvasirIds[0] + ".png"), ec)) << text;
        }
    };

    PredictOptions options = good;
    options.model_path = dir / "no-such-model.safetensors";
    expect_refused(options, "no-such-model.safetensors': No such file");

    write_bytes(dir / "junk.safetensors", "not a model", 11);
    options.model_path = dir / "junk.safetensors";
    expect_refused(options, "--model");

    options = good;
    options.model_path = test_model().int8_path;
    options.precision = Precision::fp32;
    expect_refused(options, "is an int8 file");

    write_bytes(dir / "a-file", "x", 1);
    options = good;
    options.out_dir = dir / "a-file" + "/pred";
    expect_refused(options, "--out");

    options = good;
    options.inputs = {image, dir / "typo.jpg"};
    expect_refused(options, "typo.jpg' does not exist");

    options = good;
    options.inputs = {list_argument(dir / "no-list.txt")};
    expect_refused(options, "no-list.txt");

    fs::create_directories(dir / "empty-folder");
    options.inputs = {dir / "empty-folder"};
    expect_refused(options, "no images found");

    fs::create_directories(dir / "other");
    cv::imwrite(dir / "other" + "/" + kKvasirIds[0] + ".png", cv::Mat(5, 5, CV_8UC3, cv::Scalar(0)));
    options.inputs = {image, dir / "other" + "/" + kKvasirIds[0] + ".png"};
    expect_refused(options, "would both write");

    options = good;
    options.inputs = {dir / "other"};
    options.out_dir = dir / "other";
    options.overwrite = true;
    expect_refused(options, "would replace an input image", /*check_no_output=*/false);

    options = good;
    options.inputs = {dir / "other" + "/" + kKvasirIds[0] + ".png"};
    options.masks_dir = dir / "empty-folder";
    expect_refused(options, "no ground-truth mask");

    options = good;
    options.batch = 0;
    expect_refused(options, "--batch");

    EXPECT_FALSE(fs::exists(dir / "pred")) << "the output folder was created by a refused run";
}

TEST(Predict, InputsFromFoldersAndListFiles) {
    TempDir dir;
    const std::string folder = dir / "images";
    fs::create_directories(folder + "/sub");
    for (const char* name : {"b.png", "a.JPG", ".hidden.png", "c.tiff", "sub/inner.png"})
        cv::imwrite(folder + "/" + name, cv::Mat(3, 3, CV_8UC3, cv::Scalar(0)));
    write_bytes(folder + "/notes.txt", "x", 1);
    EXPECT_EQ(collect_input_images({folder}),
              (std::vector<std::string>{folder + "/a.JPG", folder + "/b.png", folder + "/c.tiff"}));
    {
        std::ofstream list(dir / "list.txt");
        list << "# comment\n\n  " << folder + "/c.tiff" << "  \r\n" << folder + "/sub" << "\n" << dir / "gone.png" << "\n";
    }
    EXPECT_EQ(collect_input_images({list_argument(dir / "list.txt"), folder + "/b.png"}),
              (std::vector<std::string>{folder + "/c.tiff", folder + "/sub/inner.png", dir / "gone.png", folder + "/b.png"}));
}

TEST(Predict, ProgressBarAndLogWhenAsked) {
    TempDir dir;
    PredictOptions options = base_options({kvasir_image(kKvasirIds[0]), kvasir_image(kKvasirIds[1])}, dir / "pred");
    options.progress = true;
    options.batch = 1;
    const Captured run = predict(options);
    EXPECT_NE(run.log.find("2/2 images"), std::string::npos) << run.log;
    EXPECT_NE(run.log.find("images/s"), std::string::npos) << run.log;
    EXPECT_NE(run.log.find("ETA"), std::string::npos) << run.log;
}

// The built program: exit codes 0 (ok), 1 (an image failed), 2 (usage), and one-line errors.
TEST(PredictBinary, HelpUsageErrorsAndExitCodes) {
    const fs::path binary = fs::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet";
    if (!fs::exists(binary)) GTEST_SKIP() << binary << " is not built (cmake --build ... --target resunet)";
    TempDir dir;
    auto run = [&](const std::string& arguments, std::string* out = nullptr, std::string* err = nullptr) {
        const std::string command = binary.string() + " " + arguments + " >" + (dir / "stdout") + " 2>" + (dir / "stderr");
        const int status = std::system(command.c_str());
        if (out) *out = read_text(dir / "stdout");
        if (err) *err = read_text(dir / "stderr");
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    };
    std::string out, err;
    EXPECT_EQ(run("--help", &out), 0);
    EXPECT_NE(out.find("predict"), std::string::npos) << out;
    EXPECT_NE(out.find("summary"), std::string::npos) << out;
    EXPECT_EQ(run("predict --help", &out), 0);
    EXPECT_NE(out.find("--calibration-count"), std::string::npos) << out;

    const std::string image = kvasir_image(kKvasirIds[0]);
    const std::string model = test_model().fp32_path;
    EXPECT_EQ(run("predict " + image + " --model " + (dir / "missing.safetensors") + " --out " + (dir / "pred"), &out, &err), 2);
    EXPECT_NE(err.find("missing.safetensors"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_FALSE(fs::exists(dir / "pred"));
    EXPECT_EQ(run("", &out, &err), 2);
    EXPECT_EQ(run("predict " + image + " --out x", &out, &err), 2);  // no --model
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --batch 0", &out, &err), 2);
    EXPECT_NE(err.find("--batch"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --precision int4", &out, &err), 2);
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --no-such-flag", &out, &err), 2);

    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred") + " --threads 2", &out, &err), 0) << err;
    EXPECT_NE(out.find("1 ok, 0 failed"), std::string::npos) << out;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred"), &out, &err), 2);  // exists
    EXPECT_NE(err.find(kKvasirIds[0] + ".png exists"), std::string::npos) << err;

    write_bytes(dir / "broken.png", "definitely not a png", 20);
    EXPECT_EQ(run("predict " + image + " " + (dir / "broken.png") + " --model " + model + " --out " + (dir / "pred") +
                      " --overwrite --precision static-int8 --calibration-count 2",
                  &out, &err),
              1);
    EXPECT_NE(err.find("broken.png"), std::string::npos) << err;
    EXPECT_NE(err.find("calibrated on the fixed synthetic set of 2 images"), std::string::npos) << err;  // never the run's inputs
    EXPECT_NE(out.find("1 ok, 1 failed"), std::string::npos) << out;

    // fp32 planning flags: taken with --precision fp32; with int8 only --tune (its fp32 layers), the others
    // refused (one line, exit 2).
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-tuned") +
                      " --precision fp32 --tune off --plan-cache none --memory-budget -1",
                  &out, &err),
              0)
        << err;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-int8-untuned") + " --tune off", &out, &err), 0)
        << err;
    // --plan-cache holds the int8 engine's measured choices (--tune fast|full with --int8-conv auto), and
    // means nothing to the default rule or to --int8-conv direct
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-int8-nocache") + " --plan-cache none", &out, &err), 0)
        << err;
    EXPECT_NE(out.find("int8 3x3 convolutions: "), std::string::npos) << out;  // the default plan says what it chose
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-int8-cached") + " --tune fast --plan-cache " +
                      (dir / "plans"),
                  &out, &err),
              0)
        << err;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-int8") + " --plan-cache " + (dir / "plans") +
                      " --int8-conv direct",
                  &out, &err),
              2);
    EXPECT_NE(err.find("--precision fp32"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_FALSE(fs::exists(dir / "pred-int8"));
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --precision fp32 --tune fastest", &out, &err), 2);
    // --int8-conv: the int8 engine's 3x3 convolutions; refused with fp32 and for an unknown word (one line, exit 2).
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-int8-winograd") + " --int8-conv winograd",
                  &out, &err),
              0)
        << err;
    EXPECT_NE(out.find("1 ok, 0 failed"), std::string::npos) << out;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --precision fp32 --int8-conv winograd", &out, &err), 2);
    EXPECT_NE(err.find("--int8-conv"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --int8-conv fastest", &out, &err), 2);
    // mixed: each int8 3x3 layer timed in both precisions; the plan says what each measured.
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-int8-mixed") + " --int8-conv mixed",
                  &out, &err),
              0)
        << err;
    EXPECT_NE(out.find("1 ok, 0 failed"), std::string::npos) << out;
    EXPECT_NE(out.find("--int8-conv mixed: int8 3x3 convolutions"), std::string::npos) << out;  // the engine says what it chose
    EXPECT_EQ(run("plan --model " + model + " --precision int8 --int8-conv mixed", &out, &err), 0) << err;
    EXPECT_NE(out.find("precision (mixed): u8s8 direct"), std::string::npos) << out;
    EXPECT_EQ(run("eval --model " + model + " --data " + kKvasirRoot + " --limit 2 --precision fp32 --tune off --plan-cache none",
                  &out, &err),
              0)
        << err;
    EXPECT_EQ(run("eval --model " + model + " --data " + kKvasirRoot + " --limit 2 --memory-budget 100", &out, &err), 2);
    EXPECT_NE(err.find("--precision fp32"), std::string::npos) << err;

    // A saved plan runs the same masks on another thread count.
    EXPECT_EQ(run("plan --model " + model + " --precision int8 --threads 1 --save-plan " + (dir / "int8-plan.json"), &out, &err), 0)
        << err;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-plan-t1") + " --threads 1", &out, &err), 0) << err;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out " + (dir / "pred-plan-t2") + " --threads 2 --plan " +
                      (dir / "int8-plan.json"),
                  &out, &err),
              0)
        << err;
    EXPECT_EQ(read_text((dir / "pred-plan-t1") + "/" + kKvasirIds[0] + ".png"),
              read_text((dir / "pred-plan-t2") + "/" + kKvasirIds[0] + ".png"));
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --precision fp32 --plan " + (dir / "int8-plan.json"), &out, &err), 2);
    EXPECT_NE(err.find("int8 plan"), std::string::npos) << err;
    EXPECT_EQ(run("predict " + image + " --model " + model + " --out x --plan " + (dir / "missing.json"), &out, &err), 2);
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;

    EXPECT_EQ(run("summary --width 8 --depth 2 --size 32", &out, &err), 0) << err;
    EXPECT_NE(out.find("Total parameters"), std::string::npos) << out;
    EXPECT_EQ(run("summary --model " + model, &out, &err), 0) << err;
    EXPECT_NE(out.find("[1, 8, 64, 64]"), std::string::npos) << out;
    EXPECT_EQ(run("summary --model " + (dir / "missing.safetensors"), &out, &err), 2);
}

// CLI nits: --depth within what the graph builds, errors with one "resunet" prefix, eval --size 0 refused
// (one line, exit 2), and --help saying what --batch and the default precision really are.
TEST(PredictBinary, FlagRangesOnePrefixAndTruthfulHelp) {
    const fs::path binary = fs::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet";
    if (!fs::exists(binary)) GTEST_SKIP() << binary << " is not built (cmake --build ... --target resunet)";
    TempDir dir;
    auto run = [&](const std::string& arguments, std::string* out, std::string* err) {
        const std::string command = binary.string() + " " + arguments + " >" + (dir / "stdout") + " 2>" + (dir / "stderr");
        const int status = std::system(command.c_str());
        *out = read_text(dir / "stdout");
        *err = read_text(dir / "stderr");
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    };
    auto one_prefix = [](const std::string& err) {  // "resunet: error: ..." or "resunet eval: error: ...", once
        return err.rfind("resunet", 0) == 0 && err.find("error: resunet") == std::string::npos &&
               err.find("resunet:", 1) == std::string::npos;
    };
    std::string out, err;
    for (const std::string& arguments : {std::string("summary --depth 9"), std::string("summary --depth 12"),
                                         "train --data d --out " + (dir / "run") + " --depth 9"}) {
        EXPECT_EQ(run(arguments, &out, &err), 2) << arguments;
        EXPECT_NE(err.find("--depth"), std::string::npos) << arguments << ": " << err;
        EXPECT_TRUE(one_prefix(err)) << arguments << ": " << err;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << arguments << ": " << err;
    }
    EXPECT_EQ(run("summary --width 8 --depth 8 --size 256", &out, &err), 0) << err;

    // An error from the graph builder, through main and through a subcommand's run_command.
    EXPECT_EQ(run("summary --width 8 --size 100", &out, &err), 2);
    EXPECT_TRUE(one_prefix(err)) << err;
    EXPECT_NE(err.find("divisible by 16"), std::string::npos) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;

    EXPECT_EQ(run("eval --model " + (dir / "missing.safetensors") + " --data " + kKvasirRoot + " --size 0", &out, &err), 2);
    EXPECT_NE(err.find("--size"), std::string::npos) << err;
    EXPECT_TRUE(one_prefix(err)) << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;

    EXPECT_EQ(run("predict --help", &out, &err), 0);
    EXPECT_NE(out.find("masks do not depend on it"), std::string::npos) << out;
    EXPECT_EQ(out.find("Images per engine call"), std::string::npos) << out;
    EXPECT_NE(out.find("int8 (scales computed per image, the default)"), std::string::npos) << out;
    EXPECT_EQ(run("eval --help", &out, &err), 0);
    EXPECT_NE(out.find("int8 (scales computed per image, the default)"), std::string::npos) << out;
}
