// Our own Winograd weights gradient (engine/winograd_own_bwd_weights.h) against the plain reference
// (tests/support/reference.h, conv2d_backward_weights, in double) on random data: both tiles, every
// layout it takes, edge tiles, batches, many groups of tiles, with and without the bias gradient; the
// cases it refuses. On a CPU without AVX2 and FMA it is never offered: the tests check exactly that.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "engine/winograd_own_bwd_weights.h"
#include "graph/init.h"
#include "support/reference.h"

namespace {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;
using resunet::WinogradOwnBwdWeights;
using resunet::WinogradOwnShape;
using resunet::reference::ErrorStats;
using resunet::reference::Tensor4;

// max|ours - reference| / max|reference|. F(4x4) and F(2x2) in fp32: measured 1e-7..2e-6 on these cases
// (the sums run over the whole batch and image, as the direct kernel's do); the trainer checks every
// layer against oneDNN's direct kernel with the same bound (engine/conv_tuning.h), and a wrong index or
// coefficient is of the order of the gradient itself.
constexpr double kBound = 1e-4;

const char* layout_name(tag t) { return t == tag::nChw8c ? "nChw8c" : t == tag::nChw16c ? "nChw16c" : "nhwc"; }

struct Case {
    int tile;
    int64_t batch, in_channels, out_channels, height, width;
    tag layout;
    int64_t tiles_per_group = 0;  // -1: the whole-batch mode
    bool bias = true;
};

memory in_layout(const engine& eng, stream& strm, const Tensor4& t, tag layout) {
    memory plain({memory::dims(t.dims.begin(), t.dims.end()), dt::f32, tag::nchw}, eng, const_cast<float*>(t.data.data()));
    memory out({memory::dims(t.dims.begin(), t.dims.end()), dt::f32, layout}, eng);
    reorder(plain, out).execute(strm, plain, out);
    strm.wait();
    return out;
}

void check(const Case& c, uint64_t seed) {
    const std::string label = fmt::format("F({0}x{0}) {1} {2}->{3} {4}x{5} batch {6} group {7}{8}", c.tile,
                                          layout_name(c.layout), c.in_channels, c.out_channels, c.height, c.width, c.batch,
                                          c.tiles_per_group, c.bias ? "" : " no bias");
    SCOPED_TRACE(label);
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    Tensor4 src = Tensor4::zeros({c.batch, c.in_channels, c.height, c.width});
    Tensor4 diff_dst = Tensor4::zeros({c.batch, c.out_channels, c.height, c.width});
    resunet::fill_uniform(src.data.data(), src.size(), seed, 0.0f, 1.0f);  // as after a ReLU
    resunet::fill_uniform(diff_dst.data.data(), diff_dst.size(), seed + 1, -1.0f, 1.0f);
    std::vector<float> expected_bias;
    const Tensor4 expected = resunet::reference::conv2d_backward_weights(src, diff_dst, 3, 1, 1, &expected_bias);

    const WinogradOwnShape shape{.batch = c.batch, .in_channels = c.in_channels, .out_channels = c.out_channels,
                                 .height = c.height, .width = c.width, .layout = c.layout};
    std::string why;
    auto grad = WinogradOwnBwdWeights::create(eng, c.tile, shape, &why, c.tiles_per_group);
    ASSERT_TRUE(grad) << why;
    EXPECT_EQ(grad->algorithm(), c.tile == 4 ? "winograd_f43" : "winograd_f23");
    EXPECT_TRUE(grad->kernel().starts_with(fmt::format("own_f{}3_bwd_weights", c.tile))) << grad->kernel();
    if (c.tiles_per_group < 0) {
        EXPECT_NE(grad->kernel().find("_whole:"), std::string::npos) << grad->kernel();
    }
    std::cout << "  " << grad->kernel() << "\n";
    memory src_memory = in_layout(eng, strm, src, c.layout);
    memory diff_memory = in_layout(eng, strm, diff_dst, c.layout);
    // Exactly scratch_bytes() (ASan sees an overrun), filled with garbage: the kernel must not read it unset.
    memory scratch({{static_cast<memory::dim>(grad->scratch_bytes())}, dt::u8, tag::x}, eng);
    std::fill_n(static_cast<unsigned char*>(scratch.get_data_handle()), grad->scratch_bytes(), 0xff);
    std::vector<float> actual(expected.data.size(), std::nanf("")), actual_bias(static_cast<size_t>(c.out_channels), std::nanf(""));
    // Twice: the second run must not add to the first (the accumulators start from zero each run).
    for (int run = 0; run < 2; ++run)
        grad->execute(strm, static_cast<const float*>(src_memory.get_data_handle()),
                      static_cast<const float*>(diff_memory.get_data_handle()), actual.data(),
                      c.bias ? actual_bias.data() : nullptr, scratch.get_data_handle());
    const ErrorStats e = resunet::reference::compare(actual.data(), expected);
    std::cout << fmt::format("  {:<64} weights {}\n", label, e.to_string());
    EXPECT_LE(e.relative(), kBound) << e.to_string();
    if (c.bias) {
        const ErrorStats b = resunet::reference::compare(actual_bias.data(), expected_bias.data(), c.out_channels);
        EXPECT_LE(b.relative(), kBound) << "bias: " << b.to_string();
    } else {
        for (float v : actual_bias) EXPECT_TRUE(std::isnan(v)) << "d bias written though not asked for";
    }
}

TEST(WinogradOwnBwdWeights, MatchesTheReference) {
    if (!resunet::winograd_own_supported()) GTEST_SKIP() << "CPU without AVX2 and FMA: the kernel is never offered";
    const Case cases[] = {
        {4, 1, 8, 8, 8, 8, tag::nChw8c},
        {4, 1, 16, 24, 13, 11, tag::nChw8c},  // edge tiles on both sides
        {4, 2, 32, 16, 9, 17, tag::nChw8c},   // tiles across images
        {4, 8, 8, 8, 1, 3, tag::nChw8c},      // smaller than a tile
        {2, 1, 8, 8, 8, 8, tag::nChw8c},
        {2, 2, 16, 24, 13, 11, tag::nChw8c, 0, false},
        {4, 1, 16, 32, 15, 15, tag::nChw16c},
        {2, 2, 32, 16, 7, 10, tag::nChw16c},
        {4, 2, 24, 8, 10, 7, tag::nhwc},
        {2, 2, 8, 16, 5, 9, tag::nhwc, 0, false},
        {4, 2, 16, 16, 21, 19, tag::nChw8c, 1},   // a group per tile
        {4, 2, 16, 16, 21, 19, tag::nChw8c, 7},   // a shorter last group
        {2, 1, 16, 8, 21, 19, tag::nChw8c, 1000},  // one group
        {4, 4, 64, 64, 28, 28, tag::nChw8c},     // the width-64 network's first stage, scaled down
        // The whole-batch mode (one matmul over every tile, threaded by oneDNN): forced, and chosen by itself
        // where per-thread accumulators would outweigh the inputs (256 -> 128 channels on 2 x 4 tiles).
        {4, 2, 16, 24, 13, 11, tag::nChw8c, -1},
        {2, 3, 32, 16, 7, 10, tag::nChw16c, -1, false},
        {4, 2, 24, 8, 10, 7, tag::nhwc, -1},
        {4, 2, 256, 128, 7, 7, tag::nChw8c},
    };
    uint64_t seed = 300;
    for (const Case& c : cases) check(c, seed += 10);
}

TEST(WinogradOwnBwdWeights, RefusesWhatItDoesNotCompute) {
    engine eng(engine::kind::cpu, 0);
    auto refused = [&](int tile, const WinogradOwnShape& shape) {
        std::string why;
        EXPECT_FALSE(WinogradOwnBwdWeights::create(eng, tile, shape, &why))
            << fmt::format("tile {} {}->{} {}x{}", tile, shape.in_channels, shape.out_channels, shape.height, shape.width);
        EXPECT_FALSE(why.empty());
        return why;
    };
    const WinogradOwnShape good{.batch = 2, .in_channels = 16, .out_channels = 16, .height = 16, .width = 16,
                                .layout = tag::nChw8c};
    if (!resunet::winograd_own_supported()) {
        EXPECT_NE(refused(4, good).find("AVX2"), std::string::npos);
        return;
    }
    EXPECT_TRUE(WinogradOwnBwdWeights::create(eng, 4, good));
    WinogradOwnShape s = good;
    s.in_channels = 12;  // not a multiple of 8
    refused(4, s);
    s = good;
    s.layout = tag::nchw;
    refused(2, s);
    s = good;
    s.sum = true;  // a forward's post-op has no meaning here
    refused(4, s);
    s = good;
    s.src_batch_stride = 2 * 16 * 16 * 16;  // a channel slice
    refused(4, s);
    refused(3, good);
    // 2048 -> 2048 channels on 4 tiles: the whole-batch mode's accumulators alone take 604 MB.
    s = good;
    s.batch = 1;
    s.in_channels = s.out_channels = 2048;
    s.height = s.width = 8;
    EXPECT_NE(refused(4, s).find("MB"), std::string::npos);
    // 1024 -> 1024 on the same 4 tiles: per-thread accumulators would outweigh the inputs, so the whole-batch mode.
    s.in_channels = s.out_channels = 1024;
    auto whole = WinogradOwnBwdWeights::create(eng, 4, s);
    ASSERT_TRUE(whole);
    EXPECT_NE(whole->kernel().find("_whole"), std::string::npos) << whole->kernel();
}

}  // namespace
