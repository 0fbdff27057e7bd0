// A fake-quant reference of the int8 engine (quant/quant_engine.h): the same arithmetic in plain fp32 /
// double NCHW loops. Each int8 convolution's input is quantized to u8 with the scale and zero point
// the engine would choose (from the min and max of the whole micro-batch's tensor, or a given static
// scale), dequantized (x_hat = (q - z) * s), and convolved in double with the dequantized s8 weights
// (q * s_w[oc], BN folded) plus the folded fp32 bias. Nothing is fused or rounded to integers beyond
// those two quantizations, so the int8 engine must agree up to float rounding.
//
// Intended usage:
//   resunet::reference::FakeQuantOptions options;           // dynamic, micro-batch 1, this CPU's levels
//   resunet::reference::Tensor4 expected = resunet::reference::run_fake_quant(graph, weights, image, options);
//   engine.run(image.data.data(), 2, actual.data());         // a QuantEngine with the same options
//   EXPECT_LE(resunet::reference::compare(actual.data(), expected).relative(), 1e-5);
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "graph/graph.h"
#include "quant/quantize.h"
#include "tests/support/reference.h"

namespace resunet::reference {

struct FakeQuantOptions {
    int micro_batch = 1;               // images per pass; dynamic ranges cover one pass
    int levels = 63;                   // |q| bound of the weights (QuantEngine::weight_levels())
    std::set<std::string> keep_fp32;   // head node names kept in fp32, as QuantOptions::keep_fp32
    bool quantize_activations = true;  // false: int8 layers read their fp32 input (ablation)
    bool quantize_weights = true;      // false: int8 layers use fp32 folded weights (ablation)
    // Static input quantization by the name of the quantized value (e.g. "e1.relu_a"); a value not
    // listed gets a dynamic scale.
    std::map<std::string, ActivationQuant> static_quant;
    // Values (by name, NCHW, the whole batch) that replace what this reference computes for them before
    // later ops read them, e.g. the engine's own intermediate values from QuantEngine::read_value(), so
    // that each op is checked on exactly the inputs the engine saw. Needs micro_batch == batch.
    std::map<std::string, Tensor4> substitute;
};

// One weighted fused op as last evaluated.
struct FakeQuantLayer {
    std::string name;        // head node, e.g. "e2.conv_a"
    bool int8 = false;       // same rule as the engine: >= 8 input and output channels, not kept
    ActivationQuant input;   // quantization of its input in the last pass (int8 layers)
    float input_min = 0;     // range of its input over all passes (what calibrate() records)
    float input_max = 0;
};

// dequantize(quantize(x)) elementwise.
Tensor4 fake_quantize(const Tensor4& src, const ActivationQuant& quant);

// {N, 4C, H, W} in the 1x1-convolution form of a 2x2 stride-2 transposed convolution (channel
// (ky * 2 + kx) * C + c) to {N, C, 2H, 2W}.
Tensor4 pixel_shuffle_2x2(const Tensor4& packed);

// Quantizes and dequantizes per-output-channel weights (OIHW) with quantize_weights().
std::vector<float> fake_quantize_weights(const std::vector<float>& weights, int64_t out_channels, int levels);

// Evaluates the fused graph as the int8 engine would. `layers`, if given, receives one row per weighted
// fused op (last pass); `computed`, if given, every fused op's output by value name as computed here
// (before any substitution; last pass). Throws resunet::Error for a standalone op the int8 engine does
// not support.
Tensor4 run_fake_quant(const Graph& graph, const TensorMap& weights, const Tensor4& input, const FakeQuantOptions& options,
                       std::vector<FakeQuantLayer>* layers = nullptr, std::map<std::string, Tensor4>* computed = nullptr);

// 10 log10(sum reference^2 / sum (test - reference)^2); +inf when equal.
double sqnr_db(const float* test, const float* reference, int64_t count);

// Dice of the masks (value > 0) of two tensors; 1 when both masks are empty.
double mask_dice(const float* a, const float* b, int64_t count);

}  // namespace resunet::reference
