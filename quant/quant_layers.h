// The int8 engine's weights, layer by layer: which fused ops run in int8, and each one's weights ready for
// upload, quantized from an fp32 model (BN folded) or read back, checked, from an int8 model file. Shared
// by quant/quant_engine.cpp (the lowering) and quantize_model_weights (the int8 file). Internal to quant/.
#pragma once

#include <string>
#include <vector>

#include "graph/fusion.h"
#include "graph/graph.h"
#include "quant/quant_engine.h"
#include "quant/quantize.h"

namespace resunet::quant_detail {

// One fused op's weights, ready for upload: int8 (quantized) or fp32 (folded).
struct PreparedLayer {
    bool int8 = false;
    Dims weight_dims;            // OIHW
    std::vector<float> weights;  // fp32 layers
    WeightQuant quant;           // int8 layers
    std::vector<float> bias;     // folded, fp32
};

inline bool is_weighted(const FusedOp& op) { return op.kind == OpKind::conv || op.kind == OpKind::conv_transpose; }

// The tensor `name` of an int8 model file, of this type and shape (Error naming it otherwise).
const HostTensor& int8_tensor(const TensorMap& tensors, const std::string& name, DType dtype, const Dims& dims);

// Whether a fused op runs in int8: convolutions with >= 8 input and output channels not kept by name.
bool runs_int8(const Graph& graph, const FusedOp& op, const QuantOptions& options);

// int8 weights are always the full-range (kStoredWeightLevels) quantization narrowed to `levels`, from an
// fp32 model as from a file, so both give the same network on every CPU.
PreparedLayer prepare_layer(const Graph& graph, const FusedOp& op, const TensorMap& weights, bool int8, bool from_int8_file,
                            int levels);

}  // namespace resunet::quant_detail
