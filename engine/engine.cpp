// The fp32 lowering: activation layout, which values share a buffer (in-place residuals and concats),
// the arena, and one oneDNN primitive with its arguments per fused op (each 3x3 convolution's algorithm
// measured when tuning). Construction, run and profile are in engine/engine_run.cpp.
#include "engine/engine.h"

#include <fmt/format.h>
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>

#include "engine/arena.h"
#include "engine/conv_choice.h"
#include "engine/engine_impl.h"
#include "engine/onednn_util.h"
#include "engine/plan_cache.h"
#include "engine/run_guards.h"
#include "graph/safetensors.h"

namespace resunet {

namespace {

std::string activation_label(const FusedOp& op) {
    return lowering::fused_op_label(op, op.kind == OpKind::conv ? "conv" : "deconv");
}

}  // namespace


// The activation layout, used for every activation so that concat slices and residual accumulation share
// buffers without reorders. `automatic` asks oneDNN's convolution once with format_tag::any on a
// representative convolution (64 channels). `blocked` takes the widest channel block whose convolutions
// run on a non-reference kernel, checked at 64 channels and at the graph's narrowest convolution (oneDNN
// 2.6 runs nChw16c at 8 channels on its reference kernel).
void Engine::Impl::choose_layout() {
    act_tag = tag::nchw;
    block = 1;
    if (fixed.layout != tag::undef) {
        act_tag = fixed.layout;
        block = act_tag == tag::nChw16c ? 16 : act_tag == tag::nChw8c ? 8 : act_tag == tag::nhwc ? 0 : 1;
        return;
    }
    switch (options.layout) {
        case EngineLayout::nchw: return;
        case EngineLayout::nhwc:
            act_tag = tag::nhwc;
            block = 0;
            return;
        case EngineLayout::blocked: {
            memory::dim narrowest = 64;
            for (const FusedOp& op : ops)
                if (op.kind == OpKind::conv && op.srcs[0] != graph.input_value())
                    narrowest = std::min<memory::dim>(narrowest, graph.value(op.srcs[0]).dims[1]);
            for (auto [candidate, candidate_block] : {std::pair{tag::nChw16c, 16}, std::pair{tag::nChw8c, 8}}) {
                const bool fast = !probe_conv(eng, 64, candidate).starts_with("ref") &&
                                  !probe_conv(eng, narrowest, candidate).starts_with("ref");
                if (!fast) continue;
                act_tag = candidate;
                block = candidate_block;
                return;
            }
            throw Error("engine: no channel-blocked layout runs without oneDNN's reference convolution on this CPU");
        }
        case EngineLayout::automatic: break;
    }
    const memory::dim channels = 64;
    memory::desc chosen;
    probe_conv(eng, channels, tag::any, &chosen);
    for (auto [candidate, candidate_block] : {std::pair{tag::nChw16c, 16}, std::pair{tag::nChw8c, 8},
                                              std::pair{tag::nhwc, 0}, std::pair{tag::nchw, 1}}) {
        if (chosen == memory::desc({1, channels, 16, 16}, dt::f32, candidate)) {
            act_tag = candidate;
            block = candidate_block;
            break;
        }
    }
}

// Decides which values share a buffer: a fused residual add accumulates into its operand's buffer, and
// a concat's inputs are written straight into their slices of the concat buffer.
void Engine::Impl::plan_storage() {
    const size_t num_values = graph.values().size();
    value_storage.assign(num_values, -1);
    value_desc.assign(num_values, memory::desc());
    concat_in_place.assign(ops.size(), false);
    copy_residual.assign(ops.size(), 0);
    shuffle_temp.assign(ops.size(), -1);
    const std::vector<int> last_use = last_uses(graph, ops);
    auto new_storage = [&](int value, const memory::desc& desc) {
        storages.push_back(Storage{-1, 0, desc, INT_MAX, -1, 0});
        value_storage[static_cast<size_t>(value)] = static_cast<int>(storages.size()) - 1;
        value_desc[static_cast<size_t>(value)] = desc;
    };
    std::vector<bool> in_concat(storages.size(), false);
    const int input = graph.input_value();
    new_storage(input, act_desc(graph.value(input).dims));  // replaced by the first conv's choice in lower()
    for (size_t k = 0; k < ops.size(); ++k) {
        const FusedOp& op = ops[k];
        const Dims& dims = graph.value(op.dst).dims;
        if (op.residual >= 0) {
            const int r = op.residual;
            int64_t offset = 0;
            const int root = root_of(value_storage[static_cast<size_t>(r)], &offset);
            // The shared rule (engine/arena.h), and this policy's storage: the operand owns a whole buffer (not a
            // concat slice), and no other value sharing it (an earlier residual) is read from here on.
            bool reusable = residual_in_place(graph, ops, k, last_use, options.keep_values) &&
                            storages[static_cast<size_t>(root)].parent < 0 && root == value_storage[static_cast<size_t>(r)];
            for (size_t v = 0; v < num_values && reusable; ++v) {
                if (static_cast<int>(v) == r || value_storage[v] < 0 || root_of(value_storage[v], nullptr) != root) continue;
                if (last_use[v] >= static_cast<int>(k) || static_cast<int>(v) == graph.output_value()) reusable = false;
            }
            if (reusable) {
                value_storage[static_cast<size_t>(op.dst)] = value_storage[static_cast<size_t>(r)];
                value_desc[static_cast<size_t>(op.dst)] = act_desc(dims);
                continue;
            }
            copy_residual[k] = 1;
        }
        new_storage(op.dst, act_desc(dims));
        if (op.kind == OpKind::conv_transpose && shuffle_eligible(op)) {
            const Dims& in = graph.value(op.srcs[0]).dims;
            storages.push_back(Storage{-1, 0, act_desc({in[0], 4 * dims[1], in[2], in[3]}), INT_MAX, -1, 0});
            shuffle_temp[k] = static_cast<int>(storages.size()) - 1;
        }
        if (op.kind != OpKind::concat) continue;
        // Slices are dense sub-tensors only when the channel blocks are outermost within an image. In
        // nhwc a slice is a strided sub-tensor, which oneDNN 2.6 accepts only on its reference kernels
        // (measured: a 64->64 3x3 conv at 56x56 writing a slice of a 128-channel nhwc buffer ran
        // `ref:any` in 713 ms against `brgconv:avx512_core` in 4 ms dense; pooling likewise), so there the
        // concat is a copy (`concat(copy)` steps, counted by num_concat_copies()).
        bool in_place = options.concat_in_place && graph.value(op.dst).dims[0] == 1 &&
                        (act_tag == tag::nChw8c || act_tag == tag::nChw16c || act_tag == tag::nchw);
        int64_t channel = 0;
        std::vector<int> seen;
        for (int src : op.srcs) {
            const int storage = value_storage[static_cast<size_t>(src)];
            const bool whole = storages[static_cast<size_t>(storage)].parent < 0 && src != input &&
                               std::find(seen.begin(), seen.end(), storage) == seen.end();
            in_place = in_place && whole && channel % block == 0;
            // Every value sharing this storage must be the full buffer (residual chains are).
            seen.push_back(storage);
            channel += graph.value(src).dims[1];
        }
        if (!in_place) continue;
        concat_in_place[k] = true;
        channel = 0;
        const int concat_storage = value_storage[static_cast<size_t>(op.dst)];
        for (int src : op.srcs) {
            Storage& s = storages[static_cast<size_t>(value_storage[static_cast<size_t>(src)])];
            s.parent = concat_storage;
            s.channel_offset = channel;
            channel += graph.value(src).dims[1];
        }
    }
}

void Engine::Impl::allocate_arena() {
    // Lifetimes in op steps: the input is written at step -1 (input reorder), the output read at the end.
    auto touch = [&](int value, int step) {
        if (value < 0 || value_storage[static_cast<size_t>(value)] < 0) return;
        Storage& root = storages[static_cast<size_t>(root_of(value_storage[static_cast<size_t>(value)], nullptr))];
        root.first_step = std::min(root.first_step, step);
        root.last_step = std::max(root.last_step, step);
    };
    touch(graph.input_value(), -1);
    for (size_t k = 0; k < ops.size(); ++k) {
        for (int src : ops[k].srcs) touch(src, static_cast<int>(k));
        touch(ops[k].residual, static_cast<int>(k));
        touch(ops[k].dst, static_cast<int>(k));
    }
    touch(graph.output_value(), static_cast<int>(ops.size()));
    if (options.keep_values)
        for (size_t k = 0; k < ops.size(); ++k) touch(ops[k].dst, static_cast<int>(ops.size()));
    for (size_t k = 0; k < ops.size(); ++k)
        if (shuffle_temp[k] >= 0) {
            storages[static_cast<size_t>(shuffle_temp[k])].first_step = static_cast<int>(k);
            storages[static_cast<size_t>(shuffle_temp[k])].last_step = static_cast<int>(k);
        }
    std::vector<ArenaRequest> requests;
    std::vector<int> request_storage;
    for (size_t i = 0; i < storages.size(); ++i) {
        const Storage& s = storages[i];
        if (s.parent >= 0 || s.last_step < 0) continue;
        requests.push_back({s.desc.get_size(), s.first_step + 1, s.last_step + 1});
        request_storage.push_back(static_cast<int>(i));
    }
    const std::vector<size_t> offsets = arena.allocate(requests, "engine");
    for (size_t i = 0; i < requests.size(); ++i) storages[static_cast<size_t>(request_storage[i])].arena_offset = offsets[i];
}

memory Engine::Impl::value_memory(int value) {
    int64_t channel_offset = 0;
    const int root = root_of(value_storage[static_cast<size_t>(value)], &channel_offset);
    const memory::desc& desc = value_desc[static_cast<size_t>(value)];
    const Dims& dims = graph.value(value).dims;
    // N is 1 whenever channel_offset is non-zero, so a channel slice starts at offset * H * W elements.
    const size_t byte_offset = static_cast<size_t>(channel_offset * dims[2] * dims[3]) * sizeof(float);
    return memory(desc, eng, arena.base() + storages[static_cast<size_t>(root)].arena_offset + byte_offset);
}

void Engine::Impl::add_step(primitive prim, std::unordered_map<int, memory> args, const std::string& name,
                            const std::string& op_label, const std::string& kernel, double macs, size_t scratch) {
    scratchpad_bytes = std::max(scratchpad_bytes, scratch);
    Step step;
    step.prim = std::move(prim);
    step.args = std::move(args);
    step.name = name;
    step.op = op_label;
    step.kernel = kernel;
    step.macs = macs;
    steps.push_back(std::move(step));
    steps.back().scratch_bytes = scratch;
}

void Engine::Impl::lower_conv(const FusedOp& op, const TensorMap& weights) {
    const Node& node = graph.node(op.node);
    const int src = op.srcs[0];
    const Dims& in = graph.value(src).dims;
    const int64_t out_channels = node.out_channels;
    const int64_t in_channels = in[1];
    const int64_t k = node.kernel;

    const FoldedConv folded = fold_conv(graph, op, weights);
    const bool from_input = src == graph.input_value();
    memory::desc src_desc = from_input && value_storage[static_cast<size_t>(src)] >= 0 && input_desc_chosen
                                ? value_desc[static_cast<size_t>(src)]
                                : (from_input ? memory::desc(to_dnnl_dims(in), dt::f32, tag::any)
                                              : value_desc[static_cast<size_t>(src)]);
    memory::desc dst_desc = value_desc[static_cast<size_t>(op.dst)];
    ConvChoiceRequest request;
    request.spec = lowering::ConvSpec::of(op, src_desc, dst_desc, {out_channels, in_channels, k, k}, node.stride, node.padding);
    request.weights = folded.weights.data();
    request.bias = folded.bias.data();
    request.winograd_shape = k == 3 && node.stride == 1 && !from_input;
    // Our own Winograd: 3x3 stride 1 pad 1, not the graph input (whose layout the first conv chooses), on
    // dense src and dst (a concat slice is one only at micro-batch 1: checked, so that a future strided
    // slice is refused rather than miswritten).
    const Dims& out = graph.value(op.dst).dims;
    const WinogradOwnShape own_shape{.batch = in[0], .in_channels = in_channels, .out_channels = out_channels,
                                     .height = out[2], .width = out[3], .layout = act_tag, .sum = op.residual >= 0,
                                     .relu = op.activation == Activation::relu};
    request.own_offered = [&](int tile) {
        const memory::desc dense_src(to_dnnl_dims(in), dt::f32, act_tag), dense_dst(to_dnnl_dims(out), dt::f32, act_tag);
        return k == 3 && node.stride == 1 && node.padding == 1 && !from_input && op.activation != Activation::sigmoid &&
               winograd_own_supported() && src_desc == dense_src && dst_desc == dense_dst && in[2] == out[2] &&
               in[3] == out[3] && WinogradOwn::applies(tile, own_shape);
    };
    request.make_own = [&](int tile) {
        return WinogradOwn::create(eng, strm, tile, own_shape, folded.weights.data(), folded.bias.data());
    };
    request.algorithm = options.conv_algorithm;
    request.tune = options.tune;
    if (fixed.algorithms) {
        auto it = fixed.algorithms->find(node.name);
        request.forced = it != fixed.algorithms->end() ? it->second : "direct";
    }
    request.measure_only = measure_only;
    ConvChoice choice = choose_conv_algorithm(eng, strm, request);
    const convolution_forward::primitive_desc& pd = choice.pd;
    const std::shared_ptr<WinogradOwn>& own = choice.own;
    if (from_input && !input_desc_chosen) {
        // The input buffer takes the layout the first convolution asked for (plain NCHW for 3 channels).
        value_desc[static_cast<size_t>(src)] = pd.src_desc();
        storages[static_cast<size_t>(value_storage[static_cast<size_t>(src)])].desc = pd.src_desc();
        input_desc_chosen = true;
    }

    if (own) {
        // Our kernel holds its transformed weights and runs as the step's own pass on this layer's arena
        // buffers and the shared scratchpad.
        add_step(primitive(), {}, node.name, activation_label(op), own->kernel(),
                 static_cast<double>(graph.node_macs(op.node)), own->scratch_bytes());
        steps.back().custom = own_winograd_pass(own, strm, static_cast<const float*>(value_memory(src).get_data_handle()),
                                                static_cast<float*>(value_memory(op.dst).get_data_handle()), scratchpad,
                                                weight_store, scratchpad_bytes);
    } else {
        auto [conv_weights, conv_bias] = upload_weights(folded, pd.weights_desc());
        std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, value_memory(src)},
                                                {DNNL_ARG_WEIGHTS, conv_weights},
                                                {DNNL_ARG_BIAS, conv_bias},
                                                {DNNL_ARG_DST, value_memory(op.dst)}};
        add_step(convolution_forward(pd), std::move(args), node.name, activation_label(op), pd.impl_info_str(),
                 static_cast<double>(graph.node_macs(op.node)), pd.scratchpad_desc().get_size());
    }
    Step& step = steps.back();
    step.algorithm = choice.algorithm;
    step.candidates = std::move(choice.candidates);
    step.tuned = choice.measurement;
    step.own_applies[0] = request.own_offered(4);
    step.own_applies[1] = request.own_offered(2);
    if (measure_only_for_rule) {  // the rule's budget: the exact bytes each Winograd would add over direct
        const double direct_bytes = static_cast<double>(pd.weights_desc().get_size() + folded.bias.size() * sizeof(float));
        for (int t = 0; t < 2; ++t)
            if (step.own_applies[t])
                step.own_extra_bytes[t] = static_cast<double>(WinogradOwn::weight_bytes_of(eng, t == 0 ? 4 : 2, own_shape)) - direct_bytes;
    }
    step.channels[0] = in_channels;
    step.channels[1] = out_channels;
    step.out_hw[0] = out[2];
    step.out_hw[1] = out[3];
}

void Engine::Impl::lower_conv_transpose(const FusedOp& op, const TensorMap& weights) {
    const Node& node = graph.node(op.node);
    const int src = op.srcs[0];
    const Dims& in = graph.value(src).dims;
    const Dims& out = graph.value(op.dst).dims;
    const int64_t in_channels = in[1];
    const int64_t out_channels = node.out_channels;
    const int64_t k = node.kernel;
    const double macs = static_cast<double>(graph.node_macs(op.node));

    if (shuffle_temp[static_cast<size_t>(&op - ops.data())] >= 0) {
        const FoldedConv folded = conv_transpose_as_conv1x1(graph, op, weights);
        const int64_t packed = 4 * out_channels;
        const Storage& temp = storages[static_cast<size_t>(shuffle_temp[static_cast<size_t>(&op - ops.data())])];
        memory temp_memory(temp.desc, eng, arena.base() + temp.arena_offset);
        lowering::ConvSpec spec;
        spec.src = value_desc[static_cast<size_t>(src)];
        spec.dst = temp.desc;
        spec.weight_dims = {packed, in_channels, 1, 1};
        const convolution_forward::primitive_desc pd = lowering::make_conv(eng, spec);
        primitive_attr attr;
        attr.set_scratchpad_mode(scratchpad_mode::user);
        auto [conv_weights, conv_bias] = upload_weights(folded, pd.weights_desc());
        add_step(convolution_forward(pd),
                 {{DNNL_ARG_SRC, value_memory(src)}, {DNNL_ARG_WEIGHTS, conv_weights}, {DNNL_ARG_BIAS, conv_bias},
                  {DNNL_ARG_DST, temp_memory}},
                 node.name, "deconv:conv1x1", pd.impl_info_str(), macs, pd.scratchpad_desc().get_size());
        steps.back().algorithm = "direct";
        memory dst = value_memory(op.dst);
        memory::desc from = pixel_shuffle_view(in[0], out_channels, in[2], in[3], block, true);
        memory::desc to = pixel_shuffle_view(in[0], out_channels, in[2], in[3], block, false);
        memory from_memory(from, eng, temp_memory.get_data_handle());
        memory to_memory(to, eng, dst.get_data_handle());
        reorder::primitive_desc shuffle(eng, from, eng, to, attr);
        add_step(reorder(shuffle), {{DNNL_ARG_FROM, from_memory}, {DNNL_ARG_TO, to_memory}}, node.name + ".shuffle",
                 "deconv:pixel-shuffle", shuffle.impl_info_str(), 0, shuffle.scratchpad_desc().get_size());
        return;
    }

    // oneDNN's deconvolution weights are {O, I, k, k}: PyTorch's with the first two axes swapped.
    const float* pw = find_weight(weights, node.name + ".weight").f32();  // PyTorch [I, O, k, k]
    FoldedConv folded;
    folded.weight_dims = {out_channels, in_channels, k, k};
    folded.bias.assign(static_cast<size_t>(out_channels), 0.0f);
    if (node.bias) std::copy_n(find_weight(weights, node.name + ".bias").f32(), out_channels, folded.bias.begin());
    std::vector<float>& w_oihw = folded.weights;
    w_oihw.resize(static_cast<size_t>(in_channels * out_channels * k * k));
    for (int64_t i = 0; i < in_channels; ++i)
        for (int64_t o = 0; o < out_channels; ++o)
            for (int64_t s = 0; s < k * k; ++s)
                w_oihw[static_cast<size_t>((o * in_channels + i) * k * k + s)] = pw[(i * out_channels + o) * k * k + s];
    lowering::ConvSpec spec = lowering::ConvSpec::of(op, value_desc[static_cast<size_t>(src)],
                                                     value_desc[static_cast<size_t>(op.dst)], {out_channels, in_channels, k, k},
                                                     node.stride, 0);
    spec.padding_r = {out[2] - ((in[2] - 1) * node.stride + k), out[3] - ((in[3] - 1) * node.stride + k)};
    const deconvolution_forward::primitive_desc pd = lowering::make_deconv(eng, spec);
    auto [deconv_weights, deconv_bias] = upload_weights(folded, pd.weights_desc());
    add_step(deconvolution_forward(pd),
             {{DNNL_ARG_SRC, value_memory(src)}, {DNNL_ARG_WEIGHTS, deconv_weights}, {DNNL_ARG_BIAS, deconv_bias},
              {DNNL_ARG_DST, value_memory(op.dst)}},
             node.name, activation_label(op), pd.impl_info_str(), macs, pd.scratchpad_desc().get_size());
}

void Engine::Impl::lower(const TensorMap& weights) {
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    const int input = graph.input_value();
    // The input keeps the activation layout unless a convolution reads it first and picks its own
    // (and no residual copy reads it, which would be lowered before that choice).
    bool first_reader_is_conv = false;
    for (const FusedOp& op : ops)
        if (std::find(op.srcs.begin(), op.srcs.end(), input) != op.srcs.end() || op.residual == input) {
            first_reader_is_conv = op.kind == OpKind::conv && op.srcs[0] == input;
            break;
        }
    const bool input_is_residual = std::any_of(ops.begin(), ops.end(), [&](const FusedOp& op) { return op.residual == input; });
    input_desc_chosen = !first_reader_is_conv || input_is_residual;
    const size_t input_capacity = storages[static_cast<size_t>(value_storage[static_cast<size_t>(input)])].desc.get_size();

    for (size_t k = 0; k < ops.size(); ++k) {
        const FusedOp& op = ops[k];
        const Node& node = graph.node(op.node);
        const memory::desc& dst_desc = value_desc[static_cast<size_t>(op.dst)];
        if (copy_residual[k]) {
            memory from = value_memory(op.residual);
            memory to = value_memory(op.dst);
            reorder::primitive_desc pd(from, to, attr);
            add_step(reorder(pd), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}}, node.name + ".residual_copy", "copy",
                     pd.impl_info_str(), 0, pd.scratchpad_desc().get_size());
        }
        switch (op.kind) {
            case OpKind::conv: lower_conv(op, weights); break;
            case OpKind::conv_transpose: lower_conv_transpose(op, weights); break;
            case OpKind::max_pool: {
                const memory::dims kernel = {node.kernel, node.kernel};
                const memory::dims strides = {node.stride, node.stride};
                const pooling_forward::primitive_desc pd =
                    onednn::max_pool_forward(eng, prop_kind::forward_inference, value_desc[static_cast<size_t>(op.srcs[0])],
                                             dst_desc, strides, kernel, {0, 0}, {0, 0}, attr);
                add_step(pooling_forward(pd), {{DNNL_ARG_SRC, value_memory(op.srcs[0])}, {DNNL_ARG_DST, value_memory(op.dst)}},
                         node.name, "maxpool", pd.impl_info_str(), 0, pd.scratchpad_desc().get_size());
                break;
            }
            case OpKind::concat: {
                if (concat_in_place[k]) break;
                ++concat_copies;
                std::vector<memory::desc> src_descs;
                std::unordered_map<int, memory> args = {{DNNL_ARG_DST, value_memory(op.dst)}};
                for (size_t i = 0; i < op.srcs.size(); ++i) {
                    src_descs.push_back(value_desc[static_cast<size_t>(op.srcs[i])]);
                    args[DNNL_ARG_MULTIPLE_SRC + static_cast<int>(i)] = value_memory(op.srcs[i]);
                }
                const concat::primitive_desc pd = onednn::concat(eng, dst_desc, 1, src_descs, attr);
                add_step(concat(pd), std::move(args), node.name, "concat(copy)", pd.impl_info_str(), 0,
                         pd.scratchpad_desc().get_size());
                break;
            }
            case OpKind::batch_norm: {
                const int64_t channels = graph.value(op.dst).dims[1];
                const normalization_flags flags =
                    normalization_flags::use_global_stats | normalization_flags::use_scale | normalization_flags::use_shift;
                const batch_normalization_forward::primitive_desc pd = onednn::batch_norm_forward(
                    eng, prop_kind::forward_inference, value_desc[static_cast<size_t>(op.srcs[0])], node.epsilon, flags, attr);
                std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, value_memory(op.srcs[0])}, {DNNL_ARG_DST, value_memory(op.dst)}};
                const std::pair<int, const char*> params[] = {{DNNL_ARG_SCALE, ".weight"}, {DNNL_ARG_SHIFT, ".bias"},
                                                             {DNNL_ARG_MEAN, ".running_mean"}, {DNNL_ARG_VARIANCE, ".running_var"}};
                for (auto [arg, suffix] : params) {
                    args[arg] = weight_store.floats(eng, find_weight(weights, node.name + suffix).f32(), channels);
                }
                add_step(batch_normalization_forward(pd), std::move(args), node.name, "batchnorm", pd.impl_info_str(), 0,
                         pd.scratchpad_desc().get_size());
                break;
            }
            case OpKind::relu:
            case OpKind::sigmoid: {
                const algorithm alg = op.kind == OpKind::relu ? algorithm::eltwise_relu : algorithm::eltwise_logistic;
                const eltwise_forward::primitive_desc pd = onednn::eltwise_forward(
                    eng, prop_kind::forward_inference, alg, value_desc[static_cast<size_t>(op.srcs[0])], 0.0f, 0.0f, attr);
                add_step(eltwise_forward(pd), {{DNNL_ARG_SRC, value_memory(op.srcs[0])}, {DNNL_ARG_DST, value_memory(op.dst)}},
                         node.name, op_name(op.kind), pd.impl_info_str(), 0, pd.scratchpad_desc().get_size());
                break;
            }
            case OpKind::add: {
                const binary::primitive_desc pd =
                    onednn::binary(eng, algorithm::binary_add, value_desc[static_cast<size_t>(op.srcs[0])],
                                   value_desc[static_cast<size_t>(op.srcs[1])], dst_desc, attr);
                add_step(binary(pd),
                         {{DNNL_ARG_SRC_0, value_memory(op.srcs[0])}, {DNNL_ARG_SRC_1, value_memory(op.srcs[1])},
                          {DNNL_ARG_DST, value_memory(op.dst)}},
                         node.name, "add", pd.impl_info_str(), 0, pd.scratchpad_desc().get_size());
                break;
            }
            case OpKind::input: break;
        }
    }
    const size_t input_bytes = value_desc[static_cast<size_t>(input)].get_size();
    if (input_bytes > input_capacity)
        throw Error(fmt::format("engine: input layout needs {} bytes, planned {}", input_bytes, input_capacity));

    // Input and output reorders between the caller's NCHW and the internal layouts, around the steps.
    const Dims& in_dims = graph.value(input).dims;
    const Dims& out_dims = graph.value(graph.output_value()).dims;
    static float placeholder = 0.0f;
    user_src = memory({to_dnnl_dims(in_dims), dt::f32, tag::nchw}, eng, &placeholder);
    user_dst = memory({to_dnnl_dims(out_dims), dt::f32, tag::nchw}, eng, &placeholder);
    memory internal_src = value_memory(input);
    memory internal_dst = value_memory(graph.output_value());
    reorder::primitive_desc in_pd(user_src, internal_src, attr);
    reorder::primitive_desc out_pd(internal_dst, user_dst, attr);
    Step input_step;
    input_step.prim = reorder(in_pd);
    input_step.args = {{DNNL_ARG_FROM, user_src}, {DNNL_ARG_TO, internal_src}};
    input_step.name = "input";
    input_step.op = "reorder";
    input_step.kernel = in_pd.impl_info_str();
    steps.insert(steps.begin(), std::move(input_step));
    add_step(reorder(out_pd), {{DNNL_ARG_FROM, internal_dst}, {DNNL_ARG_TO, user_dst}}, "output", "reorder",
             out_pd.impl_info_str(), 0, out_pd.scratchpad_desc().get_size());
    scratchpad_bytes = std::max(scratchpad_bytes, in_pd.scratchpad_desc().get_size());

    bind_scratchpad();
    input_dims = in_dims;
    input_dims[0] = 1;
    output_dims = out_dims;
    output_dims[0] = 1;
}

void Engine::Impl::compile(const Graph& full_graph, const TensorMap& weights, const EngineOptions& engine_options,
                           FixedChoices fixed_choices) {
    options = engine_options;
    fixed = std::move(fixed_choices);
    graph = full_graph.with_batch(options.micro_batch);
    ops = fuse(graph);
    try {
        choose_layout();
        plan_storage();
        allocate_arena();
        lower(weights);
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("engine: oneDNN could not compile the graph: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
}

}  // namespace resunet
