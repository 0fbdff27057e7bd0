// The planner's shared lowering (engine/lowering.h, engine/schedule.h, engine/arena.h): each primitive a
// ConvSpec makes against the plain reference on random data (f32 with its fused post-ops, u8 x s8 with
// its dequantization against the fp32 twin, the transposed convolution, every algorithm oneDNN offers
// here against direct), weight uploads, labels, the arena and the schedule runner.
#include <gtest/gtest.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/arena.h"
#include "engine/conv_tuning.h"
#include "engine/lowering.h"
#include "engine/schedule.h"
#include "graph/init.h"
#include "support/reference.h"

namespace {

using dnnl::memory;
using dt = memory::data_type;
using tag = memory::format_tag;
using resunet::Activation;
using resunet::Dims;
using resunet::FusedOp;
using resunet::reference::Tensor4;
namespace lowering = resunet::lowering;

Tensor4 random_tensor(const Dims& dims, uint64_t seed, float low, float high) {
    Tensor4 t = Tensor4::zeros(dims);
    resunet::fill_uniform(t.data.data(), t.size(), seed, low, high);
    return t;
}

std::vector<float> random_vector(int64_t n, uint64_t seed) {
    std::vector<float> v(static_cast<size_t>(n));
    resunet::fill_uniform(v.data(), n, seed, -0.5f, 0.5f);
    return v;
}

memory::dims dnnl_dims(const Dims& d) { return memory::dims(d.begin(), d.end()); }

struct Runner {
    dnnl::engine eng{dnnl::engine::kind::cpu, 0};
    dnnl::stream strm{eng};
    lowering::WeightStore store;

    // Runs `pd` on src (NCHW f32 or u8), writing over dst (NCHW f32, which a sum post-op reads first).
    template <class Pd>
    std::vector<float> run(const Pd& pd, const dnnl::primitive& prim, const void* src, dt src_type, const Dims& src_dims, const void* weights,
                           dt weight_type, const Dims& weight_dims, const std::vector<float>& bias, std::vector<float> dst,
                           const Dims& dst_dims, const memory* multiplier = nullptr) {
        memory user_src({dnnl_dims(src_dims), src_type, tag::nchw}, eng, const_cast<void*>(src));
        memory user_dst({dnnl_dims(dst_dims), dt::f32, tag::nchw}, eng, dst.data());
        memory src_m(pd.src_desc(), eng), dst_m(pd.dst_desc(), eng);
        dnnl::reorder(user_src, src_m).execute(strm, user_src, src_m);
        dnnl::reorder(user_dst, dst_m).execute(strm, user_dst, dst_m);
        std::unordered_map<int, memory> args = {
            {DNNL_ARG_SRC, src_m},
            {DNNL_ARG_WEIGHTS, store.upload(eng, strm, weights, weight_type, dnnl_dims(weight_dims), pd.weights_desc())},
            {DNNL_ARG_BIAS, store.floats(eng, bias.data(), static_cast<int64_t>(bias.size()))},
            {DNNL_ARG_DST, dst_m},
            {DNNL_ARG_SCRATCHPAD, memory(pd.scratchpad_desc(), eng)}};
        if (multiplier) args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = *multiplier;
        std::vector<lowering::Step> steps;
        steps.emplace_back(prim, args, "layer");
        lowering::run_schedule(steps, strm, nullptr);
        dnnl::reorder(dst_m, user_dst).execute(strm, dst_m, user_dst);
        strm.wait();
        return dst;
    }
};

// A convolution with a residual sum and a ReLU, at stride 1 and 2: the primitive a spec makes against
// relu(conv2d(src) + dst) of the reference, in the layouts oneDNN picks (format_tag::any).
TEST(Lowering, FusedConvMatchesReference) {
    for (int stride : {1, 2}) {
        Runner r;
        const Dims src_dims = {2, 8, 9, 9};
        const int64_t out_size = (9 + 2 - 3) / stride + 1;
        const Dims dst_dims = {2, 16, out_size, out_size}, weight_dims = {16, 8, 3, 3};
        const Tensor4 src = random_tensor(src_dims, 1, -1, 1), weight = random_tensor(weight_dims, 2, -0.3f, 0.3f);
        const Tensor4 residual = random_tensor(dst_dims, 3, -1, 1);
        const std::vector<float> bias = random_vector(16, 4);
        FusedOp op;
        op.residual = 7;  // any value: the spec only asks whether there is one
        op.activation = Activation::relu;
        const lowering::ConvSpec spec =
            lowering::ConvSpec::of(op, memory::desc(dnnl_dims(src_dims), dt::f32, tag::any),
                                   memory::desc(dnnl_dims(dst_dims), dt::f32, tag::any), dnnl_dims(weight_dims), stride, 1);
        EXPECT_TRUE(spec.sum);
        const auto pd = lowering::make_conv(r.eng, spec);
        const std::vector<float> got = r.run(pd, dnnl::convolution_forward(pd), src.data.data(), dt::f32, src_dims, weight.data.data(), dt::f32, weight_dims,
                                             bias, residual.data, dst_dims);
        const Tensor4 expected = resunet::reference::relu(
            resunet::reference::add(resunet::reference::conv2d(src, weight, bias, stride, 1), residual));
        const auto stats = resunet::reference::compare(got.data(), expected);
        EXPECT_LE(stats.relative(), 1e-5) << "stride " << stride << ": " << stats.to_string();
        EXPECT_EQ(r.store.bytes(), pd.weights_desc().get_size() + 16 * sizeof(float));
    }
}

// u8 x s8 with the dequantization multiplier as the first post-op: against its fp32 twin computed from
// the dequantized operands (x = s_x * (q_x - z), w = s_w[o] * q_w). The int32 sums are exact, so the
// bound is float rounding of the multiplier path: 1e-5 of the output's range.
TEST(Lowering, Int8ConvMatchesItsFp32Twin) {
    Runner r;
    const Dims src_dims = {1, 16, 8, 8}, dst_dims = {1, 8, 8, 8}, weight_dims = {8, 16, 3, 3};
    const Dims padded_dims = {1, 16, 10, 10};  // the quantize pass writes the zero-point padding
    const float s_x = 0.02f;
    const int z = 7;
    std::vector<uint8_t> q_x(static_cast<size_t>(resunet::num_elements(padded_dims)), static_cast<uint8_t>(z));
    Tensor4 x = Tensor4::zeros(src_dims);
    uint32_t state = 99;
    for (int64_t c = 0; c < 16; ++c)
        for (int64_t h = 0; h < 8; ++h)
            for (int64_t w = 0; w < 8; ++w) {
                state = state * 1664525u + 1013904223u;
                const uint8_t q = static_cast<uint8_t>(state >> 24);
                q_x[static_cast<size_t>((c * 10 + h + 1) * 10 + w + 1)] = q;
                x.at(0, c, h, w) = s_x * static_cast<float>(q - z);
            }
    std::vector<int8_t> q_w(static_cast<size_t>(resunet::num_elements(weight_dims)));
    Tensor4 wf = Tensor4::zeros(weight_dims);
    std::vector<float> s_w(8);
    for (int64_t o = 0; o < 8; ++o) s_w[static_cast<size_t>(o)] = 0.001f * static_cast<float>(o + 1);
    for (size_t i = 0; i < q_w.size(); ++i) {
        state = state * 1664525u + 1013904223u;
        q_w[i] = static_cast<int8_t>(static_cast<int>(state >> 25) - 63);  // -63..64: the engine's +-63 range
        q_w[i] = std::max<int8_t>(q_w[i], -63);
        wf.data[i] = s_w[i / (16 * 9)] * static_cast<float>(q_w[i]);
    }
    const std::vector<float> bias = random_vector(8, 5);
    FusedOp op;
    op.activation = Activation::relu;
    lowering::ConvSpec spec = lowering::ConvSpec::of(op, memory::desc(dnnl_dims(padded_dims), dt::u8, tag::nhwc),
                                                     memory::desc(dnnl_dims(dst_dims), dt::f32, tag::nhwc),
                                                     dnnl_dims(weight_dims), 1, 0);
    spec.precision = lowering::Precision::u8s8;
    const auto pd = lowering::make_conv(r.eng, spec);
    // As the int8 engine prepares each pass: multiplier = s_x * s_w, bias in sum units minus z * sum(q_w).
    memory multiplier({{1, 8, 1, 1}, dt::f32, tag::abcd}, r.eng);
    std::vector<float> bias_q(8);
    for (int64_t o = 0; o < 8; ++o) {
        float sum = 0;
        for (int64_t k = 0; k < 16 * 9; ++k) sum += static_cast<float>(q_w[static_cast<size_t>(o * 16 * 9 + k)]);
        const float m = s_x * s_w[static_cast<size_t>(o)];
        static_cast<float*>(multiplier.get_data_handle())[o] = m;
        bias_q[static_cast<size_t>(o)] = bias[static_cast<size_t>(o)] / m - static_cast<float>(z) * sum;
    }
    const std::vector<float> got = r.run(pd, dnnl::convolution_forward(pd), q_x.data(), dt::u8, padded_dims, q_w.data(), dt::s8, weight_dims, bias_q,
                                         std::vector<float>(static_cast<size_t>(resunet::num_elements(dst_dims))), dst_dims,
                                         &multiplier);
    const Tensor4 expected = resunet::reference::relu(resunet::reference::conv2d(x, wf, bias, 1, 1));
    const auto stats = resunet::reference::compare(got.data(), expected);
    EXPECT_LE(stats.relative(), 1e-5) << stats.to_string();
    EXPECT_GT(stats.max_abs_expected, 0.0);
}

// The transposed convolution (k 2, s 2) through make_deconv: weights given as {O, I, k, k}.
TEST(Lowering, DeconvMatchesReference) {
    Runner r;
    const Dims src_dims = {2, 8, 5, 5}, dst_dims = {2, 4, 10, 10};
    const Tensor4 src = random_tensor(src_dims, 6, -1, 1);
    const Tensor4 w_iohw = random_tensor({8, 4, 2, 2}, 7, -0.5f, 0.5f);  // PyTorch [I, O, k, k]
    Tensor4 w_oihw = Tensor4::zeros({4, 8, 2, 2});
    for (int64_t i = 0; i < 8; ++i)
        for (int64_t o = 0; o < 4; ++o)
            for (int64_t y = 0; y < 2; ++y)
                for (int64_t x = 0; x < 2; ++x) w_oihw.at(o, i, y, x) = w_iohw.at(i, o, y, x);
    const std::vector<float> bias = random_vector(4, 8);
    const lowering::ConvSpec spec =
        lowering::ConvSpec::of(FusedOp{}, memory::desc(dnnl_dims(src_dims), dt::f32, tag::any),
                               memory::desc(dnnl_dims(dst_dims), dt::f32, tag::any), {4, 8, 2, 2}, 2, 0);
    const auto pd = lowering::make_deconv(r.eng, spec);
    const std::vector<float> got = r.run(pd, dnnl::deconvolution_forward(pd), src.data.data(), dt::f32, src_dims, w_oihw.data.data(), dt::f32, {4, 8, 2, 2},
                                         bias, std::vector<float>(static_cast<size_t>(resunet::num_elements(dst_dims))),
                                         dst_dims);
    const auto stats = resunet::reference::compare(got.data(), resunet::reference::conv_transpose2d(src, w_iohw, bias, 2));
    EXPECT_LE(stats.relative(), 1e-5) << stats.to_string();
}

// Every algorithm make_conv may be asked for, against direct on the same spec: where oneDNN has no
// kernel (Winograd on AVX2 in 2.6) it says so with a dnnl::error, and nothing else is checked.
TEST(Lowering, EveryAlgorithmOneDnnOffersMatchesDirect) {
    Runner r;
    const Dims src_dims = {1, 32, 14, 14}, dst_dims = {1, 32, 14, 14}, weight_dims = {32, 32, 3, 3};
    const Tensor4 src = random_tensor(src_dims, 9, 0, 1), weight = random_tensor(weight_dims, 10, -0.2f, 0.2f);
    const std::vector<float> bias = random_vector(32, 11);
    lowering::ConvSpec spec = lowering::ConvSpec::of(FusedOp{}, memory::desc(dnnl_dims(src_dims), dt::f32, tag::any),
                                                     memory::desc(dnnl_dims(dst_dims), dt::f32, tag::any),
                                                     dnnl_dims(weight_dims), 1, 1);
    const std::vector<float> zeros(static_cast<size_t>(resunet::num_elements(dst_dims)));
    const auto direct_pd = lowering::make_conv(r.eng, spec);
    const std::vector<float> direct = r.run(direct_pd, dnnl::convolution_forward(direct_pd), src.data.data(), dt::f32, src_dims,
                                            weight.data.data(), dt::f32, weight_dims, bias, zeros, dst_dims);
    const auto to_reference = resunet::reference::compare(direct.data(), resunet::reference::conv2d(src, weight, bias, 1, 1));
    EXPECT_LE(to_reference.relative(), 1e-5) << to_reference.to_string();
    for (dnnl::algorithm alg : {dnnl::algorithm::convolution_winograd, dnnl::algorithm::convolution_auto}) {
        spec.algorithm = alg;
        dnnl::convolution_forward::primitive_desc pd;
        try {
            pd = lowering::make_conv(r.eng, spec);
        } catch (const dnnl::error&) {
            continue;  // no kernel for it on this CPU
        }
        const std::vector<float> got =
            r.run(pd, dnnl::convolution_forward(pd), src.data.data(), dt::f32, src_dims, weight.data.data(), dt::f32, weight_dims, bias, zeros, dst_dims);
        const auto stats = resunet::reference::compare(got.data(), direct.data(), static_cast<int64_t>(direct.size()));
        EXPECT_LE(stats.relative(), resunet::kWinogradRelativeBound) << pd.impl_info_str() << ": " << stats.to_string();
    }
}

TEST(Lowering, FusedOpLabel) {
    FusedOp op;
    EXPECT_EQ(lowering::fused_op_label(op, "conv"), "conv");
    op.batch_norm = 3;
    op.residual = 4;
    op.activation = Activation::relu;
    EXPECT_EQ(lowering::fused_op_label(op, "conv"), "conv+bn+add+relu");
    op = FusedOp{};
    op.activation = Activation::sigmoid;
    EXPECT_EQ(lowering::fused_op_label(op, "deconv:conv1x1"), "deconv:conv1x1+sigmoid");
}

// An upload is a reorder: read back to OIHW it gives the weights given; the store counts every byte.
TEST(Lowering, WeightStoreUploadsAndCounts) {
    Runner r;
    const Dims dims = {16, 8, 3, 3};
    const Tensor4 w = random_tensor(dims, 12, -1, 1);
    const memory::desc blocked(dnnl_dims(dims), dt::f32, tag::OIhw8i8o);
    memory up = r.store.upload(r.eng, r.strm, w.data.data(), dt::f32, dnnl_dims(dims), blocked);
    std::vector<float> back(w.data.size());
    memory plain({dnnl_dims(dims), dt::f32, tag::oihw}, r.eng, back.data());
    dnnl::reorder(up, plain).execute(r.strm, up, plain);
    r.strm.wait();
    EXPECT_EQ(back, w.data);
    EXPECT_EQ(r.store.bytes(), blocked.get_size());
    r.store.keep(memory({{4}, dt::f32, tag::x}, r.eng), 48);
    r.store.count(100);
    EXPECT_EQ(r.store.bytes(), blocked.get_size() + 48 + 100);
}

// Buffers alive at the same step never overlap; offsets are 64-byte aligned inside the block.
TEST(Lowering, ArenaSeparatesLiveBuffers) {
    const std::vector<resunet::ArenaRequest> requests = {{1000, 0, 2}, {300, 1, 3}, {5000, 3, 4}, {64, 4, 5}, {700, 0, 0}};
    resunet::ActivationArena arena;
    const std::vector<size_t> offsets = arena.allocate(requests, "test");
    ASSERT_EQ(offsets.size(), requests.size());
    EXPECT_NE(arena.base(), nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(arena.base()) % 64, 0u);
    size_t naive = 0;
    for (size_t i = 0; i < requests.size(); ++i) {
        EXPECT_EQ(offsets[i] % 64, 0u);
        EXPECT_LE(offsets[i] + requests[i].bytes, arena.bytes());
        naive += (requests[i].bytes + 63) / 64 * 64;
        for (size_t j = 0; j < i; ++j) {
            const bool live_together =
                !(requests[i].last_step < requests[j].first_step || requests[j].last_step < requests[i].first_step);
            const bool apart = offsets[i] + requests[i].bytes <= offsets[j] || offsets[j] + requests[j].bytes <= offsets[i];
            if (live_together) {
                EXPECT_TRUE(apart) << i << " and " << j;
            }
        }
    }
    EXPECT_EQ(arena.naive_bytes(), naive);
    EXPECT_LT(arena.bytes(), naive);  // {1000, 700} and {5000} never live together
}

// The schedule runner: `before` then `custom` (or the primitive) per step, in order; with step times, one
// slot per step.
TEST(Lowering, ScheduleRunsStepsInOrderAndTimesEach) {
    struct Probe : lowering::Schedule<lowering::Step> {};
    Probe schedule;
    std::vector<std::string> order;
    lowering::Step a({}, {}, "a", [&] { order.push_back("a"); });
    a.before = [&] { order.push_back("a.before"); };
    schedule.steps.push_back(a);
    schedule.steps.emplace_back(dnnl::primitive(), std::unordered_map<int, memory>{}, "b",
                                [&] { order.push_back("b"); });
    std::vector<double> ms(2, 0.0);
    float in = 0, out = 0;
    schedule.input_dims = {1, 1, 1, 1};
    schedule.output_dims = {1, 1, 1, 1};
    schedule.user_src = memory({{1, 1, 1, 1}, dt::f32, tag::nchw}, schedule.eng, &in);
    schedule.user_dst = memory({{1, 1, 1, 1}, dt::f32, tag::nchw}, schedule.eng, &out);
    schedule.run_batch(&in, 2, &out, 1, &ms, /*dst_stride=*/false);
    EXPECT_EQ(order, (std::vector<std::string>{"a.before", "a", "b", "a.before", "a", "b"}));
    EXPECT_GE(ms[0], 0.0);
    const auto rows = schedule.profile_rows(ms, 2);
    ASSERT_EQ(rows.size(), 2u);
    EXPECT_EQ(rows[1].name, "b");
    EXPECT_EQ(rows[1].precision, "f32");
    schedule.bind_scratchpad();
    EXPECT_EQ(schedule.steps[0].args.count(DNNL_ARG_SCRATCHPAD), 1u);
}

}  // namespace
