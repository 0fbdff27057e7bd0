#include "tests/support/fake_quant.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "graph/fusion.h"

namespace resunet::reference {

Tensor4 fake_quantize(const Tensor4& src, const ActivationQuant& quant) {
    Tensor4 dst = src;
    for (float& v : dst.data) v = dequantize_value(quantize_value(v, quant), quant);
    return dst;
}

Tensor4 pixel_shuffle_2x2(const Tensor4& packed) {
    if (packed.dims.size() != 4 || packed.dims[1] % 4 != 0)
        throw Error(fmt::format("pixel_shuffle_2x2: {} has no 4C channels", dims_to_string(packed.dims)));
    const int64_t channels = packed.dims[1] / 4, height = packed.dims[2], width = packed.dims[3];
    Tensor4 dst = Tensor4::zeros({packed.dims[0], channels, 2 * height, 2 * width});
    for (int64_t n = 0; n < packed.dims[0]; ++n)
        for (int64_t k = 0; k < 4; ++k)
            for (int64_t c = 0; c < channels; ++c)
                for (int64_t y = 0; y < height; ++y)
                    for (int64_t x = 0; x < width; ++x)
                        dst.at(n, c, 2 * y + k / 2, 2 * x + k % 2) = packed.at(n, k * channels + c, y, x);
    return dst;
}

std::vector<float> fake_quantize_weights(const std::vector<float>& weights, int64_t out_channels, int levels) {
    // as the engine: the full-range quantization, narrowed to the CPU's levels
    WeightQuant wq = quantize_weights(weights, out_channels, kStoredWeightLevels);
    narrow_weights(wq, levels);
    const int64_t per_oc = static_cast<int64_t>(weights.size()) / out_channels;
    std::vector<float> dst(weights.size());
    for (size_t i = 0; i < dst.size(); ++i)
        dst[i] = static_cast<float>(wq.q[i]) * wq.scales[i / static_cast<size_t>(per_oc)];
    return dst;
}

namespace {

Tensor4 slice_batch(const Tensor4& t, int64_t first, int64_t count) {
    Dims dims = t.dims;
    dims[0] = count;
    Tensor4 dst = Tensor4::zeros(dims);
    const int64_t per_image = t.dims[1] * t.dims[2] * t.dims[3];
    std::copy_n(t.data.begin() + static_cast<std::ptrdiff_t>(first * per_image), count * per_image, dst.data.begin());
    return dst;
}

}  // namespace

Tensor4 run_fake_quant(const Graph& full_graph, const TensorMap& weights, const Tensor4& input,
                       const FakeQuantOptions& options, std::vector<FakeQuantLayer>* layers,
                       std::map<std::string, Tensor4>* computed) {
    if (options.micro_batch <= 0 || input.dims.size() != 4 || input.dims[0] % options.micro_batch != 0)
        throw Error(fmt::format("run_fake_quant: batch of {} is not a multiple of micro-batch {}",
                                dims_to_string(input.dims), options.micro_batch));
    if (!options.substitute.empty() && input.dims[0] != options.micro_batch)
        throw Error("run_fake_quant: substitute values need one pass (micro_batch == batch)");
    if (computed) computed->clear();
    const Graph graph = full_graph.with_batch(options.micro_batch);
    const std::vector<FusedOp> ops = fuse(graph);
    if (layers) layers->clear();
    Tensor4 result;
    for (int64_t first = 0; first < input.dims[0]; first += options.micro_batch) {
        std::vector<Tensor4> values(graph.values().size());
        std::vector<bool> quantized(graph.values().size(), false);
        std::vector<Tensor4> quantized_values(graph.values().size());
        std::vector<FakeQuantLayer> rows;
        values[static_cast<size_t>(graph.input_value())] = slice_batch(input, first, options.micro_batch);
        for (const FusedOp& op : ops) {
            const Node& node = graph.node(op.node);
            Tensor4 out;
            switch (op.kind) {
                case OpKind::concat: {
                    std::vector<const Tensor4*> srcs;
                    for (int s : op.srcs) srcs.push_back(&values[static_cast<size_t>(s)]);
                    out = concat(srcs);
                    break;
                }
                case OpKind::max_pool: out = max_pool(values[static_cast<size_t>(op.srcs[0])], node.kernel, node.stride); break;
                case OpKind::conv:
                case OpKind::conv_transpose: {
                    const int src_value = op.srcs[0];
                    const Tensor4& src = values[static_cast<size_t>(src_value)];
                    const int64_t in_channels = src.dims[1];
                    FakeQuantLayer row;
                    row.name = node.name;
                    row.int8 = in_channels >= 8 && node.out_channels >= 8 && !options.keep_fp32.count(node.name);
                    const auto [lo, hi] = std::minmax_element(src.data.begin(), src.data.end());
                    row.input_min = *lo;
                    row.input_max = *hi;
                    FoldedConv folded = node.kind == OpKind::conv ? fold_conv(graph, op, weights)
                                                                  : conv_transpose_as_conv1x1(graph, op, weights);
                    const Tensor4* conv_src = &src;
                    if (row.int8) {
                        const std::string& value_name = graph.value(src_value).name;
                        auto it = options.static_quant.find(value_name);
                        row.input = it != options.static_quant.end() ? it->second : choose_activation_quant(*lo, *hi);
                        if (!options.quantize_activations) {
                            quantized_values[static_cast<size_t>(src_value)] = src;
                        } else if (!quantized[static_cast<size_t>(src_value)]) {
                            quantized_values[static_cast<size_t>(src_value)] = fake_quantize(src, row.input);
                            quantized[static_cast<size_t>(src_value)] = true;
                        }
                        conv_src = &quantized_values[static_cast<size_t>(src_value)];
                        if (options.quantize_weights)
                            folded.weights = fake_quantize_weights(folded.weights, folded.weight_dims[0], options.levels);
                    }
                    Tensor4 weight = Tensor4::zeros(folded.weight_dims);
                    weight.data = folded.weights;
                    if (node.kind == OpKind::conv) {
                        out = conv2d(*conv_src, weight, folded.bias, node.stride, node.padding);
                    } else {
                        out = pixel_shuffle_2x2(conv2d(*conv_src, weight, folded.bias, 1, 0));
                    }
                    if (op.residual >= 0) out = add(out, values[static_cast<size_t>(op.residual)]);
                    if (op.activation == Activation::relu) out = relu(out);
                    if (op.activation == Activation::sigmoid) out = sigmoid(out);
                    rows.push_back(row);
                    break;
                }
                default:
                    throw Error(fmt::format("run_fake_quant: standalone {} '{}' is not supported", op_name(op.kind), node.name));
            }
            const std::string& dst_name = graph.value(op.dst).name;
            if (computed) (*computed)[dst_name] = out;
            auto given = options.substitute.find(dst_name);
            if (given != options.substitute.end()) {
                if (given->second.dims != out.dims)
                    throw Error(fmt::format("run_fake_quant: substitute '{}' is {}, expected {}", dst_name,
                                            dims_to_string(given->second.dims), dims_to_string(out.dims)));
                out = given->second;
            }
            values[static_cast<size_t>(op.dst)] = std::move(out);
        }
        const Tensor4& out = values[static_cast<size_t>(graph.output_value())];
        if (first == 0) {
            Dims dims = out.dims;
            dims[0] = input.dims[0];
            result = Tensor4::zeros(dims);
        }
        std::copy(out.data.begin(), out.data.end(),
                  result.data.begin() + static_cast<std::ptrdiff_t>(first / options.micro_batch * out.size()));
        if (layers && first > 0) {
            for (size_t i = 0; i < rows.size(); ++i) {
                rows[i].input_min = std::min(rows[i].input_min, (*layers)[i].input_min);
                rows[i].input_max = std::max(rows[i].input_max, (*layers)[i].input_max);
            }
        }
        if (layers) *layers = std::move(rows);
    }
    return result;
}

double sqnr_db(const float* test, const float* reference, int64_t count) {
    double signal = 0, noise = 0;
    for (int64_t i = 0; i < count; ++i) {
        const double r = reference[i], d = static_cast<double>(test[i]) - r;
        signal += r * r;
        noise += d * d;
    }
    if (noise == 0) return std::numeric_limits<double>::infinity();
    return 10.0 * std::log10(signal / noise);
}

double mask_dice(const float* a, const float* b, int64_t count) {
    int64_t both = 0, in_a = 0, in_b = 0;
    for (int64_t i = 0; i < count; ++i) {
        const bool x = a[i] > 0.0f, y = b[i] > 0.0f;
        both += x && y;
        in_a += x;
        in_b += y;
    }
    return in_a + in_b == 0 ? 1.0 : 2.0 * static_cast<double>(both) / static_cast<double>(in_a + in_b);
}

}  // namespace resunet::reference
