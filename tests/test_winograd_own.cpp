// Our own Winograd F(4x4,3x3) / F(2x2,3x3) (engine/winograd_own.h): the kernel against the plain
// reference convolution on random data (channel multiples of 8, odd sizes and edge tiles, the fused
// residual sum and ReLU, a dst that is a channel slice of a larger buffer, every layout it takes); the
// cases it refuses; and the whole engine with it forced, or tuned, against the direct plan and the
// reference. On a CPU without AVX2 and FMA the kernel is never offered: the tests check exactly that.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fmt/format.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "engine/conv_tuning.h"
#include "engine/engine.h"
#include "engine/winograd_own.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "support/reference.h"

namespace {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;
using resunet::ConvAlgorithm;
using resunet::Engine;
using resunet::EngineLayout;
using resunet::EngineOptions;
using resunet::Graph;
using resunet::TensorMap;
using resunet::Tuning;
using resunet::WinogradOwn;
using resunet::WinogradOwnShape;
using resunet::reference::ErrorStats;
using resunet::reference::Tensor4;

// The bound the tuner checks every own-Winograd candidate against (engine/conv_tuning.h), relative to
// max|expected|; measured errors are 1e-7..4e-6, and a wrong index or coefficient is of order 1.
constexpr double kBound = resunet::kOwnWinogradRelativeBound;

memory::dims to_dims(const resunet::Dims& d) { return memory::dims(d.begin(), d.end()); }

const char* layout_name(tag t) { return t == tag::nChw8c ? "nChw8c" : t == tag::nChw16c ? "nChw16c" : "nhwc"; }

struct KernelCase {
    int tile;
    int64_t batch, in_channels, out_channels, height, width;
    bool sum, relu;
    tag layout;
    int64_t slice_before = 0, slice_after = 0;  // dst: a channel slice with this many channels around it
};

// Runs the kernel on random data and compares with reference conv2d + bias (+ dst) (+ ReLU).
void check_kernel(const KernelCase& c, uint64_t seed) {
    const std::string label = fmt::format("F({0}x{0}) {1} {2}->{3} {4}x{5} batch {6}{7}{8} {9}{10}", c.tile,
                                          layout_name(c.layout), c.in_channels, c.out_channels, c.height, c.width,
                                          c.batch, c.sum ? " +sum" : "", c.relu ? " +relu" : "",
                                          c.slice_before + c.slice_after ? "dst slice " : "",
                                          c.slice_before + c.slice_after
                                              ? fmt::format("[{}, {}) of {}", c.slice_before, c.slice_before + c.out_channels,
                                                            c.slice_before + c.out_channels + c.slice_after)
                                              : std::string());
    SCOPED_TRACE(label);
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    Tensor4 src = Tensor4::zeros({c.batch, c.in_channels, c.height, c.width});
    Tensor4 weight = Tensor4::zeros({c.out_channels, c.in_channels, 3, 3});
    std::vector<float> bias(static_cast<size_t>(c.out_channels));
    const int64_t total_channels = c.slice_before + c.out_channels + c.slice_after;
    Tensor4 before = Tensor4::zeros({c.batch, total_channels, c.height, c.width});  // dst buffer content before
    resunet::fill_uniform(src.data.data(), src.size(), seed, -1.0f, 1.0f);
    const float scale = 1.0f / std::sqrt(9.0f * static_cast<float>(c.in_channels));
    resunet::fill_uniform(weight.data.data(), weight.size(), seed + 1, -scale, scale);
    resunet::fill_uniform(bias.data(), c.out_channels, seed + 2, -0.5f, 0.5f);
    resunet::fill_uniform(before.data.data(), before.size(), seed + 3, -1.0f, 1.0f);

    Tensor4 expected = resunet::reference::conv2d(src, weight, bias, 1, 1);
    for (int64_t n = 0; n < c.batch; ++n)
        for (int64_t o = 0; o < c.out_channels; ++o)
            for (int64_t y = 0; y < c.height; ++y)
                for (int64_t x = 0; x < c.width; ++x) {
                    float& v = expected.at(n, o, y, x);
                    if (c.sum) v += before.at(n, c.slice_before + o, y, x);
                    if (c.relu) v = std::max(v, 0.0f);
                }

    // src and the whole dst buffer in the kernel's layout (oneDNN reorders from NCHW).
    auto to_layout = [&](const Tensor4& t) {
        memory plain({to_dims(t.dims), dt::f32, tag::nchw}, eng, const_cast<float*>(t.data.data()));
        memory out({to_dims(t.dims), dt::f32, c.layout}, eng);
        reorder(plain, out).execute(strm, plain, out);
        strm.wait();
        return out;
    };
    memory src_memory = to_layout(src);
    memory dst_memory = to_layout(before);
    WinogradOwnShape shape{.batch = c.batch, .in_channels = c.in_channels, .out_channels = c.out_channels,
                           .height = c.height, .width = c.width, .layout = c.layout, .sum = c.sum, .relu = c.relu};
    if (total_channels != c.out_channels) shape.dst_batch_stride = total_channels * c.height * c.width;
    std::string why;
    std::unique_ptr<WinogradOwn> conv = WinogradOwn::create(eng, strm, c.tile, shape, weight.data.data(), bias.data(), &why);
    ASSERT_TRUE(conv) << why;
    EXPECT_EQ(conv->algorithm(), c.tile == 4 ? "winograd_f43" : "winograd_f23");
    EXPECT_GT(conv->scratch_bytes(), 0u);
    EXPECT_GE(conv->weight_bytes(), static_cast<size_t>((c.tile + 2) * (c.tile + 2) * c.in_channels * c.out_channels * 4));
    // Exactly scratch_bytes() of scratch (ASan sees an overrun), 64-byte aligned as oneDNN allocates.
    memory scratch({{static_cast<memory::dim>(conv->scratch_bytes())}, dt::u8, tag::x}, eng);
    // A slice starts at its first channel: in a blocked layout slice_before * H * W elements in.
    float* dst = static_cast<float*>(dst_memory.get_data_handle()) + c.slice_before * c.height * c.width;
    conv->execute(strm, static_cast<const float*>(src_memory.get_data_handle()), dst, scratch.get_data_handle());

    Tensor4 actual = Tensor4::zeros(before.dims);
    memory plain({to_dims(actual.dims), dt::f32, tag::nchw}, eng, actual.data.data());
    reorder(dst_memory, plain).execute(strm, dst_memory, plain);
    strm.wait();
    Tensor4 slice = Tensor4::zeros(expected.dims);
    int64_t untouched_mismatches = 0;
    for (int64_t n = 0; n < c.batch; ++n)
        for (int64_t ch = 0; ch < total_channels; ++ch)
            for (int64_t y = 0; y < c.height; ++y)
                for (int64_t x = 0; x < c.width; ++x) {
                    const float v = actual.at(n, ch, y, x);
                    if (ch >= c.slice_before && ch < c.slice_before + c.out_channels)
                        slice.at(n, ch - c.slice_before, y, x) = v;
                    else if (v != before.at(n, ch, y, x))
                        ++untouched_mismatches;
                }
    EXPECT_EQ(untouched_mismatches, 0) << "channels outside the dst slice were written";
    const ErrorStats e = resunet::reference::compare(slice.data.data(), expected);
    std::cout << fmt::format("  {:<72} {}\n", label, e.to_string());
    EXPECT_LE(e.relative(), kBound) << e.to_string();
}

TEST(WinogradOwn, KernelMatchesTheReference) {
    if (!resunet::winograd_own_supported()) GTEST_SKIP() << "CPU without AVX2 and FMA: the kernel is never offered";
    const KernelCase cases[] = {
        {4, 1, 8, 8, 8, 8, false, false, tag::nChw8c},
        {4, 1, 16, 24, 13, 11, true, true, tag::nChw8c},  // edge tiles on both sides
        {4, 2, 32, 16, 9, 17, false, true, tag::nChw8c},  // batch 2: tiles across images
        {4, 1, 64, 64, 28, 28, true, false, tag::nChw8c},
        {4, 1, 8, 16, 1, 3, true, true, tag::nChw8c},     // smaller than a tile
        {2, 1, 8, 8, 8, 8, false, false, tag::nChw8c},
        {2, 1, 16, 24, 13, 11, true, true, tag::nChw8c},
        {2, 2, 32, 16, 9, 17, true, false, tag::nChw8c},
        {4, 1, 16, 32, 15, 15, true, true, tag::nChw16c},
        {2, 1, 32, 16, 7, 10, false, true, tag::nChw16c},
        {4, 1, 24, 8, 10, 7, true, true, tag::nhwc},
        {2, 2, 8, 16, 5, 9, false, false, tag::nhwc},
        {4, 1, 16, 16, 12, 9, true, true, tag::nChw8c, 8, 16},  // dst a channel slice of a concat buffer
        {2, 2, 16, 8, 11, 6, true, false, tag::nChw8c, 16, 8},  // the same with two images
        {4, 1, 16, 16, 6, 13, true, true, tag::nChw16c, 16, 0},
    };
    uint64_t seed = 100;
    for (const KernelCase& c : cases) check_kernel(c, seed += 10);
}

// Many groups of tiles (the matmul for a full group and the one for the last): same result as one group.
TEST(WinogradOwn, GroupsOfTilesGiveTheSameResult) {
    if (!resunet::winograd_own_supported()) GTEST_SKIP() << "CPU without AVX2 and FMA";
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    const int64_t channels = 16, height = 21, width = 19;
    std::vector<float> weights(static_cast<size_t>(channels * channels * 9)), bias(channels);
    resunet::fill_uniform(weights.data(), static_cast<int64_t>(weights.size()), 1, -0.2f, 0.2f);
    resunet::fill_uniform(bias.data(), channels, 2, -0.2f, 0.2f);
    const memory::desc desc({1, channels, height, width}, dt::f32, tag::nChw8c);
    memory src(desc, eng);
    resunet::fill_uniform(static_cast<float*>(src.get_data_handle()), static_cast<int64_t>(desc.get_size() / 4), 3, -1, 1);
    const WinogradOwnShape shape{.in_channels = channels, .out_channels = channels, .height = height, .width = width,
                                 .layout = tag::nChw8c, .relu = true};
    std::vector<std::vector<float>> outs;
    for (int64_t group : {0, 1, 7, 30, 1000}) {
        auto conv = WinogradOwn::create(eng, strm, 4, shape, weights.data(), bias.data(), nullptr, group);
        ASSERT_TRUE(conv);
        memory dst(desc, eng), scratch({{static_cast<memory::dim>(conv->scratch_bytes())}, dt::u8, tag::x}, eng);
        conv->execute(strm, static_cast<const float*>(src.get_data_handle()), static_cast<float*>(dst.get_data_handle()),
                      scratch.get_data_handle());
        const float* d = static_cast<const float*>(dst.get_data_handle());
        outs.emplace_back(d, d + desc.get_size() / 4);
    }
    for (size_t i = 1; i < outs.size(); ++i) {
        const ErrorStats e = resunet::reference::compare(outs[i].data(), outs[0].data(), static_cast<int64_t>(outs[0].size()));
        EXPECT_LE(e.max_abs_error, 1e-5) << "group variant " << i << ": " << e.to_string();
    }
}

// The AVX-512 transforms (16 channels per vector) give the AVX2 ones' bits: an fp32 plan's numbers do not depend
// on which runs. Layouts that keep 16 channels together, channel counts with an 8-channel tail, sum, ReLU, both
// tiles, edge tiles, a dst slice.
TEST(WinogradOwn, Avx512TransformsGiveTheAvx2Bits) {
    if (!resunet::winograd_own_supported()) GTEST_SKIP() << "CPU without AVX2 and FMA";
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    struct Case {
        int tile;
        int64_t in_channels, out_channels, height, width;
        tag layout;
        bool sum, relu;
    };
    const Case cases[] = {{4, 32, 48, 13, 11, tag::nChw16c, true, true},  {2, 16, 32, 9, 14, tag::nChw16c, false, true},
                          {4, 24, 40, 10, 7, tag::nhwc, true, false},    {2, 40, 24, 6, 13, tag::nhwc, true, true},
                          {4, 64, 64, 28, 28, tag::nChw16c, false, false}};
    bool ran_avx512 = false;
    for (const Case& c : cases) {
        SCOPED_TRACE(fmt::format("F({0}x{0}) {1} {2}->{3} {4}x{5}", c.tile, layout_name(c.layout), c.in_channels,
                                 c.out_channels, c.height, c.width));
        std::vector<float> weights(static_cast<size_t>(c.in_channels * c.out_channels * 9)), bias(static_cast<size_t>(c.out_channels));
        resunet::fill_uniform(weights.data(), static_cast<int64_t>(weights.size()), 5, -0.2f, 0.2f);
        resunet::fill_uniform(bias.data(), c.out_channels, 6, -0.2f, 0.2f);
        const memory::desc src_desc({2, c.in_channels, c.height, c.width}, dt::f32, c.layout);
        const memory::desc dst_desc({2, c.out_channels, c.height, c.width}, dt::f32, c.layout);
        memory src(src_desc, eng);
        resunet::fill_uniform(static_cast<float*>(src.get_data_handle()), static_cast<int64_t>(src_desc.get_size() / 4), 7, -1, 1);
        const WinogradOwnShape shape{.batch = 2, .in_channels = c.in_channels, .out_channels = c.out_channels, .height = c.height,
                                     .width = c.width, .layout = c.layout, .sum = c.sum, .relu = c.relu};
        std::vector<std::vector<float>> outs;
        for (bool allow : {false, true}) {
            auto conv = WinogradOwn::create(eng, strm, c.tile, shape, weights.data(), bias.data(), nullptr, 0, allow);
            ASSERT_TRUE(conv);
            if (allow) ran_avx512 = ran_avx512 || conv->kernel().find("avx512+") != std::string::npos;
            else EXPECT_NE(conv->kernel().find(":avx2+"), std::string::npos) << conv->kernel();
            memory dst(dst_desc, eng), scratch({{static_cast<memory::dim>(conv->scratch_bytes())}, dt::u8, tag::x}, eng);
            float* d = static_cast<float*>(dst.get_data_handle());
            resunet::fill_uniform(d, static_cast<int64_t>(dst_desc.get_size() / 4), 8, -1, 1);  // the sum's addend
            conv->execute(strm, static_cast<const float*>(src.get_data_handle()), d, scratch.get_data_handle());
            outs.emplace_back(d, d + dst_desc.get_size() / 4);
        }
        EXPECT_EQ(std::memcmp(outs[0].data(), outs[1].data(), outs[0].size() * sizeof(float)), 0);
    }
    if (!ran_avx512) GTEST_SKIP() << "no AVX-512 here (or ONEDNN_MAX_CPU_ISA caps it): only the AVX2 transforms ran";
}

// Not offered where it does not apply: the engine then keeps direct.
TEST(WinogradOwn, RefusesWhatItDoesNotCompute) {
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    std::vector<float> weights(64 * 64 * 9, 0.1f), bias(64, 0.0f);
    auto refused = [&](int tile, WinogradOwnShape shape) {
        std::string why;
        const bool made = WinogradOwn::create(eng, strm, tile, shape, weights.data(), bias.data(), &why) != nullptr;
        EXPECT_FALSE(made) << fmt::format("tile {} {}->{} layout {}", tile, shape.in_channels, shape.out_channels,
                                          static_cast<int>(shape.layout));
        EXPECT_FALSE(why.empty());
        return why;
    };
    const WinogradOwnShape good{.in_channels = 16, .out_channels = 16, .height = 8, .width = 8, .layout = tag::nChw8c};
    if (!resunet::winograd_own_supported()) {
        EXPECT_NE(refused(4, good).find("AVX2"), std::string::npos);
        return;
    }
    EXPECT_TRUE(WinogradOwn::create(eng, strm, 4, good, weights.data(), bias.data()) != nullptr);
    WinogradOwnShape s = good;
    s.in_channels = 12;  // not a multiple of 8
    refused(4, s);
    s = good;
    s.out_channels = 3;
    refused(2, s);
    s = good;
    s.layout = tag::nchw;
    refused(4, s);
    s = good;
    s.layout = tag::nChw16c;
    s.in_channels = 24;  // not a multiple of the 16-channel block
    refused(4, s);
    s = good;
    s.layout = tag::nhwc;
    s.dst_batch_stride = 2 * 16 * 8 * 8;  // a channel slice in nhwc is strided per pixel
    refused(4, s);
    refused(3, good);  // F(3x3) is not implemented
    s = good;
    s.dst_batch_stride = 16;  // smaller than an image
    refused(4, s);
}

TensorMap weights_for(const Graph& graph, uint64_t seed) {
    TensorMap weights = resunet::init_weights(graph, seed);
    resunet::randomize_batch_norm_statistics(graph, weights, seed + 1);
    return weights;
}

struct EngineRun {
    std::vector<float> out;
    std::vector<resunet::LayerProfile> rows;
    std::string summary;
    std::string layout;
    int own_steps = 0;
};

EngineRun run_engine(const Graph& graph, const TensorMap& weights, const Tensor4& input, const EngineOptions& options,
               size_t out_count) {
    Engine engine(graph, weights, options);
    EngineRun r;
    r.out.assign(out_count, std::nanf(""));
    r.rows = engine.profile(input.data.data(), static_cast<int>(input.dims[0]), r.out.data());
    r.summary = engine.tuning_summary();
    r.layout = engine.activation_layout();
    for (const resunet::LayerProfile& row : r.rows)
        if (row.algorithm == "winograd_f43" || row.algorithm == "winograd_f23") {
            ++r.own_steps;
            EXPECT_TRUE(row.kernel.starts_with("own_f")) << row.name << ": " << row.kernel;
        }
    return r;
}

// The whole network with our Winograd forced on every convolution it applies to, against the direct plan
// and the reference: odd sizes deep down (36 -> 18 -> 9: edge tiles), residual sums, concat slices.
TEST(WinogradOwn, WholeNetworkForcedAgainstDirect) {
    resunet::ResUNetConfig config;
    config.width = 8;
    config.depth = 2;
    config.height = config.width_px = 36;
    const Graph g = resunet::build_resunet(config);
    const TensorMap weights = weights_for(g, 31);
    Tensor4 input = Tensor4::zeros({2, 3, 36, 36});
    resunet::fill_uniform(input.data.data(), input.size(), 32, -2.0f, 2.0f);
    const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
    EngineOptions direct;
    direct.tune = Tuning::off;
    const EngineRun base = run_engine(g, weights, input, direct, expected.data.size());
    EXPECT_EQ(base.own_steps, 0);
    struct Plan {
        const char* label;
        ConvAlgorithm algorithm;
        EngineLayout layout;
        int micro_batch;
    };
    const Plan plans[] = {{"own F(4x4)", ConvAlgorithm::own_winograd_f43, EngineLayout::automatic, 1},
                          {"own F(2x2)", ConvAlgorithm::own_winograd_f23, EngineLayout::automatic, 1},
                          {"own F(4x4), blocked, micro-batch 2", ConvAlgorithm::own_winograd_f43, EngineLayout::blocked, 2},
                          {"own F(4x4), nhwc", ConvAlgorithm::own_winograd_f43, EngineLayout::nhwc, 1},
                          {"own F(4x4), nchw (refused: direct)", ConvAlgorithm::own_winograd_f43, EngineLayout::nchw, 1}};
    for (const Plan& plan : plans) {
        EngineOptions o;
        o.tune = Tuning::off;
        o.conv_algorithm = plan.algorithm;
        o.layout = plan.layout;
        o.micro_batch = plan.micro_batch;
        const EngineRun r = run_engine(g, weights, input, o, expected.data.size());
        const ErrorStats vs_reference = resunet::reference::compare(r.out.data(), expected);
        const ErrorStats vs_direct =
            resunet::reference::compare(r.out.data(), base.out.data(), static_cast<int64_t>(base.out.size()));
        std::cout << fmt::format("  {:<40} {} own steps | vs reference {} | vs direct {}\n", plan.label, r.own_steps,
                                 vs_reference.to_string(), vs_direct.to_string());
        EXPECT_LE(vs_reference.relative(), kBound) << plan.label << ": " << vs_reference.to_string();
        EXPECT_LE(vs_direct.relative(), kBound) << plan.label << ": " << vs_direct.to_string();
        if (!resunet::winograd_own_supported() || plan.layout == EngineLayout::nchw) {
            EXPECT_EQ(r.own_steps, 0) << plan.label;
        } else if (r.layout == "nChw16c") {
            // (Not chosen at 8 channels, where oneDNN 2.6 runs nChw16c on its reference kernel.) Only the
            // layers with channels in multiples of 16.
            EXPECT_GT(r.own_steps, 0) << plan.label << ": " << r.summary;
        } else {
            // Every 3x3 convolution but the first (it reads the 3-channel input): 2 per block, 5 blocks.
            EXPECT_EQ(r.own_steps, 9) << plan.label << ": " << r.summary;
            EXPECT_NE(r.summary.find(fmt::format("9 winograd_f{}3", plan.algorithm == ConvAlgorithm::own_winograd_f43 ? 4 : 2)),
                      std::string::npos)
                << r.summary;
        }
    }
}

// Tuned: our candidates are measured and checked on each eligible layer, the plan keeps whichever wins,
// and the plan saved to the cache gives the same algorithms and output when reused.
TEST(WinogradOwn, TunedPlanMeasuresItAndTheCacheKeepsIt) {
    resunet::ResUNetConfig config;
    config.width = 16;
    config.depth = 2;
    config.height = config.width_px = 32;
    const Graph g = resunet::build_resunet(config);
    const TensorMap weights = weights_for(g, 41);
    Tensor4 input = Tensor4::zeros({1, 3, 32, 32});
    resunet::fill_uniform(input.data.data(), input.size(), 42, -2.0f, 2.0f);
    const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
    const std::filesystem::path cache =
        std::filesystem::temp_directory_path() / fmt::format("resunet-test-winograd-own-{}", ::getpid());
    std::filesystem::remove_all(cache);
    EngineOptions o;  // the automatic layout: the one the plan cache keeps
    o.tune = resunet::Tuning::fast;  // measured (the default rule caches nothing)
    o.memory_budget_mb = -1;  // no budget: the fastest candidate is kept
    o.plan_cache = cache.string();
    const EngineRun tuned = run_engine(g, weights, input, o, expected.data.size());
    const EngineRun cached = run_engine(g, weights, input, o, expected.data.size());
    std::filesystem::remove_all(cache);
    EXPECT_NE(cached.summary.find("from the plan cache"), std::string::npos) << cached.summary;
    int offered = 0;
    ASSERT_EQ(tuned.rows.size(), cached.rows.size());
    for (size_t i = 0; i < tuned.rows.size(); ++i) {
        const resunet::LayerProfile& row = tuned.rows[i];
        if (!row.op.starts_with("conv")) continue;
        std::cout << fmt::format("  {:<14} {:<14} {}\n", row.name, row.algorithm, row.candidates);
        EXPECT_EQ(row.algorithm, cached.rows[i].algorithm) << row.name;
        if (row.candidates.find("winograd_f43") != std::string::npos) ++offered;
        EXPECT_EQ(row.candidates.find("REJECTED"), std::string::npos) << row.candidates;
        if (row.algorithm == "winograd_f43" || row.algorithm == "winograd_f23") {
            EXPECT_NE(row.candidates.find(row.algorithm), std::string::npos) << row.candidates;
        }
    }
    if (resunet::winograd_own_supported()) {
        EXPECT_EQ(offered, 9);  // every 3x3 conv but the input's
    }
    for (const EngineRun* r : {&tuned, &cached}) {
        const ErrorStats e = resunet::reference::compare(r->out.data(), expected);
        EXPECT_LE(e.relative(), kBound) << r->summary << ": " << e.to_string();
    }
    const ErrorStats same = resunet::reference::compare(cached.out.data(), tuned.out.data(),
                                                        static_cast<int64_t>(tuned.out.size()));
    EXPECT_EQ(same.max_abs_error, 0.0) << same.to_string();
    std::cout << "  " << tuned.summary << "\n";
}

}  // namespace
