// The fp32 engine (engine/engine.h) beyond single ops (test_engine.cpp): the whole ResUNet at small sizes
// against the plain reference, engine properties (arena, in-place concat, profile, repeatability), bad input,
// and the input checks and threading contract of engine.h. Error metric as in test_engine.cpp.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <iostream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "tests/support/engine_checks.h"

namespace {

using namespace resunet::engine_checks;

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
    expect_concurrent_runs_refused([&] { return engine_output(engine, g, input.data, 2); }, expected, 1000);
#endif
}

}  // namespace
