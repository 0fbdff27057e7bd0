// Every backward lowering of the trainer against central finite differences.
//
// The forward runs in float32, so a finite difference resolves a gradient only to about
// 1e-7 * |loss| / h. Errors are therefore measured per tensor against that tensor's scale:
//   error(tensor) = max over checked elements |analytic - numeric| / max(max |analytic| over the tensor, floor)
// where floor = floor_fraction * (largest analytic gradient of any parameter): tensors whose gradient is
// exactly zero (a conv bias followed by batch norm) are compared on the network's scale, not on 0.
// ReLU and max pool make the loss piecewise smooth: an element whose +-h perturbation flips a ReLU or
// moves a max-pool argmax (compared on the activations of the whole network) is skipped and counted.
// For each tensor the elements with the largest analytic gradients are checked (where the
// difference is well resolved) plus a few spread over the tensor. Batch norm in training mode couples
// the images of a batch, so every evaluation runs the whole batch with the same perturbed weights or
// images. Losses are accumulated in double.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "engine/winograd_own.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "train/loss.h"
#include "train/trainer.h"

using namespace resunet;

namespace {

// A linear loss sum(r * logits) with fixed random r: checks the network's backward alone (no curvature
// from the loss, so the central difference has no truncation error beyond the network's own).
struct LinearLoss {
    std::vector<float> r;
    double operator()(const float* logits, const float*, int batch, int64_t pixels, float* dlogits) const {
        double sum = 0;
        for (int64_t i = 0; i < batch * pixels; ++i) {
            sum += static_cast<double>(r[static_cast<size_t>(i)]) * logits[i];
            if (dlogits) dlogits[i] = r[static_cast<size_t>(i)];
        }
        return sum;
    }
};

struct TensorError {
    std::string name;
    double error = 0;        // as defined at the top of the file
    double scale = 0;        // max |analytic| over the tensor
    int64_t worst_index = -1;
    double analytic = 0, numeric = 0;  // at the worst index
    int checked = 0, skipped = 0;      // elements compared; elements skipped at a kink
};

struct CheckResult {
    std::vector<TensorError> tensors;
    TensorError worst;
    int checked = 0, skipped = 0;
    std::string report() const {
        std::string s;
        for (const TensorError& t : tensors)
            s += fmt::format("  {:<28} error {:.2e} (scale {:.2e}; at {} analytic {:.6e} numeric {:.6e}; {} checked, {} at kinks)\n",
                             t.name, t.error, t.scale, t.worst_index, t.analytic, t.numeric, t.checked, t.skipped);
        return s;
    }
};

std::vector<int64_t> pick_elements(const float* analytic, int64_t count, int top, int spread) {
    std::vector<int64_t> order(static_cast<size_t>(count));
    std::iota(order.begin(), order.end(), 0);
    const int64_t k = std::min<int64_t>(top, count);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return std::abs(analytic[a]) > std::abs(analytic[b]); });
    std::vector<int64_t> picked(order.begin(), order.begin() + k);
    for (int i = 0; i < spread; ++i) picked.push_back(static_cast<int64_t>((i * 7919 + 13) % count));
    std::sort(picked.begin(), picked.end());
    picked.erase(std::unique(picked.begin(), picked.end()), picked.end());
    return picked;
}

// Checks every learnable tensor (and, with input_gradient, the images) of `trainer`.
CheckResult check_gradients(Trainer& trainer, const std::vector<float>& images, const std::vector<float>& masks,
                            const std::function<double(const float*)>& loss_of_logits, double h, double floor_fraction,
                            int top = 4, int spread = 3) {
    trainer.compute_gradients(images.data(), masks.data());
    const TensorMap analytic = trainer.gradients();
    std::vector<float> input_analytic;
    if (trainer.options().input_gradient) input_analytic = trainer.input_gradient();
    const TensorMap base = trainer.weights();
    std::vector<float> logits(static_cast<size_t>(num_elements(trainer.output_dims())));
    auto loss_at = [&](const std::vector<float>& x) {
        trainer.forward(x.data(), logits.data(), true);
        return loss_of_logits(logits.data());
    };
    double global_scale = 0;
    for (const auto& [name, grad] : analytic)
        for (int64_t i = 0; i < grad.num_elements(); ++i) global_scale = std::max(global_scale, static_cast<double>(std::abs(grad.f32()[i])));
    const double floor = floor_fraction * global_scale;
    // Which side of every kink the network is on: ReLU signs and max-pool argmaxes of the last forward.
    const Graph& graph = trainer.graph();
    auto pattern = [&] {
        std::vector<int> bits;
        for (const Node& node : graph.nodes()) {
            if (node.kind == OpKind::relu)
                for (float v : trainer.activation(node.name)) bits.push_back(v > 0);
            if (node.kind != OpKind::max_pool) continue;
            const std::vector<float> in = trainer.activation(graph.value(node.inputs[0]).name);
            const Dims& d = graph.value(node.inputs[0]).dims;
            const Dims& o = graph.value(node.output).dims;
            for (int64_t nc = 0; nc < d[0] * d[1]; ++nc)
                for (int64_t y = 0; y < o[2]; ++y)
                    for (int64_t x = 0; x < o[3]; ++x) {
                        int best = 0;
                        float best_value = -std::numeric_limits<float>::infinity();
                        for (int k = 0; k < node.kernel * node.kernel; ++k) {
                            const int64_t yy = y * node.stride + k / node.kernel, xx = x * node.stride + k % node.kernel;
                            const float v = in[static_cast<size_t>((nc * d[2] + yy) * d[3] + xx)];
                            if (v > best_value) best_value = v, best = k;
                        }
                        bits.push_back(best);
                    }
        }
        return bits;
    };
    loss_at(images);
    const std::vector<int> base_pattern = pattern();
    CheckResult result;
    auto record = [&](const std::string& name, const float* grad, int64_t count, const std::function<double(int64_t, double)>& perturbed) {
        TensorError e;
        e.name = name;
        for (int64_t i = 0; i < count; ++i) e.scale = std::max(e.scale, static_cast<double>(std::abs(grad[i])));
        const double scale = std::max(e.scale, floor);
        for (int64_t i : pick_elements(grad, count, top, spread)) {
            const double up = perturbed(i, h);
            const bool up_smooth = pattern() == base_pattern;
            const double down = perturbed(i, -h);
            const bool down_smooth = pattern() == base_pattern;
            // A ReLU that changed sign or a max pool that changed its argmax within +-h: the loss has a kink
            // there and the central difference means nothing, so the element is skipped (and counted).
            if (!up_smooth || !down_smooth) {
                ++e.skipped;
                continue;
            }
            ++e.checked;
            const double numeric = (up - down) / (2 * h);
            const double error = std::abs(numeric - grad[i]) / scale;
            if (error >= e.error) {
                e.error = error;
                e.worst_index = i;
                e.analytic = grad[i];
                e.numeric = numeric;
            }
        }
        result.checked += e.checked;
        result.skipped += e.skipped;
        result.tensors.push_back(e);
        if (e.error >= result.worst.error) result.worst = e;
    };
    TensorMap w = base;
    for (const auto& [name, grad] : analytic) {
        float* value = w.at(name).f32();
        record(name, grad.f32(), grad.num_elements(), [&](int64_t i, double delta) {
            const float saved = value[i];
            value[i] = static_cast<float>(saved + delta);
            trainer.set_weights(w);
            const double loss = loss_at(images);
            value[i] = saved;
            return loss;
        });
        trainer.set_weights(base);
    }
    if (!input_analytic.empty()) {
        std::vector<float> x = images;
        record("(input)", input_analytic.data(), static_cast<int64_t>(input_analytic.size()), [&](int64_t i, double delta) {
            const float saved = x[static_cast<size_t>(i)];
            x[static_cast<size_t>(i)] = static_cast<float>(saved + delta);
            const double loss = loss_at(x);
            x[static_cast<size_t>(i)] = saved;
            return loss;
        });
    }
    trainer.set_weights(base);
    return result;
}

// Random weights with non-trivial batch-norm parameters and biases.
TensorMap random_weights(const Graph& g, uint64_t seed) {
    TensorMap w = init_weights(g, seed);
    randomize_batch_norm_statistics(g, w, seed + 1);
    return w;
}

std::vector<float> uniform(int64_t count, uint64_t seed, float low, float high) {
    std::vector<float> v(static_cast<size_t>(count));
    fill_uniform(v.data(), count, seed, low, high);
    return v;
}

constexpr double kStep = 1e-3;              // h of the central difference
constexpr double kFloor = 1e-2;             // floor_fraction: errors are relative to >= 1% of the largest gradient
constexpr double kOpTolerance = 1e-2;      // per-tensor relative error, linear loss on one op
constexpr double kNetworkTolerance = 2e-2;  // per-tensor relative error, whole ResUNet with Dice + BCE

struct OpCase {
    std::string name;
    std::function<Graph()> build;
};

// input -> conv (so the op's input gradient reaches a weight) -> op -> conv -> output.
Graph around(const Dims& input, int c, const std::function<int(Graph&, int)>& op) {
    Graph g;
    int x = g.input("input", input);
    x = g.conv("pre", x, 3 * c, 3, 1, 1);
    x = op(g, x);
    x = g.conv("post", x, 2, 1, 1, 0);
    g.set_output(x);
    return g;
}

// Channel counts are multiplied by `c`: c = 16 keeps every concat offset and every conv's channel count a
// multiple of the channel block oneDNN chooses (8 on AVX2, 16 on AVX-512), so our Winograd applies under both.
std::vector<OpCase> op_cases(int c = 1) {
    const Dims in = {2, 2, 6, 6};
    return {
        {"conv3x3", [=] { return around(in, c, [c](Graph& g, int x) { return g.conv("op", x, 4 * c, 3, 1, 1); }); }},
        {"conv3x3_stride2", [=] { return around(in, c, [c](Graph& g, int x) { return g.conv("op", x, 3 * c, 3, 2, 1); }); }},
        {"conv1x1_no_bias", [=] { return around(in, c, [c](Graph& g, int x) { return g.conv("op", x, 3 * c, 1, 1, 0, false); }); }},
        {"conv_transpose2x2", [=] { return around(in, c, [c](Graph& g, int x) { return g.conv_transpose("op", x, 3 * c, 2, 2); }); }},
        {"conv_transpose3x3_s2_no_bias",
         [=] { return around(in, c, [c](Graph& g, int x) { return g.conv_transpose("op", x, 2 * c, 3, 2, false); }); }},
        {"batch_norm", [=] { return around(in, c, [c](Graph& g, int x) { return g.batch_norm("op", x); }); }},
        {"relu", [=] { return around(in, c, [c](Graph& g, int x) { return g.relu("op", x); }); }},
        {"batch_norm_relu",  // fused into one primitive by default (TrainOptions::fuse_batch_norm_relu)
         [=] { return around(in, c, [c](Graph& g, int x) { return g.relu("op.relu", g.batch_norm("op", x)); }); }},
        {"sigmoid", [=] { return around(in, c, [c](Graph& g, int x) { return g.sigmoid("op", x); }); }},
        {"max_pool", [=] { return around(in, c, [c](Graph& g, int x) { return g.max_pool("op", x, 2, 2); }); }},
        {"add_with_fan_out",  // x feeds the relu and the add: its gradient is the sum of both terms
         [=] { return around(in, c, [c](Graph& g, int x) { return g.add("op", g.relu("op.relu", x), x); }); }},
        {"concat_with_fan_out",  // x feeds the conv and the concat
         [=] {
             return around(in, c, [c](Graph& g, int x) {
                 const int y = g.conv("op.conv", x, 2 * c, 3, 1, 1);
                 return g.concat("op", {y, x});
             });
         }},
    };
}

}  // namespace

class OpGradient : public ::testing::TestWithParam<std::tuple<int, ActivationLayout>> {};

std::string layout_suffix(ActivationLayout layout) {
    switch (layout) {
        case ActivationLayout::nhwc: return "_nhwc";
        case ActivationLayout::nchw: return "_nchw";
        case ActivationLayout::blocked: return "_blocked";
        case ActivationLayout::automatic: return "_automatic";
    }
    return "";
}

// Under `blocked` the channels are 16x (block-aligned concat offsets; padded channels where a count is not: the
// 2-channel input and output).
TEST_P(OpGradient, MatchesFiniteDifferences) {
    const bool blocked = std::get<1>(GetParam()) == ActivationLayout::blocked;
    const OpCase c = op_cases(blocked ? 16 : 1)[static_cast<size_t>(std::get<0>(GetParam()))];
    const Graph g = c.build();
    TrainOptions o;
    o.layout = std::get<1>(GetParam());
    o.input_gradient = true;
    // Blocked: our own Winograd forward, backward-data and backward-weights wherever it applies (the 3x3
    // stride-1 cases).
    if (blocked) o.conv_algorithm = TrainConvAlgorithm::winograd;
    LinearLoss loss{uniform(num_elements(g.value(g.output_value()).dims), 77, -1.0f, 1.0f)};
    o.custom_loss = loss;
    Trainer trainer(g, random_weights(g, 3), o);
    const std::vector<float> images = uniform(num_elements(g.value(g.input_value()).dims), 5, -1.0f, 1.0f);
    const std::vector<float> masks(static_cast<size_t>(num_elements(g.value(g.output_value()).dims)), 0.0f);  // unused
    const Dims& out = g.value(g.output_value()).dims;
    const CheckResult r = check_gradients(
        trainer, images, masks, [&](const float* logits) { return loss(logits, nullptr, static_cast<int>(out[0]), num_elements(out) / out[0], nullptr); },
        kStep, kFloor, 6, 4);
    if (blocked && c.name == "conv3x3" && resunet::winograd_own_supported()) {
        // 48 -> 64 channels at 6x6: F(2x2) for all three passes (F(4x4)'s 8 tiles are too few for backward-weights).
        int own = 0;
        for (const TrainConvChoice& choice : trainer.conv_choices()) own += choice.layer == "op" && choice.algorithm != "direct";
        EXPECT_EQ(own, 3) << "forward, backward-data and backward-weights of the 3x3 op";
    }
    fmt::print("{} ({}): worst relative error {:.2e} in {} ({} elements checked, {} skipped at kinks)\n", c.name,
               trainer.activation_layout(), r.worst.error, r.worst.name, r.checked, r.skipped);
    EXPECT_GE(r.checked, 3 * r.skipped) << r.report();
    EXPECT_LT(r.worst.error, kOpTolerance) << c.name << "\n" << r.report();
}

INSTANTIATE_TEST_SUITE_P(Ops, OpGradient,
                         ::testing::Combine(::testing::Range(0, static_cast<int>(op_cases().size())),
                                            ::testing::Values(ActivationLayout::nhwc, ActivationLayout::nchw,
                                                              ActivationLayout::blocked)),
                         [](const auto& param_info) {
                             return op_cases()[static_cast<size_t>(std::get<0>(param_info.param))].name +
                                    layout_suffix(std::get<1>(param_info.param));
                         });

// The whole network with the real loss (Dice + BCE), every learnable tensor and the input.
TEST(NetworkGradient, TinyResUNetMatchesFiniteDifferences) {
    // Width 8: the automatic layout is channel-blocked (nChw8c on AVX2); the narrower ones are nhwc.
    for (auto [width, depth] : {std::pair{2, 2}, std::pair{4, 1}, std::pair{8, 1}}) {
        ResUNetConfig config;
        config.width = width;
        config.depth = depth;
        config.height = config.width_px = 16;
        config.batch = 2;
        const Graph g = build_resunet(config);
        TrainOptions o;
        o.input_gradient = true;
        // Direct kernels: a measured choice could differ between machines. Own Winograd on the whole network is
        // checked against direct in test_train (OwnWinogradGivesTheSameGradientsAsDirect) and per op below: its
        // extra rounding (1e-6 of the range) makes the central differences of zero-gradient biases (those
        // feeding a batch norm) noisier than this check's floor allows.
        o.conv_algorithm = TrainConvAlgorithm::direct;
        Trainer trainer(g, random_weights(g, 10 + static_cast<uint64_t>(width)), o);
        const std::vector<float> images = uniform(2 * 3 * 16 * 16, 11, -1.5f, 1.5f);
        std::vector<float> masks = uniform(2 * 16 * 16, 12, 0.0f, 1.0f);
        for (float& m : masks) m = m > 0.6f ? 1.0f : 0.0f;
        const CheckResult r = check_gradients(
            trainer, images, masks,
            [&](const float* logits) { return dice_bce_loss(logits, masks.data(), 2, 16 * 16, nullptr).total; }, kStep, kFloor);
        fmt::print("ResUNet width {} depth {} (16x16, batch 2, Dice+BCE, {}): {} tensors, worst relative error {:.2e} in {} "
                   "({} elements checked, {} skipped at kinks)\n",
                   width, depth, trainer.activation_layout(), r.tensors.size(), r.worst.error, r.worst.name, r.checked, r.skipped);
        // Most elements are away from kinks; at width 8 a +-h step flips one of many more ReLUs, so about
        // half of the picked elements are skipped there.
        EXPECT_GE(r.checked, 100) << r.report();
        EXPECT_GE(2 * r.checked, r.skipped) << r.report();
        EXPECT_LT(r.worst.error, kNetworkTolerance) << r.report();
    }
}
