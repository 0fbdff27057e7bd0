// The fp32 engine against the plain reference (tests/support/reference.h), one op kind at a time on tiny
// graphs, under every option set that changes the lowering. The whole network, engine properties, bad input
// and the threading contract are in test_engine_network.cpp; the shared checks in tests/support/engine_checks.h.
// Error metric: max|engine - reference| / max|reference| over the whole output, <= 1e-4.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include "tests/support/engine_checks.h"

namespace {

using namespace resunet::engine_checks;

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

}  // namespace
