// Our own int8 Winograd F(2x2,3x3) (quant/winograd_int8.h): the kernel against the plain reference
// convolution of the same u8 input and s8 weights, exactly where the Winograd-domain quantization is
// lossless (one tap per output channel, small inputs) and within its stated bound on full-range random
// data; the shapes it refuses; and the int8 engine with it forced or measured against the direct int8 plan.
// On a CPU without AVX2 and FMA the kernel is never offered: the tests check exactly that.
#include <gtest/gtest.h>
#include <omp.h>

#include <fmt/format.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "quant/int8_conv_choice.h"
#include "quant/quant_engine.h"
#include "quant/quantize.h"
#include "quant/winograd_int8.h"
#include "quant/winograd_int8_tiles.h"
#include "support/fake_quant.h"
#include "support/reference.h"

namespace {

using resunet::ActivationQuant;
using resunet::Int8ConvAlgorithm;
using resunet::LayerProfile;
using resunet::QuantEngine;
using resunet::QuantOptions;
using resunet::WinogradInt8;
using resunet::WinogradInt8Shape;

struct Case {
    WinogradInt8Shape shape;
    std::vector<uint8_t> src;      // padded NHWC, padding = zero point
    ActivationQuant input;
    std::vector<int8_t> q;         // OIHW
    std::vector<float> scales, bias;
    std::vector<float> residual;   // NHWC, when shape.sum
};

// Plain convolution in double of the dequantized input and weights, then bias, residual and ReLU.
std::vector<double> reference(const Case& c) {
    const auto& s = c.shape;
    const int64_t H = s.height, W = s.width, IC = s.in_channels, OC = s.out_channels;
    std::vector<double> out(static_cast<size_t>(s.batch * H * W * OC));
    for (int64_t n = 0; n < s.batch; ++n)
        for (int64_t y = 0; y < H; ++y)
            for (int64_t x = 0; x < W; ++x)
                for (int64_t o = 0; o < OC; ++o) {
                    double acc = 0;
                    for (int ky = 0; ky < 3; ++ky)
                        for (int kx = 0; kx < 3; ++kx)
                            for (int64_t i = 0; i < IC; ++i) {
                                const uint8_t v = c.src[static_cast<size_t>(((n * (H + 2) + y + ky) * (W + 2) + x + kx) * IC + i)];
                                acc += (static_cast<double>(v) - c.input.zero_point) * c.q[static_cast<size_t>(((o * IC + i) * 3 + ky) * 3 + kx)] *
                                       static_cast<double>(c.scales[static_cast<size_t>(o)]);
                            }
                    const size_t at = static_cast<size_t>(((n * H + y) * W + x) * OC + o);
                    double value = acc * c.input.scale + c.bias[static_cast<size_t>(o)];
                    if (s.sum) value += c.residual[at];
                    if (s.relu) value = std::max(value, 0.0);
                    out[at] = value;
                }
    return out;
}

// Random u8 input in [zero - spread, zero + spread] (clipped to 0..255), padding at the zero point.
Case make_case(WinogradInt8Shape shape, int zero, int spread, unsigned seed) {
    Case c;
    c.shape = shape;
    std::mt19937 rng(seed);
    c.input = {0.02f, zero};
    const int64_t H = shape.height, W = shape.width, IC = shape.in_channels, OC = shape.out_channels;
    c.src.assign(static_cast<size_t>(shape.batch * (H + 2) * (W + 2) * IC), static_cast<uint8_t>(zero));
    std::uniform_int_distribution<int> value(std::max(0, zero - spread), std::min(255, zero + spread));
    for (int64_t n = 0; n < shape.batch; ++n)
        for (int64_t y = 1; y <= H; ++y)
            for (int64_t x = 1; x <= W; ++x)
                for (int64_t i = 0; i < IC; ++i)
                    c.src[static_cast<size_t>(((n * (H + 2) + y) * (W + 2) + x) * IC + i)] = static_cast<uint8_t>(value(rng));
    c.q.resize(static_cast<size_t>(OC * IC * 9));
    std::uniform_int_distribution<int> weight(-shape.levels, shape.levels);
    for (auto& w : c.q) w = static_cast<int8_t>(weight(rng));
    std::uniform_real_distribution<float> unit(0.5f, 1.5f), signed_unit(-1.0f, 1.0f);
    for (int64_t o = 0; o < OC; ++o) {
        c.scales.push_back(0.01f * unit(rng));
        c.bias.push_back(signed_unit(rng));
    }
    if (shape.sum) {
        c.residual.resize(static_cast<size_t>(shape.batch * H * W * OC));
        for (auto& r : c.residual) r = signed_unit(rng);
    }
    return c;
}

struct Result {
    double max_relative = 0;  // max |actual - expected| / max |expected|
    double sqnr_db = 0;
};

// `group`: tiles per group (0: the kernel's choice); a small one leaves a shorter last group (its own matmul).
Result run(const Case& c, int64_t group = 0) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream strm(eng);
    std::string why;
    auto conv = WinogradInt8::create(eng, strm, c.shape, c.q.data(), c.scales.data(), c.bias.data(), &why, group);
    EXPECT_NE(conv, nullptr) << why;
    if (!conv) return {};
    std::vector<float> dst = c.shape.sum ? c.residual : std::vector<float>(static_cast<size_t>(c.shape.batch * c.shape.height * c.shape.width * c.shape.out_channels), -7.0f);
    std::vector<char> scratch(conv->scratch_bytes() + 64);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) / 64 * 64);
    conv->execute(strm, c.src.data(), c.input, dst.data(), aligned);
    const std::vector<double> expected = reference(c);
    double largest = 0, err_max = 0, signal = 0, noise = 0;
    for (size_t i = 0; i < dst.size(); ++i) {
        largest = std::max(largest, std::abs(expected[i]));
        err_max = std::max(err_max, std::abs(dst[i] - expected[i]));
        signal += expected[i] * expected[i];
        noise += (dst[i] - expected[i]) * (dst[i] - expected[i]);
    }
    return {err_max / std::max(largest, 1e-30), noise > 0 ? 10 * std::log10(signal / noise) : 200.0};
}

bool offered() { return WinogradInt8::applies({.in_channels = 16, .out_channels = 8, .height = 2, .width = 2}); }

// The row quantization's table and integer rounding against the formula they replace (a division, an
// inverse and lround): every range the transforms can produce (|V| <= 1020), at every offset.
TEST(WinogradInt8, RowQuantizationTableMatchesItsFormula) {
    int64_t checked = 0;
    for (int lo = -1020; lo <= 1020; ++lo)
        for (int hi = lo; hi <= 1020; ++hi) {
            float scale = 0;
            int32_t zero = 0;
            const int16_t multiplier = resunet::winograd_int8_tiles::row_quant(lo, hi, &scale, &zero);
            if (hi - lo <= 255) {
                ASSERT_EQ(multiplier, 0);
                ASSERT_EQ(scale, 1.0f);
                ASSERT_EQ(zero, -lo);
                continue;
            }
            const int expected = 255 * 32768 / (hi - lo);
            ASSERT_EQ(multiplier, expected) << lo << ".." << hi;
            ASSERT_EQ(scale, 32768.0f / static_cast<float>(expected)) << lo << ".." << hi;
            ASSERT_EQ(zero, std::lround(-lo * static_cast<double>(expected) / 32768.0)) << lo << ".." << hi;
            ++checked;
        }
    EXPECT_GT(checked, 1000000);
}

// The lossless case of the test below: one tap per output channel, each channel's largest |q| at the levels
// (63), inputs within +-15 of the zero point 40.
Case lossless_case(const WinogradInt8Shape& shape, unsigned seed) {
    Case c = make_case(shape, 40, 15, seed);
    std::mt19937 rng(3);
    std::uniform_int_distribution<int> weight(-63, 63);
    for (int64_t o = 0; o < shape.out_channels; ++o) {
        const int tap = static_cast<int>(o % 9);
        for (int64_t i = 0; i < shape.in_channels; ++i)
            for (int k = 0; k < 9; ++k)
                c.q[static_cast<size_t>((o * shape.in_channels + i) * 9 + k)] =
                    static_cast<int8_t>(k != tap ? 0 : i == 0 ? (o % 2 ? 63 : -63) : weight(rng));
    }
    return c;
}

// One tap per output channel (all nine taps across the channels) and each channel's largest |q| at the
// levels: every position's U is then an exact multiple of the channel's weights, and inputs within +-15 of
// the zero point keep every position's range under 256 values, so the kernel is exact up to float rounding.
// This pins the transforms, indexing, zero-point compensation, bias, residual sum and ReLU.
TEST(WinogradInt8, ExactWhereTheWinogradDomainIsLossless) {
    if (!offered()) GTEST_SKIP() << "not offered on this CPU (no AVX2 and FMA)";
    // 16, 32 and 48 input channels and 24 output channels: the AVX-512 transforms' full vectors (32 input,
    // 16 output channels) and their AVX2 remainders (16, 8), and the AVX2 transforms alone under the ISA cap.
    for (int64_t channels : {16, 32, 48})
    for (bool sum : {false, true})
        for (bool relu : {false, true}) {
            WinogradInt8Shape shape{.batch = 2, .in_channels = channels, .out_channels = 24, .height = 6, .width = 10,
                                    .sum = sum, .relu = relu, .levels = 63};
            const Case c = lossless_case(shape, 7 + sum * 2 + relu);
            // 2 x 3 x 5 = 30 tiles: groups of 4 leave a last one of 2; -1 is one group the threads share (with
            // more than one thread; 0 also takes it here, 30 tiles being few)
            for (int64_t group : {0, 4, -1}) {
                const Result r = run(c, group);
                EXPECT_LE(r.max_relative, 1e-5) << channels << " channels, sum " << sum << " relu " << relu << " group " << group;
            }
        }
}

// The kernel's own group on an image with enough tiles for per-thread groups: odd (an even one put a tile's
// 16 position rows 4 KB multiples apart), with a shorter last group where the tiles do not divide; exact.
TEST(WinogradInt8, OwnGroupIsOddAndExact) {
    if (!offered()) GTEST_SKIP() << "not offered on this CPU (no AVX2 and FMA)";
    const int before = omp_get_max_threads();
    for (int threads : {2, 3}) {
        omp_set_num_threads(threads);
        // 24 x 24 tiles = 576 (at least 128 per thread: per-thread groups): groups of 144 (2 threads) or 192 (3)
        // before the odd step, 145 and 193 after, each with a shorter last group (141, 190).
        const WinogradInt8Shape shape{.batch = 1, .in_channels = 32, .out_channels = 24, .height = 48, .width = 48,
                                      .relu = true, .levels = 63};
        const Case c = lossless_case(shape, 21);
        dnnl::engine eng(dnnl::engine::kind::cpu, 0);
        dnnl::stream strm(eng);
        auto conv = WinogradInt8::create(eng, strm, shape, c.q.data(), c.scales.data(), c.bias.data());
        ASSERT_NE(conv, nullptr);
        EXPECT_EQ(conv->tiles_per_group() % 2, 1) << threads << " threads: group " << conv->tiles_per_group();
        EXPECT_LT(conv->tiles_per_group(), 576) << threads << " threads";
        const Result r = run(c, 0);
        EXPECT_LE(r.max_relative, 1e-5) << threads << " threads";
    }
    omp_set_num_threads(before);
}

// Full-range random data: the Winograd-domain quantization (one u8 scale per position, per run) costs
// accuracy, stated as resunet::kInt8WinogradBound of the largest output value.
TEST(WinogradInt8, WithinItsBoundOnFullRangeData) {
    if (!offered()) GTEST_SKIP() << "not offered on this CPU (no AVX2 and FMA)";
    for (int zero : {0, 128}) {
        WinogradInt8Shape shape{.batch = 1, .in_channels = 64, .out_channels = 32, .height = 14, .width = 12,
                                .relu = zero == 0, .levels = 63};
        const Case c = make_case(shape, zero, 255, 11 + zero);
        const Result r = run(c);
        EXPECT_LE(r.max_relative, resunet::kInt8WinogradBound) << "zero point " << zero << ", SQNR " << r.sqnr_db << " dB";
        EXPECT_GE(r.sqnr_db, 25.0) << "zero point " << zero;
        std::printf("zero point %d: max error %.4f of the largest value, SQNR %.1f dB\n", zero, r.max_relative, r.sqnr_db);
    }
}

TEST(WinogradInt8, RefusesShapesItDoesNotCover) {
    std::string why;
    EXPECT_FALSE(WinogradInt8::applies({.in_channels = 24, .out_channels = 8, .height = 4, .width = 4}, &why));
    EXPECT_NE(why.find("channels"), std::string::npos) << why;
    EXPECT_FALSE(WinogradInt8::applies({.in_channels = 16, .out_channels = 12, .height = 4, .width = 4}, &why));
    EXPECT_FALSE(WinogradInt8::applies({.in_channels = 16, .out_channels = 8, .height = 5, .width = 4}, &why));
    EXPECT_NE(why.find("even"), std::string::npos) << why;
    EXPECT_FALSE(WinogradInt8::applies({.in_channels = 16, .out_channels = 8, .height = 4, .width = 4, .levels = 0}, &why));
}

// The whole int8 engine, width 16 (the 3x3 layers read 16 to 64 channels), 64x64, two images: with our
// Winograd forced wherever it applies, measured, and refused by --tune off, against the direct plan and fp32.
struct SmallNet {
    resunet::Graph graph = resunet::build_resunet({.width = 16, .depth = 2, .height = 64, .width_px = 64});
    resunet::TensorMap weights;
    std::vector<float> input, fp32;
    SmallNet() {
        weights = resunet::init_weights(graph, 21);
        resunet::randomize_batch_norm_statistics(graph, weights, 22);
        input.resize(2 * 3 * 64 * 64);
        resunet::fill_uniform(input.data(), static_cast<int64_t>(input.size()), 23, -2.0f, 2.0f);
        fp32.resize(2 * 64 * 64);
        resunet::EngineOptions options;
        options.threads = 2;
        resunet::Engine(graph, weights, options).run(input.data(), 2, fp32.data());
    }
};

std::map<std::string, LayerProfile> profile_rows(QuantEngine& engine, const SmallNet& net, std::vector<float>& out) {
    std::map<std::string, LayerProfile> rows;
    for (const LayerProfile& row : engine.profile(net.input.data(), 2, out.data())) rows[row.name] = row;
    return rows;
}

bool is_3x3_int8(const std::string& name) {
    return name.ends_with(".conv_a") || name.ends_with(".conv_b");
}

TEST(WinogradInt8Engine, ForcedMeasuredAndOff) {
    if (!offered()) GTEST_SKIP() << "not offered on this CPU (no AVX2 and FMA)";
    const SmallNet net;
    auto run_with = [&](Int8ConvAlgorithm algorithm, resunet::Tuning tune, std::vector<float>& out) {
        QuantOptions options;
        options.threads = 2;
        options.tune = tune;
        options.int8_algorithm = algorithm;
        QuantEngine engine(net.graph, net.weights, options);
        out.assign(net.fp32.size(), 0.0f);
        return profile_rows(engine, net, out);
    };
    std::vector<float> direct, winograd, measured, off;
    const auto direct_rows = run_with(Int8ConvAlgorithm::direct, resunet::Tuning::fast, direct);
    const auto winograd_rows = run_with(Int8ConvAlgorithm::winograd_f23, resunet::Tuning::fast, winograd);
    const auto measured_rows = run_with(Int8ConvAlgorithm::automatic, resunet::Tuning::fast, measured);
    const auto off_rows = run_with(Int8ConvAlgorithm::automatic, resunet::Tuning::off, off);
    // The measured plan offers the Winograd only where the weights have 127 levels (VNNI): with fewer it
    // keeps direct and says why (quant/int8_conv_choice.h, winograd_int8_measurable).
    const bool measurable = resunet::quant_detail::winograd_int8_measurable(resunet::weight_levels());
    int forced = 0;
    for (const auto& [name, row] : winograd_rows) {
        if (!is_3x3_int8(name) || row.precision != "u8s8") continue;
        EXPECT_EQ(direct_rows.at(name).algorithm, "direct") << name;
        EXPECT_EQ(off_rows.at(name).algorithm, "direct") << name;
        // e1.conv_b reads 16 channels: every int8 3x3 layer of this graph applies
        EXPECT_EQ(row.algorithm, "winograd_int8_f23") << name << ": " << row.candidates;
        EXPECT_NE(row.kernel.find("own_int8_f23"), std::string::npos) << row.kernel;
        forced += row.algorithm == "winograd_int8_f23";
        const LayerProfile& m = measured_rows.at(name);
        if (measurable) {
            EXPECT_NE(m.candidates.find("direct "), std::string::npos) << m.candidates;
            EXPECT_NE(m.candidates.find("winograd_int8_f23 "), std::string::npos) << m.candidates;
            EXPECT_NE(m.candidates.find("err "), std::string::npos) << m.candidates;
            EXPECT_TRUE(m.algorithm == "direct" || m.algorithm == "winograd_int8_f23") << m.algorithm;
        } else {
            EXPECT_EQ(m.algorithm, "direct") << name;
            EXPECT_NE(m.candidates.find("chosen only with 127-level weights"), std::string::npos) << m.candidates;
        }
        std::printf("  %s: %s <- %s\n", name.c_str(), m.algorithm.c_str(), m.candidates.c_str());
    }
    EXPECT_GE(forced, 6);
    EXPECT_EQ(off, direct);  // --tune off is the direct plan, bit for bit
    if (!measurable) {
        EXPECT_EQ(measured, direct);  // every layer direct: the direct plan, bit for bit
    }
    QuantOptions plain;
    plain.threads = 2;
    EXPECT_EQ(QuantEngine(net.graph, net.weights, plain).conv_summary(), "int8 3x3 convolutions: 0 winograd_int8_f23, 9 direct");
    // The network with the Winograd everywhere against direct and fp32: the bound is per network (each
    // layer's requantization adds to the next one's input), measured 2-3e-2 here.
    const resunet::reference::ErrorStats e =
        resunet::reference::compare(winograd.data(), direct.data(), static_cast<int64_t>(direct.size()));
    const double sqnr_direct = resunet::reference::sqnr_db(direct.data(), net.fp32.data(), static_cast<int64_t>(direct.size()));
    const double sqnr_winograd = resunet::reference::sqnr_db(winograd.data(), net.fp32.data(), static_cast<int64_t>(direct.size()));
    const double dice = resunet::reference::mask_dice(winograd.data(), net.fp32.data(), static_cast<int64_t>(direct.size()));
    std::printf("  Winograd vs direct: %s; SQNR vs fp32 %.1f dB (direct %.1f dB); mask Dice vs fp32 %.4f\n",
                e.to_string().c_str(), sqnr_winograd, sqnr_direct, dice);
    EXPECT_GE(sqnr_winograd, sqnr_direct - 8.0);
    EXPECT_GE(dice, 0.95);
}

// The measured choices through the plan cache (QuantOptions::plan_cache): the first engine measures and saves
// them, the next one takes them without measuring (the same layers, the same output bit for bit), and a
// damaged file is measured again and replaced.
TEST(WinogradInt8Engine, MeasuredChoicesComeBackFromThePlanCache) {
    if (!offered()) GTEST_SKIP() << "not offered on this CPU (no AVX2 and FMA)";
    const SmallNet net;
    const std::filesystem::path folder = std::filesystem::path(::testing::TempDir()) / "int8_plan_cache_test";
    std::filesystem::remove_all(folder);
    auto build = [&](std::vector<float>& out, std::map<std::string, LayerProfile>& rows) {
        QuantOptions options;
        options.threads = 2;
        options.int8_algorithm = Int8ConvAlgorithm::automatic;
        options.tune = resunet::Tuning::fast;  // measured (the default rule caches nothing)
        options.plan_cache = folder.string();
        QuantEngine engine(net.graph, net.weights, options);
        out.assign(net.fp32.size(), 0.0f);
        rows = profile_rows(engine, net, out);
        return engine.conv_summary();
    };
    std::vector<float> first, second, third;
    std::map<std::string, LayerProfile> first_rows, second_rows, third_rows;
    const std::string measured = build(first, first_rows);
    EXPECT_NE(measured.find("measured: no cached plan; saved as plan-u8s8-"), std::string::npos) << measured;
    const std::string cached = build(second, second_rows);
    EXPECT_NE(cached.find("from the plan cache (plan-u8s8-"), std::string::npos) << cached;
    EXPECT_EQ(cached.substr(0, cached.find(" (")), measured.substr(0, measured.find(" (")));  // the same layers
    int layers = 0;
    for (const auto& [name, row] : second_rows) {
        if (!is_3x3_int8(name) || row.precision != "u8s8") continue;
        ++layers;
        EXPECT_EQ(row.algorithm, first_rows.at(name).algorithm) << name;
        EXPECT_TRUE(row.candidates.starts_with(row.algorithm + " (from the plan cache)")) << name << ": " << row.candidates;  // nothing measured
    }
    EXPECT_EQ(layers, 9);
    EXPECT_EQ(second, first);
    // A damaged file (its checksum no longer matches) is measured again and replaced.
    ASSERT_EQ(std::distance(std::filesystem::directory_iterator(folder), std::filesystem::directory_iterator()), 1);
    const std::filesystem::path file = std::filesystem::directory_iterator(folder)->path();
    std::string text;
    {
        std::ifstream in(file);
        text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    const size_t at = text.find("winograd_int8_f23") != std::string::npos ? text.find("winograd_int8_f23") : text.find("\"direct\"");
    ASSERT_NE(at, std::string::npos) << text;
    text[at + 1] = text[at + 1] == 'x' ? 'y' : 'x';
    std::ofstream(file) << text;
    const std::string again = build(third, third_rows);
    EXPECT_NE(again.find("measured: damaged"), std::string::npos) << again;
    std::filesystem::remove_all(folder);
}

// The Winograd under the engine's other modes: micro-batch 2 (two images per pass, one set of row scales
// each), static scales (calibrate(): the Winograd's own row scales stay per pass), and an int8 model file
// (quantize_model_weights: the same s8 weights, so the same transformed weights, bit for bit).
TEST(WinogradInt8Engine, MicroBatchStaticAndInt8File) {
    if (!offered()) GTEST_SKIP() << "not offered on this CPU (no AVX2 and FMA)";
    const SmallNet net;
    QuantOptions options;
    options.threads = 2;
    options.int8_algorithm = Int8ConvAlgorithm::winograd_f23;
    const int64_t count = static_cast<int64_t>(net.fp32.size());
    std::vector<float> single(net.fp32.size()), pair(net.fp32.size()), from_file(net.fp32.size()), calibrated(net.fp32.size());
    QuantEngine(net.graph, net.weights, options).run(net.input.data(), 2, single.data());
    QuantEngine(net.graph, resunet::quantize_model_weights(net.graph, net.weights), options).run(net.input.data(), 2, from_file.data());
    EXPECT_EQ(from_file, single);
    options.micro_batch = 2;
    QuantEngine(net.graph, net.weights, options).run(net.input.data(), 2, pair.data());
    options.micro_batch = 1;
    QuantEngine engine(net.graph, net.weights, options);
    // 9 int8 3x3 layers (e1.conv_a reads the 3 RGB channels and stays fp32), all of them Winograd
    EXPECT_EQ(engine.conv_summary().rfind("int8 3x3 convolutions: 9 winograd_int8_f23 (e1.conv_b, e2.conv_a, ", 0), 0)
        << engine.conv_summary();
    EXPECT_TRUE(engine.conv_summary().ends_with("d1.conv_b), 0 direct")) << engine.conv_summary();
    engine.calibrate(net.input.data(), 2);
    engine.run(net.input.data(), 2, calibrated.data());
    const double single_db = resunet::reference::sqnr_db(single.data(), net.fp32.data(), count);
    for (const auto& [label, out] : {std::pair{"micro-batch 2", &pair}, std::pair{"static", &calibrated}}) {
        const double db = resunet::reference::sqnr_db(out->data(), net.fp32.data(), count);
        std::printf("  %s: SQNR vs fp32 %.1f dB (micro-batch 1, dynamic: %.1f dB)\n", label, db, single_db);
        EXPECT_GE(db, single_db - 3.0) << label;
    }
}

TEST(WinogradInt8Engine, NamesOfTheFlag) {
    EXPECT_EQ(resunet::int8_conv_from_name("direct"), Int8ConvAlgorithm::direct);
    EXPECT_EQ(resunet::int8_conv_from_name("winograd"), Int8ConvAlgorithm::winograd_f23);
    EXPECT_EQ(resunet::int8_conv_from_name("auto"), Int8ConvAlgorithm::automatic);
    EXPECT_THROW(resunet::int8_conv_from_name("fastest"), resunet::Error);
}

}  // namespace
