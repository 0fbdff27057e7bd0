// Tests for apps/lib/quantize_cli (`resunet quantize`) and the reproducible static-int8 paths of eval and
// predict: the file reproduces eval's static-int8 Dice, static-int8 masks do not depend on the other images
// of a run, int8 files made with and without ONEDNN_MAX_CPU_ISA=AVX2 load and run under both, bad input
// is one line and exit 2. The built `resunet` binary is run as the user runs it; a few Kvasir-SEG images.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <opencv2/imgproc.hpp>

#include "apps/lib/predict_command.h"
#include "apps/lib/quantize_cli.h"
#include "engine/winograd_own.h"
#include "apps/lib/eval_command.h"
#include "apps/lib/train_command.h"
#include "data/dataset.h"
#include "data/split.h"
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
const std::string kSplitPath = std::string(RESUNET_SOURCE_DIR) + "/models/resunet-w16-s192/split.json";

struct TempDir {
    fs::path path;
    TempDir() {
        static std::atomic<int> counter{0};
        path = fs::temp_directory_path() /
               ("resunet_test_quantize_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
        fs::remove_all(path);
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string operator/(const std::string& name) const { return (path / name).string(); }
};

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

fs::path resunet_binary() { return fs::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet"; }

// Runs the built program with `environment` ("VAR=value ..." or "env -u VAR") in front; returns its exit status.
int run_binary(const TempDir& dir, const std::string& environment, const std::string& arguments, std::string* out = nullptr,
               std::string* err = nullptr) {
    const std::string command = environment + " " + resunet_binary().string() + " " + arguments + " >" + (dir / "stdout") +
                                " 2>" + (dir / "stderr");
    const int status = std::system(command.c_str());
    if (out) *out = read_text(dir / "stdout");
    if (err) *err = read_text(dir / "stderr");
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Width 8, depth 4, size 64, random weights, head bias at minus the median logit over a few training images
// (masks about half foreground, so int8 differences can show).
struct TestModel {
    TempDir dir;
    ResUNetConfig config;
    std::string fp32_path;
    Dataset dataset;
    Split split;
};

const TestModel& test_model() {
    static const std::unique_ptr<TestModel> model = [] {
        auto m = std::make_unique<TestModel>();
        m->config.width = 8;
        m->config.depth = 4;
        m->config.height = m->config.width_px = 64;
        m->dataset = scan_dataset(kKvasirRoot);
        m->split = load_split(kSplitPath, m->dataset);
        const Graph graph = build_resunet(m->config);
        TensorMap weights = init_weights(graph, 2024);
        const std::vector<std::string> ids = calibration_ids(m->split.train_ids, 4);
        const std::vector<float> src = load_calibration_images(m->dataset, ids, 64);
        std::vector<float> logits(ids.size() * 64 * 64);
        EngineOptions engine_options;
        engine_options.threads = 1;
        Engine(graph, weights, engine_options).run(src.data(), static_cast<int>(ids.size()), logits.data());
        std::nth_element(logits.begin(), logits.begin() + static_cast<std::ptrdiff_t>(logits.size() / 2), logits.end());
        weights.at("head.bias").f32()[0] -= logits[logits.size() / 2];
        m->fp32_path = m->dir / "model.safetensors";
        save_safetensors(m->fp32_path, weights, resunet_metadata(m->config));
        return m;
    }();
    return *model;
}

EvalReport eval_static_int8(const std::string& model_path, int calibration_images) {
    EvalCommandOptions options;
    options.model_path = model_path;
    options.data_dir = kKvasirRoot;
    options.split_path = kSplitPath;
    options.precision = Precision::static_int8;
    options.calibration_images = calibration_images;
    options.limit = 8;
    options.threads = 1;
    options.log = nullptr;
    options.out = nullptr;
    return run_eval(options);
}

std::string kvasir_image(const std::string& id) { return kKvasirRoot + "/images/" + id + ".jpg"; }

}  // namespace

// The fixed calibration sets: the first N sorted ids, or N drawn with a seed (the same every time), and a
// synthetic set that depends only on (count, size).
TEST(QuantizeCalibration, FixedSets) {
    const std::vector<std::string> ids = {"d", "b", "a", "c", "e"};
    EXPECT_EQ(calibration_ids(ids, 3), (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_EQ(calibration_ids(ids, 9).size(), 5u);
    const std::vector<std::string> drawn = calibration_ids(ids, 3, 7);
    EXPECT_EQ(drawn, calibration_ids(ids, 3, 7));
    EXPECT_TRUE(std::is_sorted(drawn.begin(), drawn.end()));
    EXPECT_EQ(drawn.size(), 3u);
    const std::vector<float> a = synthetic_calibration_images(3, 32), b = synthetic_calibration_images(3, 32);
    EXPECT_EQ(a, b);
    EXPECT_EQ(a.size(), 3u * 3 * 32 * 32);
    EXPECT_NE(std::vector<float>(a.begin(), a.begin() + 3 * 32 * 32), std::vector<float>(a.begin() + 3 * 32 * 32, a.begin() + 6 * 32 * 32));
}

// `resunet quantize --data --split` writes a file whose stored scales give exactly eval's static-int8 numbers
// (eval calibrating the fp32 model on the same fixed set), with its metadata and reports.
TEST(QuantizeBinary, FileReproducesEvalStaticInt8Dice) {
    if (!fs::exists(resunet_binary())) GTEST_SKIP() << "resunet is not built";
    const TestModel& model = test_model();
    TempDir dir;
    const std::string out = dir / "model.int8.safetensors";
    std::string stdout_text, err;
    ASSERT_EQ(run_binary(dir, "", "quantize --model " + model.fp32_path + " --out " + out + " --data " + kKvasirRoot + " --split " +
                                      kSplitPath + " --calibration-count 4 --threads 1",
                         &stdout_text, &err),
              0)
        << err;
    ASSERT_TRUE(fs::exists(dir / "model.int8.report.md"));
    ASSERT_TRUE(fs::exists(dir / "model.int8.report.json"));
    EXPECT_NE(read_text(dir / "model.int8.report.md").find("| e2.conv_a |"), std::string::npos);
    const SafetensorsFile file = load_safetensors(out);
    EXPECT_TRUE(is_int8_weights(file.tensors));
    EXPECT_TRUE(file.tensors.count("e2.relu_a.input_scale") || file.tensors.count("e2.pool.input_scale"));
    const std::vector<std::string> ids = calibration_ids(model.split.train_ids, 4);
    EXPECT_EQ(file.metadata.at(kInt8WeightLevelsKey), "127");
    EXPECT_EQ(file.metadata.at(kInt8CalibrationCountKey), "4");
    EXPECT_EQ(file.metadata.at(kInt8CalibrationIdsKey), ids[0] + "," + ids[1] + "," + ids[2] + "," + ids[3]);
    EXPECT_EQ(file.metadata.at(kInt8SourceChecksumKey), load_safetensors(model.fp32_path).metadata.at(kSafetensorsChecksumKey));
    EXPECT_EQ(file.metadata.at(kInt8ToolVersionKey).rfind("resunet ", 0), 0u) << file.metadata.at(kInt8ToolVersionKey);
    // Full-range weights whatever this CPU runs.
    int largest = 0;
    for (const auto& [name, tensor] : file.tensors)
        if (name.ends_with(".weight_q"))
            for (int64_t i = 0; i < tensor.num_elements(); ++i) largest = std::max(largest, std::abs(static_cast<int>(tensor.s8()[i])));
    EXPECT_EQ(largest, kStoredWeightLevels);

    const EvalReport from_fp32 = eval_static_int8(model.fp32_path, 4);
    const EvalReport from_file = eval_static_int8(out, 16);  // stored scales win over --calibration-images
    EXPECT_NE(from_file.engine.find("stored"), std::string::npos) << from_file.engine;
    ASSERT_EQ(from_fp32.result.images, from_file.result.images);
    EXPECT_EQ(from_fp32.result.original.dice.mean, from_file.result.original.dice.mean);
    EXPECT_EQ(from_fp32.result.model_size.dice.mean, from_file.result.model_size.dice.mean);
    for (size_t i = 0; i < from_fp32.result.per_image.size(); ++i)
        EXPECT_EQ(from_fp32.result.per_image[i].dice, from_file.result.per_image[i].dice) << from_fp32.result.ids[i];
    std::cout << "  static-int8 Dice on " << from_file.result.images << " test images: eval " << from_fp32.result.original.dice.mean
              << ", quantize's file " << from_file.result.original.dice.mean << "\n";

    // --keep-fp32 keeps the layer's fp32 weights in the file.
    ASSERT_EQ(run_binary(dir, "", "quantize --model " + model.fp32_path + " --out " + (dir / "keep.safetensors") +
                                      " --calibration-count 2 --threads 1 --keep-fp32 e2.conv_a d1.conv_b"),
              0);
    const TensorMap kept = load_safetensors(dir / "keep.safetensors").tensors;
    EXPECT_TRUE(kept.count("e2.conv_a.weight"));
    EXPECT_FALSE(kept.count("e2.conv_a.weight_q"));
    EXPECT_TRUE(kept.count("e2.conv_b.weight_q"));
    EXPECT_EQ(load_safetensors(dir / "keep.safetensors").metadata.at(kInt8KeepFp32Key), "e2.conv_a,d1.conv_b");
}

// The same image gives byte-identical static-int8 masks alone and inside a run (and batch) of other images:
// with a model file without scales (fixed synthetic calibration) and with one from `resunet quantize`.
TEST(QuantizeBinary, StaticInt8MaskDoesNotDependOnTheRun) {
    if (!fs::exists(resunet_binary())) GTEST_SKIP() << "resunet is not built";
    const TestModel& model = test_model();
    TempDir dir;
    const std::string int8_path = dir / "model.int8.safetensors";
    ASSERT_EQ(run_binary(dir, "", "quantize --model " + model.fp32_path + " --out " + int8_path + " --data " + kKvasirRoot +
                                      " --split " + kSplitPath + " --calibration-count 4 --threads 1"),
              0);
    const std::vector<std::string> others = calibration_ids(model.split.test_ids, 7);
    const std::string target = model.split.test_ids.back();
    for (const std::string& model_path : {model.fp32_path, int8_path}) {
        std::string err;
        ASSERT_EQ(run_binary(dir, "", "predict " + kvasir_image(target) + " --model " + model_path + " --out " + (dir / "alone") +
                                          " --precision static-int8 --overwrite --threads 1",
                             nullptr, &err),
                  0)
            << err;
        std::string inputs;
        for (const std::string& id : others) inputs += kvasir_image(id) + " ";
        ASSERT_EQ(run_binary(dir, "", "predict " + inputs + kvasir_image(target) + " --model " + model_path + " --out " +
                                          (dir / "crowd") + " --precision static-int8 --batch 3 --overwrite --threads 1",
                             nullptr, &err),
                  0)
            << err;
        const std::string alone = read_text(dir / ("alone/" + target + ".png"));
        ASSERT_FALSE(alone.empty());
        EXPECT_EQ(alone, read_text(dir / ("crowd/" + target + ".png"))) << model_path;
    }
}

// Files quantized with ONEDNN_MAX_CPU_ISA=AVX2 (no VNNI: +-63 kernels) and without the cap both store
// +-127 weights, and each loads and runs under both settings (narrowed at load where the CPU needs it).
TEST(QuantizeBinary, FilesFromEitherIsaRunUnderBoth) {
    if (!fs::exists(resunet_binary())) GTEST_SKIP() << "resunet is not built";
    const TestModel& model = test_model();
    TempDir dir;
    const std::vector<std::pair<std::string, std::string>> settings = {{"capped", "ONEDNN_MAX_CPU_ISA=AVX2"},
                                                                       {"uncapped", "env -u ONEDNN_MAX_CPU_ISA"}};
    const std::string image = kvasir_image(model.split.test_ids.front());
    for (const auto& [made, made_env] : settings) {
        const std::string file = dir / ("model." + made + ".int8.safetensors");
        std::string err;
        ASSERT_EQ(run_binary(dir, made_env, "quantize --model " + model.fp32_path + " --out " + file + " --calibration " + image +
                                                " --threads 1",
                             nullptr, &err),
                  0)
            << err;
        int largest = 0;
        for (const auto& [name, tensor] : load_safetensors(file).tensors)
            if (name.ends_with(".weight_q"))
                for (int64_t i = 0; i < tensor.num_elements(); ++i) largest = std::max(largest, std::abs(static_cast<int>(tensor.s8()[i])));
        EXPECT_EQ(largest, 127) << made;
        for (const auto& [run_name, run_env] : settings) {
            // The file's stored scales, named or by default (--precision int8 on it is a usage error: CliVocabulary).
            for (const std::string precision : {" --precision static-int8", ""}) {
                std::string out;
                EXPECT_EQ(run_binary(dir, run_env, "predict " + image + " --model " + file + " --out " + (dir / "pred") +
                                                       " --overwrite --threads 1" + precision,
                                     &out, &err),
                          0)
                    << "made " << made << ", run " << run_name << ": " << err;
                EXPECT_NE(out.find("1 ok, 0 failed"), std::string::npos) << out;
            }
        }
    }
}

// `resunet plan` of an int8 file: int8 by default, with the stored static scales; a layer kept fp32 lists the
// algorithms measured for it; asking for its fp32 plan is a one-line error (an int8 file has no fp32 weights).
TEST(QuantizeBinary, PlanOfAnInt8File) {
    if (!fs::exists(resunet_binary())) GTEST_SKIP() << "resunet is not built";
    const TestModel& model = test_model();
    TempDir dir;
    const std::string int8_path = dir / "int8.safetensors";
    ASSERT_EQ(run_binary(dir, "", "quantize --model " + model.fp32_path + " --out " + int8_path +
                                      " --calibration-count 1 --threads 1 --keep-fp32 e2.conv_a"),
              0);
    std::string out, err;
    ASSERT_EQ(run_binary(dir, "", "plan --model " + int8_path + " --threads 1", &out, &err), 0) << err;
    EXPECT_NE(out.find("an int8 file"), std::string::npos) << out;
    EXPECT_NE(out.find("plan: int8, static (stored in the file)"), std::string::npos) << out;
    const size_t row = out.find("\ne2.conv_a ");
    ASSERT_NE(row, std::string::npos) << out;
    const std::string line = out.substr(row + 1, out.find('\n', row + 1) - row - 1);
    EXPECT_NE(line.find(" f32 "), std::string::npos) << line;
    if (resunet::winograd_own_supported()) {
        EXPECT_NE(line.find("winograd_f43"), std::string::npos) << line;  // measured (chosen or not)
    }
    EXPECT_EQ(run_binary(dir, "", "plan --model " + int8_path + " --precision fp32", &out, &err), 2);
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_NE(err.find("int8 file"), std::string::npos) << err;
}

// Bad input: one line on stderr, exit 2, nothing written.
TEST(QuantizeBinary, BadInputIsOneLineAndExitTwo) {
    if (!fs::exists(resunet_binary())) GTEST_SKIP() << "resunet is not built";
    const TestModel& model = test_model();
    TempDir dir;
    const std::string int8_path = dir / "int8.safetensors";
    ASSERT_EQ(run_binary(dir, "", "quantize --model " + model.fp32_path + " --out " + int8_path + " --calibration-count 1 --threads 1"), 0);
    const std::string before = read_text(int8_path);
    struct Case {
        std::string arguments, must_mention;
    };
    const std::vector<Case> cases = {
        {"quantize --model " + (dir / "missing.safetensors") + " --out " + (dir / "a.safetensors"), "missing.safetensors"},
        {"quantize --model " + int8_path + " --out " + (dir / "b.safetensors"), "int8"},
        {"quantize --model " + model.fp32_path + " --out " + (dir / "c.safetensors") + " --keep-fp32 e9.conv_z", "e9.conv_z"},
        {"quantize --model " + model.fp32_path + " --out " + int8_path, "exists"},
        {"quantize --model " + model.fp32_path + " --out " + (dir / "d.safetensors") + " --data " + kKvasirRoot, "--split"},
        {"quantize --model " + model.fp32_path, "--out"},
    };
    for (const Case& c : cases) {
        std::string out, err;
        EXPECT_EQ(run_binary(dir, "", c.arguments, &out, &err), 2) << c.arguments << "\n" << err;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
        EXPECT_NE(err.find(c.must_mention), std::string::npos) << err;
        EXPECT_EQ(err.rfind("resunet", 0), 0u) << err;
    }
    for (const char* name : {"a", "b", "c", "d"}) EXPECT_FALSE(fs::exists(dir / (std::string(name) + ".safetensors"))) << name;
    EXPECT_EQ(read_text(int8_path), before) << "the existing --out was left as it was";
    std::string err;
    EXPECT_EQ(run_binary(dir, "", "quantize --model " + model.fp32_path + " --out " + int8_path + " --overwrite --calibration-count 1 --threads 1",
                         nullptr, &err),
              0)
        << err;
}
