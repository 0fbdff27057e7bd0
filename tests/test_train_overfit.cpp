// End-to-end learning check: a small ResUNet overfits 4 real Kvasir-SEG images. If forward, backward,
// loss or Adam were wrong in a way the gradient checks miss (a sign, a stale buffer between steps), the
// Dice loss would not fall this far this fast.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "graph/graph.h"
#include "graph/init.h"
#include "train/trainer.h"

using namespace resunet;
namespace fs = std::filesystem;

namespace {

const std::string kKvasir = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";
constexpr int kSize = 64;         // images are resized to kSize x kSize
constexpr int kImages = 4;
constexpr int kMaxSteps = 300;    // bounded: the test fails if the bound is not reached by then
constexpr double kDiceBound = 0.10;  // soft Dice loss (smoothing 1) to reach on the training batch

// First kImages image/mask pairs in name order, as NCHW floats: ImageNet-normalised RGB and {0, 1} masks.
bool load_batch(std::vector<float>& images, std::vector<float>& masks) {
    if (!fs::is_directory(kKvasir + "/images")) return false;
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(kKvasir + "/images"))
        if (entry.path().extension() == ".jpg") names.push_back(entry.path().stem().string());
    std::sort(names.begin(), names.end());
    if (names.size() < kImages) return false;
    const float mean[3] = {0.485f, 0.456f, 0.406f}, stddev[3] = {0.229f, 0.224f, 0.225f};
    const size_t plane = kSize * kSize;
    images.assign(kImages * 3 * plane, 0.0f);
    masks.assign(kImages * plane, 0.0f);
    for (int n = 0; n < kImages; ++n) {
        cv::Mat bgr = cv::imread(kKvasir + "/images/" + names[static_cast<size_t>(n)] + ".jpg", cv::IMREAD_COLOR);
        cv::Mat mask = cv::imread(kKvasir + "/masks/" + names[static_cast<size_t>(n)] + ".jpg", cv::IMREAD_GRAYSCALE);
        if (bgr.empty() || mask.empty()) return false;
        cv::resize(bgr, bgr, {kSize, kSize}, 0, 0, cv::INTER_AREA);
        cv::resize(mask, mask, {kSize, kSize}, 0, 0, cv::INTER_NEAREST);
        for (int y = 0; y < kSize; ++y)
            for (int x = 0; x < kSize; ++x) {
                const cv::Vec3b p = bgr.at<cv::Vec3b>(y, x);
                for (int c = 0; c < 3; ++c)  // BGR -> RGB
                    images[(static_cast<size_t>(n) * 3 + static_cast<size_t>(c)) * plane + static_cast<size_t>(y * kSize + x)] =
                        (static_cast<float>(p[2 - c]) / 255.0f - mean[c]) / stddev[c];
                masks[static_cast<size_t>(n) * plane + static_cast<size_t>(y * kSize + x)] = mask.at<uint8_t>(y, x) >= 128 ? 1.0f : 0.0f;
            }
    }
    return true;
}

}  // namespace

TEST(Overfit, FourKvasirImagesDiceLossFallsBelowBound) {
    std::vector<float> images, masks;
    if (!load_batch(images, masks)) GTEST_SKIP() << "Kvasir-SEG not found at " << kKvasir;
    ResUNetConfig config;
    config.width = 8;
    config.depth = 3;
    config.height = config.width_px = kSize;
    config.batch = kImages;
    const Graph graph = build_resunet(config);
    TrainOptions options;
    options.learning_rate = 3e-3;  // one batch seen over and over: a large step is fine
    // One thread: the results do not depend on it, and on a shared 2-core machine an oversubscribed
    // OpenMP team is 5-20x slower per step than one thread.
    options.threads = 1;
    Trainer trainer(graph, init_weights(graph, 2024), options);
    const auto start = std::chrono::steady_clock::now();
    const double first_dice = trainer.compute_gradients(images.data(), masks.data()).dice;
    int steps = 0;
    double dice = first_dice;
    while (steps < kMaxSteps && dice >= kDiceBound) {
        trainer.step(images.data(), masks.data());
        dice = trainer.last_loss().dice;
        ++steps;
        if (steps % 25 == 0) fmt::print("step {:3d}: loss {:.4f} (dice {:.4f}, bce {:.4f})\n", steps, trainer.last_loss().total, dice, trainer.last_loss().bce);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    fmt::print("width {} depth {} {}x{} batch {}: Dice loss {:.4f} -> {:.4f} in {} steps, {:.1f} s ({:.1f} ms/step)\n",
               config.width, config.depth, kSize, kSize, kImages, first_dice, dice, steps, seconds, 1e3 * seconds / std::max(steps, 1));
    EXPECT_LT(dice, kDiceBound) << "after " << steps << " steps";
    // The eval-mode prediction (running statistics) is not asked to match yet after so few steps, but it
    // must be finite.
    std::vector<float> logits(kImages * kSize * kSize);
    trainer.forward(images.data(), logits.data(), false);
    for (float v : logits) ASSERT_TRUE(std::isfinite(v));
}
