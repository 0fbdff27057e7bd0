// Groups graph nodes into the units an engine runs as one primitive: a convolution with its batch
// norm folded and its residual add and activation as post-ops. Backend-agnostic: the fp32 engine and
// the int8 engine lower the same list.
//
// Intended usage:
//   std::vector<resunet::FusedOp> ops = resunet::fuse(graph);
//   for (const resunet::FusedOp& op : ops)  // in execution order
//       if (op.kind == resunet::OpKind::conv && op.batch_norm >= 0) fold(...);
#pragma once

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
