// Groups graph nodes into the units an engine runs as one primitive: a convolution with its batch
// norm folded and its residual add and activation as post-ops. Backend-agnostic: the fp32 engine and
// the int8 engine lower the same list.
//
// Intended usage:
//   std::vector<resunet::FusedOp> ops = resunet::fuse(graph);
//   for (const resunet::FusedOp& op : ops)  // in execution order
//       if (op.kind == resunet::OpKind::conv && op.batch_norm >= 0) fold(...);
#pragma once

#include <string>
#include <vector>

#include "graph/graph.h"

namespace resunet {

enum class Activation { none, relu, sigmoid };

struct FusedOp {
    OpKind kind = OpKind::conv;  // conv, conv_transpose, max_pool, concat, batch_norm, relu, sigmoid, add
    int node = -1;               // the head node (the conv, the pool, ...)
    int batch_norm = -1;         // batch-norm node folded into the conv, or -1
    int residual = -1;           // value added to the conv's output before the activation, or -1
    Activation activation = Activation::none;
    std::vector<int> srcs;       // input values
    int dst = -1;                // the value this op finally produces
    std::vector<int> covered;    // every graph node this op implements
};

// Fused ops in execution order. Every node except the input is covered exactly once.
std::vector<FusedOp> fuse(const Graph& graph);

}  // namespace resunet

namespace resunet {

// A convolution's weights and bias ready for an engine: OIHW, batch norm folded in.
struct FoldedConv {
    Dims weight_dims;            // {O, I, kh, kw}
    std::vector<float> weights;  // OIHW
    std::vector<float> bias;     // O (zeros when the conv has none)
};

// conv (+ folded BN): w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta.
FoldedConv fold_conv(const Graph& graph, const FusedOp& op, const TensorMap& weights);

// ConvTranspose k=2, s=2 as the equivalent 1x1 convolution to 4*O channels, output channel
// (ky * 2 + kx) * O + o; a pixel shuffle of its output gives the transposed convolution's output.
FoldedConv conv_transpose_as_conv1x1(const Graph& graph, const FusedOp& op, const TensorMap& weights);

// A named tensor of `weights`, or a resunet::Error naming it.
const HostTensor& find_weight(const TensorMap& weights, const std::string& name);

}  // namespace resunet
