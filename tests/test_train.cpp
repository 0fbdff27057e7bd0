// Trainer, losses, Adam/StepLR, NaN guard and checkpoints. Gradient checks live in test_train_grad.cpp,
// the Kvasir-SEG overfit run in test_train_overfit.cpp.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>

#include "engine/winograd_own.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/safetensors.h"
#include "tests/support/reference.h"
#include "train/checkpoint.h"
#include "train/loss.h"
#include "train/optimizer.h"
#include "train/trainer.h"

using namespace resunet;
namespace fs = std::filesystem;

namespace {

Graph tiny_resunet(int width, int depth, int size, int batch) {
    ResUNetConfig c;
    c.width = width;
    c.depth = depth;
    c.height = c.width_px = size;
    c.batch = batch;
    return build_resunet(c);
}

std::vector<float> uniform(int64_t count, uint64_t seed, float low, float high) {
    std::vector<float> v(static_cast<size_t>(count));
    fill_uniform(v.data(), count, seed, low, high);
    return v;
}

// Masks with a soft blob per image, so Dice is neither 0 nor 1.
std::vector<float> blob_masks(const Dims& dims) {
    std::vector<float> m(static_cast<size_t>(num_elements(dims)));
    const int64_t h = dims[2], w = dims[3];
    for (int64_t n = 0; n < dims[0]; ++n)
        for (int64_t y = 0; y < h; ++y)
            for (int64_t x = 0; x < w; ++x) {
                const double cy = h * (0.3 + 0.2 * static_cast<double>(n)), cx = w * 0.5;
                m[static_cast<size_t>((n * h + y) * w + x)] =
                    (y - cy) * (y - cy) + (x - cx) * (x - cx) < h * w / 8.0 ? 1.0f : 0.0f;
            }
    return m;
}

double max_abs_diff(const TensorMap& a, const TensorMap& b) {
    double worst = 0;
    for (const auto& [name, t] : a) {
        const HostTensor& u = b.at(name);
        for (int64_t i = 0; i < t.num_elements(); ++i)
            worst = std::max(worst, static_cast<double>(std::abs(t.f32()[i] - u.f32()[i])));
    }
    return worst;
}

// max |a - b| over every gradient element, divided by the largest |a| (how far two trainers' gradients are apart).
double relative_gradient_difference(const Trainer& a, const Trainer& b) {
    double scale = 0, worst = 0;
    for (const auto& [name, grad] : a.gradients())
        for (int64_t i = 0; i < grad.num_elements(); ++i) {
            scale = std::max(scale, static_cast<double>(std::abs(grad.f32()[i])));
            worst = std::max(worst, static_cast<double>(std::abs(grad.f32()[i] - b.gradients().at(name).f32()[i])));
        }
    return worst / scale;
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& keywords) {
    try {
        f();
        ADD_FAILURE() << "no resunet::Error thrown";
    } catch (const Error& e) {
        const std::string message = e.what();
        for (const std::string& k : keywords) EXPECT_NE(message.find(k), std::string::npos) << "message: " << message;
        EXPECT_EQ(message.find('\n'), std::string::npos) << message;
    }
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace

// ---------------------------------------------------------------------------------------------- losses

TEST(Loss, DiceAndBceMatchTheirFormulas) {
    const int batch = 3;
    const int64_t pixels = 50;
    std::vector<float> logits = uniform(batch * pixels, 1, -4.0f, 4.0f);
    std::vector<float> masks = uniform(batch * pixels, 2, 0.0f, 1.0f);
    for (float& m : masks) m = m > 0.6f ? 1.0f : 0.0f;
    double dice = 0, bce = 0;
    for (int n = 0; n < batch; ++n) {
        double inter = 0, sp = 0, sy = 0;
        for (int64_t i = 0; i < pixels; ++i) {
            const double p = sigmoid(logits[static_cast<size_t>(n * pixels + i)]), y = masks[static_cast<size_t>(n * pixels + i)];
            inter += p * y;
            sp += p;
            sy += y;
            bce += -(y * std::log(p) + (1 - y) * std::log(1 - p));
        }
        dice += 1.0 - (2 * inter + 1.0) / (sp + sy + 1.0);
    }
    dice /= batch;
    bce /= batch * pixels;
    EXPECT_NEAR(dice_loss(logits.data(), masks.data(), batch, pixels, nullptr), dice, 1e-12);
    EXPECT_NEAR(bce_with_logits_loss(logits.data(), masks.data(), batch, pixels, nullptr), bce, 1e-12);
    const LossValue both = dice_bce_loss(logits.data(), masks.data(), batch, pixels, nullptr);
    EXPECT_NEAR(both.total, dice + bce, 1e-12);
    EXPECT_NEAR(both.dice, dice, 1e-12);
    EXPECT_NEAR(both.bce, bce, 1e-12);
    // A perfect prediction has a Dice loss of about 0; an empty mask predicted empty too (smoothing).
    std::vector<float> confident(masks.size());
    for (size_t i = 0; i < masks.size(); ++i) confident[i] = masks[i] > 0.5f ? 30.0f : -30.0f;
    EXPECT_LT(dice_loss(confident.data(), masks.data(), batch, pixels, nullptr), 1e-9);
    std::vector<float> empty(masks.size(), 0.0f), negative(masks.size(), -30.0f);
    EXPECT_LT(dice_loss(negative.data(), empty.data(), batch, pixels, nullptr), 1e-9);
}

TEST(Loss, GradientsMatchFiniteDifferences) {
    const int batch = 2;
    const int64_t pixels = 40;
    std::vector<float> logits = uniform(batch * pixels, 3, -3.0f, 3.0f);
    std::vector<float> masks = uniform(batch * pixels, 4, 0.0f, 1.0f);
    for (LossKind kind : {LossKind::dice, LossKind::bce, LossKind::dice_bce}) {
        std::vector<float> grad(logits.size());
        compute_loss(kind, logits.data(), masks.data(), batch, pixels, grad.data());
        double worst = 0, scale = 0;
        for (size_t i = 0; i < logits.size(); ++i) {
            std::vector<float> x = logits;
            const float h = 1e-2f;
            x[i] = logits[i] + h;
            const double up = compute_loss(kind, x.data(), masks.data(), batch, pixels, nullptr).total;
            x[i] = logits[i] - h;
            const double down = compute_loss(kind, x.data(), masks.data(), batch, pixels, nullptr).total;
            const double numeric = (up - down) / (static_cast<double>(logits[i] + h) - static_cast<double>(logits[i] - h));
            worst = std::max(worst, std::abs(numeric - grad[i]));
            scale = std::max(scale, std::abs(numeric));
        }
        fmt::print("loss {}: worst |analytic - numeric| / max|numeric| = {:.2e}\n", loss_name(kind), worst / scale);
        EXPECT_LT(worst / scale, 1e-3) << loss_name(kind);
    }
}

TEST(Loss, BceIsStableForLargeLogits) {
    const std::vector<float> logits = {-500.0f, 500.0f, -80.0f, 80.0f, 0.0f};
    const std::vector<float> masks = {1.0f, 0.0f, 0.0f, 1.0f, 0.5f};
    std::vector<float> grad(logits.size());
    const double loss = bce_with_logits_loss(logits.data(), masks.data(), 1, 5, grad.data());
    EXPECT_NEAR(loss, (500.0 + 500.0 + std::log1p(std::exp(-80.0)) * 2 + std::log(2.0)) / 5, 1e-9);
    for (float g : grad) EXPECT_TRUE(std::isfinite(g));
    EXPECT_NEAR(grad[0], -0.2, 1e-7);
    EXPECT_NEAR(grad[1], 0.2, 1e-7);
    std::vector<float> dgrad(logits.size());
    EXPECT_TRUE(std::isfinite(dice_loss(logits.data(), masks.data(), 1, 5, dgrad.data())));
    for (float g : dgrad) EXPECT_TRUE(std::isfinite(g));
}

TEST(Loss, RejectsBadArguments) {
    const float x = 0.0f;
    expect_error([&] { dice_loss(&x, nullptr, 1, 1, nullptr); }, {"dice"});
    expect_error([&] { bce_with_logits_loss(&x, &x, 0, 1, nullptr); }, {"batch"});
}

// ------------------------------------------------------------------------------------- optimizer

TEST(Adam, MatchesTorchFormulasForL2AndDecoupledDecay) {
    for (bool decoupled : {false, true}) {
        AdamOptions o;
        o.weight_decay = 0.05;
        o.decoupled = decoupled;
        std::vector<float> w = {0.5f, -1.0f, 2.0f}, m(3, 0.0f), v(3, 0.0f);
        std::vector<double> wd = {0.5, -1.0, 2.0}, md(3, 0.0), vd(3, 0.0);
        const double lr = 1e-2;
        for (int64_t t = 1; t <= 5; ++t) {
            const std::vector<float> g = {0.1f * static_cast<float>(t), -0.3f, 0.0f};
            adam_update(o, w.data(), g.data(), m.data(), v.data(), 3, lr, t);
            for (size_t i = 0; i < 3; ++i) {
                double gi = g[i];
                if (decoupled)
                    wd[i] *= 1.0 - lr * o.weight_decay;
                else
                    gi += o.weight_decay * wd[i];
                md[i] = 0.9 * md[i] + 0.1 * gi;
                vd[i] = 0.999 * vd[i] + 0.001 * gi * gi;
                const double mhat = md[i] / (1 - std::pow(0.9, t)), vhat = vd[i] / (1 - std::pow(0.999, t));
                wd[i] -= lr * mhat / (std::sqrt(vhat) + 1e-8);
            }
        }
        for (size_t i = 0; i < 3; ++i) EXPECT_NEAR(w[i], wd[i], 2e-6) << "decoupled " << decoupled << " i " << i;
    }
}

TEST(Adam, FirstStepMovesEachWeightByTheLearningRate) {
    AdamOptions o;
    std::vector<float> w = {1.0f, 1.0f}, g = {3.0f, -1e-3f}, m(2, 0.0f), v(2, 0.0f);
    adam_update(o, w.data(), g.data(), m.data(), v.data(), 2, 1e-4, 1);
    EXPECT_NEAR(w[0], 1.0f - 1e-4f, 1e-7);
    EXPECT_NEAR(w[1], 1.0f + 1e-4f, 1e-7);
    expect_error([&] { adam_update(o, w.data(), g.data(), m.data(), v.data(), 2, 1e-4, 0); }, {"step"});
}

TEST(StepLR, DecaysEveryStepSizeEpochs) {
    StepLR s{1e-4, 10, 0.5};
    EXPECT_DOUBLE_EQ(s.learning_rate(0), 1e-4);
    EXPECT_DOUBLE_EQ(s.learning_rate(9), 1e-4);
    EXPECT_DOUBLE_EQ(s.learning_rate(10), 5e-5);
    EXPECT_DOUBLE_EQ(s.learning_rate(25), 2.5e-5);
    expect_error([] { StepLR{1e-4, 0, 0.5}.learning_rate(1); }, {"step_size"});
}

// ------------------------------------------------------------------------------------------ trainer

class TrainerLayouts : public ::testing::TestWithParam<ActivationLayout> {};
INSTANTIATE_TEST_SUITE_P(Layouts, TrainerLayouts,
                         ::testing::Values(ActivationLayout::nhwc, ActivationLayout::nchw, ActivationLayout::blocked),
                         [](const auto& param_info) {
                             return param_info.param == ActivationLayout::nhwc   ? "nhwc"
                                    : param_info.param == ActivationLayout::nchw ? "nchw"
                                                                                 : "blocked";
                         });

// Eval mode (running statistics) must equal the plain reference of the graph. Width 8 under `blocked`
// (concat offsets must be multiples of the channel block).
TEST_P(TrainerLayouts, EvalForwardMatchesReference) {
    Graph g = tiny_resunet(GetParam() == ActivationLayout::blocked ? 8 : 4, 2, 32, 2);
    TensorMap w = init_weights(g, 5);
    randomize_batch_norm_statistics(g, w, 6);
    TrainOptions o;
    o.layout = GetParam();
    Trainer trainer(g, w, o);
    reference::Tensor4 images = reference::Tensor4::zeros({2, 3, 32, 32});
    fill_uniform(images.data.data(), images.size(), 7, -2.0f, 2.0f);
    std::vector<float> logits(2 * 32 * 32);
    trainer.forward(images.data.data(), logits.data(), false);
    const reference::Tensor4 expected = reference::run_graph(g, w, images);
    const reference::ErrorStats e = reference::compare(logits.data(), expected);
    fmt::print("eval forward vs reference ({}): {}\n", trainer.activation_layout(), e.to_string());
    EXPECT_LE(e.relative(), 1e-4) << e.to_string();
    EXPECT_EQ(max_abs_diff(trainer.weights(), w), 0.0);  // eval forward changes nothing
}

// Training mode: batch statistics with biased variance; running statistics updated with momentum 0.1
// and the unbiased variance (PyTorch).
TEST_P(TrainerLayouts, TrainingBatchNormUsesBatchStatisticsAndUpdatesRunningStatistics) {
    Graph g;
    int x = g.input("input", {3, 2, 5, 4});
    x = g.conv("conv", x, 3, 3, 1, 1);
    x = g.batch_norm("bn", x);
    g.set_output(x);
    TensorMap w = init_weights(g, 1);
    randomize_batch_norm_statistics(g, w, 2);
    TrainOptions o;
    o.layout = GetParam();
    Trainer trainer(g, w, o);
    reference::Tensor4 images = reference::Tensor4::zeros({3, 2, 5, 4});
    fill_uniform(images.data.data(), images.size(), 3, -1.0f, 1.0f);
    std::vector<float> out(3 * 3 * 5 * 4);
    trainer.forward(images.data.data(), out.data(), true);
    const reference::Tensor4 conv = reference::conv2d(images, reference::Tensor4::from_host(w.at("conv.weight")),
                                                      reference::to_vector(w.at("conv.bias")), 1, 1);
    const TensorMap after = trainer.weights();
    for (int64_t c = 0; c < 3; ++c) {
        double sum = 0, sq = 0;
        const double count = 3 * 5 * 4;
        for (int64_t n = 0; n < 3; ++n)
            for (int64_t y = 0; y < 5; ++y)
                for (int64_t xx = 0; xx < 4; ++xx) sum += conv.at(n, c, y, xx);
        const double mean = sum / count;
        for (int64_t n = 0; n < 3; ++n)
            for (int64_t y = 0; y < 5; ++y)
                for (int64_t xx = 0; xx < 4; ++xx) sq += (conv.at(n, c, y, xx) - mean) * (conv.at(n, c, y, xx) - mean);
        const double var = sq / count;
        const double gamma = w.at("bn.weight").f32()[c], beta = w.at("bn.bias").f32()[c];
        for (int64_t n = 0; n < 3; ++n)
            for (int64_t y = 0; y < 5; ++y)
                for (int64_t xx = 0; xx < 4; ++xx) {
                    const double expected = (conv.at(n, c, y, xx) - mean) / std::sqrt(var + 1e-5) * gamma + beta;
                    EXPECT_NEAR(out[static_cast<size_t>(((n * 3 + c) * 5 + y) * 4 + xx)], expected, 1e-5);
                }
        EXPECT_NEAR(after.at("bn.running_mean").f32()[c], 0.9 * w.at("bn.running_mean").f32()[c] + 0.1 * mean, 1e-6);
        EXPECT_NEAR(after.at("bn.running_var").f32()[c],
                    0.9 * w.at("bn.running_var").f32()[c] + 0.1 * var * count / (count - 1), 1e-6);
    }
}

TEST(Trainer, WeightsKeepGraphNamesAndRejectMismatches) {
    Graph g = tiny_resunet(2, 1, 16, 2);
    TensorMap w = init_weights(g, 1);
    w["e1.bn_a.num_batches_tracked"] = HostTensor::zeros({}, DType::i64);  // PyTorch bookkeeping: tolerated
    Trainer trainer(g, w, {});
    const TensorMap out = trainer.weights();
    std::vector<std::string> names;
    for (const ParamInfo& p : g.parameters()) names.push_back(p.name);
    std::vector<std::string> got;
    for (const auto& [name, t] : out) got.push_back(name);
    std::sort(names.begin(), names.end());
    EXPECT_EQ(got, names);
    size_t learnable = 0;
    for (const ParamInfo& p : g.parameters()) learnable += p.learnable;
    EXPECT_EQ(trainer.gradients().size(), learnable);
    TensorMap bad = init_weights(g, 1);
    bad["head.weight"] = HostTensor::zeros({1, 3, 1, 1});
    expect_error([&] { Trainer t(g, bad, {}); }, {"head.weight"});
    expect_error([&] { trainer.set_weights(bad); }, {"head.weight"});
    expect_error([&] { trainer.input_gradient(); }, {"input_gradient"});
}

TEST(Trainer, StepsReduceTheLossOnAFixedBatch) {
    Graph g = tiny_resunet(4, 2, 32, 2);
    TrainOptions o;
    o.learning_rate = 3e-3;
    Trainer trainer(g, init_weights(g, 3), o);
    const std::vector<float> images = uniform(2 * 3 * 32 * 32, 9, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 32, 32});
    const float first = trainer.step(images.data(), masks.data());
    float last = first;
    for (int i = 0; i < 25; ++i) last = trainer.step(images.data(), masks.data());
    fmt::print("loss {:.4f} -> {:.4f} after 26 steps; {} primitives, compiled in {:.1f} ms, {:.2f} MB buffers\n", first,
               last, trainer.num_primitives(), trainer.compile_ms(), static_cast<double>(trainer.activation_bytes()) / 1e6);
    EXPECT_LT(last, 0.8 * first);
    EXPECT_EQ(trainer.step_count(), 26);
}

// Every layout against nchw, on a width (8) whose concat offsets allow a channel block.
TEST(Trainer, LayoutsGiveTheSameGradients) {
    Graph g = tiny_resunet(8, 2, 16, 2);
    const TensorMap w = init_weights(g, 11);
    const std::vector<float> images = uniform(2 * 3 * 16 * 16, 12, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 16, 16});
    TrainOptions plain;
    plain.layout = ActivationLayout::nchw;
    Trainer tb(g, w, plain);
    const double plain_loss = tb.compute_gradients(images.data(), masks.data()).total;
    for (ActivationLayout layout : {ActivationLayout::nhwc, ActivationLayout::blocked, ActivationLayout::automatic}) {
        TrainOptions a;
        a.layout = layout;
        Trainer ta(g, w, a);
        EXPECT_NEAR(ta.compute_gradients(images.data(), masks.data()).total, plain_loss, 1e-6) << ta.activation_layout();
        const double relative = relative_gradient_difference(ta, tb);
        fmt::print("{} against nchw: worst gradient difference {:.2e} of the largest\n", ta.activation_layout(), relative);
        EXPECT_LT(relative, 1e-4) << ta.activation_layout();
        if (layout == ActivationLayout::blocked) {
            EXPECT_TRUE(ta.activation_layout().starts_with("nChw")) << ta.activation_layout();
        }
    }
}

// Batch norm + ReLU as one primitive (fuse_norm_relu) against the two primitives, whole network.
TEST(Trainer, FusedBatchNormReluGivesTheSameGradients) {
    Graph g = tiny_resunet(8, 2, 16, 2);
    const TensorMap w = init_weights(g, 13);
    const std::vector<float> images = uniform(2 * 3 * 16 * 16, 14, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 16, 16});
    TrainOptions fused, separate;
    separate.fuse_batch_norm_relu = false;
    Trainer tf(g, w, fused), ts(g, w, separate);
    EXPECT_LT(tf.num_primitives(), ts.num_primitives());  // memory: the ReLU's input is not kept either way
    EXPECT_NEAR(tf.compute_gradients(images.data(), masks.data()).total, ts.compute_gradients(images.data(), masks.data()).total, 1e-6);
    const double relative = relative_gradient_difference(tf, ts);
    fmt::print("fused batch norm + ReLU ({} primitives, {:.2f} MB) against separate ({}, {:.2f} MB): worst gradient difference "
               "{:.2e} of the largest\n",
               tf.num_primitives(), tf.activation_bytes() / 1e6, ts.num_primitives(), ts.activation_bytes() / 1e6, relative);
    EXPECT_LT(relative, 1e-5);
    // Eval forward and the step's running statistics agree too.
    std::vector<float> a(2 * 16 * 16), b(2 * 16 * 16);
    tf.forward(images.data(), a.data(), false);
    ts.forward(images.data(), b.data(), false);
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-5) << i;
}

// Forward-only values sharing buffers (and ReLU's backward from its output) against one buffer per value.
TEST(Trainer, SharedForwardBuffersGiveTheSameGradients) {
    Graph g = tiny_resunet(8, 2, 16, 2);
    const TensorMap w = init_weights(g, 15);
    const std::vector<float> images = uniform(2 * 3 * 16 * 16, 16, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 16, 16});
    TrainOptions shared, separate;
    separate.share_forward_buffers = false;
    Trainer a(g, w, shared), b(g, w, separate);
    EXPECT_LT(a.activation_bytes(), b.activation_bytes());
    for (int step = 0; step < 2; ++step) EXPECT_EQ(a.step(images.data(), masks.data()), b.step(images.data(), masks.data()));
    EXPECT_EQ(max_abs_diff(a.weights(), b.weights()), 0.0);
    fmt::print("shared forward buffers: {:.2f} MB of buffers against {:.2f} MB; weights bit-identical after 2 steps\n",
               a.activation_bytes() / 1e6, b.activation_bytes() / 1e6);
    EXPECT_NO_THROW(a.activation("e1.relu"));
    expect_error([&] { a.activation("e1.add"); }, {"not kept"});
}

// Our own Winograd (forward, backward-data and backward-weights of every 3x3 convolution it applies to) against oneDNN's
// direct kernels: same loss and gradients within the Winograd error (1e-6 of the range per layer, measured).
TEST(Trainer, OwnWinogradGivesTheSameGradientsAsDirect) {
    if (!winograd_own_supported()) GTEST_SKIP() << "CPU without AVX2 and FMA";
    Graph g = tiny_resunet(8, 2, 16, 2);
    const TensorMap w = init_weights(g, 17);
    const std::vector<float> images = uniform(2 * 3 * 16 * 16, 18, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 16, 16});
    TrainOptions own, direct;
    own.conv_algorithm = TrainConvAlgorithm::winograd;
    direct.conv_algorithm = TrainConvAlgorithm::direct;
    Trainer a(g, w, own), b(g, w, direct);
    int forward = 0, backward = 0, weights = 0;
    for (const TrainConvChoice& c : a.conv_choices()) {
        fmt::print("  {:<16} {:<16} {:<13} {}\n", c.layer, c.pass, c.algorithm, c.summary);
        forward += c.algorithm != "direct" && c.pass == "forward";
        backward += c.algorithm != "direct" && c.pass == "backward_data";
        weights += c.algorithm != "direct" && c.pass == "backward_weights";
    }
    EXPECT_GE(forward, 5);   // every 3x3 convolution but the first (3 input channels)
    EXPECT_GE(backward, 5);
    // Backward-weights too, the bridge's in the whole-batch mode (8 tiles of 16 -> 32 and 32 -> 32 channels).
    EXPECT_GE(weights, 8);
    for (const TrainConvChoice& c : b.conv_choices()) EXPECT_EQ(c.algorithm, "direct") << c.layer;
    // A layer whose forward and backward-data both run our own Winograd reads only the host weights: no
    // weights mirror is refreshed for it. The direct twin refreshes one per blocked 3x3 layer.
    std::map<std::string, int> own_passes;
    for (const TrainConvChoice& c : a.conv_choices())
        own_passes[c.layer] += c.algorithm != "direct" && c.pass != "backward_weights";
    auto mirror_refreshes = [&](Trainer& t) {
        std::map<std::string, int> refreshes;
        for (const Trainer::StepTime& s : t.profile_gradients(images.data(), masks.data())) {
            EXPECT_GE(s.ms, 0.0) << s.name;
            if (s.phase == "prepare" && s.name.ends_with(".weight.reorder"))
                ++refreshes[s.name.substr(0, s.name.size() - std::string(".weight.reorder").size())];
        }
        return refreshes;
    };
    const std::map<std::string, int> own_refreshes = mirror_refreshes(a), direct_refreshes = mirror_refreshes(b);
    int skipped = 0;
    for (const auto& [layer, passes] : own_passes) {
        if (passes == 2) {
            EXPECT_EQ(own_refreshes.count(layer), 0u) << layer << ": mirror refreshed though no primitive reads it";
            skipped += direct_refreshes.count(layer) > 0;
        }
    }
    EXPECT_GE(skipped, 5);
    for (int step = 0; step < 3; ++step) {  // weights change between steps: the transformed ones must follow
        const LossValue la = a.compute_gradients(images.data(), masks.data());
        const LossValue lb = b.compute_gradients(images.data(), masks.data());
        EXPECT_NEAR(la.total, lb.total, 1e-5 * std::abs(lb.total));
        const double relative = relative_gradient_difference(a, b);
        fmt::print("step {}: own Winograd against direct: loss {:.7f} / {:.7f}, worst gradient difference {:.2e} of the largest\n",
                   step + 1, la.total, lb.total, relative);
        EXPECT_LT(relative, 1e-4);
        a.apply_gradients(la);
        b.apply_gradients(lb);
        a.update_running_statistics();
        b.update_running_statistics();
        // Adam moves every weight by up to lr whatever its gradient's size: a bias feeding a batch norm has a
        // true gradient of 0 and rounding noise for one, so it may step either way (docs/mpi.md): 2 lr per step.
        EXPECT_LT(max_abs_diff(a.weights(), b.weights()), 2 * TrainOptions{}.learning_rate * (step + 1));
    }
}

// A conv plan (what a first run chose) makes a second trainer run the same algorithms, bit for bit.
TEST(Trainer, ConvPlanRepeatsTheChoicesOfAnotherTrainer) {
    if (!winograd_own_supported()) GTEST_SKIP() << "CPU without AVX2 and FMA";
    Graph g = tiny_resunet(8, 2, 16, 2);
    const TensorMap w = init_weights(g, 19);
    const std::vector<float> images = uniform(2 * 3 * 16 * 16, 20, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 16, 16});
    TrainOptions first;
    first.conv_algorithm = TrainConvAlgorithm::winograd;
    Trainer a(g, w, first);
    TrainOptions second;  // measured, except where the plan speaks
    bool alternate = false;
    for (const TrainConvChoice& c : a.conv_choices()) {
        // Mix the plan: every other Winograd pass as F(2x2), to see the plan, not a measurement, decide.
        std::string algorithm = c.algorithm;
        if (algorithm == "winograd_f43" && (alternate = !alternate)) algorithm = "winograd_f23";
        second.conv_plan[c.layer + "/" + c.pass] = algorithm;
    }
    Trainer b(g, w, second);
    ASSERT_EQ(b.conv_choices().size(), a.conv_choices().size());
    for (const TrainConvChoice& c : b.conv_choices()) EXPECT_EQ(c.algorithm, second.conv_plan.at(c.layer + "/" + c.pass)) << c.layer;
    Trainer c(g, w, second);
    EXPECT_EQ(b.step(images.data(), masks.data()), c.step(images.data(), masks.data()));
    EXPECT_EQ(max_abs_diff(b.weights(), c.weights()), 0.0);
    // A plan that names an unknown algorithm, or one that cannot run there, is refused.
    TrainOptions bad;
    bad.conv_plan["e1.conv_b/forward"] = "winograd_f63";
    expect_error([&] { Trainer(g, w, bad); }, {"unknown algorithm", "winograd_f63"});
    bad.conv_plan = {{"e1.conv_a/forward", "winograd_f43"}};  // 3 input channels
    expect_error([&] { Trainer(g, w, bad); }, {"does not apply"});
}

// A channel block must divide every concat offset; `blocked` refuses otherwise, `automatic` falls back to nhwc.
TEST(Trainer, BlockedLayoutNeedsBlockAlignedConcatOffsets) {
    Graph g = tiny_resunet(4, 2, 16, 2);  // concat offsets 4 and 8
    TrainOptions o;
    o.layout = ActivationLayout::automatic;
    EXPECT_EQ(Trainer(g, init_weights(g, 1), o).activation_layout(), "nhwc");
    o.layout = ActivationLayout::blocked;
    expect_error([&] { Trainer(g, init_weights(g, 1), o); }, {"concat offsets"});
}

TEST(Trainer, EndEpochAppliesStepLR) {
    Graph g = tiny_resunet(2, 1, 16, 2);
    TrainOptions o;
    o.learning_rate = 1e-3;
    o.lr_step_size = 2;
    o.lr_gamma = 0.5;
    Trainer trainer(g, init_weights(g, 1), o);
    EXPECT_DOUBLE_EQ(trainer.learning_rate(), 1e-3);
    trainer.end_epoch();
    EXPECT_DOUBLE_EQ(trainer.learning_rate(), 1e-3);
    trainer.end_epoch();
    EXPECT_DOUBLE_EQ(trainer.learning_rate(), 5e-4);
    EXPECT_EQ(trainer.epoch(), 2);
}

// --------------------------------------------------------------------------------------- NaN guard

TEST(Trainer, NonFiniteLossThrowsAndKeepsEverything) {
    Graph g = tiny_resunet(2, 1, 16, 2);
    Trainer trainer(g, init_weights(g, 1), {});
    std::vector<float> images = uniform(2 * 3 * 16 * 16, 2, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 16, 16});
    trainer.step(images.data(), masks.data());
    const TrainerState before = trainer.state();
    std::vector<float> bad = images;
    bad[100] = std::numeric_limits<float>::quiet_NaN();
    // oneDNN's ReLU maps NaN to 0, so the loss may stay finite; either way the step is refused and the
    // NaN traced back to the images.
    expect_error([&] { trainer.step(bad.data(), masks.data()); }, {"step 2", "non-finite activation in forward order: 'input'"});
    const TrainerState after = trainer.state();
    EXPECT_EQ(max_abs_diff(before.weights, after.weights), 0.0);  // running statistics included
    EXPECT_EQ(max_abs_diff(before.adam_first_moment, after.adam_first_moment), 0.0);
    EXPECT_EQ(after.step, 1);
    // A weight that overflows the forward: the first non-finite activation is named.
    TensorMap w = trainer.weights();
    w.at("e1.conv_b.weight").f32()[0] = std::numeric_limits<float>::infinity();
    Trainer broken(g, w, {});
    expect_error([&] { broken.step(images.data(), masks.data()); }, {"step 1", "forward order: 'e1.conv_b'"});
    // Training goes on normally after a refused batch.
    Trainer twin(g, before.weights, {});
    twin.restore(before);
    EXPECT_EQ(trainer.step(images.data(), masks.data()), twin.step(images.data(), masks.data()));
    EXPECT_EQ(max_abs_diff(trainer.weights(), twin.weights()), 0.0);
}

TEST(Trainer, NonFiniteGradientNamesTheFirstLayerInBackwardOrder) {
    Graph g = tiny_resunet(2, 1, 16, 2);
    const TensorMap w = init_weights(g, 1);
    const std::vector<float> images = uniform(2 * 3 * 16 * 16, 2, -1.0f, 1.0f);
    const std::vector<float> masks = blob_masks({2, 1, 16, 16});
    // A finite loss whose gradient is NaN at one pixel: caught at the loss.
    TrainOptions o;
    o.custom_loss = [](const float*, const float*, int batch, int64_t pixels, float* dlogits) {
        std::fill(dlogits, dlogits + batch * pixels, 0.0f);
        dlogits[3] = std::numeric_limits<float>::quiet_NaN();
        return 1.0;
    };
    Trainer a(g, w, o);
    expect_error([&] { a.step(images.data(), masks.data()); }, {"step 1", "'loss'"});
    // A finite but huge gradient overflows in the head's weight gradient: the first layer in backward order.
    o.custom_loss = [](const float*, const float*, int batch, int64_t pixels, float* dlogits) {
        std::fill(dlogits, dlogits + batch * pixels, 3e38f);
        return 1.0;
    };
    Trainer b(g, w, o);
    expect_error([&] { b.step(images.data(), masks.data()); }, {"step 1", "'head'", "weights left as before"});
    EXPECT_EQ(max_abs_diff(b.weights(), w), 0.0);
    EXPECT_EQ(b.step_count(), 0);
}

// -------------------------------------------------------------------------------------- checkpoints

class CheckpointTest : public ::testing::Test {
  protected:
    void SetUp() override {
        dir_ = fs::temp_directory_path() /
               fmt::format("resunet_test_train_{}_{}", ::getpid(), ::testing::UnitTest::GetInstance()->current_test_info()->name());
        fs::remove_all(dir_);
        fs::create_directories(dir_);
    }
    void TearDown() override { fs::remove_all(dir_); }
    fs::path dir_;
};

// --resume: N steps straight equal N/2 steps, save, load into a fresh Trainer, N/2 steps.
TEST_F(CheckpointTest, ResumeEqualsAStraightRun) {
    Graph g = tiny_resunet(4, 2, 16, 2);
    const TensorMap w = init_weights(g, 21);
    TrainOptions o;
    o.learning_rate = 1e-3;
    o.lr_step_size = 1;
    o.lr_gamma = 0.7;
    o.adam.weight_decay = 1e-4;
    const int n = 8;
    std::vector<std::vector<float>> images, masks;
    for (int i = 0; i < n; ++i) {
        images.push_back(uniform(2 * 3 * 16 * 16, 100 + static_cast<uint64_t>(i), -1.0f, 1.0f));
        std::vector<float> m = uniform(2 * 16 * 16, 200 + static_cast<uint64_t>(i), 0.0f, 1.0f);
        for (float& v : m) v = v > 0.7f ? 1.0f : 0.0f;
        masks.push_back(m);
    }
    auto run = [&](Trainer& t, int from, int to) {
        std::vector<float> losses;
        for (int i = from; i < to; ++i) {
            losses.push_back(t.step(images[static_cast<size_t>(i)].data(), masks[static_cast<size_t>(i)].data()));
            if (i % 2 == 1) t.end_epoch();
        }
        return losses;
    };
    Trainer straight(g, w, o);
    const std::vector<float> straight_losses = run(straight, 0, n);

    Trainer first(g, w, o);
    std::vector<float> resumed_losses = run(first, 0, n / 2);
    const std::string path = (dir_ / "last.safetensors").string();
    save_checkpoint(path, first, {.rng_state = 0xfeedfacecafebeefULL, .metadata = {{"fold", "3"}}});
    Trainer fresh(g, init_weights(g, 999), o);  // other weights: everything must come from the file
    const Checkpoint c = resume_from_checkpoint(path, fresh);
    EXPECT_EQ(c.rng_state, 0xfeedfacecafebeefULL);
    EXPECT_EQ(c.metadata.at("fold"), "3");
    EXPECT_EQ(fresh.step_count(), n / 2);
    EXPECT_EQ(fresh.epoch(), first.epoch());
    EXPECT_EQ(fresh.learning_rate(), first.learning_rate());
    const std::vector<float> rest = run(fresh, n / 2, n);
    resumed_losses.insert(resumed_losses.end(), rest.begin(), rest.end());

    for (int i = 0; i < n; ++i) EXPECT_NEAR(resumed_losses[static_cast<size_t>(i)], straight_losses[static_cast<size_t>(i)], 1e-6) << i;
    const double weight_diff = max_abs_diff(fresh.weights(), straight.weights());
    const TrainerState a = fresh.state(), b = straight.state();
    const double moment_diff = std::max(max_abs_diff(a.adam_first_moment, b.adam_first_moment),
                                        max_abs_diff(a.adam_second_moment, b.adam_second_moment));
    fmt::print("resume vs straight after {} steps: max |weight diff| {:.3e}, max |moment diff| {:.3e}\n", n, weight_diff,
               moment_diff);
    EXPECT_LE(weight_diff, 1e-6);
    EXPECT_LE(moment_diff, 1e-6);
    EXPECT_EQ(a.step, b.step);
    EXPECT_EQ(a.epoch, b.epoch);
    EXPECT_EQ(a.learning_rate, b.learning_rate);
    // The checkpoint's weights also load as a plain weight file.
    SafetensorsFile file = load_safetensors(path);
    EXPECT_TRUE(file.tensors.count("e1.conv_a.weight"));
    EXPECT_TRUE(file.tensors.count("adam.exp_avg.e1.conv_a.weight"));
    EXPECT_TRUE(file.tensors.count("adam.exp_avg_sq.head.bias"));
}

TEST_F(CheckpointTest, RefusesAnotherWidthImageSizeOrFile) {
    Graph g = tiny_resunet(4, 1, 16, 2);
    Trainer trainer(g, init_weights(g, 1), {});
    const std::string path = (dir_ / "w4.safetensors").string();
    save_checkpoint(path, trainer);

    Graph wider = tiny_resunet(8, 1, 16, 2);
    Trainer other(wider, init_weights(wider, 1), {});
    const TrainerState before = other.state();
    expect_error([&] { resume_from_checkpoint(path, other); }, {path, "does not match", "e1.conv_a.weight", "[8, 3, 3, 3]"});
    EXPECT_EQ(max_abs_diff(other.weights(), before.weights), 0.0);

    Graph deeper = tiny_resunet(4, 2, 16, 2);
    Trainer deep(deeper, init_weights(deeper, 1), {});
    expect_error([&] { resume_from_checkpoint(path, deep); }, {"does not match"});

    Graph bigger = tiny_resunet(4, 1, 32, 2);
    Trainer big(bigger, init_weights(bigger, 1), {});
    expect_error([&] { resume_from_checkpoint(path, big); }, {"3 x 16 x 16", "3 x 32 x 32"});

    // Another batch size is fine: the checkpoint does not depend on N.
    Graph batch4 = tiny_resunet(4, 1, 16, 4);
    Trainer four(batch4, init_weights(batch4, 2), {});
    resume_from_checkpoint(path, four);
    EXPECT_EQ(max_abs_diff(four.weights(), trainer.weights()), 0.0);

    const std::string plain = (dir_ / "weights.safetensors").string();
    save_safetensors(plain, trainer.weights());
    expect_error([&] { load_checkpoint(plain); }, {"resunet.format"});

    // A flipped byte in the data section fails the checksum.
    {
        std::FILE* f = std::fopen(path.c_str(), "r+b");
        ASSERT_TRUE(f);
        std::fseek(f, -5, SEEK_END);
        const int c = std::fgetc(f);
        std::fseek(f, -5, SEEK_END);
        std::fputc(c ^ 0x40, f);
        std::fclose(f);
    }
    expect_error([&] { load_checkpoint(path); }, {"checksum"});
}
