// `resunet convert` (apps/lib/convert_command.h): an F16/BF16 copy of a model file loads to weights within the
// stated precision of the original and runs the same network; the original and existing outputs are never
// replaced by mistake.
#include "apps/lib/convert_command.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "engine/engine.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/safetensors.h"

namespace {

namespace fs = std::filesystem;

class ConvertCli : public ::testing::Test {
protected:
    void SetUp() override {
        dir_ = fs::temp_directory_path() / fmt::format("resunet_test_convert_{}", ::getpid());
        fs::remove_all(dir_);
        fs::create_directories(dir_);
        config_.width = 4;
        config_.depth = 2;
        config_.height = config_.width_px = 32;
        weights_ = resunet::init_weights(resunet::build_resunet(config_), 5);
        model_ = (dir_ / "m.safetensors").string();
        resunet::save_safetensors(model_, weights_, {{"resunet.width", "4"}, {"resunet.depth", "2"}});
    }
    void TearDown() override { fs::remove_all(dir_); }

    std::vector<float> run(const resunet::TensorMap& weights) const {
        const resunet::Graph graph = resunet::build_resunet(config_);
        resunet::EngineOptions options;
        options.tune = resunet::Tuning::off;
        resunet::Engine engine(graph, weights, options);
        std::vector<float> input(3 * 32 * 32);
        std::mt19937 rng(1);
        std::normal_distribution<float> normal;
        for (float& x : input) x = normal(rng);
        std::vector<float> out(32 * 32);
        engine.run(input.data(), 1, out.data());
        return out;
    }

    fs::path dir_;
    resunet::ResUNetConfig config_;
    resunet::TensorMap weights_;
    std::string model_;
};

TEST_F(ConvertCli, HalfCopiesLoadWithinTheirPrecisionAndRunTheSameNetwork) {
    const std::vector<float> reference = run(weights_);
    for (const char* floats : {"f16", "bf16"}) {
        SCOPED_TRACE(floats);
        const std::string out = (dir_ / fmt::format("m.{}.safetensors", floats)).string();
        ASSERT_EQ(resunet::convert_command({.model_path = model_, .out_path = out, .floats = floats}), 0);
        const resunet::SafetensorsFile file = resunet::load_safetensors(out);
        EXPECT_EQ(file.metadata.at("resunet.width"), "4");  // metadata kept
        EXPECT_LT(fs::file_size(out), fs::file_size(model_) * 6 / 10);
        // Per weight: half an ulp, relative (2^-11 for F16, 2^-8 for BF16); below F16's normal range (2^-14)
        // its subnormals keep an absolute step of 2^-24.
        const bool f16 = std::string(floats) == "f16";
        const double bound = f16 ? 0x1p-11 : 0x1p-8;
        const double floor = f16 ? 0x1p-25 : 0;
        for (const auto& [name, tensor] : weights_) {
            const float* a = tensor.f32();
            const float* b = file.tensors.at(name).f32();
            for (size_t i = 0; i < tensor.bytes.size() / 4; ++i)
                ASSERT_LE(std::fabs(a[i] - b[i]), std::max(std::fabs(a[i]) * bound, floor)) << name << "[" << i << "]";
        }
        // The network on the narrowed weights: logits within a few narrowing steps of the original's range.
        const std::vector<float> logits = run(file.tensors);
        double worst = 0, range = 0;
        for (size_t i = 0; i < logits.size(); ++i) {
            worst = std::max(worst, double{std::fabs(logits[i] - reference[i])});
            range = std::max(range, double{std::fabs(reference[i])});
        }
        EXPECT_LE(worst, range * bound * 64) << "max |diff| " << worst << " of range " << range;
        EXPECT_GT(worst, 0.0);  // the weights really changed
    }
}

TEST_F(ConvertCli, NeverReplacesTheModelOrAnExistingOutput) {
    const std::string out = (dir_ / "out.safetensors").string();
    EXPECT_EQ(resunet::convert_command({.model_path = model_, .out_path = model_, .floats = "f16"}), 2);
    EXPECT_EQ(resunet::convert_command({.model_path = model_, .out_path = out, .floats = "f16"}), 0);
    const auto written = fs::last_write_time(out);
    EXPECT_EQ(resunet::convert_command({.model_path = model_, .out_path = out, .floats = "bf16"}), 2);
    EXPECT_EQ(fs::last_write_time(out), written);
    EXPECT_EQ(resunet::convert_command({.model_path = model_, .out_path = out, .floats = "bf16", .overwrite = true}), 0);
    EXPECT_EQ(resunet::convert_command({.model_path = model_, .out_path = out, .floats = "f8"}), 2);
    EXPECT_EQ(resunet::convert_command({.model_path = (dir_ / "missing").string(), .out_path = out, .floats = "f16"}), 2);
    // The original still loads bit for bit.
    EXPECT_EQ(resunet::load_safetensors(model_).tensors.at("head.weight").bytes, weights_.at("head.weight").bytes);
}

}  // namespace
