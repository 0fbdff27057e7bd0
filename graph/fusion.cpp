#include "graph/fusion.h"

#include <fmt/format.h>

namespace resunet {

namespace {

// The single consumer of `value` if it is of `kind`, else -1. The graph output is never fused away.
int sole_consumer(const Graph& graph, int value, OpKind kind) {
    const Value& v = graph.value(value);
    if (v.consumers.size() != 1 || value == graph.output_value()) return -1;
    const int consumer = v.consumers[0];
    return graph.node(consumer).kind == kind ? consumer : -1;
}

}  // namespace

std::vector<FusedOp> fuse(const Graph& graph) {
    const int num_nodes = static_cast<int>(graph.nodes().size());
    std::vector<int> producer_op(graph.values().size(), -1);  // fused op index that produces each value
    std::vector<bool> covered(static_cast<size_t>(num_nodes), false);
    std::vector<FusedOp> ops;

    auto emit = [&](FusedOp op) {
        for (int n : op.covered) covered[static_cast<size_t>(n)] = true;
        producer_op[static_cast<size_t>(op.dst)] = static_cast<int>(ops.size());
        ops.push_back(std::move(op));
    };
    // A value is available to a new op if it is the graph input or some earlier op produced it.
    auto available = [&](int value) {
        return value == graph.input_value() || producer_op[static_cast<size_t>(value)] >= 0;
    };

    for (int i = 0; i < num_nodes; ++i) {
        const Node& node = graph.node(i);
        if (covered[static_cast<size_t>(i)] || node.kind == OpKind::input) continue;
        FusedOp op;
        op.kind = node.kind;
        op.node = i;
        op.srcs = node.inputs;
        op.covered = {i};
        op.dst = node.output;
        if (node.kind == OpKind::conv || node.kind == OpKind::conv_transpose) {
            if (int bn = sole_consumer(graph, op.dst, OpKind::batch_norm); bn >= 0 && node.kind == OpKind::conv) {
                op.batch_norm = bn;
                op.covered.push_back(bn);
                op.dst = graph.node(bn).output;
            }
            if (int add = sole_consumer(graph, op.dst, OpKind::add); add >= 0 && node.kind == OpKind::conv) {
                const Node& add_node = graph.node(add);
                const int other = add_node.inputs[0] == op.dst ? add_node.inputs[1] : add_node.inputs[0];
                if (other != op.dst && available(other)) {
                    op.residual = other;
                    op.covered.push_back(add);
                    op.dst = add_node.output;
                }
            }
            if (int relu = sole_consumer(graph, op.dst, OpKind::relu); relu >= 0) {
                op.activation = Activation::relu;
                op.covered.push_back(relu);
                op.dst = graph.node(relu).output;
            } else if (int sig = sole_consumer(graph, op.dst, OpKind::sigmoid); sig >= 0) {
                op.activation = Activation::sigmoid;
                op.covered.push_back(sig);
                op.dst = graph.node(sig).output;
            }
        }
        for (int src : op.srcs)
            if (!available(src))
                throw Error(fmt::format("fuse: node '{}' reads '{}' before it is produced", node.name,
                                        graph.value(src).name));
        emit(std::move(op));
    }
    return ops;
}

}  // namespace resunet
