// The planner's shared lowering: how one fused op becomes a oneDNN primitive with its arguments and its
// memory, whatever the precision (f32, or u8 x s8 with a per-channel dequantization) or the direction
// (inference, or the trainer's forward). The three lowerings are policies over it:
//   engine/engine.cpp          fp32 inference: layout, in-place storage, each convolution's measured algorithm;
//   quant/quant_engine.cpp     int8 inference: which layers run int8, the quantize and gather passes, scales;
//   train/trainer_lowering.cpp forward (and backward) for training.
// They decide *what* runs; this file makes the primitive (make_conv, make_deconv), uploads its weights
// once (WeightStore), names it (fused_op_label), holds it in the schedule (Step) and runs the schedule
// (run_schedule). The activation arena is engine/arena.h.
//
// Intended usage (one fused convolution, fp32):
//   lowering::ConvSpec spec = lowering::ConvSpec::of(op, src_desc, dst_desc, weight_dims, stride, padding);
//   auto pd = lowering::make_conv(eng, spec);                    // dnnl::error when oneDNN has no kernel
//   memory w = store.upload(eng, strm, oihw.data(), dt::f32, weight_dims, pd.weights_desc());
//   steps.push_back(lowering::Step{convolution_forward(pd), {{DNNL_ARG_SRC, src}, ...}, name});
//   lowering::run_schedule(steps, strm, nullptr);
//
// Internal to engine/, quant/ and train/ (oneDNN types): public headers speak in our own types.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "graph/fusion.h"

namespace resunet::lowering {

// One step of a compiled schedule: a oneDNN primitive with its argument map, or a pass of our own.
struct Step {
    Step() = default;
    Step(dnnl::primitive p, std::unordered_map<int, dnnl::memory> a, std::string n, std::function<void()> c = nullptr)
        : prim(std::move(p)), args(std::move(a)), name(std::move(n)), custom(std::move(c)) {}

    dnnl::primitive prim;
    std::unordered_map<int, dnnl::memory> args;
    std::string name;              // graph node (or node + ".what") the step belongs to
    std::function<void()> custom;  // our own pass (quantize, gather, our Winograd), run instead of `prim`
    std::function<void()> before;  // per-pass preparation run first (int8: this batch's scales)
    std::string op;                // what it computes: "conv+bn+relu", "reorder", "quantize", ...
    std::string kernel;            // oneDNN's implementation name, or ours
    std::string precision;         // "f32", "u8s8"; empty where it does not apply
    // Convolutions: "direct", "winograd" (oneDNN's), "winograd_f43" or "winograd_f23" (ours).
    std::string algorithm;
    std::string candidates;        // what tuning tried, with times (ConvTrial::summary)
    double macs = 0;               // per pass
    size_t scratch_bytes = 0;      // its scratchpad

    void execute(dnnl::stream& strm) {
        if (before) before();
        if (custom)
            custom();
        else
            prim.execute(strm, args);
    }
};

// Runs a schedule once. With `step_ms` (one slot per step), waits after each step and adds its time.
// Our own passes read what primitives wrote without a wait: a CPU stream runs in order, synchronously.
template <class AnyStep>
void run_schedule(std::vector<AnyStep>& steps, dnnl::stream& strm, std::vector<double>* step_ms) {
    for (size_t i = 0; i < steps.size(); ++i) {
        if (!step_ms) {
            steps[i].execute(strm);
            continue;
        }
        const auto start = std::chrono::steady_clock::now();
        steps[i].execute(strm);
        strm.wait();
        (*step_ms)[i] += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    }
    strm.wait();
}

enum class Precision {
    f32,   // f32 src, weights and dst
    u8s8,  // u8 src, s8 weights, f32 dst: the int32 sum times a per-channel multiplier (the first post-op)
};

// Everything that decides a convolution primitive, before oneDNN is asked for one.
struct ConvSpec {
    Precision precision = Precision::f32;
    dnnl::prop_kind prop = dnnl::prop_kind::forward_inference;
    dnnl::algorithm algorithm = dnnl::algorithm::convolution_direct;
    dnnl::memory::desc src, dst;    // the layouts the policy chose (format_tag::any lets oneDNN choose)
    dnnl::memory::dims weight_dims; // {O, I, kh, kw}
    bool bias = true;
    dnnl::memory::dims strides = {1, 1};
    dnnl::memory::dims padding_l = {0, 0}, padding_r = {0, 0};
    // Post-ops, in oneDNN's order: the u8s8 dequantization multiplier (DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) |
    // DNNL_ARG_SRC_1, {1, O, 1, 1} f32), a residual sum into dst, then the activation.
    bool sum = false;
    Activation activation = Activation::none;

    // A fused op's post-ops (residual sum, activation) with the policy's layouts and geometry.
    static ConvSpec of(const FusedOp& op, const dnnl::memory::desc& src, const dnnl::memory::desc& dst,
                       const dnnl::memory::dims& weight_dims, int64_t stride, int64_t padding);
    dnnl::memory::desc weights_any() const;
    dnnl::memory::desc bias_desc() const;  // {O} f32, or an empty desc without a bias
    bool dequantizes() const { return precision == Precision::u8s8; }
};

// The attribute of a spec: user scratchpad and its post-ops.
dnnl::primitive_attr conv_attr(const ConvSpec& spec);

// The convolution primitive descriptor of a spec; a dnnl::error when oneDNN has no kernel for it (for
// example convolution_winograd on AVX2 in oneDNN 2.6).
dnnl::convolution_forward::primitive_desc make_conv(const dnnl::engine& eng, const ConvSpec& spec);

// The transposed convolution as oneDNN's deconvolution (spec.weight_dims {O, I, kh, kw}; precision f32).
dnnl::deconvolution_forward::primitive_desc make_deconv(const dnnl::engine& eng, const ConvSpec& spec);

// "conv+bn+add+relu": a fused op's label in profiles, reports and plans, after `base` ("conv", "deconv",
// "deconv:conv1x1").
std::string fused_op_label(const FusedOp& op, const std::string& base);

// Weights reordered once into the layout a primitive asked for, kept alive for the steps' argument maps,
// and counted (the engines' weight bytes).
class WeightStore {
  public:
    // `data` holds `dims` in plain OIHW (f32 or s8 as `type` says); the result is in `layout`.
    dnnl::memory upload(const dnnl::engine& eng, dnnl::stream& strm, const void* data, dnnl::memory::data_type type,
                        const dnnl::memory::dims& dims, const dnnl::memory::desc& layout);
    // A {count} f32 copy of `data`: a bias, or batch-norm parameters.
    dnnl::memory floats(const dnnl::engine& eng, const float* data, int64_t count);
    // A memory the store keeps and counts (`bytes`, or its own size when 0): multipliers, per-pass tables.
    dnnl::memory keep(dnnl::memory m, size_t bytes = 0);
    void count(size_t bytes) { bytes_ += bytes; }  // bytes held elsewhere (our own Winograd's U)
    size_t bytes() const { return bytes_; }

  private:
    std::vector<dnnl::memory> kept_;
    size_t bytes_ = 0;
};

}  // namespace resunet::lowering
