#include "graph/fusion.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

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

namespace resunet {

const HostTensor& find_weight(const TensorMap& weights, const std::string& name) {
    auto it = weights.find(name);
    if (it == weights.end()) throw Error(fmt::format("weights: tensor '{}' is missing", name));
    if (it->second.dtype != DType::f32)
        throw Error(fmt::format("weights: tensor '{}' is {}, expected F32", name, dtype_name(it->second.dtype)));
    return it->second;
}

FoldedConv fold_conv(const Graph& graph, const FusedOp& op, const TensorMap& weights) {
    const Node& node = graph.node(op.node);
    if (node.kind != OpKind::conv) throw Error(fmt::format("fold_conv: '{}' is not a convolution", node.name));
    const int64_t out_channels = node.out_channels;
    const int64_t in_channels = graph.value(node.inputs[0]).dims[1];
    const int64_t k = node.kernel;
    FoldedConv folded;
    folded.weight_dims = {out_channels, in_channels, k, k};
    const HostTensor& w = find_weight(weights, node.name + ".weight");
    folded.weights.assign(w.f32(), w.f32() + w.num_elements());
    folded.bias.assign(static_cast<size_t>(out_channels), 0.0f);
    if (node.bias) {
        const float* b = find_weight(weights, node.name + ".bias").f32();
        std::copy(b, b + out_channels, folded.bias.begin());
    }
    if (op.batch_norm < 0) return folded;
    const Node& bn = graph.node(op.batch_norm);
    const float* gamma = find_weight(weights, bn.name + ".weight").f32();
    const float* beta = find_weight(weights, bn.name + ".bias").f32();
    const float* mean = find_weight(weights, bn.name + ".running_mean").f32();
    const float* var = find_weight(weights, bn.name + ".running_var").f32();
    const int64_t per_oc = in_channels * k * k;
    for (int64_t oc = 0; oc < out_channels; ++oc) {
        if (!(var[oc] >= 0.0f))
            throw Error(fmt::format("weights: '{}.running_var'[{}] = {} is negative or NaN", bn.name, oc, var[oc]));
        const double inv = static_cast<double>(gamma[oc]) / std::sqrt(static_cast<double>(var[oc]) + bn.epsilon);
        float* row = folded.weights.data() + oc * per_oc;
        for (int64_t i = 0; i < per_oc; ++i) row[i] = static_cast<float>(row[i] * inv);
        folded.bias[static_cast<size_t>(oc)] =
            static_cast<float>((folded.bias[static_cast<size_t>(oc)] - mean[oc]) * inv + beta[oc]);
        // Finite statistics can still fold to Inf (a huge gamma over a tiny variance): the engines would then
        // compute NaN activations and a plausible-looking mask, so the folded values are checked here.
        const float bias = folded.bias[static_cast<size_t>(oc)];
        if (!std::isfinite(bias) || !std::all_of(row, row + per_oc, [](float v) { return std::isfinite(v); }))
            throw Error(fmt::format("weights: '{}' with batch norm '{}' folded in overflows at output channel {} "
                                    "(gamma {}, running_var {}); the batch-norm statistics are out of range",
                                    node.name, bn.name, oc, gamma[oc], var[oc]));
    }
    return folded;
}

FoldedConv conv_transpose_as_conv1x1(const Graph& graph, const FusedOp& op, const TensorMap& weights) {
    const Node& node = graph.node(op.node);
    if (node.kind != OpKind::conv_transpose || node.kernel != 2 || node.stride != 2)
        throw Error(fmt::format("'{}' is not a 2x2 stride-2 transposed convolution", node.name));
    const int64_t in_channels = graph.value(node.inputs[0]).dims[1];
    const int64_t out_channels = node.out_channels;
    const float* w = find_weight(weights, node.name + ".weight").f32();  // PyTorch [I, O, 2, 2]
    FoldedConv folded;
    folded.weight_dims = {4 * out_channels, in_channels, 1, 1};
    folded.weights.resize(static_cast<size_t>(4 * out_channels * in_channels));
    folded.bias.assign(static_cast<size_t>(4 * out_channels), 0.0f);
    const float* b = node.bias ? find_weight(weights, node.name + ".bias").f32() : nullptr;
    for (int64_t kk = 0; kk < 4; ++kk)
        for (int64_t o = 0; o < out_channels; ++o) {
            if (b) folded.bias[static_cast<size_t>(kk * out_channels + o)] = b[o];
            for (int64_t i = 0; i < in_channels; ++i)
                folded.weights[static_cast<size_t>((kk * out_channels + o) * in_channels + i)] =
                    w[((i * out_channels + o) * 2 + kk / 2) * 2 + kk % 2];
        }
    return folded;
}

}  // namespace resunet
