// See model_check.h.
#include "graph/model_check.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <set>
#include <utility>
#include <vector>

#include "graph/fusion.h"
#include "graph/safetensors.h"

namespace resunet {

namespace {

// A tensor name from the file as an error shows it: control bytes escaped, long names cut.
std::string shown(const std::string& name) {
    std::string out;
    for (unsigned char c : name.substr(0, 120)) out += (c < 0x20 || c == 0x7f) ? fmt::format("\\x{:02x}", c) : std::string(1, static_cast<char>(c));
    return name.size() > 120 ? out + "..." : out;
}

bool is_weighted(const FusedOp& op) { return op.kind == OpKind::conv || op.kind == OpKind::conv_transpose; }

// Checks every folded convolution of an fp32 file (fold_conv refuses non-finite results).
void check_folded(const Graph& graph, const TensorMap& tensors) {
    for (const FusedOp& op : fuse(graph))
        if (op.kind == OpKind::conv) (void)fold_conv(graph, op, tensors);
}

class Int8Checker {
  public:
    Int8Checker(const TensorMap& tensors, const std::string& what) : tensors_(tensors), what_(what) {}

    const HostTensor& need(const std::string& name, DType dtype, const Dims& dims) {
        auto it = tensors_.find(name);
        if (it == tensors_.end()) throw Error(fmt::format("{}: int8 model: tensor '{}' is missing", what_, name));
        if (it->second.dtype != dtype || it->second.shape != dims)
            throw Error(fmt::format("{}: int8 model: tensor '{}' is {} {}, expected {} {}", what_, name,
                                    dtype_name(it->second.dtype), dims_to_string(it->second.shape), dtype_name(dtype),
                                    dims_to_string(dims)));
        seen_.insert(name);
        return it->second;
    }
    bool has(const std::string& name) const { return tensors_.count(name) > 0; }

    void layer(const std::string& name, const Dims& weight_dims) {
        const int64_t out_channels = weight_dims[0];
        need(name + ".bias", DType::f32, {out_channels});  // finite: load_safetensors checks every F32 tensor
        const bool quantized = has(name + ".weight_q");
        if (quantized && has(name + ".weight"))
            throw Error(fmt::format("{}: int8 model: layer '{}' has both '.weight' and '.weight_q'; a layer is stored "
                                    "one way",
                                    what_, name));
        if (!quantized) {
            need(name + ".weight", DType::f32, weight_dims);
            return;
        }
        const HostTensor& q = need(name + ".weight_q", DType::s8, weight_dims);
        const HostTensor& s = need(name + ".weight_scale", DType::f32, {out_channels});
        for (int64_t oc = 0; oc < out_channels; ++oc) {
            const float scale = s.f32()[oc];
            if (!(scale > 0.0f && scale <= kMaxInt8Scale))
                throw Error(fmt::format("{}: int8 model: '{}.weight_scale'[{}] = {} is outside (0, {:g}]", what_, name, oc,
                                        scale, kMaxInt8Scale));
        }
        const int8_t* values = q.s8();
        for (int64_t i = 0; i < q.num_elements(); ++i)
            if (values[i] == INT8_MIN)
                throw Error(fmt::format("{}: int8 model: '{}.weight_q' holds -128; stored weights are symmetric, +-127",
                                        what_, name));
    }

    // Static scales: all of `readers` (values int8 layers read) or none.
    void static_scales(const std::vector<std::string>& readers) {
        std::vector<std::string> missing;
        size_t present = 0;
        for (const std::string& value : readers) {
            const bool scale = has(value + ".input_scale"), zero = has(value + ".input_zero_point");
            if (scale != zero)
                throw Error(fmt::format("{}: int8 model: '{}.input_scale' and '{}.input_zero_point' must come together", what_,
                                        value, value));
            if (!scale) {
                missing.push_back(value);
                continue;
            }
            ++present;
            const float s = need(value + ".input_scale", DType::f32, {1}).f32()[0];
            int32_t zero_point = 0;
            std::memcpy(&zero_point, need(value + ".input_zero_point", DType::s32, {1}).bytes.data(), sizeof zero_point);
            if (!(s >= kMinInt8ActivationScale && s <= kMaxInt8Scale))
                throw Error(fmt::format("{}: int8 model: '{}.input_scale' = {} is outside [{:g}, {:g}]", what_, value, s,
                                        kMinInt8ActivationScale, kMaxInt8Scale));
            if (zero_point < 0 || zero_point > 255)
                throw Error(fmt::format("{}: int8 model: '{}.input_zero_point' = {} is outside [0, 255]", what_, value,
                                        zero_point));
        }
        if (present > 0 && !missing.empty())
            throw Error(fmt::format("{}: int8 model: static scales for {} of {} quantized inputs; '{}.input_scale' and "
                                    "'{}.input_zero_point' are missing{} (a file has them for every int8 layer or for none)",
                                    what_, present, readers.size(), missing[0], missing[0],
                                    missing.size() > 1 ? fmt::format(", and {} more", missing.size() - 1) : std::string()));
    }

    void no_others() const {
        for (const auto& [name, tensor] : tensors_)
            if (!seen_.count(name))
                throw Error(fmt::format("{}: int8 model: unexpected tensor '{}' {} (not a tensor of this graph's int8 layout)",
                                        what_, shown(name), dims_to_string(tensor.shape)));
    }

  private:
    const TensorMap& tensors_;
    const std::string& what_;
    std::set<std::string> seen_;
};

void validate_int8(const Graph& graph, const TensorMap& tensors, const std::string& what) {
    Int8Checker check(tensors, what);
    std::vector<std::string> readers;  // values read by int8 layers, each once
    std::set<int> reader_values;
    for (const FusedOp& op : fuse(graph)) {
        if (!is_weighted(op)) continue;
        const Node& node = graph.node(op.node);
        const int64_t in_channels = graph.value(node.inputs[0]).dims[1];
        const Dims weight_dims = op.kind == OpKind::conv_transpose
                                     ? Dims{4 * static_cast<int64_t>(node.out_channels), in_channels, 1, 1}
                                     : Dims{node.out_channels, in_channels, node.kernel, node.kernel};
        check.layer(node.name, weight_dims);
        if (check.has(node.name + ".weight_q") && reader_values.insert(node.inputs[0]).second)
            readers.push_back(graph.value(node.inputs[0]).name);
    }
    check.static_scales(readers);
    check.no_others();
}

}  // namespace

bool has_int8_tensors(const TensorMap& tensors) {
    for (const auto& [name, tensor] : tensors)
        if (name.ends_with(".weight_q")) return true;
    return false;
}

void validate_model_tensors(const Graph& graph, const TensorMap& tensors, const std::string& what) {
    if (has_int8_tensors(tensors)) {
        validate_int8(graph, tensors, what);
        return;
    }
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(tensors, expected, what);
    try {
        check_folded(graph, tensors);
    } catch (const Error& e) {
        throw Error(fmt::format("{}: {}", what, e.what()));
    }
}

}  // namespace resunet
