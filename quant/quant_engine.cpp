#include "quant/quant_engine.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <oneapi/dnnl/dnnl.hpp>
#include <unordered_map>

#include "engine/arena.h"
#include "engine/onednn_util.h"
#include "engine/run_guards.h"
#include "graph/fusion.h"
#include "graph/safetensors.h"
#include "quant/quantize_kernels.h"

namespace resunet {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

using Clock = std::chrono::steady_clock;

// One fused op's weights, ready for upload: int8 (quantized) or fp32 (folded).
struct PreparedLayer {
    bool int8 = false;
    Dims weight_dims;            // OIHW
    std::vector<float> weights;  // fp32 layers
    WeightQuant quant;           // int8 layers
    std::vector<float> bias;     // folded, fp32
};

bool is_weighted(const FusedOp& op) { return op.kind == OpKind::conv || op.kind == OpKind::conv_transpose; }

// Whether a fused op runs in int8: convolutions with >= 8 input and output channels not kept by name.
bool runs_int8(const Graph& graph, const FusedOp& op, const QuantOptions& options) {
    if (!is_weighted(op)) return false;
    const Node& node = graph.node(op.node);
    if (options.keep_fp32.count(node.name)) return false;
    const int64_t in_channels = graph.value(node.inputs[0]).dims[1];
    return in_channels >= 8 && node.out_channels >= 8;
}

FoldedConv fold_any(const Graph& graph, const FusedOp& op, const TensorMap& weights) {
    return graph.node(op.node).kind == OpKind::conv ? fold_conv(graph, op, weights)
                                                    : conv_transpose_as_conv1x1(graph, op, weights);
}

const HostTensor& int8_tensor(const TensorMap& tensors, const std::string& name, DType dtype, const Dims& dims) {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw Error(fmt::format("int8 weights: tensor '{}' is missing", name));
    if (it->second.dtype != dtype || it->second.shape != dims)
        throw Error(fmt::format("int8 weights: tensor '{}' is {} {}, expected {} {}", name, dtype_name(it->second.dtype),
                                dims_to_string(it->second.shape), dtype_name(dtype), dims_to_string(dims)));
    return it->second;
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

// int8 weights are always the full-range (kStoredWeightLevels) quantization narrowed to `levels`, from an
// fp32 model as from a file, so both give the same network on every CPU.
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

// A buffer in the arena.
struct Buffer {
    size_t bytes = 0;
    int first_step = INT_MAX;
    int last_step = -1;
    size_t offset = 0;
};

enum class StepKind { input_reorder, quantize, gather, conv, residual_copy, pool, output_reorder };

// A step of the schedule before any oneDNN object exists: what it reads and writes.
struct PlannedStep {
    StepKind kind;
    int op = -1;     // fused op index (conv, pool, residual_copy)
    int value = -1;  // value quantized or gathered
    std::vector<int> reads;
    std::vector<int> writes;
};

struct Step {
    std::function<void()> before;  // per-pass preparation (scales into bias and multiplier)
    std::function<void()> custom;  // a pass of our own (quantize, gather) instead of a primitive
    primitive prim;
    std::unordered_map<int, memory> args;
    std::string name;
    std::string op;
    std::string kernel;
    std::string precision;
    double macs = 0;
};

// The values one quantize pass covers, and the u8 buffers (one per padding) it writes.
struct QuantGroup {
    int value = -1;
    std::vector<std::pair<int, int>> outputs;  // (padding, buffer)
    ActivationQuant current;
    float calibrated_min = INFINITY;
    float calibrated_max = -INFINITY;
    bool have_static = false;
    ActivationQuant static_quant;
    int64_t saturated = 0;
    int64_t counted = 0;
};

}  // namespace

struct QuantEngine::Impl {
    dnnl::engine eng{dnnl::engine::kind::cpu, 0};
    stream strm{eng};
    QuantOptions options;
    Graph graph;
    std::vector<FusedOp> ops;
    std::vector<bool> int8_op;
    int levels = 63;

    // Per value: its raw buffer (fp32 NHWC, or the packed 1x1 output of a transposed conv), whether it
    // is packed, whether it is a concat that exists only inside quantize/gather passes, and a buffer
    // with its plain fp32 NHWC form when one is needed.
    std::vector<int> raw_buffer;
    std::vector<bool> packed;
    std::vector<bool> virtual_concat;
    std::vector<int> fp32_buffer;
    std::vector<int> group_of;  // value -> quant group
    std::vector<QuantGroup> groups;
    std::vector<Buffer> buffers;
    std::vector<PlannedStep> plan;
    std::vector<bool> copy_residual;

    std::unique_ptr<char, decltype(&std::free)> arena{nullptr, &std::free};
    size_t arena_bytes = 0;
    size_t arena_naive_bytes = 0;
    memory scratchpad;
    size_t scratchpad_bytes = 0;
    size_t weights_bytes = 0;
    std::vector<memory> weight_memories;
    std::vector<std::vector<float>> host_vectors;  // per-layer scale/bias sources kept for `before`

    std::vector<Step> steps;
    std::vector<float> input_nhwc_dummy;
    memory user_src;
    memory user_dst;
    Dims input_dims;
    Dims output_dims;
    double compile_ms = 0;
    bool calibrating = false;
    std::atomic<bool> running{false};  // a run()/profile()/calibrate() is in progress (checked without NDEBUG)

    const Dims& dims(int value) const { return graph.value(value).dims; }
    char* ptr(int buffer) const { return arena.get() + buffers[static_cast<size_t>(buffer)].offset; }
    int new_buffer(size_t bytes) {
        buffers.push_back(Buffer{bytes, INT_MAX, -1, 0});
        return static_cast<int>(buffers.size()) - 1;
    }
    size_t f32_bytes(const Dims& d) const { return static_cast<size_t>(num_elements(d)) * sizeof(float); }

    void plan_values(const TensorMap& weights_for_checks);
    int ensure_fp32(int value);
    int ensure_group(int value);
    void collect_sources(int value, int64_t channel_offset, std::vector<KernelSource>& out) const;
    void allocate();
    void lower(const TensorMap& weights, bool from_int8_file);
    void lower_conv(const PlannedStep& planned, const PreparedLayer& layer);
    void run_pass(const float* src, float* dst, std::vector<double>* step_ms);
    memory f32_memory(int buffer, const Dims& d, tag layout) {
        return memory({to_dnnl_dims(d), dt::f32, layout}, eng, ptr(buffer));
    }
};

// Decides each value's form and emits the schedule: quantize passes go right before the first int8
// reader, gathers (fp32 concat or unshuffled transposed-conv output) before the first fp32 reader.
void QuantEngine::Impl::plan_values(const TensorMap&) {
    const size_t num_values = graph.values().size();
    raw_buffer.assign(num_values, -1);
    packed.assign(num_values, false);
    virtual_concat.assign(num_values, false);
    fp32_buffer.assign(num_values, -1);
    group_of.assign(num_values, -1);
    copy_residual.assign(ops.size(), false);
    const int input = graph.input_value();
    raw_buffer[static_cast<size_t>(input)] = new_buffer(f32_bytes(dims(input)));
    fp32_buffer[static_cast<size_t>(input)] = raw_buffer[static_cast<size_t>(input)];
    plan.push_back({StepKind::input_reorder, -1, input, {}, {raw_buffer[static_cast<size_t>(input)]}});

    for (size_t k = 0; k < ops.size(); ++k) {
        const FusedOp& op = ops[k];
        const Node& node = graph.node(op.node);
        PlannedStep step{StepKind::conv, static_cast<int>(k), op.dst, {}, {}};
        switch (op.kind) {
            case OpKind::concat:
                virtual_concat[static_cast<size_t>(op.dst)] = true;
                continue;
            case OpKind::conv:
            case OpKind::conv_transpose: {
                const int src = op.srcs[0];
                if (int8_op[k]) {
                    const int group = ensure_group(src);
                    const int padding = node.kind == OpKind::conv ? node.padding : 0;
                    QuantGroup& g = groups[static_cast<size_t>(group)];
                    auto it = std::find_if(g.outputs.begin(), g.outputs.end(), [&](auto& o) { return o.first == padding; });
                    if (it == g.outputs.end())
                        throw Error(fmt::format("int8 engine: internal: no padding {} buffer for '{}'", padding, node.name));
                    step.reads.push_back(it->second);
                } else {
                    step.reads.push_back(ensure_fp32(src));
                }
                if (op.kind == OpKind::conv_transpose) {
                    if (node.kernel != 2 || node.stride != 2 || op.activation != Activation::none)
                        throw Error(fmt::format("int8 engine: '{}': only 2x2 stride-2 transposed convolutions without "
                                                "activation are supported", node.name));
                    const Dims& in = dims(src);
                    packed[static_cast<size_t>(op.dst)] = true;
                    raw_buffer[static_cast<size_t>(op.dst)] =
                        new_buffer(f32_bytes({in[0], 4 * node.out_channels, in[2], in[3]}));
                } else if (op.residual >= 0) {
                    const int r = op.residual;
                    const bool in_place = r != input && r != graph.output_value() && !packed[static_cast<size_t>(r)] &&
                                          !virtual_concat[static_cast<size_t>(r)] && graph.value(r).consumers.size() == 1 &&
                                          !options.keep_values;  // keep_values must keep the operand readable
                    if (in_place) {
                        raw_buffer[static_cast<size_t>(op.dst)] = raw_buffer[static_cast<size_t>(r)];
                        step.reads.push_back(raw_buffer[static_cast<size_t>(r)]);
                    } else {
                        copy_residual[k] = true;
                        raw_buffer[static_cast<size_t>(op.dst)] = new_buffer(f32_bytes(dims(op.dst)));
                        const int from = ensure_fp32(r);
                        plan.push_back({StepKind::residual_copy, static_cast<int>(k), r, {from}, {raw_buffer[static_cast<size_t>(op.dst)]}});
                    }
                } else {
                    raw_buffer[static_cast<size_t>(op.dst)] = new_buffer(f32_bytes(dims(op.dst)));
                }
                if (!packed[static_cast<size_t>(op.dst)]) fp32_buffer[static_cast<size_t>(op.dst)] = raw_buffer[static_cast<size_t>(op.dst)];
                step.writes.push_back(raw_buffer[static_cast<size_t>(op.dst)]);
                plan.push_back(step);
                break;
            }
            case OpKind::max_pool: {
                const int from = ensure_fp32(op.srcs[0]);
                raw_buffer[static_cast<size_t>(op.dst)] = fp32_buffer[static_cast<size_t>(op.dst)] = new_buffer(f32_bytes(dims(op.dst)));
                plan.push_back({StepKind::pool, static_cast<int>(k), op.dst, {from}, {raw_buffer[static_cast<size_t>(op.dst)]}});
                break;
            }
            default:
                throw Error(fmt::format("int8 engine: standalone {} '{}' is not supported (it fuses into a convolution "
                                        "in ResUNet); run this graph with the fp32 engine",
                                        op_name(op.kind), node.name));
        }
    }
    const int out = ensure_fp32(graph.output_value());
    plan.push_back({StepKind::output_reorder, -1, graph.output_value(), {out}, {}});
}

// The buffers a value's elements live in, channel range by channel range.
void QuantEngine::Impl::collect_sources(int value, int64_t channel_offset, std::vector<KernelSource>& out) const {
    if (virtual_concat[static_cast<size_t>(value)]) {
        int64_t offset = channel_offset;
        for (int src : graph.node(graph.value(value).producer).inputs) {
            collect_sources(src, offset, out);
            offset += dims(src)[1];
        }
        return;
    }
    KernelSource s;
    s.data = reinterpret_cast<const float*>(ptr(raw_buffer[static_cast<size_t>(value)]));
    s.channels = dims(value)[1];
    s.channel_offset = channel_offset;
    s.packed = packed[static_cast<size_t>(value)];
    out.push_back(s);
}

// A plain fp32 NHWC buffer of `value`, gathering (concat) or unshuffling (transposed conv) if needed.
int QuantEngine::Impl::ensure_fp32(int value) {
    if (fp32_buffer[static_cast<size_t>(value)] >= 0) return fp32_buffer[static_cast<size_t>(value)];
    const int buffer = new_buffer(f32_bytes(dims(value)));
    fp32_buffer[static_cast<size_t>(value)] = buffer;
    PlannedStep step{StepKind::gather, -1, value, {}, {buffer}};
    std::vector<int> stack = {value};
    while (!stack.empty()) {  // reads: every raw buffer under a concat tree
        const int v = stack.back();
        stack.pop_back();
        if (virtual_concat[static_cast<size_t>(v)]) {
            for (int src : graph.node(graph.value(v).producer).inputs) stack.push_back(src);
        } else {
            step.reads.push_back(raw_buffer[static_cast<size_t>(v)]);
        }
    }
    plan.push_back(step);
    return buffer;
}

// The quantize pass of `value`, emitted once, with one u8 buffer per padding its int8 readers need.
int QuantEngine::Impl::ensure_group(int value) {
    if (group_of[static_cast<size_t>(value)] >= 0) return group_of[static_cast<size_t>(value)];
    QuantGroup g;
    g.value = value;
    std::vector<int> paddings;
    for (int consumer : graph.value(value).consumers) {
        for (size_t k = 0; k < ops.size(); ++k) {
            if (ops[k].node != consumer || !int8_op[k]) continue;
            const Node& n = graph.node(consumer);
            const int padding = n.kind == OpKind::conv ? n.padding : 0;
            if (std::find(paddings.begin(), paddings.end(), padding) == paddings.end()) paddings.push_back(padding);
        }
    }
    const Dims& d = dims(value);
    PlannedStep step{StepKind::quantize, -1, value, {}, {}};
    for (int padding : paddings) {
        const int buffer = new_buffer(static_cast<size_t>(d[0] * d[1] * (d[2] + 2 * padding) * (d[3] + 2 * padding)));
        g.outputs.emplace_back(padding, buffer);
        step.writes.push_back(buffer);
    }
    std::vector<KernelSource> sources;
    std::vector<int> stack = {value};
    while (!stack.empty()) {
        const int v = stack.back();
        stack.pop_back();
        if (virtual_concat[static_cast<size_t>(v)]) {
            for (int src : graph.node(graph.value(v).producer).inputs) stack.push_back(src);
        } else {
            step.reads.push_back(raw_buffer[static_cast<size_t>(v)]);
        }
    }
    groups.push_back(g);
    group_of[static_cast<size_t>(value)] = static_cast<int>(groups.size()) - 1;
    plan.push_back(step);
    return group_of[static_cast<size_t>(value)];
}

void QuantEngine::Impl::allocate() {
    for (size_t i = 0; i < plan.size(); ++i) {
        for (int b : plan[i].reads) {
            buffers[static_cast<size_t>(b)].first_step = std::min(buffers[static_cast<size_t>(b)].first_step, static_cast<int>(i));
            buffers[static_cast<size_t>(b)].last_step = std::max(buffers[static_cast<size_t>(b)].last_step, static_cast<int>(i));
        }
        for (int b : plan[i].writes) {
            buffers[static_cast<size_t>(b)].first_step = std::min(buffers[static_cast<size_t>(b)].first_step, static_cast<int>(i));
            buffers[static_cast<size_t>(b)].last_step = std::max(buffers[static_cast<size_t>(b)].last_step, static_cast<int>(i));
        }
    }
    std::vector<ArenaRequest> requests;
    for (Buffer& b : buffers) {
        if (b.last_step < 0) b.first_step = b.last_step = 0;
        if (options.keep_values) b.last_step = static_cast<int>(plan.size());
        requests.push_back({b.bytes, b.first_step, b.last_step});
    }
    ArenaPlan arena_plan = plan_arena(requests, 64);
    for (size_t i = 0; i < buffers.size(); ++i) buffers[i].offset = arena_plan.offsets[i];
    arena_bytes = arena_plan.total_bytes;
    arena_naive_bytes = arena_plan.naive_bytes;
    arena.reset(static_cast<char*>(std::aligned_alloc(64, std::max<size_t>(64, (arena_bytes + 63) / 64 * 64))));
    if (!arena) throw Error(fmt::format("int8 engine: cannot allocate an arena of {} bytes", arena_bytes));
}

void QuantEngine::Impl::lower_conv(const PlannedStep& planned, const PreparedLayer& layer) {
    const FusedOp& op = ops[static_cast<size_t>(planned.op)];
    const Node& node = graph.node(op.node);
    const int src = op.srcs[0];
    const Dims& in = dims(src);
    const bool transposed = node.kind == OpKind::conv_transpose;
    const int64_t out_channels = layer.weight_dims[0];
    const Dims out = transposed ? Dims{in[0], out_channels, in[2], in[3]} : dims(op.dst);
    const int padding = transposed ? 0 : node.padding;
    const int64_t stride = transposed ? 1 : node.stride;

    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    post_ops post;
    memory multiplier;
    if (layer.int8) post.append_binary(algorithm::binary_mul, memory::desc({1, out_channels, 1, 1}, dt::f32, tag::abcd));
    if (op.residual >= 0) post.append_sum(1.0f);
    if (op.activation == Activation::relu) post.append_eltwise(1.0f, algorithm::eltwise_relu, 0.0f, 0.0f);
    if (op.activation == Activation::sigmoid) post.append_eltwise(1.0f, algorithm::eltwise_logistic, 0.0f, 0.0f);
    attr.set_post_ops(post);

    memory::desc src_desc;
    memory src_memory;
    if (layer.int8) {
        const Dims padded = {in[0], in[1], in[2] + 2 * padding, in[3] + 2 * padding};
        src_desc = memory::desc(to_dnnl_dims(padded), dt::u8, tag::nhwc);
        src_memory = memory(src_desc, eng, ptr(planned.reads[0]));
    } else {
        src_desc = memory::desc(to_dnnl_dims(in), dt::f32, tag::nhwc);
        src_memory = memory(src_desc, eng, ptr(planned.reads[0]));
    }
    const memory::dims conv_padding = layer.int8 ? memory::dims{0, 0} : memory::dims{padding, padding};
    memory::desc weights_any(to_dnnl_dims(layer.weight_dims), layer.int8 ? dt::s8 : dt::f32, tag::any);
    memory::desc bias_desc({out_channels}, dt::f32, tag::x);
    memory::desc dst_desc(to_dnnl_dims(out), dt::f32, tag::nhwc);
    convolution_forward::primitive_desc pd(
        convolution_forward::desc(prop_kind::forward_inference, algorithm::convolution_direct, src_desc, weights_any,
                                  bias_desc, dst_desc, {stride, stride}, conv_padding, conv_padding),
        attr, eng);

    memory user_weights = layer.int8 ? memory({to_dnnl_dims(layer.weight_dims), dt::s8, tag::oihw}, eng,
                                              const_cast<int8_t*>(layer.quant.q.data()))
                                     : memory({to_dnnl_dims(layer.weight_dims), dt::f32, tag::oihw}, eng,
                                              const_cast<float*>(layer.weights.data()));
    memory weights(pd.weights_desc(), eng);
    reorder(user_weights, weights).execute(strm, user_weights, weights);
    strm.wait();
    memory bias(bias_desc, eng);
    std::memcpy(bias.get_data_handle(), layer.bias.data(), layer.bias.size() * sizeof(float));
    weights_bytes += pd.weights_desc().get_size() + bias_desc.get_size();
    weight_memories.push_back(weights);

    Step step;
    step.prim = convolution_forward(pd);
    step.args = {{DNNL_ARG_SRC, src_memory}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, bias},
                 {DNNL_ARG_DST, memory(dst_desc, eng, ptr(planned.writes[0]))}};
    step.name = node.name;
    step.op = std::string(transposed ? "deconv:conv1x1" : "conv") + (op.batch_norm >= 0 ? "+bn" : "") +
              (op.residual >= 0 ? "+add" : "") + (op.activation == Activation::relu ? "+relu" : "") +
              (op.activation == Activation::sigmoid ? "+sigmoid" : "");
    step.kernel = pd.impl_info_str();
    step.precision = layer.int8 ? "u8s8" : "f32";
    step.macs = static_cast<double>(graph.node_macs(op.node));
    scratchpad_bytes = std::max(scratchpad_bytes, pd.scratchpad_desc().get_size());
    if (layer.int8) {
        // Per pass: multiplier[oc] = s_x * s_w[oc] dequantizes the int32 sum; oneDNN adds the bias to
        // that sum before post-ops, so the bias goes in sum units, minus the zero-point term z * sum(q).
        multiplier = memory({{1, out_channels, 1, 1}, dt::f32, tag::abcd}, eng);
        step.args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = multiplier;
        weights_bytes += static_cast<size_t>(out_channels) * sizeof(float) * 3;
        host_vectors.push_back(layer.quant.scales);
        host_vectors.push_back(layer.bias);
        host_vectors.push_back(std::vector<float>(layer.quant.sums.begin(), layer.quant.sums.end()));
        const float* scales = host_vectors[host_vectors.size() - 3].data();
        const float* fp_bias = host_vectors[host_vectors.size() - 2].data();
        const float* sums = host_vectors[host_vectors.size() - 1].data();
        float* mul = static_cast<float*>(multiplier.get_data_handle());
        float* bias_q = static_cast<float*>(bias.get_data_handle());
        const QuantGroup* group = &groups[static_cast<size_t>(group_of[static_cast<size_t>(src)])];
        step.before = [=] {
            const float s = group->current.scale;
            const float z = static_cast<float>(group->current.zero_point);
            for (int64_t oc = 0; oc < out_channels; ++oc) {
                mul[oc] = s * scales[oc];
                bias_q[oc] = fp_bias[oc] / mul[oc] - z * sums[oc];
            }
        };
        weight_memories.push_back(multiplier);
    }
    weight_memories.push_back(bias);
    steps.push_back(std::move(step));
}

void QuantEngine::Impl::lower(const TensorMap& weights, bool from_int8_file) {
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    const int threads = options.threads;
    for (const PlannedStep& planned : plan) {
        switch (planned.kind) {
            case StepKind::input_reorder:
            case StepKind::output_reorder: {
                // Between the caller's NCHW buffers (handles set per pass) and the internal NHWC ones.
                const bool input = planned.kind == StepKind::input_reorder;
                const Dims& d = dims(planned.value);
                static float placeholder = 0.0f;
                memory user({to_dnnl_dims(d), dt::f32, tag::nchw}, eng, &placeholder);
                memory internal = f32_memory(input ? planned.writes[0] : planned.reads[0], d, tag::nhwc);
                (input ? user_src : user_dst) = user;
                memory from = input ? user : internal, to = input ? internal : user;
                reorder::primitive_desc pd(from, to, attr);
                Step step;
                step.prim = reorder(pd);
                step.args = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
                step.name = input ? "input" : "output";
                step.op = "reorder";
                step.kernel = pd.impl_info_str();
                step.precision = "f32";
                steps.push_back(std::move(step));
                break;
            }
            case StepKind::quantize: {
                QuantGroup* group = &groups[static_cast<size_t>(group_of[static_cast<size_t>(planned.value)])];
                std::vector<KernelSource> sources;
                collect_sources(planned.value, 0, sources);
                std::vector<KernelTarget> targets;
                for (auto [padding, buffer] : group->outputs)
                    targets.push_back({reinterpret_cast<uint8_t*>(ptr(buffer)), padding});
                const KernelShape shape{dims(planned.value)[0], dims(planned.value)[1], dims(planned.value)[2], dims(planned.value)[3]};
                const std::string name = graph.value(planned.value).name;
                Step step;
                step.custom = [this, group, sources, targets, shape, name, threads] {
                    if (threads > 0) omp_set_num_threads(threads);
                    if (options.mode != ScaleMode::static_calibrated || !group->have_static || calibrating) {
                        const Range r = tensor_range(sources, shape);
                        if (!r.finite)
                            throw Error(fmt::format("int8 engine: NaN or Inf in '{}' (the input of an int8 layer)", name));
                        if (calibrating) {
                            group->calibrated_min = std::min(group->calibrated_min, r.min);
                            group->calibrated_max = std::max(group->calibrated_max, r.max);
                        }
                        group->current = choose_activation_quant(r.min, r.max);
                    } else {
                        group->current = group->static_quant;
                    }
                    bool finite = true;
                    const int64_t clipped =
                        quantize_u8(sources, shape, group->current, targets, options.count_saturation, &finite);
                    if (!finite)  // static scales: no range pass before, so the quantize pass checks
                        throw Error(fmt::format("int8 engine: NaN or Inf in '{}' (the input of an int8 layer)", name));
                    if (options.count_saturation) {
                        group->saturated += clipped;
                        group->counted += num_elements({shape.n, shape.c, shape.h, shape.w});
                    }
                };
                step.name = name + ".quantize";
                step.op = sources.size() > 1 ? "range+quantize (concat fused)" : "range+quantize";
                step.kernel = "resunet:omp";
                step.precision = "f32->u8";
                steps.push_back(std::move(step));
                break;
            }
            case StepKind::gather: {
                std::vector<KernelSource> sources;
                collect_sources(planned.value, 0, sources);
                float* out = reinterpret_cast<float*>(ptr(planned.writes[0]));
                const KernelShape shape{dims(planned.value)[0], dims(planned.value)[1], dims(planned.value)[2], dims(planned.value)[3]};
                Step step;
                step.custom = [sources, shape, out, threads] {
                    if (threads > 0) omp_set_num_threads(threads);
                    gather_f32(sources, shape, out);
                };
                step.name = graph.value(planned.value).name + ".gather";
                step.op = "concat/pixel-shuffle (copy)";
                step.kernel = "resunet:omp";
                step.precision = "f32";
                steps.push_back(std::move(step));
                break;
            }
            case StepKind::residual_copy: {
                const Dims& d = dims(planned.value);
                memory from = f32_memory(planned.reads[0], d, tag::nhwc);
                memory to = f32_memory(planned.writes[0], d, tag::nhwc);
                reorder::primitive_desc pd(from, to, attr);
                Step step;
                step.prim = reorder(pd);
                step.args = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
                step.name = graph.node(ops[static_cast<size_t>(planned.op)].node).name + ".residual_copy";
                step.op = "copy";
                step.kernel = pd.impl_info_str();
                step.precision = "f32";
                steps.push_back(std::move(step));
                break;
            }
            case StepKind::pool: {
                const FusedOp& op = ops[static_cast<size_t>(planned.op)];
                const Node& node = graph.node(op.node);
                memory src = f32_memory(planned.reads[0], dims(op.srcs[0]), tag::nhwc);
                memory dst = f32_memory(planned.writes[0], dims(op.dst), tag::nhwc);
                pooling_forward::primitive_desc pd(
                    pooling_forward::desc(prop_kind::forward_inference, algorithm::pooling_max, src.get_desc(),
                                          dst.get_desc(), {node.stride, node.stride}, {node.kernel, node.kernel},
                                          {0, 0}, {0, 0}),
                    attr, eng);
                Step step;
                step.prim = pooling_forward(pd);
                step.args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}};
                step.name = node.name;
                step.op = "maxpool";
                step.kernel = pd.impl_info_str();
                step.precision = "f32";
                scratchpad_bytes = std::max(scratchpad_bytes, pd.scratchpad_desc().get_size());
                steps.push_back(std::move(step));
                break;
            }
            case StepKind::conv: {
                const FusedOp& op = ops[static_cast<size_t>(planned.op)];
                lower_conv(planned, prepare_layer(graph, op, weights, int8_op[static_cast<size_t>(planned.op)], from_int8_file, levels));
                break;
            }
        }
    }
    scratchpad = memory({{static_cast<memory::dim>(std::max<size_t>(scratchpad_bytes, 1))}, dt::u8, tag::x}, eng);
    for (Step& step : steps)
        if (!step.custom) step.args[DNNL_ARG_SCRATCHPAD] = scratchpad;
    input_dims = dims(graph.input_value());
    input_dims[0] = 1;
    output_dims = dims(graph.output_value());
    output_dims[0] = 1;
}

void QuantEngine::Impl::run_pass(const float* src, float* dst, std::vector<double>* step_ms) {
    user_src.set_data_handle(const_cast<float*>(src));
    user_dst.set_data_handle(dst);
    for (size_t i = 0; i < steps.size(); ++i) {
        Step& s = steps[i];
        const auto start = Clock::now();
        if (s.before) s.before();
        if (s.custom) {
            s.custom();
        } else {
            s.prim.execute(strm, s.args);
            // Our own passes read what primitives wrote; with an in-order CPU stream that is already done.
            if (step_ms) strm.wait();
        }
        if (step_ms) (*step_ms)[i] += std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    }
    strm.wait();
}

QuantEngine::QuantEngine(const Graph& graph, const TensorMap& weights, const QuantOptions& options)
    : impl_(std::make_unique<Impl>()) {
    const auto start = Clock::now();
    if (options.micro_batch <= 0) throw Error(fmt::format("int8 engine: micro_batch must be positive, got {}", options.micro_batch));
    if (options.threads < 0) throw Error(fmt::format("int8 engine: threads must be >= 0, got {}", options.threads));
    Impl& m = *impl_;
    m.options = options;
    m.graph = graph.with_batch(options.micro_batch);
    m.ops = fuse(m.graph);
    m.levels = resunet::weight_levels();
    for (const std::string& name : options.keep_fp32)
        if (!graph.find_node(name)) throw Error(fmt::format("int8 engine: --keep-fp32 names '{}', which is not a layer", name));
    const bool from_int8_file = is_int8_weights(weights);
    if (!from_int8_file) {
        std::vector<std::pair<std::string, Dims>> expected;
        for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
        check_tensors(weights, expected, "weights");
    }
    for (const FusedOp& op : m.ops) {
        bool int8 = runs_int8(m.graph, op, options);
        // An int8 file decides by itself which layers are int8.
        if (from_int8_file && is_weighted(op)) int8 = weights.count(m.graph.node(op.node).name + ".weight_q") > 0;
        m.int8_op.push_back(int8);
    }
    const ThreadSetting thread_setting(options.threads);
    try {
        m.plan_values(weights);
        m.allocate();
        m.lower(weights, from_int8_file);
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("int8 engine: oneDNN could not compile the graph: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
    if (from_int8_file) {  // static scales stored with the model switch the engine to static mode
        for (QuantGroup& g : m.groups) {
            const std::string base = m.graph.value(g.value).name;
            const bool has_scale = weights.count(base + ".input_scale") > 0;
            const bool has_zero = weights.count(base + ".input_zero_point") > 0;
            if (has_scale != has_zero)
                throw Error(fmt::format("int8 weights: '{}.input_scale' and '{}.input_zero_point' must come together", base, base));
            if (!has_scale) continue;
            const float scale = int8_tensor(weights, base + ".input_scale", DType::f32, {1}).f32()[0];
            int32_t zero = 0;
            std::memcpy(&zero, int8_tensor(weights, base + ".input_zero_point", DType::s32, {1}).bytes.data(), sizeof(zero));
            if (!(scale >= kMinActivationScale) || !std::isfinite(scale) || zero < 0 || zero > 255)
                throw Error(fmt::format("int8 weights: '{}.input_scale' = {} / zero point {} is invalid (the scale must "
                                        "be finite and at least {:g})",
                                        base, scale, zero, kMinActivationScale));
            g.static_quant = {scale, zero};
            g.have_static = true;
        }
    }
    // Static scales need one per quantized input: from the file (which then implies static mode), or
    // from calibrate() later; until then the engine runs dynamic.
    const bool all_static = !m.groups.empty() &&
                            std::all_of(m.groups.begin(), m.groups.end(), [](const QuantGroup& g) { return g.have_static; });
    m.options.mode = all_static ? ScaleMode::static_calibrated : ScaleMode::dynamic;
    m.compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

QuantEngine::~QuantEngine() = default;

namespace {
void check_batch(const float* src, int batch, const float* dst, int micro_batch) {
    if (!src || !dst) throw Error("int8 engine: run() needs non-null input and output buffers");
    if (batch <= 0 || batch % micro_batch != 0)
        throw Error(fmt::format("int8 engine: batch {} is not a positive multiple of the micro-batch {}", batch, micro_batch));
}
}  // namespace

void QuantEngine::run(const float* src, int batch, float* dst) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "int8 engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_batch(src, batch, dst, m.options.micro_batch);
    // The first layers run in fp32 and ReLU turns NaN into 0, so bad input is caught here, before it
    // can turn silently into a plausible mask.
    check_finite_input(src, batch * num_elements(m.input_dims), "int8 engine");
    const int64_t in = num_elements(m.input_dims), out = num_elements(m.output_dims);
    for (int b = 0; b < batch; b += m.options.micro_batch) m.run_pass(src + b * in, dst + b * out, nullptr);
}

std::vector<LayerProfile> QuantEngine::profile(const float* src, int batch, float* dst) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "int8 engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_batch(src, batch, dst, m.options.micro_batch);
    check_finite_input(src, batch * num_elements(m.input_dims), "int8 engine");
    std::vector<double> ms(m.steps.size(), 0.0);
    const int64_t in = num_elements(m.input_dims), out = num_elements(m.output_dims);
    for (int b = 0; b < batch; b += m.options.micro_batch) m.run_pass(src + b * in, dst + b * out, &ms);
    std::vector<LayerProfile> rows;
    const double passes = static_cast<double>(batch / m.options.micro_batch);
    for (size_t i = 0; i < m.steps.size(); ++i)
        rows.push_back({m.steps[i].name, m.steps[i].op, m.steps[i].kernel, m.steps[i].precision, ms[i],
                        2.0 * m.steps[i].macs * passes / 1e9, {}, {}});
    return rows;
}

void QuantEngine::calibrate(const float* src, int batch) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "int8 engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_batch(src, batch, src, m.options.micro_batch);
    check_finite_input(src, batch * num_elements(m.input_dims), "int8 engine");
    std::vector<float> scratch(static_cast<size_t>(num_elements(m.output_dims) * m.options.micro_batch));
    for (QuantGroup& g : m.groups) {
        g.calibrated_min = INFINITY;
        g.calibrated_max = -INFINITY;
        g.have_static = false;
    }
    m.calibrating = true;
    try {
        const int64_t in = num_elements(m.input_dims);
        for (int b = 0; b < batch; b += m.options.micro_batch) m.run_pass(src + b * in, scratch.data(), nullptr);
    } catch (...) {
        m.calibrating = false;
        throw;
    }
    m.calibrating = false;
    for (QuantGroup& g : m.groups) {
        g.static_quant = choose_activation_quant(g.calibrated_min, g.calibrated_max);
        g.have_static = true;
    }
    m.options.mode = ScaleMode::static_calibrated;
}

ScaleMode QuantEngine::mode() const { return impl_->options.mode; }

std::vector<LayerQuantInfo> QuantEngine::layer_info() const {
    const Impl& m = *impl_;
    std::vector<LayerQuantInfo> rows;
    for (size_t k = 0; k < m.ops.size(); ++k) {
        if (!is_weighted(m.ops[k])) continue;
        LayerQuantInfo info;
        info.name = m.graph.node(m.ops[k].node).name;
        info.precision = m.int8_op[k] ? "u8s8" : "f32";
        if (m.int8_op[k]) {
            const QuantGroup& g = m.groups[static_cast<size_t>(m.group_of[static_cast<size_t>(m.ops[k].srcs[0])])];
            info.input_scale = g.current.scale;
            info.input_zero_point = g.current.zero_point;
            info.saturated_share = g.counted > 0 ? static_cast<double>(g.saturated) / static_cast<double>(g.counted) : 0.0;
        }
        rows.push_back(info);
    }
    return rows;
}

std::vector<std::string> QuantEngine::materialized_values() const {
    std::vector<std::string> names;
    for (const FusedOp& op : impl_->ops)
        if (is_weighted(op) || op.kind == OpKind::max_pool) names.push_back(impl_->graph.value(op.dst).name);
    return names;
}

std::vector<float> QuantEngine::read_value(const std::string& name) {
    Impl& m = *impl_;
    if (!m.options.keep_values) throw Error("int8 engine: read_value() needs QuantOptions::keep_values");
    for (size_t v = 0; v < m.graph.values().size(); ++v) {
        if (m.graph.value(static_cast<int>(v)).name != name) continue;
        if (m.raw_buffer[v] < 0 && !m.virtual_concat[v])
            throw Error(fmt::format("int8 engine: value '{}' is fused inside an op and never stored", name));
        const Dims& d = m.graph.value(static_cast<int>(v)).dims;
        std::vector<KernelSource> sources;
        m.collect_sources(static_cast<int>(v), 0, sources);
        std::vector<float> nhwc(static_cast<size_t>(num_elements(d)));
        gather_f32(sources, {d[0], d[1], d[2], d[3]}, nhwc.data());
        std::vector<float> nchw(nhwc.size());
        for (int64_t n = 0; n < d[0]; ++n)
            for (int64_t c = 0; c < d[1]; ++c)
                for (int64_t i = 0; i < d[2] * d[3]; ++i)
                    nchw[static_cast<size_t>((n * d[1] + c) * d[2] * d[3] + i)] = nhwc[static_cast<size_t>((n * d[2] * d[3] + i) * d[1] + c)];
        return nchw;
    }
    throw Error(fmt::format("int8 engine: no value named '{}'", name));
}

TensorMap QuantEngine::static_scales() const {
    TensorMap out;
    for (const QuantGroup& g : impl_->groups) {
        if (!g.have_static) continue;
        const std::string base = impl_->graph.value(g.value).name;
        HostTensor s = HostTensor::zeros({1});
        s.f32()[0] = g.static_quant.scale;
        HostTensor z = HostTensor::zeros({1}, DType::s32);
        std::memcpy(z.bytes.data(), &g.static_quant.zero_point, sizeof(int32_t));
        out[base + ".input_scale"] = std::move(s);
        out[base + ".input_zero_point"] = std::move(z);
    }
    return out;
}

EngineMemory QuantEngine::memory_usage() const {
    return {impl_->weights_bytes, impl_->arena_bytes, impl_->arena_naive_bytes, impl_->scratchpad_bytes};
}
double QuantEngine::compile_ms() const { return impl_->compile_ms; }
int QuantEngine::num_primitives() const { return static_cast<int>(impl_->steps.size()); }
int QuantEngine::weight_levels() const { return impl_->levels; }

bool is_int8_weights(const TensorMap& tensors) {
    return std::any_of(tensors.begin(), tensors.end(), [](const auto& kv) { return kv.first.ends_with(".weight_q"); });
}

TensorMap quantize_model_weights(const Graph& graph, const TensorMap& fp32_weights, const QuantOptions& options) {
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(fp32_weights, expected, "weights");
    TensorMap out;
    for (const FusedOp& op : fuse(graph)) {
        if (!is_weighted(op)) continue;
        const std::string name = graph.node(op.node).name;
        PreparedLayer layer = prepare_layer(graph, op, fp32_weights, runs_int8(graph, op, options), false, kStoredWeightLevels);
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
