// See quant_layers.h; also the int8 model file (quantize_model_weights, is_int8_weights in quant_engine.h).
#include "quant/quant_layers.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "graph/safetensors.h"

namespace resunet {
namespace quant_detail {

const HostTensor& int8_tensor(const TensorMap& tensors, const std::string& name, DType dtype, const Dims& dims) {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Error(fmt::format("int8 weights: tensor '{}' is missing", name));
    if (it->second.dtype != dtype || it->second.shape != dims)
        throw Error(fmt::format("int8 weights: tensor '{}' is {} {}, expected {} {}", name, dtype_name(it->second.dtype),
                                dims_to_string(it->second.shape), dtype_name(dtype), dims_to_string(dims)));
    return it->second;
}

namespace {

FoldedConv fold_any(const Graph& graph, const FusedOp& op, const TensorMap& weights) {
    return graph.node(op.node).kind == OpKind::conv ? fold_conv(graph, op, weights)
                                                    : conv_transpose_as_conv1x1(graph, op, weights);
}

// Reads one layer back from an int8 model file, checking every scale, and fits its weights to `levels`
// (narrow_weights: a full-range file runs on a CPU without VNNI too).
PreparedLayer read_int8_layer(const Graph& graph, const FusedOp& op, const TensorMap& tensors, bool int8, int levels) {
    const Node& node = graph.node(op.node);
    const int64_t in_channels = graph.value(node.inputs[0]).dims[1];
    const bool transposed = node.kind == OpKind::conv_transpose;
    PreparedLayer layer;
    layer.int8 = int8;
    layer.weight_dims = transposed ? Dims{4 * node.out_channels, in_channels, 1, 1}
                                   : Dims{node.out_channels, in_channels, node.kernel, node.kernel};
    const int64_t out_channels = layer.weight_dims[0];
    const HostTensor& bias = int8_tensor(tensors, node.name + ".bias", DType::f32, {out_channels});
    layer.bias.assign(bias.f32(), bias.f32() + out_channels);
    for (float b : layer.bias)
        if (!std::isfinite(b)) throw Error(fmt::format("int8 weights: '{}.bias' holds NaN or Inf", node.name));
    if (!int8) {
        const HostTensor& w = int8_tensor(tensors, node.name + ".weight", DType::f32, layer.weight_dims);
        layer.weights.assign(w.f32(), w.f32() + w.num_elements());
        return layer;
    }
    const HostTensor& q = int8_tensor(tensors, node.name + ".weight_q", DType::s8, layer.weight_dims);
    const HostTensor& s = int8_tensor(tensors, node.name + ".weight_scale", DType::f32, {out_channels});
    layer.quant.q.assign(q.s8(), q.s8() + q.num_elements());
    layer.quant.scales.assign(s.f32(), s.f32() + out_channels);
    const int64_t per_oc = q.num_elements() / out_channels;
    for (int64_t oc = 0; oc < out_channels; ++oc) {
        const float scale = layer.quant.scales[static_cast<size_t>(oc)];
        if (!(scale > 0.0f) || !std::isfinite(scale))
            throw Error(fmt::format("int8 weights: '{}.weight_scale'[{}] = {} (must be positive and finite)", node.name, oc, scale));
        for (int64_t i = 0; i < per_oc; ++i) {
            const int8_t v = layer.quant.q[static_cast<size_t>(oc * per_oc + i)];
            if (v < -kStoredWeightLevels)
                throw Error(fmt::format("int8 weights: '{}.weight_q' has {} outside +-{} (symmetric weights)", node.name,
                                        static_cast<int>(v), kStoredWeightLevels));
        }
    }
    narrow_weights(layer.quant, levels);
    return layer;
}

}  // namespace

bool runs_int8(const Graph& graph, const FusedOp& op, const QuantOptions& options) {
    if (!is_weighted(op)) return false;
    const Node& node = graph.node(op.node);
    if (options.keep_fp32.count(node.name)) return false;
    const int64_t in_channels = graph.value(node.inputs[0]).dims[1];
    return in_channels >= 8 && node.out_channels >= 8;
}

PreparedLayer prepare_layer(const Graph& graph, const FusedOp& op, const TensorMap& weights, bool int8, bool from_int8_file,
                            int levels) {
    if (from_int8_file) return read_int8_layer(graph, op, weights, int8, levels);
    FoldedConv folded = fold_any(graph, op, weights);
    PreparedLayer layer;
    layer.int8 = int8;
    layer.weight_dims = folded.weight_dims;
    layer.bias = std::move(folded.bias);
    if (int8) {
        layer.quant = quantize_weights(folded.weights, layer.weight_dims[0], kStoredWeightLevels);
        narrow_weights(layer.quant, levels);
    } else
        layer.weights = std::move(folded.weights);
    return layer;
}

}  // namespace quant_detail

using quant_detail::PreparedLayer;

bool is_int8_weights(const TensorMap& tensors) {
    return std::any_of(tensors.begin(), tensors.end(), [](const auto& kv) { return kv.first.ends_with(".weight_q"); });
}

TensorMap quantize_model_weights(const Graph& graph, const TensorMap& fp32_weights, const QuantOptions& options) {
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(fp32_weights, expected, "weights");
    TensorMap out;
    for (const FusedOp& op : fuse(graph)) {
        if (!quant_detail::is_weighted(op)) continue;
        const std::string name = graph.node(op.node).name;
        PreparedLayer layer = quant_detail::prepare_layer(graph, op, fp32_weights, quant_detail::runs_int8(graph, op, options), false,
                                                          kStoredWeightLevels);
        const int64_t out_channels = layer.weight_dims[0];
        HostTensor bias = HostTensor::zeros({out_channels});
        std::copy(layer.bias.begin(), layer.bias.end(), bias.f32());
        out[name + ".bias"] = std::move(bias);
        if (layer.int8) {
            HostTensor q = HostTensor::zeros(layer.weight_dims, DType::s8);
            std::copy(layer.quant.q.begin(), layer.quant.q.end(), q.s8());
            HostTensor s = HostTensor::zeros({out_channels});
            std::copy(layer.quant.scales.begin(), layer.quant.scales.end(), s.f32());
            out[name + ".weight_q"] = std::move(q);
            out[name + ".weight_scale"] = std::move(s);
        } else {
            HostTensor w = HostTensor::zeros(layer.weight_dims);
            std::copy(layer.weights.begin(), layer.weights.end(), w.f32());
            out[name + ".weight"] = std::move(w);
        }
    }
    return out;
}

}  // namespace resunet
