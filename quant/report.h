// Per-layer int8 report: how far each int8 layer's output drifts from the fp32 engine's, and why.
//
// Intended usage:
//   std::vector<resunet::LayerQuantReport> rows =
//       resunet::compare_layers(graph, weights, quant_options, images.data(), batch);
//   fmt::print("{}", resunet::format_layer_report(rows));   // Markdown table
#pragma once

#include <string>
#include <vector>

#include "quant/quant_engine.h"

namespace resunet {

struct LayerQuantReport {
    std::string name;            // fused op's output value, e.g. "e2.relu_a"
    std::string layer;           // fused op's head node, e.g. "e2.conv_a"
    std::string precision;       // "u8s8" or "f32"
    float input_scale = 0;       // activation scale of the layer's input (last pass)
    int32_t input_zero_point = 0;
    double sqnr_db = 0;          // 10 log10(sum fp32^2 / sum (int8 - fp32)^2) of the output
    double cosine = 0;           // cosine similarity of int8 and fp32 outputs
    double saturated_share = 0;  // input values clipped at 0 or 255
    double time_ms = 0;          // the layer's time in a profiled int8 run (conv only)
};

// Runs the fp32 and int8 engines on the same images (keeping every activation) and compares each
// convolution's output. Errors accumulate along the network, as they do in real use.
std::vector<LayerQuantReport> compare_layers(const Graph& graph, const TensorMap& weights, QuantOptions options,
                                             const float* images, int batch);
// Same, with the int8 engine built from `int8_weights` (an int8 file, e.g. one with stored static scales).
std::vector<LayerQuantReport> compare_layers(const Graph& graph, const TensorMap& fp32_weights, const TensorMap& int8_weights,
                                             QuantOptions options, const float* images, int batch);

std::string format_layer_report(const std::vector<LayerQuantReport>& rows);

// SQNR in dB and cosine similarity of `test` against `reference`.
double sqnr_db(const std::vector<float>& reference, const std::vector<float>& test);
double cosine_similarity(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace resunet
