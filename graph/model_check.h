// The one check every model-file loader runs (fp32, F16/BF16 widened at load, int8 files of `resunet
// quantize`): the tensors must be exactly the weights of the graph they build, in the layout the engines
// read, with values the engines can use. infer_resunet_config() runs it, so every program that reads a
// model file refuses a bad one there, with one line, before any engine is planned.
//
// Intended usage:
//   resunet::SafetensorsFile file = resunet::load_safetensors(path);
//   resunet::ResUNetConfig config = resunet::infer_resunet_config(file.tensors, file.metadata, 224);  // validates
//   resunet::validate_model_tensors(resunet::build_resunet(config), file.tensors, path);                // the same check
//
// fp32 file: exactly graph.parameters(), F32, with their shapes (PyTorch's ".num_batches_tracked" tolerated);
// each convolution's weights and bias after batch-norm folding finite (fold_conv checks the same).
// int8 file (any "*.weight_q"): per convolution "<layer>.bias" F32 [O] and either "<layer>.weight_q" I8 with
// "<layer>.weight_scale" F32 [O], or "<layer>.weight" F32 (a layer kept fp32), never both; batch norm folded
// (a transposed convolution is stored as its 1x1 equivalent, O = 4 * out_channels). Static activation scales
// "<value>.input_scale" F32 [1] with "<value>.input_zero_point" I32 [1] come for every value an int8 layer
// reads, or for none (a partial set would silently run every layer dynamic). No other tensor.
#pragma once

#include <string>

#include "graph/graph.h"

namespace resunet {

// Scales an int8 file may hold: a weight scale or activation scale above this means weights beyond
// 127 * 2^24 or activations beyond 255 * 2^24, which no trained network has; a damaged or forged file does,
// and its outputs would overflow to Inf. Below: zero (weights) or the quantizer's floor 2^-80 (activations).
inline constexpr float kMaxInt8Scale = 0x1p24f;
inline constexpr float kMinInt8ActivationScale = 0x1p-80f;  // quant/quantize.h kMinActivationScale

// Throws resunet::Error naming `what` and the first tensor that does not fit (see the header notes).
void validate_model_tensors(const Graph& graph, const TensorMap& tensors, const std::string& what);

// True if any tensor is named "*.weight_q" (an int8 file).
bool has_int8_tensors(const TensorMap& tensors);

}  // namespace resunet
