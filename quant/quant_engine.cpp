// The int8 engine's lowering (QuantEngine::Impl, quant/quant_engine_impl.h): each value's form, the
// quantize and gather passes, the arena, and the oneDNN primitives with their arguments.
#include "quant/quant_engine_impl.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "engine/arena.h"
#include "engine/run_guards.h"
#include "graph/safetensors.h"

namespace resunet {

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
    const std::vector<int> last_use = last_uses(graph, ops);
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
                    // The shared rule (engine/arena.h), and this policy's storage: a plain fp32 buffer of its own.
                    const bool in_place = residual_in_place(graph, ops, k, last_use, options.keep_values) &&
                                          !packed[static_cast<size_t>(r)] && !virtual_concat[static_cast<size_t>(r)];
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
void QuantEngine::Impl::collect_source_values(int value, std::vector<int>& out) const {
    if (!virtual_concat[static_cast<size_t>(value)]) {
        out.push_back(value);
        return;
    }
    for (int src : graph.node(graph.value(value).producer).inputs) collect_source_values(src, out);
}

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
    const std::vector<size_t> offsets = arena.allocate(requests, "int8 engine");
    for (size_t i = 0; i < buffers.size(); ++i) buffers[i].offset = offsets[i];
}

lowering::ConvSpec QuantEngine::Impl::conv_spec(const FusedOp& op, const PreparedLayer& layer) const {
    const Node& node = graph.node(op.node);
    const Dims& in = dims(op.srcs[0]);
    const bool transposed = node.kind == OpKind::conv_transpose;
    const Dims out = transposed ? Dims{in[0], layer.weight_dims[0], in[2], in[3]} : dims(op.dst);
    const int padding = transposed ? 0 : node.padding;
    // An int8 layer reads the quantize pass's copy, which holds the padding.
    const Dims padded = {in[0], in[1], in[2] + 2 * padding, in[3] + 2 * padding};
    const memory::desc src_desc = layer.int8 ? memory::desc(to_dnnl_dims(padded), dt::u8, tag::nhwc)
                                             : memory::desc(to_dnnl_dims(in), dt::f32, tag::nhwc);
    const memory::desc dst_desc(to_dnnl_dims(out), dt::f32, tag::nhwc);
    lowering::ConvSpec spec = lowering::ConvSpec::of(op, src_desc, dst_desc, to_dnnl_dims(layer.weight_dims),
                                                     transposed ? 1 : node.stride, layer.int8 ? 0 : padding);
    if (layer.int8) spec.precision = lowering::Precision::u8s8;
    return spec;
}

ConvChoiceRequest QuantEngine::Impl::fp32_conv_request(const FusedOp& op, const PreparedLayer& layer,
                                                       const lowering::ConvSpec& spec) {
    const Dims& in = dims(op.srcs[0]);
    const Dims& out = dims(op.dst);
    ConvChoiceRequest request;
    request.spec = spec;
    request.weights = layer.weights.data();
    request.bias = layer.bias.data();
    request.winograd_shape = true;
    const WinogradOwnShape own_shape{.batch = in[0], .in_channels = in[1], .out_channels = layer.weight_dims[0],
                                     .height = out[2], .width = out[3], .layout = tag::nhwc,
                                     .sum = op.residual >= 0, .relu = op.activation == Activation::relu};
    const bool sigmoid = op.activation == Activation::sigmoid;
    request.own_offered = [own_shape, sigmoid](int tile) {
        return !sigmoid && winograd_own_supported() && WinogradOwn::applies(tile, own_shape);
    };
    request.make_own = [this, own_shape, &layer](int tile) {
        return WinogradOwn::create(eng, strm, tile, own_shape, layer.weights.data(), layer.bias.data());
    };
    request.tune = options.tune;
    request.algorithm = options.conv_algorithm;
    return request;
}

void QuantEngine::Impl::lower_conv(const PlannedStep& planned, const PreparedLayer& layer) {
    const size_t k_op = static_cast<size_t>(planned.op);
    const FusedOp& op = ops[k_op];
    const Node& node = graph.node(op.node);
    const int src = op.srcs[0];
    const Dims& in = dims(src);
    const bool transposed = node.kind == OpKind::conv_transpose;
    const int64_t out_channels = layer.weight_dims[0];
    const Dims out = transposed ? Dims{in[0], out_channels, in[2], in[3]} : dims(op.dst);
    const int padding = transposed ? 0 : node.padding;
    const int64_t stride = transposed ? 1 : node.stride;

    const lowering::ConvSpec spec = conv_spec(op, layer);
    const memory src_memory(spec.src, eng, ptr(planned.reads[0]));
    const memory::desc dst_desc = spec.dst;
    const int64_t k = layer.weight_dims[2];
    // (an int8 layer reads the quantize pass's padded u8 copy, so one reading the graph input qualifies too)
    const bool winograd_shape = !transposed && k == 3 && stride == 1 && padding == 1 && (layer.int8 || src != graph.input_value());
    // Mixed precision: what measuring both precisions found (choose_precisions).
    const std::string note = k_op < precision_note.size() ? precision_note[k_op] : std::string();
    auto with_note = [&](std::string candidates) { return note.empty() ? candidates : note + "; " + candidates; };
    Step step;
    step.name = node.name;
    step.op = lowering::fused_op_label(op, transposed ? "deconv:conv1x1" : "conv");
    step.precision = layer.int8 ? "u8s8" : "f32";
    step.macs = static_cast<double>(graph.node_macs(op.node));
    step.algorithm = "direct";
    convolution_forward::primitive_desc pd;
    if (!layer.int8 && winograd_shape) {
        // An fp32 layer: the planner's candidates, as in the fp32 engine (NHWC, dense src and dst); a layer mixed
        // precision moved to fp32 runs the algorithm that measurement chose.
        ConvChoiceRequest request = fp32_conv_request(op, layer, spec);
        const bool from_mixed = k_op < fp32_forced.size() && !fp32_forced[k_op].empty();
        if (from_mixed) request.forced = fp32_forced[k_op];
        ConvChoice choice = choose_conv_algorithm(eng, strm, request);
        step.algorithm = choice.algorithm;
        step.candidates = from_mixed ? (note.empty() ? choice.algorithm + " (from --plan)" : note) : with_note(std::move(choice.candidates));
        if (choice.own) {
            step.custom = own_winograd_pass(choice.own, strm, reinterpret_cast<const float*>(ptr(planned.reads[0])),
                                            reinterpret_cast<float*>(ptr(planned.writes[0])), scratchpad, weight_store,
                                            scratchpad_bytes);
            step.kernel = choice.own->kernel();
            steps.push_back(std::move(step));
            return;
        }
        pd = choice.pd;
    } else if (layer.int8 && winograd_shape) {
        // The planner's int8 candidates: direct, or our own int8 Winograd. oneDNN's int8 Winograd is not one:
        // it takes no per-channel dequantization post-op; the plan says whether this CPU has it.
        lowering::ConvSpec winograd = spec;
        winograd.algorithm = algorithm::convolution_winograd;
        bool available = false;
        try {
            lowering::make_conv(eng, winograd);
            available = true;
        } catch (const dnnl::error&) {
            // no kernel for it here
        }
        pd = lowering::make_conv(eng, spec);
        const WinogradInt8Shape own_shape{.batch = in[0], .in_channels = in[1], .out_channels = out_channels,
                                          .height = out[2], .width = out[3], .sum = op.residual >= 0,
                                          .relu = op.activation == Activation::relu, .levels = levels};
        // A cached plan's choice is taken as asked for (it was checked and measured when the plan was made).
        Int8ConvAlgorithm algorithm = options.int8_algorithm;
        const auto cached = chosen_int8 ? chosen_int8->find(graph.node(op.node).name) : std::map<std::string, ConvAlgo>::const_iterator{};
        const bool from_cache = chosen_int8 && cached != chosen_int8->end();
        if (from_cache) algorithm = cached->second == ConvAlgo::winograd_int8_f23 ? Int8ConvAlgorithm::winograd_f23 : Int8ConvAlgorithm::direct;
        Int8ConvChoice choice = op.activation == Activation::sigmoid
                                    ? Int8ConvChoice{nullptr, "direct", "direct (sigmoid is not fused into our int8 Winograd)"}
                                    : choose_int8_conv(eng, strm, pd, layer, own_shape, algorithm, options.tune);
        if (from_cache) choice.candidates = choice.algorithm + (options.plan ? " (from --plan)" : " (from the plan cache)");
        step.candidates = with_note(choice.candidates + (available ? "; oneDNN's u8s8 Winograd also accepts this layer (not a candidate)"
                                                                   : "; oneDNN has no u8s8 Winograd for it here"));
        if (choice.winograd) {
            std::shared_ptr<WinogradInt8> own = choice.winograd;
            weight_store.count(own->weight_bytes());
            scratchpad_bytes = std::max(scratchpad_bytes, own->scratch_bytes());
            const uint8_t* src_u8 = reinterpret_cast<const uint8_t*>(ptr(planned.reads[0]));
            float* dst_f32 = reinterpret_cast<float*>(ptr(planned.writes[0]));
            const QuantGroup* group = &groups[static_cast<size_t>(group_of[static_cast<size_t>(src)])];
            step.custom = [this, own, src_u8, dst_f32, group] {
                own->execute(strm, src_u8, group->current, dst_f32, scratchpad.get_data_handle());
            };
            step.algorithm = choice.algorithm;
            step.kernel = own->kernel();
            steps.push_back(std::move(step));
            return;
        }
    }
    if (!pd) pd = lowering::make_conv(eng, spec);
    const memory weights = layer.int8 ? weight_store.upload(eng, strm, layer.quant.q.data(), dt::s8,
                                                            to_dnnl_dims(layer.weight_dims), pd.weights_desc())
                                      : weight_store.upload(eng, strm, layer.weights.data(), dt::f32,
                                                            to_dnnl_dims(layer.weight_dims), pd.weights_desc());
    const memory bias = weight_store.floats(eng, layer.bias.data(), out_channels);
    step.prim = convolution_forward(pd);
    step.args = {{DNNL_ARG_SRC, src_memory}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, bias},
                 {DNNL_ARG_DST, memory(dst_desc, eng, ptr(planned.writes[0]))}};
    step.kernel = pd.impl_info_str();
    scratchpad_bytes = std::max(scratchpad_bytes, pd.scratchpad_desc().get_size());
    if (layer.int8) {
        // Per pass: multiplier[oc] = s_x * s_w[oc] dequantizes the int32 sum; oneDNN adds the bias to
        // that sum before post-ops, so the bias goes in sum units, minus the zero-point term z * sum(q).
        // Counted with the three per-channel host vectors `before` reads.
        const memory multiplier = weight_store.keep(memory({{1, out_channels, 1, 1}, dt::f32, tag::abcd}, eng),
                                                    static_cast<size_t>(out_channels) * sizeof(float) * 3);
        step.args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = multiplier;
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
    }
    steps.push_back(std::move(step));
}

// Range donors. A value S that comes out of a ReLU (S >= 0, so its range widened to include 0, as
// choose_activation_quant widens it, is [0, max S]) and feeds a 2x2 stride-2 max-pool covering it exactly has
// max S = max pool(S); when the pool's output has a quantize pass of its own, that pass's range gives S's, and a
// later pass that quantizes S (a decoder's concat of the skip tensor) need not read S for it. Per value: the
// donor's group, or -1.
std::vector<int> QuantEngine::Impl::range_donors() const {
    std::vector<int> donor(raw_buffer.size(), -1);  // per value
    for (const FusedOp& pool : ops) {
        if (pool.kind != OpKind::max_pool) continue;
        const Node& node = graph.node(pool.node);
        const int s = pool.srcs[0], p = pool.dst;
        const Dims &ds = dims(s), &dp = dims(p);
        if (node.kernel != 2 || node.stride != 2 || ds[2] != 2 * dp[2] || ds[3] != 2 * dp[3]) continue;
        const bool after_relu = std::any_of(ops.begin(), ops.end(), [&](const FusedOp& op) {
            return op.dst == s && op.kind == OpKind::conv && op.activation == Activation::relu;
        });
        const int g = group_of[static_cast<size_t>(p)];
        if (after_relu && g >= 0 && groups[static_cast<size_t>(g)].value == p) donor[static_cast<size_t>(s)] = g;
    }
    return donor;
}

void QuantEngine::Impl::lower(const TensorMap& weights, bool from_int8_file, std::optional<std::map<std::string, ConvAlgo>> chosen) {
    chosen_int8 = std::move(chosen);
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    const int threads = options.threads;
    const std::vector<int> donor_of = range_donors();
    std::vector<bool> group_lowered(groups.size(), false);
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
                group_lowered[static_cast<size_t>(group_of[static_cast<size_t>(planned.value)])] = true;
                std::vector<KernelSource> sources;
                collect_sources(planned.value, 0, sources);
                // The sources whose range an earlier pass has found (range_donors): the range pass reads the rest.
                std::vector<int> source_values;
                collect_source_values(planned.value, source_values);
                std::vector<KernelSource> range_sources;
                std::vector<const QuantGroup*> donors;
                for (size_t i = 0; i < sources.size(); ++i) {
                    const int d = donor_of[static_cast<size_t>(source_values[i])];
                    if (d >= 0 && sources.size() > 1 && group_lowered[static_cast<size_t>(d)] && &groups[static_cast<size_t>(d)] != group)
                        donors.push_back(&groups[static_cast<size_t>(d)]);
                    else
                        range_sources.push_back(sources[i]);
                }
                std::vector<KernelTarget> targets;
                for (auto [padding, buffer] : group->outputs)
                    targets.push_back({reinterpret_cast<uint8_t*>(ptr(buffer)), padding});
                const KernelShape shape{dims(planned.value)[0], dims(planned.value)[1], dims(planned.value)[2], dims(planned.value)[3]};
                const std::string name = graph.value(planned.value).name;
                Step step;
                step.custom = [this, group, sources, range_sources, donors, targets, shape, name, threads] {
                    if (threads > 0) omp_set_num_threads(threads);
                    if (options.mode != ScaleMode::static_calibrated || !group->have_static || calibrating) {
                        // The donors' range passes ran earlier in this pass when every group runs one (dynamic
                        // scales, or calibrating); a static plan's group without a scale reads all its sources.
                        const bool use_donors = !donors.empty() && (options.mode != ScaleMode::static_calibrated || calibrating);
                        Range r = !use_donors ? tensor_range(sources, shape)
                                  : range_sources.empty() ? Range{INFINITY, -INFINITY, true}
                                                          : tensor_range(range_sources, shape);
                        if (use_donors)
                            for (const QuantGroup* d : donors) {  // [0, the donor's max]: the skipped sources' range
                                r.min = std::min(r.min, 0.0f);
                                r.max = std::max(r.max, d->last_max);
                            }
                        group->last_max = r.max;
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
                if (!donors.empty()) step.op += fmt::format(" ({} of {} sources' range from an earlier pass)", donors.size(), sources.size());
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
                const pooling_forward::primitive_desc pd =
                    onednn::max_pool_forward(eng, prop_kind::forward_inference, src.get_desc(), dst.get_desc(),
                                             {node.stride, node.stride}, {node.kernel, node.kernel}, {0, 0}, {0, 0}, attr);
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
    bind_scratchpad();
    input_dims = dims(graph.input_value());
    input_dims[0] = 1;
    output_dims = dims(graph.output_value());
    output_dims[0] = 1;
}

}  // namespace resunet
