#include "tests/support/reference.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace resunet::reference {

namespace {

size_t index_of(int64_t i) { return static_cast<size_t>(i); }

void require_rank4(const Tensor4& t, const char* what) {
    if (t.dims.size() != 4 || t.size() != num_elements(t.dims))
        throw Error(fmt::format("reference {}: expected a 4-D tensor, got {} with {} values", what,
                                dims_to_string(t.dims), t.size()));
}

void require_length(const std::vector<float>& v, int64_t length, const char* what, const char* name) {
    if (static_cast<int64_t>(v.size()) != length)
        throw Error(fmt::format("reference {}: {} has {} values, expected {}", what, name, v.size(), length));
}

const HostTensor& param(const TensorMap& weights, const ParamInfo& info) {
    auto it = weights.find(info.name);
    if (it == weights.end()) throw Error(fmt::format("reference: tensor '{}' is missing", info.name));
    if (it->second.shape != info.dims)
        throw Error(fmt::format("reference: tensor '{}' has shape {}, expected {}", info.name,
                                dims_to_string(it->second.shape), dims_to_string(info.dims)));
    return it->second;
}

const HostTensor& param(const TensorMap& weights, const Node& node, const std::string& suffix) {
    for (const ParamInfo& info : node.params)
        if (info.name == node.name + suffix) return param(weights, info);
    throw Error(fmt::format("reference: node '{}' has no parameter '{}'", node.name, suffix));
}

}  // namespace

Tensor4 Tensor4::zeros(const Dims& dims) {
    if (dims.size() != 4) throw Error(fmt::format("reference: Tensor4 needs 4 dims, got {}", dims_to_string(dims)));
    Tensor4 t;
    t.dims = dims;
    t.data.assign(static_cast<size_t>(num_elements(dims)), 0.0f);
    return t;
}

Tensor4 Tensor4::from_host(const HostTensor& tensor) {
    Tensor4 t = zeros(tensor.shape);
    std::copy_n(tensor.f32(), tensor.num_elements(), t.data.begin());
    return t;
}

std::vector<float> to_vector(const HostTensor& tensor) {
    return std::vector<float>(tensor.f32(), tensor.f32() + tensor.num_elements());
}

Tensor4 conv2d(const Tensor4& src, const Tensor4& weight, const std::vector<float>& bias, int stride, int padding) {
    require_rank4(src, "conv2d src");
    require_rank4(weight, "conv2d weight");
    const int64_t batch = src.dims[0], in_channels = src.dims[1], height = src.dims[2], width = src.dims[3];
    const int64_t out_channels = weight.dims[0], kernel = weight.dims[2];
    if (weight.dims[1] != in_channels || weight.dims[3] != kernel || stride <= 0 || padding < 0)
        throw Error(fmt::format("reference conv2d: src {} does not fit weight {} (stride {}, padding {})",
                                dims_to_string(src.dims), dims_to_string(weight.dims), stride, padding));
    if (!bias.empty()) require_length(bias, out_channels, "conv2d", "bias");
    const int64_t out_h = (height + 2 * padding - kernel) / stride + 1;
    const int64_t out_w = (width + 2 * padding - kernel) / stride + 1;
    Tensor4 dst = Tensor4::zeros({batch, out_channels, out_h, out_w});
    std::vector<double> plane(static_cast<size_t>(out_h * out_w));
    for (int64_t n = 0; n < batch; ++n)
        for (int64_t o = 0; o < out_channels; ++o) {
            std::fill(plane.begin(), plane.end(), bias.empty() ? 0.0 : static_cast<double>(bias[index_of(o)]));
            for (int64_t i = 0; i < in_channels; ++i)
                for (int64_t ky = 0; ky < kernel; ++ky)
                    for (int64_t kx = 0; kx < kernel; ++kx) {
                        const double w = weight.at(o, i, ky, kx);
                        for (int64_t y = 0; y < out_h; ++y) {
                            const int64_t iy = y * stride - padding + ky;
                            if (iy < 0 || iy >= height) continue;
                            for (int64_t x = 0; x < out_w; ++x) {
                                const int64_t ix = x * stride - padding + kx;
                                if (ix < 0 || ix >= width) continue;
                                plane[index_of(y * out_w + x)] += w * static_cast<double>(src.at(n, i, iy, ix));
                            }
                        }
                    }
            for (int64_t p = 0; p < out_h * out_w; ++p) dst.at(n, o, p / out_w, p % out_w) = static_cast<float>(plane[index_of(p)]);
        }
    return dst;
}

Tensor4 conv2d_backward_weights(const Tensor4& src, const Tensor4& diff_dst, int kernel, int stride, int padding,
                                std::vector<float>* diff_bias) {
    require_rank4(src, "conv2d_backward_weights src");
    require_rank4(diff_dst, "conv2d_backward_weights diff_dst");
    const int64_t batch = src.dims[0], in_channels = src.dims[1], height = src.dims[2], width = src.dims[3];
    const int64_t out_channels = diff_dst.dims[1], out_h = diff_dst.dims[2], out_w = diff_dst.dims[3];
    if (diff_dst.dims[0] != batch || out_h != (height + 2 * padding - kernel) / stride + 1 ||
        out_w != (width + 2 * padding - kernel) / stride + 1)
        throw Error(fmt::format("reference conv2d_backward_weights: src {} does not fit diff_dst {}", dims_to_string(src.dims),
                                dims_to_string(diff_dst.dims)));
    Tensor4 grad = Tensor4::zeros({out_channels, in_channels, kernel, kernel});
    for (int64_t o = 0; o < out_channels; ++o)
        for (int64_t i = 0; i < in_channels; ++i)
            for (int64_t ky = 0; ky < kernel; ++ky)
                for (int64_t kx = 0; kx < kernel; ++kx) {
                    double sum = 0;
                    for (int64_t n = 0; n < batch; ++n)
                        for (int64_t y = 0; y < out_h; ++y) {
                            const int64_t iy = y * stride - padding + ky;
                            if (iy < 0 || iy >= height) continue;
                            for (int64_t x = 0; x < out_w; ++x) {
                                const int64_t ix = x * stride - padding + kx;
                                if (ix < 0 || ix >= width) continue;
                                sum += static_cast<double>(diff_dst.at(n, o, y, x)) * static_cast<double>(src.at(n, i, iy, ix));
                            }
                        }
                    grad.at(o, i, ky, kx) = static_cast<float>(sum);
                }
    if (diff_bias) {
        diff_bias->assign(static_cast<size_t>(out_channels), 0.0f);
        for (int64_t o = 0; o < out_channels; ++o) {
            double sum = 0;
            for (int64_t n = 0; n < batch; ++n)
                for (int64_t y = 0; y < out_h; ++y)
                    for (int64_t x = 0; x < out_w; ++x) sum += diff_dst.at(n, o, y, x);
            (*diff_bias)[index_of(o)] = static_cast<float>(sum);
        }
    }
    return grad;
}

Tensor4 conv_transpose2d(const Tensor4& src, const Tensor4& weight, const std::vector<float>& bias, int stride) {
    require_rank4(src, "conv_transpose2d src");
    require_rank4(weight, "conv_transpose2d weight");
    const int64_t batch = src.dims[0], in_channels = src.dims[1], height = src.dims[2], width = src.dims[3];
    const int64_t out_channels = weight.dims[1], kernel = weight.dims[2];
    if (weight.dims[0] != in_channels || weight.dims[3] != kernel || stride <= 0)
        throw Error(fmt::format("reference conv_transpose2d: src {} does not fit weight {} (stride {})",
                                dims_to_string(src.dims), dims_to_string(weight.dims), stride));
    if (!bias.empty()) require_length(bias, out_channels, "conv_transpose2d", "bias");
    const int64_t out_h = (height - 1) * stride + kernel;
    const int64_t out_w = (width - 1) * stride + kernel;
    Tensor4 dst = Tensor4::zeros({batch, out_channels, out_h, out_w});
    std::vector<double> plane(static_cast<size_t>(out_h * out_w));
    for (int64_t n = 0; n < batch; ++n)
        for (int64_t o = 0; o < out_channels; ++o) {
            std::fill(plane.begin(), plane.end(), bias.empty() ? 0.0 : static_cast<double>(bias[index_of(o)]));
            for (int64_t i = 0; i < in_channels; ++i)
                for (int64_t ky = 0; ky < kernel; ++ky)
                    for (int64_t kx = 0; kx < kernel; ++kx) {
                        const double w = weight.at(i, o, ky, kx);
                        for (int64_t y = 0; y < height; ++y)
                            for (int64_t x = 0; x < width; ++x)
                                plane[index_of((y * stride + ky) * out_w + x * stride + kx)] +=
                                    w * static_cast<double>(src.at(n, i, y, x));
                    }
            for (int64_t p = 0; p < out_h * out_w; ++p) dst.at(n, o, p / out_w, p % out_w) = static_cast<float>(plane[index_of(p)]);
        }
    return dst;
}

Tensor4 batch_norm_inference(const Tensor4& src, const std::vector<float>& gamma, const std::vector<float>& beta,
                             const std::vector<float>& mean, const std::vector<float>& var, float epsilon) {
    require_rank4(src, "batch_norm src");
    const int64_t channels = src.dims[1];
    require_length(gamma, channels, "batch_norm", "gamma");
    require_length(beta, channels, "batch_norm", "beta");
    require_length(mean, channels, "batch_norm", "mean");
    require_length(var, channels, "batch_norm", "var");
    Tensor4 dst = Tensor4::zeros(src.dims);
    for (int64_t n = 0; n < src.dims[0]; ++n)
        for (int64_t c = 0; c < channels; ++c) {
            const double scale = static_cast<double>(gamma[index_of(c)]) /
                                 std::sqrt(static_cast<double>(var[index_of(c)]) + static_cast<double>(epsilon));
            for (int64_t h = 0; h < src.dims[2]; ++h)
                for (int64_t w = 0; w < src.dims[3]; ++w)
                    dst.at(n, c, h, w) = static_cast<float>(
                        (static_cast<double>(src.at(n, c, h, w)) - mean[index_of(c)]) * scale + beta[index_of(c)]);
        }
    return dst;
}

Tensor4 relu(const Tensor4& src) {
    require_rank4(src, "relu src");
    Tensor4 dst = src;
    for (float& v : dst.data) v = v > 0.0f ? v : 0.0f;
    return dst;
}

Tensor4 sigmoid(const Tensor4& src) {
    require_rank4(src, "sigmoid src");
    Tensor4 dst = src;
    for (float& v : dst.data) v = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(v))));
    return dst;
}

Tensor4 add(const Tensor4& lhs, const Tensor4& rhs) {
    require_rank4(lhs, "add lhs");
    require_rank4(rhs, "add rhs");
    if (lhs.dims != rhs.dims)
        throw Error(fmt::format("reference add: shapes {} and {} differ", dims_to_string(lhs.dims), dims_to_string(rhs.dims)));
    Tensor4 dst = lhs;
    for (size_t i = 0; i < dst.data.size(); ++i)
        dst.data[i] = static_cast<float>(static_cast<double>(lhs.data[i]) + static_cast<double>(rhs.data[i]));
    return dst;
}

Tensor4 max_pool(const Tensor4& src, int kernel, int stride) {
    require_rank4(src, "max_pool src");
    if (kernel <= 0 || stride <= 0 || src.dims[2] < kernel || src.dims[3] < kernel)
        throw Error(fmt::format("reference max_pool: kernel {} stride {} on {}", kernel, stride, dims_to_string(src.dims)));
    const int64_t out_h = (src.dims[2] - kernel) / stride + 1;
    const int64_t out_w = (src.dims[3] - kernel) / stride + 1;
    Tensor4 dst = Tensor4::zeros({src.dims[0], src.dims[1], out_h, out_w});
    for (int64_t n = 0; n < src.dims[0]; ++n)
        for (int64_t c = 0; c < src.dims[1]; ++c)
            for (int64_t y = 0; y < out_h; ++y)
                for (int64_t x = 0; x < out_w; ++x) {
                    float best = -std::numeric_limits<float>::infinity();
                    for (int64_t ky = 0; ky < kernel; ++ky)
                        for (int64_t kx = 0; kx < kernel; ++kx)
                            best = std::max(best, src.at(n, c, y * stride + ky, x * stride + kx));
                    dst.at(n, c, y, x) = best;
                }
    return dst;
}

Tensor4 concat(const std::vector<const Tensor4*>& srcs) {
    if (srcs.empty()) throw Error("reference concat: no inputs");
    Dims dims = srcs[0]->dims;
    dims[1] = 0;
    for (const Tensor4* s : srcs) {
        require_rank4(*s, "concat src");
        if (s->dims[0] != dims[0] || s->dims[2] != dims[2] || s->dims[3] != dims[3])
            throw Error(fmt::format("reference concat: {} does not fit {}", dims_to_string(s->dims), dims_to_string(dims)));
        dims[1] += s->dims[1];
    }
    Tensor4 dst = Tensor4::zeros(dims);
    const int64_t plane = dims[2] * dims[3];
    for (int64_t n = 0; n < dims[0]; ++n) {
        int64_t channel = 0;
        for (const Tensor4* s : srcs) {
            const auto from = s->data.begin() + static_cast<std::ptrdiff_t>(n * s->dims[1] * plane);
            std::copy(from, from + static_cast<std::ptrdiff_t>(s->dims[1] * plane),
                      dst.data.begin() + static_cast<std::ptrdiff_t>((n * dims[1] + channel) * plane));
            channel += s->dims[1];
        }
    }
    return dst;
}

Tensor4 run_graph(const Graph& graph, const TensorMap& weights, const Tensor4& input) {
    require_rank4(input, "run_graph input");
    if (graph.input_value() < 0 || graph.output_value() < 0) throw Error("reference: graph has no input or no output");
    const Dims& expected = graph.value(graph.input_value()).dims;
    if (input.dims[1] != expected[1] || input.dims[2] != expected[2] || input.dims[3] != expected[3])
        throw Error(fmt::format("reference: input {} does not match the graph's {}", dims_to_string(input.dims),
                                dims_to_string(expected)));
    std::vector<Tensor4> values(graph.values().size());
    auto value = [&](int index) -> const Tensor4& {
        const Tensor4& v = values.at(static_cast<size_t>(index));
        if (v.dims.empty()) throw Error(fmt::format("reference: value {} read before it is computed", index));
        return v;
    };
    for (const Node& node : graph.nodes()) {
        Tensor4 out;
        switch (node.kind) {
            case OpKind::input: out = input; break;
            case OpKind::conv: {
                const std::vector<float> bias = node.bias ? to_vector(param(weights, node, ".bias")) : std::vector<float>{};
                out = conv2d(value(node.inputs[0]), Tensor4::from_host(param(weights, node, ".weight")), bias, node.stride,
                             node.padding);
                break;
            }
            case OpKind::conv_transpose: {
                const std::vector<float> bias = node.bias ? to_vector(param(weights, node, ".bias")) : std::vector<float>{};
                out = conv_transpose2d(value(node.inputs[0]), Tensor4::from_host(param(weights, node, ".weight")), bias,
                                       node.stride);
                break;
            }
            case OpKind::batch_norm:
                out = batch_norm_inference(value(node.inputs[0]), to_vector(param(weights, node, ".weight")),
                                           to_vector(param(weights, node, ".bias")),
                                           to_vector(param(weights, node, ".running_mean")),
                                           to_vector(param(weights, node, ".running_var")), node.epsilon);
                break;
            case OpKind::relu: out = relu(value(node.inputs[0])); break;
            case OpKind::sigmoid: out = sigmoid(value(node.inputs[0])); break;
            case OpKind::add: out = add(value(node.inputs[0]), value(node.inputs[1])); break;
            case OpKind::max_pool: out = max_pool(value(node.inputs[0]), node.kernel, node.stride); break;
            case OpKind::concat: {
                std::vector<const Tensor4*> srcs;
                for (int in : node.inputs) srcs.push_back(&value(in));
                out = concat(srcs);
                break;
            }
        }
        const Dims& shape = graph.value(node.output).dims;
        if (out.dims[1] != shape[1] || out.dims[2] != shape[2] || out.dims[3] != shape[3])
            throw Error(fmt::format("reference: node '{}' produced {}, the graph says {}", node.name,
                                    dims_to_string(out.dims), dims_to_string(shape)));
        values[static_cast<size_t>(node.output)] = std::move(out);
    }
    return value(graph.output_value());
}

double ErrorStats::relative() const {
    if (max_abs_error == 0) return 0;
    return max_abs_expected > 0 ? max_abs_error / max_abs_expected : std::numeric_limits<double>::infinity();
}

std::string ErrorStats::to_string() const {
    return fmt::format("max_abs_err {:.3g} / max_abs_ref {:.4g} = rel {:.3g} at index {} of {}", max_abs_error,
                       max_abs_expected, relative(), worst_index, count);
}

ErrorStats compare(const float* actual, const float* expected, int64_t count) {
    ErrorStats stats;
    stats.count = count;
    for (int64_t i = 0; i < count; ++i) {
        const double e = expected[i];
        const double a = actual[i];
        const double error = std::isfinite(a) ? std::abs(a - e) : std::numeric_limits<double>::infinity();
        stats.max_abs_expected = std::max(stats.max_abs_expected, std::abs(e));
        if (error > stats.max_abs_error || stats.worst_index < 0) {
            stats.max_abs_error = std::max(stats.max_abs_error, error);
            stats.worst_index = i;
        }
    }
    return stats;
}

ErrorStats compare(const float* actual, const Tensor4& expected) {
    return compare(actual, expected.data.data(), expected.size());
}

}  // namespace resunet::reference
