// The trainer's compile step: activation layout, buffers (shared by forward liveness), gradient buffers,
// the lowering driver and when each host gradient is final (train/trainer_impl.h).
#include "train/trainer_impl.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

namespace resunet {

// Gradient buffers are shared between values whose gradients are never live at the same time. In
// backward order the gradient of a value is live from its first write (by its last consumer, or the loss
// for the output) until its producer's backward has read it; buffers of the same size are recycled.
// This halves the trainer's memory compared with one gradient buffer per value.
void Trainer::Impl::plan_gradient_buffers() {
    const int num_nodes = static_cast<int>(graph.nodes().size());
    const int output = graph.output_value();
    std::vector<std::vector<int>> starts(index(num_nodes + 1));
    for (int v = 0; v < static_cast<int>(graph.values().size()); ++v) {
        if (!needs_diff[index(v)]) continue;
        const std::vector<int>& consumers = graph.value(v).consumers;
        if (v == output) {
            starts[index(num_nodes)].push_back(v);
        } else if (consumers.empty()) {
            // Nobody reads it: its gradient stays zero (never written).
            diffs[index(v)] = allocate(value_desc[index(v)]);
            std::memset(diffs[index(v)].get_data_handle(), 0, value_desc[index(v)].get_size());
        } else {
            starts[index(*std::max_element(consumers.begin(), consumers.end()))].push_back(v);
        }
    }
    std::multimap<size_t, void*> free_buffers;
    std::vector<void*> pooled(graph.values().size(), nullptr);
    for (int k = num_nodes; k >= 0; --k) {
        for (int v : starts[index(k)]) {
            const size_t bytes = value_desc[index(v)].get_size();
            auto it = free_buffers.find(bytes);
            void* handle = nullptr;
            if (it != free_buffers.end()) {
                handle = it->second;
                free_buffers.erase(it);
            } else {
                gradient_buffers.push_back(allocate(memory::desc({static_cast<memory::dim>(bytes)}, dt::u8, tag::x)));
                handle = gradient_buffers.back().get_data_handle();
            }
            diffs[index(v)] = memory(value_desc[index(v)], eng, handle);
            pooled[index(v)] = handle;
        }
        if (k == num_nodes || relu_fused[index(k)]) continue;
        // A fused batch norm's backward reads its ReLU's output gradient: that buffer lives until here.
        const int produced = fused_relu[index(k)] >= 0 ? graph.node(fused_relu[index(k)]).output : graph.node(k).output;
        if (pooled[index(produced)]) free_buffers.emplace(value_desc[index(produced)].get_size(), pooled[index(produced)]);
    }
}

// See ActivationLayout. A block must divide every concat offset, because concat slices are views.
tag Trainer::Impl::choose_layout() const {
    auto block_of = [](tag t) { return t == tag::nChw16c ? 16 : t == tag::nChw8c ? 8 : 0; };
    auto offsets_allow = [&](int block) {
        for (const Node& node : graph.nodes()) {
            if (node.kind != OpKind::concat) continue;
            int64_t offset = 0;
            for (int src : node.inputs) {
                if (offset % block != 0) return false;
                offset += graph.value(src).dims[1];
            }
        }
        return true;
    };
    switch (options.layout) {
        case ActivationLayout::nchw: return tag::nchw;
        case ActivationLayout::nhwc: return tag::nhwc;
        case ActivationLayout::blocked:
            for (tag candidate : {tag::nChw16c, tag::nChw8c})
                if (offsets_allow(block_of(candidate)) && !probe_conv(eng, 64, candidate).starts_with("ref")) return candidate;
            throw Error("trainer: no channel-blocked layout fits this graph's concat offsets and runs without oneDNN's "
                        "reference convolution on this CPU");
        case ActivationLayout::automatic: {
            memory::desc chosen;
            probe_conv(eng, 64, tag::any, &chosen);
            for (tag candidate : {tag::nChw16c, tag::nChw8c})
                if (chosen == memory::desc({1, 64, 16, 16}, dt::f32, candidate) && offsets_allow(block_of(candidate)))
                    return candidate;
            return tag::nhwc;
        }
    }
    return tag::nhwc;
}

void Trainer::Impl::find_batch_norm_relu_pairs() {
    fused_relu.assign(graph.nodes().size(), -1);
    relu_fused.assign(graph.nodes().size(), false);
    if (!options.fuse_batch_norm_relu) return;
    for (int n = 0; n < static_cast<int>(graph.nodes().size()); ++n) {
        const Node& node = graph.node(n);
        if (node.kind != OpKind::batch_norm || node.output == graph.output_value()) continue;
        const std::vector<int>& readers = graph.value(node.output).consumers;
        if (readers.size() != 1 || graph.node(readers[0]).kind != OpKind::relu) continue;
        fused_relu[index(n)] = readers[0];
        relu_fused[index(readers[0])] = true;
    }
}

// Which values backward never reads: everything but the inputs of convolutions, batch norms, max
// pools (kept for activation()) and sigmoids, the outputs of ReLUs, and the graph's input and output.
void Trainer::Impl::find_forward_only_values(const std::vector<int>& alias_of) {
    forward_only.assign(graph.values().size(), false);
    if (!options.share_forward_buffers) return;
    for (size_t v = 0; v < graph.values().size(); ++v) {
        const int value = static_cast<int>(v);
        if (alias_of[v] >= 0 || value == graph.input_value() || value == graph.output_value()) continue;
        const int producer = graph.value(value).producer;
        bool kept = producer >= 0 && graph.node(producer).kind == OpKind::relu;
        for (int reader : graph.value(value).consumers) {
            const OpKind kind = graph.node(reader).kind;
            kept |= kind == OpKind::conv || kind == OpKind::conv_transpose || kind == OpKind::batch_norm ||
                    kind == OpKind::max_pool || kind == OpKind::sigmoid;
        }
        forward_only[v] = !kept;
    }
}

// Kept values get a buffer each; forward-only ones share buffers of equal size, live from their
// producer until their last reader has run (a value never gets the buffer of one its own producer reads).
void Trainer::Impl::allocate_values(const std::vector<int>& alias_of) {
    find_forward_only_values(alias_of);
    const size_t num_values = graph.values().size();
    std::vector<std::vector<int>> dies_after(graph.nodes().size());
    for (size_t v = 0; v < num_values; ++v) {
        if (alias_of[v] >= 0) continue;
        if (!forward_only[v]) {
            values[v] = allocate(value_desc[v]);
            continue;
        }
        const Value& value = graph.value(static_cast<int>(v));
        const int last = value.consumers.empty() ? value.producer
                                                 : *std::max_element(value.consumers.begin(), value.consumers.end());
        dies_after[index(last)].push_back(static_cast<int>(v));
    }
    std::multimap<size_t, memory> free_buffers;
    for (size_t n = 0; n < graph.nodes().size(); ++n) {
        const int out = graph.node(static_cast<int>(n)).output;
        if (out >= 0 && forward_only[index(out)]) {
            const size_t bytes = value_desc[index(out)].get_size();
            auto it = free_buffers.find(bytes);
            if (it != free_buffers.end()) {
                values[index(out)] = memory(value_desc[index(out)], eng, it->second.get_data_handle());
                free_buffers.erase(it);
            } else {
                values[index(out)] = allocate(value_desc[index(out)]);
            }
        }
        for (int v : dies_after[n]) free_buffers.emplace(value_desc[index(v)].get_size(), values[index(v)]);
    }
    for (size_t v = 0; v < num_values; ++v)
        if (alias_of[v] >= 0) values[v] = values[index(alias_of[v])];
}

void Trainer::Impl::compile() {
    attr.set_scratchpad_mode(scratchpad_mode::user);
    act_tag = choose_layout();
    const bool blocked = act_tag == tag::nChw16c || act_tag == tag::nChw8c;
    const size_t num_values = graph.values().size();
    const int input = graph.input_value();
    const int output = graph.output_value();
    value_desc.resize(num_values);
    values.resize(num_values);
    diffs.resize(num_values);
    needs_diff.assign(num_values, false);
    contributed.assign(num_values, false);
    plans.assign(graph.nodes().size(), NodePlan{});
    find_batch_norm_relu_pairs();
    // A fused batch norm's own output is never materialised: it aliases its ReLU's output.
    std::vector<int> alias_of(num_values, -1);
    for (size_t n = 0; n < fused_relu.size(); ++n)
        if (fused_relu[n] >= 0) alias_of[index(graph.node(static_cast<int>(n)).output)] = graph.node(fused_relu[n]).output;
    size_t largest = 0;
    for (size_t v = 0; v < num_values; ++v) {
        // Under a blocked layout the input (3 channels) stays nchw: oneDNN's first-layer kernels read it
        // so, while a padded nChw8c input sends the 3x3 convolution to the reference kernel.
        const tag value_tag = blocked && static_cast<int>(v) == input ? tag::nchw : act_tag;
        value_desc[v] = memory::desc(to_dnnl_dims(graph.value(static_cast<int>(v)).dims), dt::f32, value_tag);
        // A fused batch norm's output gradient is never formed (its backward reads the ReLU's).
        needs_diff[v] = (static_cast<int>(v) != input || options.input_gradient) && alias_of[v] < 0;
        largest = std::max(largest, value_desc[v].get_size());
    }
    allocate_values(alias_of);
    contribution = allocate(memory::desc({static_cast<memory::dim>(largest / sizeof(float))}, dt::f32, tag::x));
    plan_gradient_buffers();

    const Dims& in_dims = graph.value(input).dims;
    const Dims& out_dims = graph.value(output).dims;
    input_dims = in_dims;
    output_dims = out_dims;
    logits.assign(index(num_elements(out_dims)), 0.0f);
    dlogits.assign(index(num_elements(out_dims)), 0.0f);
    static float placeholder = 0.0f;
    user_images = memory({to_dnnl_dims(in_dims), dt::f32, tag::nchw}, eng, &placeholder);
    user_logits = memory({to_dnnl_dims(out_dims), dt::f32, tag::nchw}, eng, logits.data());
    user_dlogits = memory({to_dnnl_dims(out_dims), dt::f32, tag::nchw}, eng, dlogits.data());

    add_reorder(forward_train_steps, user_images, values[index(input)], "input", false);
    forward_eval_steps.push_back(forward_train_steps.back());
    for (int n = 0; n < static_cast<int>(graph.nodes().size()); ++n) lower_forward(n);
    add_reorder(forward_train_steps, values[index(output)], user_logits, "output", false);
    forward_eval_steps.push_back(forward_train_steps.back());

    add_reorder(backward_steps, user_dlogits, diffs[index(output)], "loss", false);
    contributed[index(output)] = true;
    for (int n = static_cast<int>(graph.nodes().size()) - 1; n >= 0; --n) lower_backward(n);
    if (options.input_gradient) {
        input_grad.assign(index(num_elements(in_dims)), 0.0f);
        user_input_grad = memory({to_dnnl_dims(in_dims), dt::f32, tag::nchw}, eng, input_grad.data());
        add_reorder(backward_steps, diffs[index(input)], user_input_grad, "input.grad", false);
    }

    drop_unread_mirrors();
    scratchpad = memory({{static_cast<memory::dim>(std::max<size_t>(scratchpad_bytes, 1))}, dt::u8, tag::x}, eng);
    for (auto* list : {&prepare_steps, &forward_train_steps, &forward_eval_steps, &backward_steps})
        for (Step& s : *list) s.args[DNNL_ARG_SCRATCHPAD] = scratchpad;
    plan_gradient_ready();
}

// A weights mirror that no primitive reads (every pass of its layer that would read it runs our own
// Winograd, which reads the host weights) is not refreshed before every forward: its reorder is dropped,
// and its memory with it.
void Trainer::Impl::drop_unread_mirrors() {
    std::unordered_map<const void*, int> readers;
    for (const auto* list : {&forward_train_steps, &forward_eval_steps, &backward_steps})
        for (const Step& s : *list)
            for (const auto& [arg, mem] : s.args) ++readers[mem.get_data_handle()];
    std::vector<const void*> dropped;
    std::erase_if(prepare_steps, [&](const Step& s) {
        if (s.custom) return false;
        const auto to = s.args.find(DNNL_ARG_TO);
        if (to == s.args.end() || readers.count(to->second.get_data_handle())) return false;
        dropped.push_back(to->second.get_data_handle());
        return true;
    });
    for (auto& [name, mirrors] : weight_mirrors)
        std::erase_if(mirrors, [&](const auto& mirror) {
            return std::find(dropped.begin(), dropped.end(), mirror.second.get_data_handle()) != dropped.end();
        });
}

// A host gradient is final after the last backward step that has it among its arguments (the weights
// primitive itself, or the reorder from its own layout).
void Trainer::Impl::plan_gradient_ready() {
    std::unordered_map<const void*, std::string> owner;
    for (const std::string& name : learnable) owner[grads.at(name).f32()] = name;
    std::map<std::string, size_t> last;
    for (size_t i = 0; i < backward_steps.size(); ++i)
        for (const auto& [arg, mem] : backward_steps[i].args)
            if (auto it = owner.find(mem.get_data_handle()); it != owner.end()) last[it->second] = i;
    ready_after.assign(std::max<size_t>(backward_steps.size(), 1), {});
    for (const std::string& name : learnable) {  // one not found by its pointer: final after the whole backward
        auto it = last.find(name);
        ready_after[it != last.end() ? it->second : ready_after.size() - 1].push_back(name);
    }
}

}  // namespace resunet
