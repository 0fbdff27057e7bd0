// The planner's per-layer algorithm choice for an fp32 convolution, shared by the fp32 engine and the int8
// engine's fp32 layers: which candidates a layer has (direct; oneDNN's Winograd where it has a kernel; our
// own Winograd F(4x4,3x3) and F(2x2,3x3) where it applies), and which one runs: asked for, taken from a
// cached plan, or measured on the layer's real shape and weights with each candidate checked against
// direct first (engine/conv_tuning.h: a wrong kernel never wins on speed).
//
// Intended usage (a policy's lower_conv):
//   ConvChoiceRequest request{.spec = spec, .weights = folded.weights.data(), ...};
//   request.own_offered = [&](int tile) { return WinogradOwn::applies(tile, shape); };
//   request.make_own = [&](int tile) { return WinogradOwn::create(eng, strm, tile, shape, w, b); };
//   ConvChoice choice = choose_conv_algorithm(eng, strm, request);
//   if (choice.own) ...run our kernel...; else convolution_forward(choice.pd)
//
// Internal to engine/ and quant/ (oneDNN types).
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "engine/engine.h"
#include "engine/lowering.h"
#include "engine/winograd_own.h"

namespace resunet {

struct ConvChoiceRequest {
    lowering::ConvSpec spec;          // the direct convolution (its algorithm is set per candidate)
    const float* weights = nullptr;   // OIHW, BN folded: spec.weight_dims
    const float* bias = nullptr;      // O values
    bool winograd_shape = false;      // a 3x3 stride-1 convolution not reading the graph input
    // Whether our own Winograd with output tile 4 or 2 applies to the layer (layout, channels, CPU;
    // engine/winograd_own.h), and the kernel with the layer's weights and post-ops. Unset: never offered.
    std::function<bool(int tile)> own_offered;
    std::function<std::shared_ptr<WinogradOwn>(int tile)> make_own;
    ConvAlgorithm algorithm = ConvAlgorithm::tuned;
    Tuning tune = Tuning::fast;
    std::optional<std::string> forced;  // an algorithm from a cached plan: used without measuring
    // Measure and record the preferred candidate (ConvChoice::preferred and the slots), but lower direct:
    // the fp32 engine's memory budget decides afterwards (engine_run.cpp).
    bool measure_only = false;
};

// What measuring a convolution's candidates found, for the fp32 engine's memory budget (engine_run.cpp):
// slot 0 direct, 1 the chosen candidate (else the fastest other one that passed), 2 the leaner runner-up of
// a Winograd choice (fewer weight and scratchpad bytes, still faster than direct).
struct ConvMeasurement {
    bool measured = false;  // slot 1 holds a candidate other than direct that passed its check
    std::string preferred;  // the fastest candidate that passed its check
    std::string fallback;   // slot 2's name, or empty
    double ms[3] = {0, 0, 0};
    size_t weight_bytes[3] = {0, 0, 0};
    size_t scratch[3] = {0, 0, 0};
};

struct ConvChoice {
    dnnl::convolution_forward::primitive_desc pd;  // the oneDNN candidate to run (unless `own`)
    std::shared_ptr<WinogradOwn> own;              // our own kernel to run instead
    std::string algorithm = "direct";              // "direct", "winograd", "winograd_f43", "winograd_f23"
    std::string candidates;                        // ConvTrial::summary, or why nothing was measured
    double ms = -1;                                // the measured time of the candidate it holds; -1: not measured
    ConvMeasurement measurement;
};

// The algorithms of our own Winograd (engine/winograd_own.h).
inline bool is_own_winograd(const std::string& algorithm) {
    return algorithm == "winograd_f43" || algorithm == "winograd_f23";
}

// Chooses the layer's algorithm as the request says; throws dnnl::error only if direct itself has no kernel.
ConvChoice choose_conv_algorithm(const dnnl::engine& eng, dnnl::stream& strm, const ConvChoiceRequest& request);

// A schedule step's pass for our own kernel on fixed src and dst buffers, with the schedule's shared
// scratchpad (read when the pass runs: it is allocated after lowering). Its transformed weights go
// into `weights` (counted); its scratchpad need into `scratchpad_bytes`.
inline std::function<void()> own_winograd_pass(std::shared_ptr<WinogradOwn> own, dnnl::stream& strm, const float* src,
                                               float* dst, const dnnl::memory& scratchpad, lowering::WeightStore& weights,
                                               size_t& scratchpad_bytes) {
    weights.count(own->weight_bytes());
    scratchpad_bytes = std::max(scratchpad_bytes, own->scratch_bytes());
    return [own, &strm, src, dst, &scratchpad] { own->execute(strm, src, dst, scratchpad.get_data_handle()); };
}

}  // namespace resunet
