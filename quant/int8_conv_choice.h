// The int8 engine's per-layer algorithm choice for a u8 x s8 3x3 convolution: oneDNN's direct kernel, or our
// own int8 Winograd F(2x2,3x3) (quant/winograd_int8.h), asked for or measured on the layer's real shape and
// weights with the Winograd output checked against direct first (kInt8WinogradBound): a kernel that fails
// its check never wins on speed (the tuner's one protocol: engine/candidate_trial.h).
//
// Intended usage (quant/quant_engine.cpp, lower_conv):
//   Int8ConvChoice choice = choose_int8_conv(eng, strm, direct_pd, layer, shape, options.int8_algorithm, options.tune);
//   if (choice.winograd) ...a custom step running choice.winograd...; else convolution_forward(direct_pd)
//
// Internal to quant/ (oneDNN types).
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <memory>
#include <string>

#include "quant/quant_engine.h"
#include "quant/quant_layers.h"
#include "quant/winograd_int8.h"

namespace resunet::quant_detail {

// How much faster than direct the Winograd must measure to be chosen: each layer it takes costs accuracy
// (its requantization), and timings on a shared 2-core machine move by several percent even as the best of 5
// runs, so a layer only a little faster would flip between starts for no real gain. A larger margin left out
// layers that were consistently faster (figures: docs/design.md, "Tuning constants").
inline constexpr double kInt8WinogradMargin = 0.10;

// Mixed precision (Int8ConvAlgorithm::mixed): how much faster than its u8 x s8 direct kernel a layer's fastest fp32
// candidate must measure for the layer to run fp32. fp32 is never less exact, so the margin only guards against
// timing noise (one-shot timings on a shared 2-core machine move by about 10%) and the fp32 weights' memory.
inline constexpr double kMixedPrecisionMargin = 0.10;

// Whether the measured plan (Int8ConvAlgorithm::tuned) offers our int8 Winograd at all: only where the weights
// have their full kStoredWeightLevels levels (CPUs with VNNI). With 63 (AVX2, AVX-512 without VNNI: vpmaddubsw
// adds two products in int16) its transformed weights keep one bit less, and each layer passing its own check
// was not enough: the per-layer errors of the two cases overlap, and with 63 levels the measured plan took
// nearly every layer and lost the network's fidelity bound, even with a tighter check (figures:
// docs/design.md, "Tuning constants"). `--int8-conv winograd` still runs it there when asked for.
inline bool winograd_int8_measurable(int weight_levels) { return weight_levels >= kStoredWeightLevels; }

// The default plan's rule (Tuning::rule) for a layer where our int8 Winograd applies and the weights keep 127
// levels: whether it runs the Winograd, from the shape alone (never timed, so the same on any thread count,
// load or MPI rank); the reason in `why` either way. docs/plan.md gives the measurements behind it.
bool winograd_int8_rule(const WinogradInt8Shape& shape, std::string* why);
// The rule's threshold: our int8 Winograd where both the input and output channels are at least this.
inline constexpr int64_t kInt8WinogradRuleChannels = 128;

struct Int8ConvChoice {
    std::shared_ptr<WinogradInt8> winograd;  // run instead of the direct primitive; null: direct
    std::string algorithm = "direct";        // "direct" or "winograd_int8_f23"
    std::string candidates;                  // what was tried, with times and the check's error
};

// `direct_pd`: the layer's u8 x s8 direct convolution (padded u8 NHWC src, f32 NHWC dst, the dequantization
// multiplier as binary post-op 0). `shape` is the Winograd's view of the same layer.
Int8ConvChoice choose_int8_conv(const dnnl::engine& eng, dnnl::stream& strm,
                                const dnnl::convolution_forward::primitive_desc& direct_pd, const PreparedLayer& layer,
                                const WinogradInt8Shape& shape, Int8ConvAlgorithm algorithm, Tuning tune);

// The layer's u8 x s8 direct kernel alone (mixed precision's int8 side), timed as choose_int8_conv times it
// (ms per pass).
double time_int8_direct(const dnnl::engine& eng, dnnl::stream& strm, const dnnl::convolution_forward::primitive_desc& direct_pd,
                        const PreparedLayer& layer, const WinogradInt8Shape& shape, Tuning tune);

}  // namespace resunet::quant_detail
