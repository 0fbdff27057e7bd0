// The int8 engine's arithmetic and kernels (quant/quantize.h, quant/quantize_kernels.h): weight and
// activation quantization, the range, quantize, concat and gather passes against plain loops.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "tests/support/quant_checks.h"

namespace {

using namespace resunet::quant_checks;

// ---------------------------------------------------------------------------------------------------
// 1. Quantization arithmetic.

TEST(QuantArithmetic, WeightLevelsFitTheCpu) {
    const int levels = resunet::weight_levels();
    EXPECT_TRUE(levels == 63 || levels == 127) << levels;
    std::cout << fmt::format("  weight levels on this CPU: {} ({})\n", levels, resunet::onednn_version());
}

TEST(QuantArithmetic, QuantizeWeightsPerChannel) {
    const int64_t out_channels = 6, per_oc = 3 * 3 * 5;
    std::vector<float> weights(static_cast<size_t>(out_channels * per_oc));
    fill_uniform(weights.data(), count_of(weights), 11, -0.7f, 0.4f);
    for (int64_t i = 0; i < per_oc; ++i) weights[static_cast<size_t>(2 * per_oc + i)] *= 1e-3f;  // tiny channel
    weights[static_cast<size_t>(4 * per_oc + 7)] = -3.0f;                                    // one outlier
    for (int levels : {63, 127}) {
        const WeightQuant wq = resunet::quantize_weights(weights, out_channels, levels);
        ASSERT_EQ(wq.q.size(), weights.size());
        ASSERT_EQ(wq.scales.size(), static_cast<size_t>(out_channels));
        ASSERT_EQ(wq.sums.size(), static_cast<size_t>(out_channels));
        for (int64_t oc = 0; oc < out_channels; ++oc) {
            float max_abs = 0;
            int max_q = 0;
            int32_t sum = 0;
            const float scale = wq.scales[static_cast<size_t>(oc)];
            for (int64_t i = 0; i < per_oc; ++i) {
                const size_t k = static_cast<size_t>(oc * per_oc + i);
                max_abs = std::max(max_abs, std::fabs(weights[k]));
                const int q = wq.q[k];
                EXPECT_LE(std::abs(q), levels);
                max_q = std::max(max_q, std::abs(q));
                sum += q;
                EXPECT_LE(std::fabs(static_cast<float>(q) * scale - weights[k]), 0.5f * scale * (1 + 1e-5f))
                    << "oc " << oc << " i " << i;
            }
            EXPECT_FLOAT_EQ(scale, max_abs / static_cast<float>(levels)) << "oc " << oc;
            EXPECT_EQ(max_q, levels) << "the largest weight of a channel maps to +-levels, oc " << oc;
            EXPECT_EQ(wq.sums[static_cast<size_t>(oc)], sum) << "oc " << oc;
        }
        EXPECT_EQ(wq.q[static_cast<size_t>(4 * per_oc + 7)], -levels);
    }
}

// Full-range weights narrowed for a CPU without VNNI: the largest maps to +-63 exactly, every weight moves by
// at most half a new step, channels already within 63 are untouched, sums follow.
TEST(QuantArithmetic, NarrowWeightsTo63) {
    const int64_t out_channels = 3, per_oc = 40;
    std::vector<float> weights(static_cast<size_t>(out_channels * per_oc));
    fill_uniform(weights.data(), count_of(weights), 5, -0.9f, 0.6f);
    WeightQuant wq = resunet::quantize_weights(weights, out_channels, resunet::kStoredWeightLevels);
    for (int64_t i = 0; i < per_oc; ++i) wq.q[static_cast<size_t>(2 * per_oc + i)] = static_cast<int8_t>(i % 7 - 3);  // within 63
    const WeightQuant full = wq;
    resunet::narrow_weights(wq, 63);
    for (int64_t oc = 0; oc < out_channels; ++oc) {
        int max_q = 0;
        int32_t sum = 0;
        for (int64_t i = 0; i < per_oc; ++i) {
            const size_t k = static_cast<size_t>(oc * per_oc + i);
            max_q = std::max(max_q, std::abs(static_cast<int>(wq.q[k])));
            sum += wq.q[k];
            const float before = static_cast<float>(full.q[k]) * full.scales[static_cast<size_t>(oc)];
            const float after = static_cast<float>(wq.q[k]) * wq.scales[static_cast<size_t>(oc)];
            EXPECT_LE(std::fabs(after - before), 0.5f * wq.scales[static_cast<size_t>(oc)] * (1 + 1e-5f)) << oc << " " << i;
        }
        EXPECT_EQ(wq.sums[static_cast<size_t>(oc)], sum);
        if (oc < 2) {
            EXPECT_EQ(max_q, 63) << oc;
            EXPECT_FLOAT_EQ(wq.scales[static_cast<size_t>(oc)], full.scales[static_cast<size_t>(oc)] * 127.0f / 63.0f);
        } else {
            EXPECT_TRUE(std::equal(wq.q.begin() + 2 * per_oc, wq.q.end(), full.q.begin() + 2 * per_oc)) << "within 63: kept";
            EXPECT_EQ(wq.scales[2], full.scales[2]);
        }
    }
    // round half away from zero: 127 -> 63, 1 -> 0 (0.496), 3 -> 1 (1.488), 65 -> 32 (32.24), -127 -> -63
    WeightQuant tiny;
    tiny.q = {127, 1, 3, 65, -127, -3};
    tiny.scales = {1.0f};
    resunet::narrow_weights(tiny, 63);
    EXPECT_EQ(tiny.q, (std::vector<int8_t>{63, 0, 1, 32, -63, -1}));
    EXPECT_EQ(tiny.sums, (std::vector<int32_t>{63 + 0 + 1 + 32 - 63 - 1}));
}

TEST(QuantArithmetic, AllZeroWeightChannelHasScaleOne) {
    std::vector<float> weights = {0, 0, 0, 0, 0.3f, -1.0f, 0.25f, 0};
    const WeightQuant wq = resunet::quantize_weights(weights, 2, 63);
    EXPECT_EQ(wq.scales[0], 1.0f);
    EXPECT_EQ(wq.sums[0], 0);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(wq.q[static_cast<size_t>(i)], 0);
    EXPECT_FLOAT_EQ(wq.scales[1], 1.0f / 63.0f);
    EXPECT_EQ((std::vector<int8_t>(wq.q.begin() + 4, wq.q.end())), (std::vector<int8_t>{19, -63, 16, 0}));
    EXPECT_EQ(wq.sums[1], 19 - 63 + 16);
}

TEST(QuantArithmetic, NonNegativeRangeHasZeroPointZero) {
    for (auto [lo, hi] : {std::pair{0.0f, 5.0f}, {1.0f, 5.0f}, {0.0f, 1e-20f}, {3.0f, 1e6f}}) {
        const ActivationQuant q = resunet::choose_activation_quant(lo, hi);
        EXPECT_EQ(q.zero_point, 0) << lo << ".." << hi;
        EXPECT_FLOAT_EQ(q.scale, hi / 255.0f) << lo << ".." << hi;  // widened to include 0
        EXPECT_EQ(resunet::quantize_value(hi, q), 255);
        EXPECT_EQ(resunet::quantize_value(0.0f, q), 0);
    }
}

TEST(QuantArithmetic, SignedRangeKeepsZeroExact) {
    for (auto [lo, hi] : {std::pair{-1.0f, 3.0f}, {-2.0f, 2.0f}, {-5.0f, 0.01f}, {-3.0f, -1.0f}, {-1e-3f, 7.0f},
                          {-0.37f, 0.91f}}) {
        const ActivationQuant q = resunet::choose_activation_quant(lo, hi);
        EXPECT_GT(q.scale, 0.0f);
        EXPECT_GE(q.zero_point, 0);
        EXPECT_LE(q.zero_point, 255);
        EXPECT_EQ(resunet::quantize_value(0.0f, q), q.zero_point) << lo << ".." << hi;
        EXPECT_EQ(resunet::dequantize_value(static_cast<uint8_t>(q.zero_point), q), 0.0f);
        const float l = std::min(lo, 0.0f), h = std::max(hi, 0.0f);
        EXPECT_FLOAT_EQ(q.scale, (h - l) / 255.0f);
        EXPECT_LE(resunet::quantize_value(l, q), 1) << "range start maps to ~0";
        EXPECT_GE(resunet::quantize_value(h, q), 254) << "range end maps to ~255";
    }
    EXPECT_EQ(resunet::choose_activation_quant(-3.0f, -1.0f).zero_point, 255);  // all negative: 0 is the top
    EXPECT_NEAR(resunet::choose_activation_quant(-2.0f, 2.0f).zero_point, 127.5, 0.5);  // 2 / (4 / 255)
}

TEST(QuantArithmetic, ConstantAndAllZeroTensorsHaveADefinedScale) {
    const ActivationQuant zero = resunet::choose_activation_quant(0.0f, 0.0f);
    EXPECT_EQ(zero.scale, 1.0f);
    EXPECT_EQ(zero.zero_point, 0);
    EXPECT_EQ(resunet::quantize_value(0.0f, zero), 0);
    for (float c : {2.5f, -2.5f, 1e-30f, -1e-38f, 1e-45f, 3e38f}) {
        const ActivationQuant q = resunet::choose_activation_quant(c, c);
        EXPECT_GT(q.scale, 0.0f) << c;
        EXPECT_TRUE(std::isfinite(q.scale)) << c;
        EXPECT_GE(q.zero_point, 0);
        EXPECT_LE(q.zero_point, 255);
        const float back = resunet::dequantize_value(resunet::quantize_value(c, q), q);
        EXPECT_TRUE(std::isfinite(back)) << c;
        EXPECT_LE(std::fabs(back - c), 0.5f * q.scale * (1 + 1e-5f)) << c << " -> " << back;
    }
    // Extreme ranges: the step overflows (max - min > FLT_MAX) or underflows to 0; still a finite scale.
    for (auto [lo, hi] : {std::pair{-3e38f, 3e38f}, {-1e-45f, 1e-45f}}) {
        const ActivationQuant q = resunet::choose_activation_quant(lo, hi);
        EXPECT_GT(q.scale, 0.0f) << lo << ".." << hi;
        EXPECT_TRUE(std::isfinite(q.scale)) << lo << ".." << hi;
        EXPECT_EQ(resunet::quantize_value(0.0f, q), q.zero_point);
    }
}

TEST(QuantArithmetic, RoundTripWithinHalfAStep) {
    for (auto [lo, hi] : {std::pair{-1.0f, 3.0f}, {0.0f, 6.0f}, {-2.0f, 2.0f}, {-7.3f, -0.2f}, {-0.001f, 0.37f},
                          {-2.0f, 2.0f / 3.0f}, {-63.5f / 255.0f * 4.0f, 191.5f / 255.0f * 4.0f}}) {
        const ActivationQuant q = resunet::choose_activation_quant(lo, hi);
        const float l = std::min(lo, 0.0f), h = std::max(hi, 0.0f);
        double worst_steps = 0;
        for (int i = 0; i <= 100000; ++i) {
            const float x = l + (h - l) * static_cast<float>(i) / 100000.0f;
            const float back = resunet::dequantize_value(resunet::quantize_value(x, q), q);
            worst_steps = std::max(worst_steps, std::fabs(static_cast<double>(back) - x) / q.scale);
        }
        EXPECT_LE(worst_steps, 0.5 + 1e-4) << lo << ".." << hi << " s " << q.scale << " z " << q.zero_point;
        // Outside the range values clip to 0 and 255.
        EXPECT_EQ(resunet::quantize_value(h + 10 * q.scale, q), 255);
        EXPECT_EQ(resunet::quantize_value(l - 10 * q.scale, q), 0);
    }
}

// ---------------------------------------------------------------------------------------------------
// 2. Kernels.

TEST(QuantKernels, TensorRangeFindsMinMaxAndNonFinite) {
    const KernelShape shape{2, 5, 30, 40};  // 12000 values per source: several OpenMP chunks
    std::vector<float> a(static_cast<size_t>(2 * 3 * 30 * 40)), b(static_cast<size_t>(2 * 2 * 30 * 40));
    fill_uniform(a.data(), count_of(a), 1, -1.0f, 1.0f);
    fill_uniform(b.data(), count_of(b), 2, -1.0f, 1.0f);
    a[100] = -4.5f;
    b[b.size() - 1] = 7.25f;
    const std::vector<KernelSource> sources = {{a.data(), 3, 0, false}, {b.data(), 2, 3, false}};
    resunet::Range r = resunet::tensor_range(sources, shape);
    EXPECT_TRUE(r.finite);
    EXPECT_EQ(r.min, -4.5f);
    EXPECT_EQ(r.max, 7.25f);
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY})
        for (size_t where : {size_t{0}, size_t{5000}, a.size() - 1}) {
            std::vector<float> c = a;
            c[where] = bad;
            r = resunet::tensor_range({{c.data(), 3, 0, false}, {b.data(), 2, 3, false}}, shape);
            EXPECT_FALSE(r.finite) << bad << " at " << where;
        }
    std::vector<float> c = b;
    c[77] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_FALSE(resunet::tensor_range({{a.data(), 3, 0, false}, {c.data(), 2, 3, false}}, shape).finite) << "second source";
}

// Plain NHWC {n, h, w, c} from a packed {n, h/2, w/2, 4c} 1x1-convolution output, written out longhand.
std::vector<float> unshuffle(const std::vector<float>& packed, const KernelShape& s, int64_t channels) {
    std::vector<float> plain(static_cast<size_t>(s.n * s.h * s.w * channels));
    for (int64_t n = 0; n < s.n; ++n)
        for (int64_t y = 0; y < s.h; ++y)
            for (int64_t x = 0; x < s.w; ++x)
                for (int64_t c = 0; c < channels; ++c) {
                    const int64_t k = (y % 2) * 2 + x % 2;
                    plain[static_cast<size_t>(((n * s.h + y) * s.w + x) * channels + c)] =
                        packed[static_cast<size_t>(((n * (s.h / 2) + y / 2) * (s.w / 2) + x / 2) * 4 * channels + k * channels + c)];
                }
    return plain;
}

// Expected u8 buffer with `padding` pixels of zero point around each image of a plain NHWC tensor.
std::vector<uint8_t> expected_u8(const std::vector<float>& nhwc, const KernelShape& s, const ActivationQuant& q, int padding) {
    const int64_t ph = s.h + 2 * padding, pw = s.w + 2 * padding;
    std::vector<uint8_t> out(static_cast<size_t>(s.n * ph * pw * s.c), static_cast<uint8_t>(q.zero_point));
    for (int64_t n = 0; n < s.n; ++n)
        for (int64_t y = 0; y < s.h; ++y)
            for (int64_t x = 0; x < s.w; ++x)
                for (int64_t c = 0; c < s.c; ++c)
                    out[static_cast<size_t>(((n * ph + y + padding) * pw + x + padding) * s.c + c)] =
                        resunet::quantize_value(nhwc[static_cast<size_t>(((n * s.h + y) * s.w + x) * s.c + c)], q);
    return out;
}

std::vector<uint8_t> padded_buffer(const KernelShape& s, int padding) {
    return std::vector<uint8_t>(static_cast<size_t>(s.n * (s.h + 2 * padding) * (s.w + 2 * padding) * s.c), 0xAB);
}

TEST(QuantKernels, QuantizeU8PaddingHoldsZeroPoint) {
    const KernelShape shape{2, 3, 5, 7};
    std::vector<float> src(static_cast<size_t>(2 * 3 * 5 * 7));
    fill_uniform(src.data(), count_of(src), 3, -1.0f, 2.0f);
    const ActivationQuant q = resunet::choose_activation_quant(-1.0f, 2.0f);
    ASSERT_NE(q.zero_point, 0);
    ASSERT_NE(q.zero_point, 0xAB);
    const std::vector<KernelSource> sources = {{src.data(), 3, 0, false}};
    for (int padding : {0, 1, 2}) {
        std::vector<uint8_t> out = padded_buffer(shape, padding);
        EXPECT_EQ(resunet::quantize_u8(sources, shape, q, {{out.data(), padding}}, false), 0);
        EXPECT_EQ(out, expected_u8(src, shape, q, padding)) << "padding " << padding;
    }
    // Two targets in one pass (a value read by a 3x3 and a 1x1 convolution).
    std::vector<uint8_t> out1 = padded_buffer(shape, 1), out0 = padded_buffer(shape, 0);
    resunet::quantize_u8(sources, shape, q, {{out1.data(), 1}, {out0.data(), 0}}, false);
    EXPECT_EQ(out1, expected_u8(src, shape, q, 1));
    EXPECT_EQ(out0, expected_u8(src, shape, q, 0));
}

TEST(QuantKernels, QuantizeU8PackedSourceIsPixelShuffled) {
    const KernelShape shape{2, 3, 6, 8};
    std::vector<float> packed(static_cast<size_t>(2 * 3 * 4 * 3 * 4));
    fill_uniform(packed.data(), count_of(packed), 4, -2.0f, 2.0f);
    const std::vector<float> plain = unshuffle(packed, shape, 3);
    const ActivationQuant q = resunet::choose_activation_quant(-2.0f, 2.0f);
    for (int padding : {0, 1}) {
        std::vector<uint8_t> out = padded_buffer(shape, padding);
        resunet::quantize_u8({{packed.data(), 3, 0, true}}, shape, q, {{out.data(), padding}}, false);
        EXPECT_EQ(out, expected_u8(plain, shape, q, padding)) << "padding " << padding;
    }
    const resunet::Range r = resunet::tensor_range({{packed.data(), 3, 0, true}}, shape);
    EXPECT_EQ(r.min, *std::min_element(plain.begin(), plain.end()));
    EXPECT_EQ(r.max, *std::max_element(plain.begin(), plain.end()));
}

// Two sources concatenated along channels, one of them packed: [up (packed, 5 ch), skip (plain, 3 ch)].
struct ConcatCase {
    KernelShape shape{2, 8, 4, 6};
    std::vector<float> up_packed, skip, whole;
    ConcatCase() {
        up_packed.resize(static_cast<size_t>(2 * 2 * 3 * 4 * 5));
        skip.resize(static_cast<size_t>(2 * 4 * 6 * 3));
        fill_uniform(up_packed.data(), count_of(up_packed), 5, -1.0f, 1.5f);
        fill_uniform(skip.data(), count_of(skip), 6, -0.5f, 3.0f);
        const std::vector<float> up = unshuffle(up_packed, shape, 5);
        whole.resize(static_cast<size_t>(2 * 4 * 6 * 8));
        for (int64_t p = 0; p < 2 * 4 * 6; ++p) {
            std::copy_n(up.begin() + p * 5, 5, whole.begin() + p * 8);
            std::copy_n(skip.begin() + p * 3, 3, whole.begin() + p * 8 + 5);
        }
    }
    std::vector<KernelSource> sources() const { return {{up_packed.data(), 5, 0, true}, {skip.data(), 3, 5, false}}; }
};

TEST(QuantKernels, QuantizeU8ConcatSourcesAtTheirOffsets) {
    const ConcatCase cc;
    const resunet::Range r = resunet::tensor_range(cc.sources(), cc.shape);
    EXPECT_EQ(r.min, *std::min_element(cc.whole.begin(), cc.whole.end()));
    EXPECT_EQ(r.max, *std::max_element(cc.whole.begin(), cc.whole.end()));
    const ActivationQuant q = resunet::choose_activation_quant(r.min, r.max);
    std::vector<uint8_t> out1 = padded_buffer(cc.shape, 1), out0 = padded_buffer(cc.shape, 0);
    resunet::quantize_u8(cc.sources(), cc.shape, q, {{out1.data(), 1}, {out0.data(), 0}}, false);
    EXPECT_EQ(out1, expected_u8(cc.whole, cc.shape, q, 1));
    EXPECT_EQ(out0, expected_u8(cc.whole, cc.shape, q, 0));
    // Reversed order: skip first.
    std::vector<float> reversed(cc.whole.size());
    const std::vector<float> up = unshuffle(cc.up_packed, cc.shape, 5);
    for (int64_t p = 0; p < 2 * 4 * 6; ++p) {
        std::copy_n(cc.skip.begin() + p * 3, 3, reversed.begin() + p * 8);
        std::copy_n(up.begin() + p * 5, 5, reversed.begin() + p * 8 + 3);
    }
    std::vector<uint8_t> out = padded_buffer(cc.shape, 1);
    resunet::quantize_u8({{cc.skip.data(), 3, 0, false}, {cc.up_packed.data(), 5, 3, true}}, cc.shape, q, {{out.data(), 1}}, false);
    EXPECT_EQ(out, expected_u8(reversed, cc.shape, q, 1));
}

// Many channels (vector bodies and tails) and values exactly halfway between two steps: the kernel must
// round as quantize_value() does (to even), bit for bit.
TEST(QuantKernels, QuantizeU8RoundsLikeQuantizeValue) {
    const KernelShape shape{2, 37, 3, 5};
    const ActivationQuant q{0.25f, 100};
    std::vector<float> src(static_cast<size_t>(2 * 3 * 5 * 37));
    fill_uniform(src.data(), count_of(src), 8, -30.0f, 45.0f);
    for (size_t i = 0; i < src.size(); i += 2) src[i] = (std::floor(src[i]) + 0.5f) * q.scale;  // x / s = k + 0.5
    src[1] = 1e9f;
    src[3] = -1e9f;
    std::vector<uint8_t> out = padded_buffer(shape, 1);
    const int64_t clipped = resunet::quantize_u8({{src.data(), 37, 0, false}}, shape, q, {{out.data(), 1}}, true);
    EXPECT_EQ(out, expected_u8(src, shape, q, 1));
    int64_t expected_clipped = 0;
    for (float x : src) {
        const float v = std::nearbyint(x / q.scale) + static_cast<float>(q.zero_point);
        expected_clipped += v < 0.0f || v > 255.0f;
    }
    EXPECT_EQ(clipped, expected_clipped);
    EXPECT_GE(expected_clipped, 2);
}

// NaN and +-Inf inside the 32-value vector bodies and in the tails: the same bytes as quantize_value (NaN
// to 0, +Inf to 255, -Inf to 0), and the pass reports them; finite data reports finite.
TEST(QuantKernels, QuantizeU8NonFiniteInVectorBodiesAndTails) {
    const KernelShape shape{1, 40, 2, 3};  // 32 + 8 channels per pixel
    const ActivationQuant q{0.05f, 20};
    std::vector<float> src(static_cast<size_t>(40 * 2 * 3));
    fill_uniform(src.data(), count_of(src), 11, -1.0f, 2.0f);
    std::vector<uint8_t> out = padded_buffer(shape, 1);
    bool finite = false;
    resunet::quantize_u8({{src.data(), 40, 0, false}}, shape, q, {{out.data(), 1}}, false, &finite);
    EXPECT_TRUE(finite);
    EXPECT_EQ(out, expected_u8(src, shape, q, 1));
    for (size_t i : {size_t{3}, size_t{45}, size_t{120}}) {  // a body, another pixel's body, a body again
        for (float bad : {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY}) {
            std::vector<float> with = src;
            with[i] = bad;
            with[35] = -bad;  // a tail too
            resunet::quantize_u8({{with.data(), 40, 0, false}}, shape, q, {{out.data(), 1}}, false, &finite);
            EXPECT_FALSE(finite) << i << " " << bad;
            EXPECT_EQ(out, expected_u8(with, shape, q, 1)) << i << " " << bad;
        }
    }
}

// A wide concat as in the decoder: a packed transposed-conv output (40 channels) and a plain skip (72),
// quantized into two paddings at once: each the quantize_value image of the gathered tensor.
TEST(QuantKernels, QuantizeU8WideConcatIntoTwoTargets) {
    const KernelShape shape{2, 112, 4, 6};
    std::vector<float> up_packed(static_cast<size_t>(2 * 2 * 3 * 4 * 40)), skip(static_cast<size_t>(2 * 4 * 6 * 72));
    fill_uniform(up_packed.data(), count_of(up_packed), 12, -3.0f, 3.0f);
    fill_uniform(skip.data(), count_of(skip), 13, 0.0f, 4.0f);
    const std::vector<KernelSource> sources = {{up_packed.data(), 40, 0, true}, {skip.data(), 72, 40, false}};
    std::vector<float> whole(static_cast<size_t>(2 * 4 * 6 * 112));
    resunet::gather_f32(sources, shape, whole.data());
    const ActivationQuant q = resunet::choose_activation_quant(-3.0f, 4.0f);
    std::vector<uint8_t> out1 = padded_buffer(shape, 1), out0 = padded_buffer(shape, 0);
    resunet::quantize_u8(sources, shape, q, {{out1.data(), 1}, {out0.data(), 0}}, false);
    EXPECT_EQ(out1, expected_u8(whole, shape, q, 1));
    EXPECT_EQ(out0, expected_u8(whole, shape, q, 0));
}

TEST(QuantKernels, QuantizeU8CountsClippedValues) {
    const KernelShape shape{1, 4, 8, 8};
    std::vector<float> src(256);
    fill_uniform(src.data(), count_of(src), 7, -0.9f, 0.9f);
    src[3] = 5.0f;
    src[100] = -2.0f;
    src[255] = 1.2f;
    const ActivationQuant q = resunet::choose_activation_quant(-1.0f, 1.0f);
    std::vector<uint8_t> out = padded_buffer(shape, 1);
    EXPECT_EQ(resunet::quantize_u8({{src.data(), 4, 0, false}}, shape, q, {{out.data(), 1}}, true), 3);
    EXPECT_EQ(out, expected_u8(src, shape, q, 1));
    EXPECT_EQ(resunet::quantize_u8({{src.data(), 4, 0, false}}, shape, q, {{out.data(), 1}}, false), 0) << "not counted";
}

TEST(QuantKernels, GatherF32ConcatAndPixelShuffle) {
    const ConcatCase cc;
    std::vector<float> out(cc.whole.size(), std::numeric_limits<float>::quiet_NaN());
    resunet::gather_f32(cc.sources(), cc.shape, out.data());
    EXPECT_EQ(out, cc.whole);
    const KernelShape single{2, 5, 4, 6};
    std::vector<float> plain(static_cast<size_t>(2 * 4 * 6 * 5));
    resunet::gather_f32({{cc.up_packed.data(), 5, 0, true}}, single, plain.data());
    EXPECT_EQ(plain, unshuffle(cc.up_packed, single, 5));
}

}  // namespace
