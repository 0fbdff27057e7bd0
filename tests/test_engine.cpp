// The fp32 engine against the plain reference (tests/support/reference.h): every op kind on tiny graphs,
// the whole ResUNet at small sizes, engine properties (arena, in-place concat, profile, repeatability),
// and bad input. Error metric: max|engine - reference| / max|reference| over the whole output, <= 1e-4.
#include "engine/engine.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <iostream>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "graph/graph.h"
#include "graph/init.h"
#include "tests/support/reference.h"

namespace {

using resunet::Dims;
using resunet::Engine;
using resunet::EngineOptions;
using resunet::Error;
using resunet::Graph;
using resunet::HostTensor;
using resunet::Node;
using resunet::OpKind;
using resunet::ParamInfo;
using resunet::TensorMap;
using resunet::dims_to_string;
using resunet::fill_uniform;
using resunet::reference::ErrorStats;
using resunet::reference::Tensor4;

constexpr double kTolerance = 1e-4;  // relative: max|a - b| / max|reference|

// The largest relative errors the comparisons saw, reported once at the end of the run.
struct Worst {
    double relative = 0;         // largest relative error of a comparison within tolerance
    std::string where;           // which comparison
    int failures = 0;            // comparisons over tolerance
    double failed_relative = 0;  // largest relative error among those
    std::string failed_where;    // which comparison
};
Worst& worst() {
    static Worst w;
    return w;
}

class WorstErrorReport : public ::testing::Environment {
  public:
    void TearDown() override {
        std::cout << fmt::format("[ reference ] largest relative error within tolerance {:.0e}: {:.3g} ({})\n", kTolerance,
                                 worst().relative, worst().where);
        if (worst().failures > 0)
            std::cout << fmt::format("[ reference ] {} comparisons over tolerance; the worst: {:.3g} ({})\n",
                                     worst().failures, worst().failed_relative, worst().failed_where);
    }
};
[[maybe_unused]] ::testing::Environment* const kReport = ::testing::AddGlobalTestEnvironment(new WorstErrorReport);

// Every parameter drawn uniformly with its own fixed seed. Conv weights have Kaiming variance
// (bound sqrt(6 / fan_in)) so activations keep their scale; biases and BN statistics are far from the
// identity so that bias handling and BN folding are exercised.
TensorMap random_weights(const Graph& graph, uint64_t seed) {
    TensorMap weights;
    uint64_t index = 0;
    for (const Node& node : graph.nodes())
        for (const ParamInfo& p : node.params) {
            HostTensor t = HostTensor::zeros(p.dims);
            const uint64_t s = seed * 1000003ULL + ++index;
            float low = -0.5f, high = 0.5f;
            const bool is_weight = p.name.ends_with(".weight");
            if ((node.kind == OpKind::conv || node.kind == OpKind::conv_transpose) && is_weight) {
                // conv [O, I, k, k]: fan_in I*k*k; conv_transpose [I, O, k, k]: each output sees about I*(k/s)^2.
                const double fan_in = node.kind == OpKind::conv
                                          ? static_cast<double>(p.dims[1] * p.dims[2] * p.dims[3])
                                          : static_cast<double>(p.dims[0]) *
                                                std::max(1.0, static_cast<double>(p.dims[2] * p.dims[3]) /
                                                                  static_cast<double>(node.stride * node.stride));
                high = static_cast<float>(std::sqrt(6.0 / fan_in));
                low = -high;
            } else if (node.kind == OpKind::batch_norm && is_weight) {
                low = 0.5f, high = 1.5f;
            } else if (p.name.ends_with(".running_var")) {
                low = 0.25f, high = 2.0f;
            }
            fill_uniform(t.f32(), t.num_elements(), s, low, high);
            weights.emplace(p.name, std::move(t));
        }
    return weights;
}

Tensor4 random_input(const Graph& graph, int batch, uint64_t seed) {
    Dims dims = graph.value(graph.input_value()).dims;
    dims[0] = batch;
    Tensor4 input = Tensor4::zeros(dims);
    fill_uniform(input.data.data(), input.size(), seed, -2.0f, 2.0f);
    return input;
}

std::string describe(const EngineOptions& o) {
    return fmt::format("micro_batch {} concat_in_place {} deconv_as_conv {}", o.micro_batch, o.concat_in_place,
                       o.deconv_as_conv);
}

std::vector<float> run_engine(Engine& engine, const Tensor4& input, const Dims& output_dims) {
    std::vector<float> out(static_cast<size_t>(resunet::num_elements(output_dims)),
                           std::numeric_limits<float>::quiet_NaN());
    engine.run(input.data.data(), static_cast<int>(input.dims[0]), out.data());
    return out;
}

// Runs the engine and the reference on the same input, prints the shapes and the error, checks it.
ErrorStats check_case(const std::string& label, const Graph& graph, const TensorMap& weights, const EngineOptions& options,
                      const Tensor4& input, const Tensor4& expected, std::vector<float>* output = nullptr) {
    Engine engine(graph, weights, options);
    std::vector<float> actual = run_engine(engine, input, expected.dims);
    const ErrorStats e = resunet::reference::compare(actual.data(), expected);
    std::cout << fmt::format("  {:<42} in {:<16} out {:<16} {:<58} layout {:<7} {}\n", label,
                             dims_to_string(input.dims), dims_to_string(expected.dims), describe(options),
                             engine.activation_layout(), e.to_string());
    const std::string where = fmt::format("{}, {}, out {}", label, describe(options), dims_to_string(expected.dims));
    Worst& w = worst();
    if (e.relative() <= kTolerance && e.relative() > w.relative) {
        w.relative = e.relative();
        w.where = where;
    } else if (!(e.relative() <= kTolerance)) {
        ++w.failures;
        if (!(e.relative() <= w.failed_relative)) {
            w.failed_relative = e.relative();
            w.failed_where = where;
        }
    }
    EXPECT_LE(e.relative(), kTolerance) << where << ": " << e.to_string();
    if (output) *output = std::move(actual);
    return e;
}

// One graph under every option set that changes the lowering: batch 2 as two passes of one image (the
// in-place paths), as one pass of two (no in-place concat), and with both rewrites switched off.
void check_graph(const std::string& label, const Graph& graph, uint64_t seed) {
    SCOPED_TRACE(label);
    const TensorMap weights = random_weights(graph, seed);
    const Tensor4 input = random_input(graph, 2, seed + 17);
    const Tensor4 expected = resunet::reference::run_graph(graph, weights, input);
    EngineOptions options;
    check_case(label, graph, weights, options, input, expected);
    options.micro_batch = 2;
    check_case(label, graph, weights, options, input, expected);
    options.micro_batch = 1;
    options.concat_in_place = false;
    options.deconv_as_conv = false;
    check_case(label, graph, weights, options, input, expected);
}

// RB(cin, cout) of MODEL.md, built as build_resunet builds it.
int residual_block(Graph& g, const std::string& stage, int x, int out_channels) {
    const int64_t in_channels = g.value(x).dims[1];
    int y = g.conv(stage + ".conv_a", x, out_channels, 3, 1, 1);
    y = g.batch_norm(stage + ".bn_a", y);
    y = g.relu(stage + ".relu_a", y);
    y = g.conv(stage + ".conv_b", y, out_channels, 3, 1, 1);
    y = g.batch_norm(stage + ".bn_b", y);
    int shortcut = x;
    if (in_channels != out_channels) {
        shortcut = g.conv(stage + ".shortcut.conv", x, out_channels, 1, 1, 0);
        shortcut = g.batch_norm(stage + ".shortcut.bn", shortcut);
    }
    y = g.add(stage + ".add", y, shortcut);
    return g.relu(stage + ".relu", y);
}

// A graph value that is not the graph input: conv + relu, so ops behind it read an activation layout.
int stem(Graph& g, int x, int channels) { return g.relu("stem.relu", g.conv("stem.conv", x, channels, 3, 1, 1)); }

// ---------------------------------------------------------------------------------------------------
// a) One op kind at a time.

TEST(EngineOps, Conv3x3Padding1) {
    const std::pair<int, int> shapes[] = {{3, 8}, {8, 16}, {5, 12}, {12, 5}, {16, 3}, {8, 1}};
    uint64_t seed = 100;
    for (auto [cin, cout] : shapes)
        for (bool from_input : {true, false}) {
            Graph g;
            int x = g.input("input", {1, cin, 11, 13});
            if (!from_input) x = g.relu("pre.relu", x);
            g.set_output(g.conv("conv", x, cout, 3, 1, 1));
            check_graph(fmt::format("conv3x3 {}->{}{}", cin, cout, from_input ? "" : " after relu"), g, ++seed);
        }
    Graph g;
    g.set_output(g.conv("conv", g.input("input", {1, 8, 10, 10}), 8, 3, 1, 1, /*bias=*/false));
    check_graph("conv3x3 8->8 no bias", g, ++seed);
}

TEST(EngineOps, Conv1x1) {
    const std::pair<int, int> shapes[] = {{8, 8}, {5, 3}, {16, 24}, {3, 1}, {12, 12}};
    uint64_t seed = 200;
    for (auto [cin, cout] : shapes) {
        Graph g;
        int x = stem(g, g.input("input", {1, 3, 9, 9}), cin);
        g.set_output(g.conv("conv", x, cout, 1, 1, 0));
        check_graph(fmt::format("conv1x1 {}->{}", cin, cout), g, ++seed);
    }
}

TEST(EngineOps, ConvStride2) {
    struct Case {
        int cin, cout, size, kernel, padding;
    };
    const Case cases[] = {{8, 16, 12, 3, 1}, {5, 12, 11, 3, 1}, {8, 8, 12, 1, 0}, {12, 5, 10, 2, 0}, {3, 8, 13, 3, 0}};
    uint64_t seed = 300;
    for (const Case& c : cases) {
        Graph g;
        int x = g.input("input", {1, c.cin, c.size, c.size});
        g.set_output(g.conv("conv", x, c.cout, c.kernel, 2, c.padding));
        check_graph(fmt::format("conv{}x{} s2 p{} {}->{}", c.kernel, c.kernel, c.padding, c.cin, c.cout), g, ++seed);
    }
}

TEST(EngineOps, ConvBatchNormFolded) {
    uint64_t seed = 400;
    for (auto [cin, cout] : {std::pair{3, 8}, std::pair{8, 16}, std::pair{5, 12}}) {
        Graph g;
        int x = g.conv("conv", g.input("input", {1, cin, 10, 10}), cout, 3, 1, 1);
        g.set_output(g.batch_norm("bn", x));
        check_graph(fmt::format("conv+bn {}->{}", cin, cout), g, ++seed);
    }
}

TEST(EngineOps, ConvBatchNormRelu) {
    uint64_t seed = 500;
    for (auto [cin, cout] : {std::pair{3, 8}, std::pair{8, 16}, std::pair{12, 5}}) {
        Graph g;
        int x = g.conv("conv", g.input("input", {1, cin, 10, 10}), cout, 3, 1, 1);
        g.set_output(g.relu("relu", g.batch_norm("bn", x)));
        check_graph(fmt::format("conv+bn+relu {}->{}", cin, cout), g, ++seed);
    }
}

TEST(EngineOps, ConvSigmoid) {
    uint64_t seed = 550;
    for (bool with_bn : {false, true}) {
        Graph g;
        int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
        x = g.conv("head", x, 1, 1, 1, 0);
        if (with_bn) x = g.batch_norm("head.bn", x);
        g.set_output(g.sigmoid("head.sigmoid", x));
        check_graph(with_bn ? "conv+bn+sigmoid 8->1" : "conv+sigmoid 8->1", g, ++seed);
    }
}

TEST(EngineOps, ResidualWithConvShortcut) {
    uint64_t seed = 600;
    for (auto [cin, cout] : {std::pair{3, 8}, std::pair{8, 16}, std::pair{5, 12}, std::pair{16, 6}}) {
        for (bool from_input : {true, false}) {
            if (from_input && cin != 3) continue;
            Graph g;
            int x = g.input("input", {1, 3, 12, 12});
            if (!from_input) x = stem(g, x, cin);
            g.set_output(residual_block(g, "rb", x, cout));
            check_graph(fmt::format("RB {}->{} (1x1 shortcut){}", cin, cout, from_input ? " on input" : ""), g, ++seed);
        }
    }
}

TEST(EngineOps, ResidualWithIdentityShortcut) {
    uint64_t seed = 700;
    for (int channels : {8, 16, 5, 12}) {
        {
            // x is read by conv_a and by the add: the add accumulates in place into x's buffer.
            Graph g;
            int x = stem(g, g.input("input", {1, 3, 10, 10}), channels);
            g.set_output(residual_block(g, "rb", x, channels));
            check_graph(fmt::format("RB {}->{} identity", channels, channels), g, ++seed);
        }
        {
            // x is also read after the block (a concat, as a U-Net skip is): x must survive the add.
            Graph g;
            int x = stem(g, g.input("input", {1, 3, 10, 10}), channels);
            int y = residual_block(g, "rb", x, channels);
            g.set_output(g.concat("cat", {y, x}));
            check_graph(fmt::format("RB {}->{} identity, x also concat'd", channels, channels), g, ++seed);
        }
        {
            // x is also read after the block by a standalone add and a conv.
            Graph g;
            int x = stem(g, g.input("input", {1, 3, 10, 10}), channels);
            int y = residual_block(g, "rb", x, channels);
            int z = g.add("after.add", y, x);
            g.set_output(g.conv("after.conv", g.concat("after.cat", {z, x}), 8, 1, 1, 0));
            check_graph(fmt::format("RB {}->{} identity, x read twice after", channels, channels), g, ++seed);
        }
        {
            // The shortcut is the graph input itself (never written in place).
            Graph g;
            int x = g.input("input", {1, channels, 10, 10});
            g.set_output(residual_block(g, "rb", x, channels));
            check_graph(fmt::format("RB {}->{} identity on input", channels, channels), g, ++seed);
        }
    }
}

// y = relu(bn(conv(x)) + x): the conv reads the very buffer its residual add accumulates into, unless
// the engine keeps the two apart.
TEST(EngineOps, ResidualOperandIsTheConvSource) {
    uint64_t seed = 800;
    for (int channels : {8, 5}) {
        for (int kernel : {3, 1}) {
            for (bool swapped : {false, true}) {
                Graph g;
                int x = stem(g, g.input("input", {1, 3, 8, 8}), channels);
                int y = g.batch_norm("bn", g.conv("conv", x, channels, kernel, 1, kernel / 2));
                y = swapped ? g.add("add", x, y) : g.add("add", y, x);
                g.set_output(g.relu("relu", y));
                check_graph(fmt::format("relu(bn(conv{}x{}(x)) + x) C={}{}", kernel, kernel, channels,
                                        swapped ? " (x + .)" : ""),
                            g, ++seed);
            }
        }
    }
    // The conv reads a slice of the concat whose buffer its residual add accumulates into.
    Graph g;
    int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
    int a = g.conv("a", x, 8, 3, 1, 1);
    int b = g.conv("b", x, 8, 3, 1, 1);
    int cat = g.concat("cat", {a, b});
    int y = g.batch_norm("bn", g.conv("conv", b, 16, 3, 1, 1));
    g.set_output(g.relu("relu", g.add("add", y, cat)));
    check_graph("relu(bn(conv3x3(b)) + concat[a, b])", g, ++seed);
}

// y = relu(bn(conv(input)) + input): the residual is the graph input, which the conv reads first, so the
// input takes the layout that conv chooses; the residual copy must read it in that layout.
TEST(EngineOps, ResidualOperandIsTheGraphInput) {
    uint64_t seed = 820;
    for (int channels : {8, 5, 3, 16}) {
        Graph g;
        int x = g.input("input", {1, channels, 8, 8});
        g.set_output(g.relu("relu", g.add("add", g.batch_norm("bn", g.conv("conv", x, channels, 3, 1, 1)), x)));
        check_graph(fmt::format("relu(bn(conv3x3(input)) + input) C={}", channels), g, ++seed);
    }
}

// The residual add accumulates into a concat's buffer while one of the concat's inputs (a slice of that
// buffer) is still read afterwards.
TEST(EngineOps, ResidualIntoConcatWhoseInputIsReadLater) {
    Graph g;
    int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
    int a = g.conv("a", x, 8, 3, 1, 1);
    int b = g.conv("b", x, 8, 3, 1, 1);
    int cat = g.concat("cat", {a, b});
    int z = g.relu("relu", g.add("add", g.batch_norm("bn", g.conv("conv", x, 16, 3, 1, 1)), cat));
    g.set_output(g.concat("out", {z, a}));
    check_graph("concat [relu(bn(conv(x)) + concat[a, b]), a]", g, 840);
}

TEST(EngineOps, AddOfTwoConvs) {
    uint64_t seed = 850;
    for (int channels : {8, 5}) {
        Graph g;
        int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
        int a = g.conv("a", x, channels, 3, 1, 1);
        int b = g.conv("b", x, channels, 1, 1, 0);
        g.set_output(g.relu("relu", g.add("add", a, b)));
        check_graph(fmt::format("relu(conv3x3(x) + conv1x1(x)) C={}", channels), g, ++seed);
    }
}

TEST(EngineOps, MaxPool) {
    uint64_t seed = 900;
    for (int channels : {8, 5, 16, 3}) {
        {
            Graph g;
            g.set_output(g.max_pool("pool", g.input("input", {1, channels, 12, 10}), 2, 2));
            check_graph(fmt::format("maxpool 2x2 on input C={}", channels), g, ++seed);
        }
        {
            Graph g;
            int x = stem(g, g.input("input", {1, 3, 12, 12}), channels);
            x = g.max_pool("pool", x, 2, 2);
            g.set_output(g.conv("conv", x, 8, 3, 1, 1));
            check_graph(fmt::format("conv -> maxpool 2x2 -> conv C={}", channels), g, ++seed);
        }
    }
    for (auto [kernel, stride] : {std::pair{3, 3}, std::pair{3, 1}, std::pair{2, 1}}) {
        Graph g;
        g.set_output(g.max_pool("pool", stem(g, g.input("input", {1, 3, 12, 12}), 8), kernel, stride));
        check_graph(fmt::format("maxpool {}x{} s{} C=8", kernel, kernel, stride), g, ++seed);
    }
}

// check_graph runs each with deconv_as_conv true (1x1 conv + pixel shuffle) and false (deconvolution).
TEST(EngineOps, ConvTransposeK2S2) {
    const std::pair<int, int> shapes[] = {{16, 8}, {8, 8}, {5, 3}, {8, 5}, {12, 16}, {3, 8}};
    uint64_t seed = 1000;
    for (auto [cin, cout] : shapes)
        for (bool from_input : {true, false}) {
            Graph g;
            int x = g.input("input", {1, cin, 6, 7});
            if (!from_input) x = g.relu("pre.relu", x);
            g.set_output(g.conv_transpose("up", x, cout, 2, 2));
            check_graph(fmt::format("convT k2 s2 {}->{}{}", cin, cout, from_input ? "" : " after relu"), g, ++seed);
        }
    {
        Graph g;
        g.set_output(g.conv_transpose("up", stem(g, g.input("input", {1, 3, 5, 5}), 16), 8, 2, 2, /*bias=*/false));
        check_graph("convT k2 s2 16->8 no bias", g, ++seed);
    }
    {
        Graph g;  // an activation after it is fused, so the pixel-shuffle rewrite must step aside
        g.set_output(g.relu("relu", g.conv_transpose("up", stem(g, g.input("input", {1, 3, 5, 5}), 16), 8, 2, 2)));
        check_graph("convT k2 s2 16->8 + relu", g, ++seed);
    }
    {
        Graph g;  // the upsampling as the decoder uses it: into a conv
        int x = g.conv_transpose("up", stem(g, g.input("input", {1, 3, 4, 4}), 16), 8, 2, 2);
        g.set_output(g.conv("conv", x, 8, 3, 1, 1));
        check_graph("convT k2 s2 16->8 -> conv3x3", g, ++seed);
    }
}

TEST(EngineOps, ConvTransposeOtherKernels) {
    uint64_t seed = 1100;
    for (auto [kernel, stride] : {std::pair{3, 2}, std::pair{2, 1}, std::pair{4, 2}, std::pair{1, 1}}) {
        Graph g;
        g.set_output(g.conv_transpose("up", stem(g, g.input("input", {1, 3, 5, 6}), 8), 8, kernel, stride));
        check_graph(fmt::format("convT k{} s{} 8->8", kernel, stride), g, ++seed);
    }
}

// check_graph runs each in place (micro_batch 1) and as oneDNN concat (micro_batch 2, concat_in_place false).
TEST(EngineOps, Concat) {
    uint64_t seed = 1200;
    const std::vector<std::vector<int>> channel_lists = {{8, 8}, {8, 16}, {16, 8, 8}, {8, 5}, {5, 8}, {12, 8}, {3, 5}, {8, 12, 8}};
    for (const std::vector<int>& channels : channel_lists) {
        Graph g;
        int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
        std::vector<int> parts;
        for (size_t i = 0; i < channels.size(); ++i)
            parts.push_back(g.conv(fmt::format("part{}", i), x, channels[i], 3, 1, 1));
        int cat = g.concat("cat", parts);
        g.set_output(g.conv("after", cat, 8, 3, 1, 1));
        check_graph(fmt::format("concat [{}] -> conv", fmt::join(channels, ", ")), g, ++seed);
    }
    {
        Graph g;  // the decoder pattern: [up, skip] where skip was written by a fused residual add
        int input = g.input("input", {1, 3, 8, 8});
        int skip = residual_block(g, "e1", input, 8);
        int down = residual_block(g, "b", g.max_pool("b.pool", skip, 2, 2), 16);
        int up = g.conv_transpose("d1.up", down, 8, 2, 2);
        g.set_output(residual_block(g, "d1", g.concat("d1.concat", {up, skip}), 8));
        check_graph("U-Net step: concat [up, skip]", g, ++seed);
    }
    {
        Graph g;  // one value in two concats: only one of them can hold it in place
        int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
        int a = g.conv("a", x, 8, 3, 1, 1);
        int b = g.conv("b", x, 8, 3, 1, 1);
        int c = g.conv("c", x, 8, 3, 1, 1);
        int ab = g.concat("ab", {a, b});
        int cb = g.concat("cb", {c, b});
        g.set_output(g.add("sum", g.conv("ab.conv", ab, 8, 1, 1, 0), g.conv("cb.conv", cb, 8, 1, 1, 0)));
        check_graph("one value in two concats", g, ++seed);
    }
    {
        Graph g;  // the same value twice in one concat, and the graph input in a concat
        int input = g.input("input", {1, 8, 8, 8});
        int a = g.relu("a", input);
        int aa = g.concat("aa", {a, a});
        int ia = g.concat("ia", {input, a});
        g.set_output(g.add("sum", aa, ia));
        check_graph("concat [a, a] and [input, a]", g, ++seed);
    }
    {
        Graph g;  // a concat'd value later used as a residual operand
        int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
        int a = g.conv("a", x, 8, 3, 1, 1);
        int b = g.conv("b", x, 8, 3, 1, 1);
        int cat = g.concat("cat", {a, b});
        int y = g.batch_norm("bn", g.conv("conv", cat, 8, 3, 1, 1));
        g.set_output(g.relu("relu", g.add("add", y, a)));
        check_graph("concat slice as a residual operand", g, ++seed);
    }
    {
        Graph g;  // the concat is the graph output
        int x = stem(g, g.input("input", {1, 3, 8, 8}), 8);
        g.set_output(g.concat("cat", {g.conv("a", x, 8, 1, 1, 0), g.max_pool("p", g.conv_transpose("up", x, 8, 2, 2), 2, 2)}));
        check_graph("concat as graph output", g, ++seed);
    }
}

TEST(EngineOps, StandaloneBatchNorm) {
    uint64_t seed = 1300;
    for (int channels : {8, 5, 16}) {
        {
            Graph g;
            g.set_output(g.batch_norm("bn", g.input("input", {1, channels, 7, 9})));
            check_graph(fmt::format("batchnorm on input C={}", channels), g, ++seed);
        }
        {
            Graph g;  // the conv's output goes to a relu first, so the BN cannot be folded
            int x = stem(g, g.input("input", {1, 3, 7, 9}), channels);
            g.set_output(g.relu("relu", g.batch_norm("bn", x)));
            check_graph(fmt::format("conv+relu -> batchnorm -> relu C={}", channels), g, ++seed);
        }
    }
}

TEST(EngineOps, StandaloneReluAndSigmoid) {
    uint64_t seed = 1400;
    for (int channels : {8, 3, 12}) {
        for (OpKind kind : {OpKind::relu, OpKind::sigmoid}) {
            Graph g;
            int x = g.input("input", {1, channels, 6, 7});
            g.set_output(kind == OpKind::relu ? g.relu("op", x) : g.sigmoid("op", x));
            check_graph(fmt::format("{} on input C={}", resunet::op_name(kind), channels), g, ++seed);
        }
        Graph g;
        int x = g.relu("relu", g.input("input", {1, channels, 6, 7}));
        g.set_output(g.sigmoid("sigmoid", g.max_pool("pool", x, 2, 1)));
        check_graph(fmt::format("relu -> maxpool -> sigmoid C={}", channels), g, ++seed);
    }
}

TEST(EngineOps, StandaloneAdd) {
    uint64_t seed = 1500;
    for (int channels : {8, 5, 16}) {
        {
            Graph g;
            int x = g.input("input", {1, channels, 6, 6});
            g.set_output(g.add("add", g.relu("relu", x), g.sigmoid("sigmoid", x)));
            check_graph(fmt::format("add(relu(x), sigmoid(x)) C={}", channels), g, ++seed);
        }
        {
            Graph g;
            int x = g.input("input", {1, channels, 6, 6});
            g.set_output(g.add("add", x, g.relu("relu", x)));
            check_graph(fmt::format("add(x, relu(x)) C={}", channels), g, ++seed);
        }
        {
            Graph g;
            int x = g.input("input", {1, channels, 6, 6});
            g.set_output(g.add("add", x, x));
            check_graph(fmt::format("add(x, x) C={}", channels), g, ++seed);
        }
        {
            Graph g;  // both operands come from convs that have other consumers: nothing can fuse
            int x = g.input("input", {1, 3, 6, 6});
            int a = g.conv("a", x, channels, 3, 1, 1);
            int b = g.conv("b", x, channels, 3, 1, 1);
            int sum = g.add("add", a, b);
            g.set_output(g.concat("cat", {sum, a, b}));
            check_graph(fmt::format("add of multi-consumer convs C={}", channels), g, ++seed);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// b) The whole network at small sizes.

struct NetworkCase {
    int width, depth, size;
    bool sigmoid;
};

Graph small_resunet(const NetworkCase& c) {
    resunet::ResUNetConfig config;
    config.width = c.width;
    config.depth = c.depth;
    config.height = config.width_px = c.size;
    config.sigmoid = c.sigmoid;
    return resunet::build_resunet(config);
}

TensorMap network_weights(const Graph& graph, uint64_t seed) {
    TensorMap weights = resunet::init_weights(graph, seed);
    resunet::randomize_batch_norm_statistics(graph, weights, seed + 1);
    return weights;
}

std::string network_label(const NetworkCase& c) {
    return fmt::format("ResUNet w{} d{} {}x{}{}", c.width, c.depth, c.size, c.size, c.sigmoid ? " sigmoid" : "");
}

TEST(EngineNetwork, MatchesReferenceBatch2MicroBatch1) {
    const NetworkCase cases[] = {{8, 2, 32, false}, {8, 3, 32, false}, {8, 4, 64, false}, {8, 2, 32, true},
                                 {4, 3, 32, false}, {6, 2, 32, true},  {5, 2, 16, false}};
    uint64_t seed = 2000;
    for (const NetworkCase& c : cases) {
        const Graph g = small_resunet(c);
        const TensorMap weights = network_weights(g, ++seed);
        const Tensor4 input = random_input(g, 2, seed + 5);
        const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
        check_case(network_label(c), g, weights, {}, input, expected);
    }
}

TEST(EngineNetwork, MicroBatchesAgreeWithReferenceAndEachOther) {
    const NetworkCase cases[] = {{8, 3, 32, false}, {6, 2, 32, true}};
    uint64_t seed = 2100;
    for (const NetworkCase& c : cases) {
        const Graph g = small_resunet(c);
        const TensorMap weights = network_weights(g, ++seed);
        const Tensor4 input = random_input(g, 4, seed + 5);
        const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
        std::vector<std::vector<float>> outputs;
        for (int micro_batch : {1, 2, 4}) {
            EngineOptions options;
            options.micro_batch = micro_batch;
            outputs.emplace_back();
            check_case(network_label(c), g, weights, options, input, expected, &outputs.back());
        }
        for (size_t i = 1; i < outputs.size(); ++i) {
            const ErrorStats e =
                resunet::reference::compare(outputs[i].data(), outputs[0].data(), static_cast<int64_t>(outputs[0].size()));
            std::cout << fmt::format("  {:<42} micro_batch {} vs 1: {}\n", network_label(c), i == 1 ? 2 : 4, e.to_string());
            EXPECT_LE(e.relative(), 1e-5) << network_label(c) << " micro-batch " << (i == 1 ? 2 : 4) << " vs 1";
        }
        // Each image's result must not depend on its neighbours in the micro-batch.
        const Tensor4 first = [&] {
            Tensor4 t = Tensor4::zeros({1, input.dims[1], input.dims[2], input.dims[3]});
            std::copy_n(input.data.begin(), t.size(), t.data.begin());
            return t;
        }();
        Engine single(g, weights, {});
        const std::vector<float> alone = run_engine(single, first, {1, expected.dims[1], expected.dims[2], expected.dims[3]});
        const ErrorStats e = resunet::reference::compare(outputs[2].data(), alone.data(), static_cast<int64_t>(alone.size()));
        EXPECT_LE(e.relative(), 1e-5) << "image 0 of a micro-batch of 4 vs alone: " << e.to_string();
    }
}

TEST(EngineNetwork, MatchesReferenceWithRewritesOff) {
    const NetworkCase c{8, 3, 32, true};
    const Graph g = small_resunet(c);
    const TensorMap weights = network_weights(g, 2200);
    const Tensor4 input = random_input(g, 2, 2201);
    const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
    for (bool concat_in_place : {true, false})
        for (bool deconv_as_conv : {true, false}) {
            EngineOptions options;
            options.concat_in_place = concat_in_place;
            options.deconv_as_conv = deconv_as_conv;
            options.threads = concat_in_place ? 0 : 1;
            check_case(network_label(c) + (options.threads ? " 1 thread" : ""), g, weights, options, input, expected);
        }
    // threads sets OpenMP's process-wide default: put the machine's count back for the tests that follow.
    EngineOptions restore;
    restore.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    Engine reset(g, weights, restore);
}

TEST(EngineNetwork, OtherShapesAndChannelCounts) {
    struct Case {
        int width, depth, height, width_px, in_channels, out_channels;
    };
    // Non-square input; an input with as many channels as the first stage (e1's shortcut is the
    // identity, the graph input itself); several output channels; odd widths.
    const Case cases[] = {{8, 2, 32, 48, 3, 1}, {8, 2, 16, 16, 8, 2}, {5, 2, 16, 24, 5, 3}, {6, 1, 8, 8, 1, 1}};
    uint64_t seed = 2250;
    for (const Case& c : cases) {
        resunet::ResUNetConfig config;
        config.width = c.width;
        config.depth = c.depth;
        config.height = c.height;
        config.width_px = c.width_px;
        config.in_channels = c.in_channels;
        config.out_channels = c.out_channels;
        const Graph g = resunet::build_resunet(config);
        const TensorMap weights = network_weights(g, ++seed);
        const Tensor4 input = random_input(g, 2, seed + 5);
        const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
        const std::string label = fmt::format("ResUNet w{} d{} {}x{} in {} out {}", c.width, c.depth, c.height,
                                              c.width_px, c.in_channels, c.out_channels);
        for (int micro_batch : {1, 2}) {
            EngineOptions options;
            options.micro_batch = micro_batch;
            check_case(label, g, weights, options, input, expected);
        }
    }
}

TEST(EngineNetwork, NormalInputAndUniformWeights) {
    // Inputs ~ N(0, 1)-like (sum of uniforms), every parameter drawn by random_weights.
    const NetworkCase c{8, 2, 32, false};
    const Graph g = small_resunet(c);
    const TensorMap weights = random_weights(g, 2300);
    Tensor4 input = random_input(g, 2, 2301);
    Tensor4 other = random_input(g, 2, 2302);
    Tensor4 third = random_input(g, 2, 2303);
    for (size_t i = 0; i < input.data.size(); ++i) input.data[i] = (input.data[i] + other.data[i] + third.data[i]) / 2.0f;
    const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
    check_case(network_label(c) + " normal input", g, weights, {}, input, expected);
}

// ---------------------------------------------------------------------------------------------------
// c) Engine properties.

TEST(EngineProperties, ArenaReusesMemory) {
    for (const NetworkCase& c : {NetworkCase{8, 2, 32, false}, NetworkCase{8, 4, 64, true}}) {
        const Graph g = small_resunet(c);
        for (int micro_batch : {1, 2}) {
            EngineOptions options;
            options.micro_batch = micro_batch;
            Engine engine(g, network_weights(g, 1), options);
            const resunet::EngineMemory m = engine.memory_usage();
            std::cout << fmt::format("  {:<42} micro_batch {}: arena {} B, naive {} B, weights {} B, scratchpad {} B\n",
                                     network_label(c), micro_batch, m.arena_bytes, m.arena_naive_bytes, m.weights_bytes,
                                     m.scratchpad_bytes);
            EXPECT_GT(m.arena_bytes, 0u);
            EXPECT_LT(m.arena_bytes, m.arena_naive_bytes) << network_label(c);
            EXPECT_GT(m.weights_bytes, 0u);
            // At least the largest activation (the full-resolution e1 output) must fit.
            const size_t largest = static_cast<size_t>(micro_batch) * static_cast<size_t>(c.width) *
                                   static_cast<size_t>(c.size * c.size) * sizeof(float);
            EXPECT_GE(m.arena_bytes, largest);
            EXPECT_EQ(m.total(), m.weights_bytes + m.arena_bytes + m.scratchpad_bytes);
        }
    }
}

// Concats the engine must copy for `layout` (as activation_layout() names it): a concat is written in
// place only where each input's channel slice of the concat buffer is a dense sub-tensor: micro-batch 1,
// a layout whose channel blocks are outermost within an image (nchw, nChw8c, nChw16c), and every slice
// starting on the layout's channel block. In nhwc a slice is strided, and oneDNN 2.6 runs convolutions
// into strided slices on its reference kernel only, so nhwc concats are copies.
int expected_concat_copies(const Graph& g, const std::string& layout, int micro_batch) {
    const int64_t block = layout == "nChw16c" ? 16 : layout == "nChw8c" ? 8 : layout == "nchw" ? 1 : 0;
    int copies = 0;
    for (const resunet::Node& node : g.nodes()) {
        if (node.kind != resunet::OpKind::concat) continue;
        bool in_place = block > 0 && micro_batch == 1;
        int64_t channel = 0;
        for (int src : node.inputs) {
            in_place = in_place && channel % block == 0;
            channel += g.value(src).dims[1];
        }
        copies += in_place ? 0 : 1;
    }
    return copies;
}

// Holds on every CPU class: for the layout oneDNN picks here (automatic) and for each forced layout, the
// number of copied concats is what that layout allows, each copy is a named `concat(copy)` step, and the
// network matches the reference; in the layouts the engine picks itself, no convolution falls back to a
// reference kernel (which an in-place nhwc slice would cause).
TEST(EngineProperties, ConcatInPlaceWhereTheLayoutAllows) {
    using resunet::EngineLayout;
    for (const NetworkCase& c : {NetworkCase{16, 3, 32, false}, NetworkCase{8, 3, 32, false}}) {
        const Graph g = small_resunet(c);
        const TensorMap weights = network_weights(g, 3);
        const Tensor4 input = random_input(g, 2, 4);
        const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
        for (EngineLayout layout :
             {EngineLayout::automatic, EngineLayout::blocked, EngineLayout::nhwc, EngineLayout::nchw})
            for (int micro_batch : {1, 2}) {
                if (micro_batch == 2 && (layout == EngineLayout::nhwc || layout == EngineLayout::nchw)) continue;
                EngineOptions options;
                options.layout = layout;
                options.micro_batch = micro_batch;
                Engine engine(g, weights, options);
                const std::string chosen = engine.activation_layout();
                const std::string label = fmt::format("{} layout option {} ({}), micro_batch {}", network_label(c),
                                                      static_cast<int>(layout), chosen, micro_batch);
                if (layout == EngineLayout::nhwc) {
                    EXPECT_EQ(chosen, "nhwc");
                } else if (layout == EngineLayout::nchw) {
                    EXPECT_EQ(chosen, "nchw");
                } else if (layout == EngineLayout::blocked) {
                    EXPECT_TRUE(chosen == "nChw16c" || chosen == "nChw8c") << chosen;
                }
                const int copies = expected_concat_copies(g, chosen, micro_batch);
                EXPECT_EQ(engine.num_concat_copies(), copies) << label;
                std::vector<float> out(expected.data.size());
                const std::vector<resunet::LayerProfile> rows = engine.profile(input.data.data(), 2, out.data());
                const ErrorStats e = resunet::reference::compare(out.data(), expected);
                EXPECT_LE(e.relative(), kTolerance) << label << ": " << e.to_string();
                int copy_steps = 0;
                for (const resunet::LayerProfile& row : rows) {
                    if (row.op == "concat(copy)") {
                        ++copy_steps;
                        EXPECT_EQ(row.name.substr(0, 1), "d") << "a concat step named after its decoder stage: " << row.name;
                    }
                    // Forced layouts are test knobs and may hit reference kernels (nhwc with AVX2 runs the
                    // 3-channel e1.conv_a on ref:any); the layouts the engine picks itself must not.
                    const bool picked = layout == EngineLayout::automatic || layout == EngineLayout::blocked;
                    if (row.op.starts_with("conv") && picked) {
                        EXPECT_FALSE(row.kernel.starts_with("ref")) << label << ": " << row.name << " runs " << row.kernel;
                    }
                }
                EXPECT_EQ(copy_steps, copies) << label;
                std::cout << fmt::format("  {:<64} concat copies {} (expected {}), {}\n", label,
                                         engine.num_concat_copies(), copies, e.to_string());
            }
        // Forced off: every concat is a copy, whatever the layout.
        EngineOptions options;
        options.concat_in_place = false;
        Engine engine(g, weights, options);
        EXPECT_EQ(engine.num_concat_copies(), c.depth);
    }
    // The narrowest network the blocked layout must still serve without reference kernels: 8 channels,
    // where oneDNN 2.6 runs nChw16c on its reference kernel, so `blocked` takes nChw8c there.
    EngineOptions options;
    options.layout = EngineLayout::blocked;
    Engine narrow(small_resunet({8, 2, 32, false}), network_weights(small_resunet({8, 2, 32, false}), 5), options);
    std::cout << "  blocked layout at width 8: " << narrow.activation_layout() << "\n";
}

TEST(EngineProperties, ProfileHasOneRowPerPrimitive) {
    const NetworkCase c{8, 2, 32, true};
    const Graph g = small_resunet(c);
    const TensorMap weights = network_weights(g, 4);
    const int batch = 2;
    const Tensor4 input = random_input(g, batch, 5);
    Engine engine(g, weights, {});
    std::vector<float> profiled(static_cast<size_t>(batch * 32 * 32), 0.0f);
    const std::vector<resunet::LayerProfile> rows = engine.profile(input.data.data(), batch, profiled.data());
    ASSERT_EQ(static_cast<int>(rows.size()), engine.num_primitives());
    double total_gflop = 0;
    int conv_rows = 0;
    for (const resunet::LayerProfile& row : rows) {
        SCOPED_TRACE(row.name + " " + row.op);
        EXPECT_FALSE(row.name.empty());
        EXPECT_FALSE(row.op.empty());
        EXPECT_FALSE(row.kernel.empty());
        EXPECT_EQ(row.precision, "f32");
        EXPECT_GE(row.time_ms, 0.0);
        if (row.op.starts_with("conv") || (row.op.starts_with("deconv") && row.op != "deconv:pixel-shuffle")) {
            EXPECT_GT(row.gflop, 0.0);
            ++conv_rows;
        }
        total_gflop += row.gflop;
    }
    // One row with MACs per conv and per transposed conv of the graph.
    int conv_nodes = 0;
    for (const Node& n : g.nodes()) conv_nodes += n.kind == OpKind::conv || n.kind == OpKind::conv_transpose;
    EXPECT_EQ(conv_rows, conv_nodes);
    const double expected_gflop = 2.0 * static_cast<double>(g.total_macs()) * batch / 1e9;
    EXPECT_NEAR(total_gflop, expected_gflop, 1e-9 * expected_gflop + 1e-12);
    // profile() computes the same thing as run().
    std::vector<float> ran(profiled.size(), 0.0f);
    engine.run(input.data.data(), batch, ran.data());
    EXPECT_EQ(ran, profiled);
}

TEST(EngineProperties, RunIsRepeatable) {
    const NetworkCase c{8, 2, 32, false};
    const Graph g = small_resunet(c);
    const TensorMap weights = network_weights(g, 6);
    const Tensor4 a = random_input(g, 2, 7);
    const Tensor4 b = random_input(g, 2, 8);
    const Dims out_dims = {2, 1, 32, 32};
    for (int micro_batch : {1, 2}) {
        EngineOptions options;
        options.micro_batch = micro_batch;
        Engine engine(g, weights, options);
        EXPECT_EQ(engine.input_dims(), (Dims{1, 3, 32, 32}));
        EXPECT_EQ(engine.output_dims(), (Dims{1, 1, 32, 32}));
        const std::vector<float> first = run_engine(engine, a, out_dims);
        const std::vector<float> second = run_engine(engine, a, out_dims);
        const std::vector<float> other = run_engine(engine, b, out_dims);
        const std::vector<float> third = run_engine(engine, a, out_dims);
        EXPECT_EQ(first, second) << "micro_batch " << micro_batch;
        EXPECT_EQ(first, third) << "micro_batch " << micro_batch << ": a run with other data in between changed the result";
        EXPECT_NE(first, other);
        // run() writes exactly batch outputs and leaves its input alone.
        std::vector<float> guarded(first.size() + 64, -7.0f);
        const Tensor4 copy = a;
        engine.run(a.data.data(), 2, guarded.data());
        EXPECT_EQ(std::vector<float>(guarded.begin(), guarded.begin() + static_cast<long>(first.size())), first);
        EXPECT_TRUE(std::all_of(guarded.begin() + static_cast<long>(first.size()), guarded.end(),
                                [](float v) { return v == -7.0f; }));
        EXPECT_EQ(copy.data, a.data);
    }
}

TEST(EngineProperties, Descriptions) {
    const Graph g = small_resunet({8, 2, 32, false});
    Engine engine(g, network_weights(g, 12), {});
    EXPECT_GT(engine.compile_ms(), 0.0);
    EXPECT_FALSE(engine.isa().empty());
    EXPECT_FALSE(engine.activation_layout().empty());
    EXPECT_NE(resunet::onednn_version().find("oneDNN"), std::string::npos);
    std::cout << fmt::format("  {}, isa {}, layout {}, {} primitives, compiled in {:.1f} ms\n", resunet::onednn_version(),
                             engine.isa(), engine.activation_layout(), engine.num_primitives(), engine.compile_ms());
}

// ---------------------------------------------------------------------------------------------------
// d) Bad input.

void expect_error_naming(const std::function<void()>& call, const std::string& needle) {
    try {
        call();
        ADD_FAILURE() << "expected resunet::Error mentioning '" << needle << "'";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
    }
}

TEST(EngineErrors, BadWeights) {
    const Graph g = small_resunet({8, 2, 32, false});
    const TensorMap good = network_weights(g, 9);
    {
        TensorMap w = good;
        w.erase("e2.conv_b.weight");
        expect_error_naming([&] { Engine e(g, w); }, "e2.conv_b.weight");
    }
    {
        TensorMap w = good;
        w.erase("d1.shortcut.bn.running_var");
        expect_error_naming([&] { Engine e(g, w); }, "d1.shortcut.bn.running_var");
    }
    {
        TensorMap w = good;
        w["d1.up.weight"] = HostTensor::zeros({8, 16, 2, 2});  // [O, I, k, k]: the conv layout, not PyTorch's [I, O, k, k]
        expect_error_naming([&] { Engine e(g, w); }, "d1.up.weight");
    }
    {
        TensorMap w = good;
        w["head.bias"] = HostTensor::zeros({2});
        expect_error_naming([&] { Engine e(g, w); }, "head.bias");
    }
    {
        TensorMap w = good;
        w["e1.conv_a.weight"] = HostTensor::zeros({8, 3, 3, 3}, resunet::DType::s8);
        expect_error_naming([&] { Engine e(g, w); }, "e1.conv_a.weight");
    }
    {
        TensorMap w = good;
        w["e9.conv_a.weight"] = HostTensor::zeros({8, 8, 3, 3});
        expect_error_naming([&] { Engine e(g, w); }, "e9.conv_a.weight");
    }
    {
        // PyTorch state_dicts carry a BN step counter the engine has no use for; it is tolerated.
        TensorMap w = good;
        w["e1.bn_a.num_batches_tracked"] = HostTensor::zeros({}, resunet::DType::i64);
        EXPECT_NO_THROW(Engine e(g, w));
    }
}

TEST(EngineErrors, BadOptions) {
    const Graph g = small_resunet({8, 2, 32, false});
    const TensorMap w = network_weights(g, 10);
    EngineOptions options;
    options.micro_batch = 0;
    EXPECT_THROW(Engine(g, w, options), Error);
    options.micro_batch = 1;
    options.threads = -1;
    EXPECT_THROW(Engine(g, w, options), Error);
}

TEST(EngineErrors, BadRunArguments) {
    const Graph g = small_resunet({8, 2, 32, false});
    const TensorMap w = network_weights(g, 11);
    EngineOptions options;
    options.micro_batch = 2;
    Engine engine(g, w, options);
    std::vector<float> src(4 * 3 * 32 * 32, 0.5f), dst(4 * 32 * 32, 0.0f);
    EXPECT_THROW(engine.run(src.data(), 3, dst.data()), Error);
    EXPECT_THROW(engine.run(src.data(), 1, dst.data()), Error);
    EXPECT_THROW(engine.run(src.data(), 0, dst.data()), Error);
    EXPECT_THROW(engine.run(src.data(), -2, dst.data()), Error);
    EXPECT_THROW(engine.run(nullptr, 2, dst.data()), Error);
    EXPECT_THROW(engine.run(src.data(), 2, nullptr), Error);
    EXPECT_THROW(engine.profile(src.data(), 3, dst.data()), Error);
    EXPECT_THROW(engine.profile(nullptr, 2, dst.data()), Error);
    EXPECT_NO_THROW(engine.run(src.data(), 4, dst.data()));
    expect_error_naming([&] { engine.run(src.data(), 3, dst.data()); }, "micro");
}

TEST(EngineErrors, SizeNotDivisible) {
    resunet::ResUNetConfig config;
    config.width = 8;
    config.height = config.width_px = 100;
    expect_error_naming([&] { resunet::build_resunet(config); }, "divisible");
    config.height = 96;
    config.width_px = 88;  // 88 = 8 * 11: not a multiple of 16
    expect_error_naming([&] { resunet::build_resunet(config); }, "divisible");
}

// The reference itself: a few values worked out by hand, so that engine and reference cannot agree on
// a shared misunderstanding.
TEST(Reference, HandComputedValues) {
    using namespace resunet::reference;
    Tensor4 x = Tensor4::zeros({1, 1, 2, 2});
    x.data = {1, 2, 3, 4};
    Tensor4 w = Tensor4::zeros({1, 1, 3, 3});
    std::fill(w.data.begin(), w.data.end(), 1.0f);
    EXPECT_EQ(conv2d(x, w, {0.5f}, 1, 1).data, (std::vector<float>{10.5f, 10.5f, 10.5f, 10.5f}));
    EXPECT_EQ(conv2d(x, w, {}, 2, 1).data, (std::vector<float>{10.0f}));
    // ConvTranspose2d, PyTorch layout [I=1, O=2, 2, 2]: out[o][2y+ky][2x+kx] = in[y][x] * W[0][o][ky][kx].
    Tensor4 wt = Tensor4::zeros({1, 2, 2, 2});
    wt.data = {1, 2, 3, 4, -1, 0, 0, 1};
    Tensor4 up = conv_transpose2d(x, wt, {0.0f, 10.0f}, 2);
    ASSERT_EQ(up.dims, (Dims{1, 2, 4, 4}));
    EXPECT_EQ(up.at(0, 0, 0, 0), 1.0f);
    EXPECT_EQ(up.at(0, 0, 1, 1), 4.0f);
    EXPECT_EQ(up.at(0, 0, 3, 2), 4.0f * 3.0f);
    EXPECT_EQ(up.at(0, 1, 2, 2), 10.0f - 4.0f);
    EXPECT_EQ(up.at(0, 1, 3, 3), 10.0f + 4.0f);
    Tensor4 bn = batch_norm_inference(x, {2.0f}, {1.0f}, {1.0f}, {3.0f}, 1.0f);
    EXPECT_EQ(bn.data, (std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f}));
    EXPECT_EQ(max_pool(x, 2, 2).data, (std::vector<float>{4.0f}));
    EXPECT_FLOAT_EQ(sigmoid(x).data[0], 1.0f / (1.0f + std::exp(-1.0f)));
    Tensor4 neg = x;
    neg.data[1] = -2;
    EXPECT_EQ(relu(neg).data, (std::vector<float>{1, 0, 3, 4}));
    EXPECT_EQ(add(x, x).data, (std::vector<float>{2, 4, 6, 8}));
    Tensor4 y = Tensor4::zeros({1, 2, 2, 2});
    y.data = {5, 6, 7, 8, 9, 10, 11, 12};
    Tensor4 cat = concat({&y, &x});
    ASSERT_EQ(cat.dims, (Dims{1, 3, 2, 2}));
    EXPECT_EQ(cat.data, (std::vector<float>{5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4}));
    // compare(): the metric and NaN handling.
    const std::vector<float> expected = {1, -4, 2}, actual = {1, -4.5f, std::nanf("")};
    EXPECT_EQ(compare(actual.data(), expected.data(), 3).relative(), std::numeric_limits<double>::infinity());
    EXPECT_DOUBLE_EQ(compare(actual.data(), expected.data(), 2).relative(), 0.5 / 4.0);
}

TEST(Reference, RunGraphRejectsBadWeights) {
    Graph g;
    g.set_output(g.conv("conv", g.input("input", {1, 3, 4, 4}), 8, 3, 1, 1));
    TensorMap w = random_weights(g, 1);
    const Tensor4 input = random_input(g, 1, 2);
    EXPECT_NO_THROW(resunet::reference::run_graph(g, w, input));
    w["conv.bias"] = HostTensor::zeros({7});
    expect_error_naming([&] { resunet::reference::run_graph(g, w, input); }, "conv.bias");
    w.erase("conv.bias");
    expect_error_naming([&] { resunet::reference::run_graph(g, w, input); }, "conv.bias");
}

// ---------------------------------------------------------------------------------------------------
// e) Input checks and the threading contract of engine.h.

std::vector<float> engine_output(Engine& engine, const Graph& g, const std::vector<float>& input, int batch) {
    Dims d = g.value(g.output_value()).dims;
    d[0] = batch;
    std::vector<float> out(static_cast<size_t>(resunet::num_elements(d)), std::numeric_limits<float>::quiet_NaN());
    engine.run(input.data(), batch, out.data());
    return out;
}

// As the int8 engine: NaN/Inf input is refused (the first ReLU would turn a NaN into a plausible 0).
TEST(EngineContract, NonFiniteInputIsRefused) {
    const Graph g = small_resunet({8, 2, 32, false});
    const TensorMap w = network_weights(g, 12);
    EngineOptions options;
    options.threads = 1;
    Engine engine(g, w, options);
    const Tensor4 good = random_input(g, 2, 13);
    const std::vector<float> expected = engine_output(engine, g, good.data, 2);
    std::vector<float> out(expected.size());
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY})
        for (size_t where : {size_t{0}, good.data.size() - 1}) {
            std::vector<float> input = good.data;
            input[where] = bad;
            expect_error_naming([&] { engine.run(input.data(), 2, out.data()); }, "NaN or Inf");
            expect_error_naming([&] { engine.profile(input.data(), 2, out.data()); }, "NaN or Inf");
        }
    EXPECT_EQ(engine_output(engine, g, good.data, 2), expected) << "usable after refusing a batch";
}

TEST(EngineContract, CallersThreadSettingIsRestored) {
    const Graph g = small_resunet({8, 2, 32, false});
    const TensorMap w = network_weights(g, 14);
    const Tensor4 input = random_input(g, 2, 15);
    const int original = omp_get_max_threads();
    const int caller = 5;
    omp_set_num_threads(caller);
    {
        EngineOptions options;
        options.threads = 1;
        Engine engine(g, w, options);
        EXPECT_EQ(omp_get_max_threads(), caller) << "after construction";
        std::vector<float> out = engine_output(engine, g, input.data, 2);
        EXPECT_EQ(omp_get_max_threads(), caller) << "after run()";
        engine.profile(input.data.data(), 2, out.data());
        EXPECT_EQ(omp_get_max_threads(), caller) << "after profile()";
        std::vector<float> bad = input.data;
        bad[7] = std::numeric_limits<float>::quiet_NaN();
        EXPECT_THROW(engine.run(bad.data(), 2, out.data()), Error);
        EXPECT_EQ(omp_get_max_threads(), caller) << "after a run() that threw";
        options.threads = 0;  // leaves the setting alone
        Engine untouched(g, w, options);
        engine_output(untouched, g, input.data, 2);
        EXPECT_EQ(omp_get_max_threads(), caller) << "threads 0";
    }
    omp_set_num_threads(original);
}

// One engine from two threads: in builds without NDEBUG the second concurrent run() is refused, and every
// run that went through gives the single-threaded output.
TEST(EngineContract, ConcurrentRunOnOneEngineIsRefused) {
#ifdef NDEBUG
    GTEST_SKIP() << "checked only in builds without NDEBUG (the sanitizer build of tests/run_all.sh)";
#else
    const Graph g = small_resunet({8, 2, 32, false});
    const TensorMap w = network_weights(g, 16);
    const Tensor4 input = random_input(g, 2, 17);
    EngineOptions options;
    options.threads = 1;
    Engine engine(g, w, options);
    const std::vector<float> expected = engine_output(engine, g, input.data, 2);
    std::atomic<int> refused{0}, wrong{0}, other_errors{0};
    std::atomic<bool> stop{false};
    std::string message;
    std::mutex message_mutex;
    auto worker = [&] {
        for (int i = 0; i < 1000 && !stop.load(); ++i) {
            try {
                if (engine_output(engine, g, input.data, 2) != expected) ++wrong;
            } catch (const Error& e) {
                const std::string text = e.what();
                if (text.find("another run()") == std::string::npos) {
                    ++other_errors;
                } else if (++refused >= 3) {
                    stop = true;
                }
                const std::lock_guard<std::mutex> lock(message_mutex);
                message = text;
            }
        }
    };
    std::thread a(worker), b(worker);
    a.join();
    b.join();
    EXPECT_GT(refused.load(), 0) << "no concurrent run was caught";
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_EQ(other_errors.load(), 0) << message;
    std::cout << "  concurrent run refused " << refused.load() << " times: " << message << "\n";
    EXPECT_EQ(engine_output(engine, g, input.data, 2), expected) << "usable afterwards";
#endif
}

}  // namespace
