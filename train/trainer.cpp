#include "train/trainer.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <oneapi/dnnl/dnnl.hpp>
#include <unordered_map>

#include "engine/conv_tuning.h"
#include "engine/onednn_util.h"
#include "engine/winograd_own.h"
#include "engine/winograd_own_bwd_weights.h"
#include "graph/safetensors.h"

namespace resunet {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

using Clock = std::chrono::steady_clock;

struct Step {
    primitive prim;
    std::unordered_map<int, memory> args;
    std::string name;  // graph node (or node + ".what") the step belongs to
    std::function<void()> custom;  // our own kernel, run instead of `prim` when set
};

// Deterministic values in [0, 1), as after a ReLU: what candidates are timed and compared on.
void fill_unit(const memory& m) {
    float* p = static_cast<float*>(m.get_data_handle());
    const size_t n = m.get_desc().get_size() / sizeof(float);
    uint32_t state = 12345;
    for (size_t i = 0; i < n; ++i) {
        state = state * 1664525u + 1013904223u;
        p[i] = static_cast<float>(state >> 8) / 16777216.0f;
    }
}

bool all_finite(const float* data, int64_t count) {
    bool finite = true;
    for (int64_t i = 0; i < count; ++i) finite &= std::isfinite(data[i]);
    return finite;
}

size_t index(int64_t i) { return static_cast<size_t>(i); }

// Everything a node's backward lowering needs from its forward lowering.
struct NodePlan {
    convolution_forward::primitive_desc conv;
    deconvolution_forward::primitive_desc deconv;
    batch_normalization_forward::primitive_desc batch_norm;
    pooling_forward::primitive_desc pool;
    eltwise_forward::primitive_desc eltwise;
    memory workspace;       // max pool: argmax positions
    memory mean, variance;  // batch norm: batch statistics of the last training forward
    memory::dims padding_l, padding_r;
};

}  // namespace

struct Trainer::Impl {
    dnnl::engine eng{dnnl::engine::kind::cpu, 0};
    stream strm{eng};
    Graph graph;
    TrainOptions options;
    tag act_tag = tag::nhwc;
    primitive_attr attr;  // user scratchpad

    TensorMap weights;  // master copy in PyTorch layouts; oneDNN memories point into it
    TensorMap grads;
    TensorMap adam_m, adam_v;
    std::vector<std::string> learnable;  // graph order
    int64_t step = 0;
    int64_t epoch = 0;
    double lr = 1e-4;
    LossValue last_loss;

    std::vector<memory::desc> value_desc;
    std::vector<memory> values;      // forward activations, one buffer each (all kept for backward)
    std::vector<memory> diffs;       // d loss / d value, for values that need it
    std::vector<bool> needs_diff;
    std::vector<bool> contributed;   // while lowering backward: the diff buffer already holds a term
    memory contribution;             // temp for gradient terms of values with several consumers
    std::vector<memory> gradient_buffers;  // storage the diffs share (see plan_gradient_buffers)
    std::vector<NodePlan> plans;
    std::vector<int> batch_norm_nodes;
    // fused_relu[n]: for a batch norm n fused with its ReLU, that ReLU's node index; else -1. relu_fused[r]:
    // the ReLU r's node is folded into the batch norm before it.
    std::vector<int> fused_relu;
    std::vector<bool> relu_fused;
    std::vector<std::shared_ptr<void>> own_kernels;  // chosen own kernels (steps hold them too)
    std::vector<TrainConvChoice> conv_choices;
    std::vector<bool> forward_only;  // per value: no backward reads it, its buffer is shared (share_forward_buffers)

    std::vector<float> logits, dlogits, input_grad;
    memory user_images, user_logits, user_dlogits, user_input_grad;

    // prepare: host weights -> the layouts primitives chose; then forward (training or eval); backward.
    std::vector<Step> prepare_steps, forward_train_steps, forward_eval_steps, backward_steps;
    // ready_after[i]: learnable parameters whose host gradient is final once backward step i has run.
    std::vector<std::vector<std::string>> ready_after;
    std::function<void(const std::string&)> gradient_ready;
    std::map<std::string, std::vector<std::pair<memory::desc, memory>>> weight_mirrors;
    size_t scratchpad_bytes = 0;
    memory scratchpad;
    size_t activation_bytes = 0;
    double compile_ms = 0;
    Dims input_dims, output_dims;

    void add(std::vector<Step>& list, primitive prim, std::unordered_map<int, memory> args, std::string name,
             size_t scratch) {
        scratchpad_bytes = std::max(scratchpad_bytes, scratch);
        list.push_back(Step{std::move(prim), std::move(args), std::move(name), nullptr});
    }
    // Fills a weights mirror from its host tensor now (prepare_steps does it before each forward).
    void refresh_mirror(memory from, memory to) {
        if (from.get_data_handle() == to.get_data_handle()) return;
        reorder(from, to).execute(strm, from, to);
        strm.wait();
    }
    void add_custom(std::vector<Step>& list, std::function<void()> run, std::string name, size_t scratch) {
        scratchpad_bytes = std::max(scratchpad_bytes, scratch);
        list.push_back(Step{primitive(), {}, std::move(name), std::move(run)});
    }
    // One candidate of our own for a pass of a 3x3 convolution: `run` computes the pass on a scratch of
    // `scratch_bytes`; `kernel` keeps the object alive (a WinogradOwn or a WinogradOwnBwdWeights).
    struct OwnPass {
        std::string algorithm;  // "winograd_f43", "winograd_f23"
        std::function<void(void* scratch)> run;
        size_t scratch_bytes = 0;
        std::shared_ptr<void> kernel;
        // What it adds to every step besides `run` (the weights transform), timed with it: nullptr if nothing.
        std::function<void()> per_step = nullptr;
    };
    // Our own kernel for one pass (forward, backward_data, backward_weights) of a 3x3 convolution, or
    // nothing for oneDNN's direct kernel (see TrainConvAlgorithm). `direct`: the direct pass's steps (the
    // primitive, and any reorder of its result into `outputs`) and their largest scratchpad; `inputs` are filled with test values for the
    // measurement and restored after; `outputs` are compared; `make(tile)` builds a candidate (nothing where
    // `applies` refuses it). A candidate's time includes its per-step work (the weights transform).
    std::optional<OwnPass> choose_conv(const std::string& layer, const std::string& pass,
                                       const std::function<bool(int tile, std::string* why)>& applies,
                                       const std::vector<Step>& direct, size_t direct_scratch, const std::vector<memory>& inputs,
                                       const std::vector<memory>& outputs,
                                       const std::function<std::optional<OwnPass>(int tile)>& make);
    void add_reorder(std::vector<Step>& list, const memory& from, const memory& to, const std::string& name,
                     bool accumulate) {
        primitive_attr reorder_attr;
        reorder_attr.set_scratchpad_mode(scratchpad_mode::user);
        if (accumulate) {
            post_ops ops;
            ops.append_sum(1.0f);
            reorder_attr.set_post_ops(ops);
        }
        reorder::primitive_desc pd(eng, from.get_desc(), eng, to.get_desc(), reorder_attr);
        add(list, reorder(pd), {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}}, name, pd.scratchpad_desc().get_size());
    }
    memory allocate(const memory::desc& desc) {
        activation_bytes += desc.get_size();
        return memory(desc, eng);
    }
    memory host(TensorMap& map, const std::string& name, const memory::desc& desc) {
        return memory(desc, eng, map.at(name).f32());
    }
    // The weights of `name` in the layout a primitive wants: the host buffer itself when it is plain,
    // else a mirror refreshed by a reorder before every forward (weights change every step).
    memory weights_for(const std::string& name, const memory::desc& plain, const memory::desc& wanted) {
        if (wanted == plain) return host(weights, name, plain);
        for (auto& [desc, mirror] : weight_mirrors[name])
            if (desc == wanted) return mirror;
        memory mirror(wanted, eng);
        add_reorder(prepare_steps, host(weights, name, plain), mirror, name + ".reorder", false);
        weight_mirrors[name].emplace_back(wanted, mirror);
        return mirror;
    }
    // Where a weights-gradient primitive writes: the host gradient, or a buffer reordered into it after.
    struct PendingGradient {
        memory temp;
        std::string name;
        memory::desc plain;
    };
    memory gradient_for(const std::string& name, const memory::desc& plain, const memory::desc& produced,
                        std::vector<PendingGradient>& pending) {
        if (produced == plain) return host(grads, name, plain);
        memory temp = allocate(produced);
        pending.push_back({temp, name, plain});
        return temp;
    }
    // Reorders the gradients written in a primitive's own layout into the host tensors (after the primitive).
    void flush_gradients(std::vector<PendingGradient>& pending) {
        for (PendingGradient& p : pending) add_reorder(backward_steps, p.temp, host(grads, p.name, p.plain), p.name + ".grad_reorder", false);
        pending.clear();
    }

    // The buffer a backward primitive writes the gradient of `value` into: its diff buffer for the first
    // term, else the shared temp that finish_contribution() adds in (gradient fan-out).
    memory contribution_target(int value) {
        const memory::desc& desc = value_desc[index(value)];
        if (needs_diff[index(value)] && !contributed[index(value)]) return diffs[index(value)];
        return memory(desc, eng, contribution.get_data_handle());
    }
    void finish_contribution(int value, const std::string& name) {
        if (!needs_diff[index(value)]) return;
        if (contributed[index(value)])
            add_reorder(backward_steps, memory(value_desc[index(value)], eng, contribution.get_data_handle()),
                        diffs[index(value)], name + ".accumulate", true);
        contributed[index(value)] = true;
    }
    // Adds `from` (the value's dims, any plain view) into the gradient of `value`. An add's backward thus
    // copies its output gradient to each operand; aliasing the buffers instead would save those copies.
    void contribute(const memory& from, int value, const std::string& name) {
        if (!needs_diff[index(value)]) return;
        add_reorder(backward_steps, from, diffs[index(value)], name + (contributed[index(value)] ? ".accumulate" : ".copy"),
                    contributed[index(value)]);
        contributed[index(value)] = true;
    }

    void compile();
    tag choose_layout() const;
    void find_batch_norm_relu_pairs();
    void find_forward_only_values(const std::vector<int>& alias_of);
    void allocate_values(const std::vector<int>& alias_of);
    void plan_gradient_buffers();
    void lower_forward(int node_index);
    void lower_backward(int node_index);
    // profile_gradients(): set while it runs; each step is then waited for and timed into `profile`.
    std::vector<Trainer::StepTime>* profile = nullptr;
    const char* profile_phase = "";
    void execute(Step& s) {
        const auto start = profile ? Clock::now() : Clock::time_point{};
        if (s.custom)
            s.custom();
        else
            s.prim.execute(strm, s.args);
        if (profile) {
            strm.wait();
            profile->push_back({s.name, profile_phase, std::chrono::duration<double, std::milli>(Clock::now() - start).count()});
        }
    }
    void run(std::vector<Step>& list) {
        for (Step& s : list) execute(s);
    }
    void run_backward() {
        if (!gradient_ready) return run(backward_steps);
        for (size_t i = 0; i < backward_steps.size(); ++i) {
            execute(backward_steps[i]);
            if (ready_after[i].empty()) continue;
            strm.wait();
            for (const std::string& name : ready_after[i]) gradient_ready(name);
        }
    }
    void plan_gradient_ready();
    void adam_step();
    void forward(const float* images, bool training);
    LossValue loss_and_backward(const float* masks, float gradient_scale = 1.0f);
    void update_running_statistics();
    void check_finite_step(const LossValue& loss) const;
    void set_threads() const {
        if (options.threads > 0) omp_set_num_threads(options.threads);
    }
};

std::optional<Trainer::Impl::OwnPass> Trainer::Impl::choose_conv(const std::string& layer, const std::string& pass,
                                                                 const std::function<bool(int tile, std::string* why)>& applies,
                                                                 const std::vector<Step>& direct, size_t direct_scratch,
                                                                 const std::vector<memory>& inputs,
                                                                 const std::vector<memory>& outputs,
                                                                 const std::function<std::optional<OwnPass>(int tile)>& make) {
    TrainConvChoice choice{layer, pass, "direct", ""};
    std::string why;
    const auto planned = options.conv_plan.find(layer + "/" + pass);
    if (planned != options.conv_plan.end()) {
        if (planned->second == "direct") {
            choice.summary = "direct (plan)";
            conv_choices.push_back(choice);
            return std::nullopt;
        }
        if (planned->second != "winograd_f43" && planned->second != "winograd_f23")
            throw Error(fmt::format("trainer: conv plan names an unknown algorithm '{}' for {}/{}", planned->second, layer, pass));
        const int tile = planned->second == "winograd_f43" ? 4 : 2;
        if (!applies(tile, &why))
            throw Error(fmt::format("trainer: conv plan asks {} for {}/{}, which does not apply here: {}", planned->second, layer,
                                    pass, why));
    } else if (options.conv_algorithm == TrainConvAlgorithm::direct || (!applies(4, &why) && !applies(2, &why))) {
        choice.summary = options.conv_algorithm == TrainConvAlgorithm::direct ? "direct (asked for)" : "direct (" + why + ")";
        conv_choices.push_back(choice);
        return std::nullopt;
    }
    using Ms = std::chrono::duration<double, std::milli>;
    // The inputs get test values, and their contents back after: a diff buffer may hold the zeros of a
    // gradient that no step ever writes.
    std::vector<std::vector<char>> saved;
    for (const memory& m : inputs) {
        const char* data = static_cast<const char*>(m.get_data_handle());
        saved.emplace_back(data, data + m.get_desc().get_size());
        fill_unit(m);
    }
    const memory direct_scratchpad({{static_cast<memory::dim>(std::max<size_t>(direct_scratch, 1))}, dt::u8, tag::x}, eng);
    // Warm-up (first touch, caches), then the best of two runs, or of one when a run takes over 50 ms (a
    // width-64 224x224 batch-16 layer: the noise is small against it, and building stays near a minute).
    // A pass the plan names runs once, for the check only.
    const bool from_plan = planned != options.conv_plan.end();
    auto time_best = [&](const std::function<void()>& run) {
        auto start = Clock::now();
        run();
        double best = Ms(Clock::now() - start).count();
        if (from_plan) return best;
        const int reps = best > 50 ? 1 : 2;
        best = 1e300;
        for (int rep = 0; rep < reps; ++rep) {
            start = Clock::now();
            run();
            best = std::min(best, Ms(Clock::now() - start).count());
        }
        return best;
    };
    const double direct_ms = time_best([&] {
        for (const Step& pass_step : direct) {
            std::unordered_map<int, memory> args = pass_step.args;
            args[DNNL_ARG_SCRATCHPAD] = direct_scratchpad;
            pass_step.prim.execute(strm, args);
        }
        strm.wait();
    });
    std::vector<std::vector<float>> reference;
    double range = 0;
    for (const memory& m : outputs) {
        const float* out = static_cast<const float*>(m.get_data_handle());
        reference.emplace_back(out, out + m.get_desc().get_size() / sizeof(float));
        for (float v : reference.back()) range = std::max(range, static_cast<double>(std::abs(v)));
    }
    choice.summary = fmt::format("direct {:.2f} ms", direct_ms);
    std::optional<OwnPass> chosen;
    double chosen_ms = direct_ms;
    // The plan's tile; under `winograd` F(4x4), or F(2x2) where only that applies (it has more tiles); else both.
    std::vector<int> tiles;
    if (from_plan)
        tiles = {planned->second == "winograd_f43" ? 4 : 2};
    else if (options.conv_algorithm == TrainConvAlgorithm::winograd)
        tiles = {applies(4, nullptr) ? 4 : 2};
    else
        tiles = {4, 2};
    for (int tile : tiles) {
        if (!applies(tile, nullptr)) continue;
        std::optional<OwnPass> own = make(tile);
        if (!own) continue;
        const memory scratch({{static_cast<memory::dim>(std::max<size_t>(own->scratch_bytes, 1))}, dt::u8, tag::x}, eng);
        const double ms = time_best([&] {
            if (own->per_step) own->per_step();
            own->run(scratch.get_data_handle());
        });
        double worst = 0;
        for (size_t k = 0; k < outputs.size(); ++k) {
            const float* out = static_cast<const float*>(outputs[k].get_data_handle());
            for (size_t i = 0; i < reference[k].size(); ++i)
                worst = std::max(worst, static_cast<double>(std::abs(out[i] - reference[k][i])));
        }
        const double error = range > 0 ? worst / range : worst;
        const bool passed = error <= kOwnWinogradRelativeBound;
        choice.summary += fmt::format(", {} {:.2f} ms (err {:.1e}{})", own->algorithm, ms, error, passed ? "" : ", refused");
        if (from_plan && !passed)
            throw Error(fmt::format("trainer: conv plan's {} for {}/{} is {:.1e} of the range off the direct result (bound {:.0e})",
                                    own->algorithm, layer, pass, error, kOwnWinogradRelativeBound));
        const bool wins = from_plan || options.conv_algorithm == TrainConvAlgorithm::winograd || ms < chosen_ms * 0.97;
        if (passed && wins) {
            chosen = std::move(own);
            chosen_ms = ms;
            choice.algorithm = chosen->algorithm;
        }
    }
    for (size_t k = 0; k < inputs.size(); ++k) std::memcpy(inputs[k].get_data_handle(), saved[k].data(), saved[k].size());
    conv_choices.push_back(choice);
    return chosen;
}

void Trainer::Impl::lower_forward(int node_index) {
    const Node& node = graph.node(node_index);
    NodePlan& plan = plans[index(node_index)];
    const int dst = node.output;
    const memory::desc& dst_desc = value_desc[index(dst)];
    const Dims& out = graph.value(dst).dims;
    auto both = [&](primitive prim, const std::unordered_map<int, memory>& args, const std::string& name, size_t scratch) {
        add(forward_train_steps, prim, args, name, scratch);
        add(forward_eval_steps, prim, args, name, scratch);
    };
    switch (node.kind) {
        case OpKind::input: break;
        case OpKind::conv:
        case OpKind::conv_transpose: {
            const int src = node.inputs[0];
            const Dims& in = graph.value(src).dims;
            const int64_t k = node.kernel, s = node.stride;
            const bool is_conv = node.kind == OpKind::conv;
            const memory::dims strides = {s, s};
            if (is_conv) {
                plan.padding_l = {node.padding, node.padding};
                plan.padding_r = {(out[2] - 1) * s + k - in[2] - node.padding, (out[3] - 1) * s + k - in[3] - node.padding};
            } else {
                plan.padding_l = {0, 0};
                plan.padding_r = {out[2] - ((in[2] - 1) * s + k), out[3] - ((in[3] - 1) * s + k)};
            }
            const memory::desc weights_any({out[1], in[1], k, k}, dt::f32, tag::any);
            const memory::desc bias_desc({out[1]}, dt::f32, tag::x);
            // PyTorch layouts: Conv2d [O, I, k, k] is oneDNN's oihw; ConvTranspose2d [I, O, k, k] is oneDNN's
            // deconvolution weights {O, I, k, k} stored as iohw. So the host tensors are used as they are.
            const memory::desc plain({out[1], in[1], k, k}, dt::f32, is_conv ? tag::oihw : tag::iohw);
            memory weights_memory;
            size_t scratch = 0;
            primitive prim;
            if (is_conv) {
                auto desc = node.bias ? convolution_forward::desc(prop_kind::forward_training, algorithm::convolution_direct,
                                                                   value_desc[index(src)], weights_any, bias_desc, dst_desc,
                                                                   strides, plan.padding_l, plan.padding_r)
                                      : convolution_forward::desc(prop_kind::forward_training, algorithm::convolution_direct,
                                                                   value_desc[index(src)], weights_any, dst_desc, strides,
                                                                   plan.padding_l, plan.padding_r);
                plan.conv = convolution_forward::primitive_desc(desc, attr, eng);
                weights_memory = weights_for(node.name + ".weight", plain, plan.conv.weights_desc());
                scratch = plan.conv.scratchpad_desc().get_size();
                prim = convolution_forward(plan.conv);
            } else {
                auto desc = node.bias ? deconvolution_forward::desc(prop_kind::forward_training, algorithm::deconvolution_direct,
                                                                     value_desc[index(src)], weights_any, bias_desc, dst_desc,
                                                                     strides, plan.padding_l, plan.padding_r)
                                      : deconvolution_forward::desc(prop_kind::forward_training, algorithm::deconvolution_direct,
                                                                     value_desc[index(src)], weights_any, dst_desc, strides,
                                                                     plan.padding_l, plan.padding_r);
                plan.deconv = deconvolution_forward::primitive_desc(desc, attr, eng);
                weights_memory = weights_for(node.name + ".weight", plain, plan.deconv.weights_desc());
                scratch = plan.deconv.scratchpad_desc().get_size();
                prim = deconvolution_forward(plan.deconv);
            }
            std::unordered_map<int, memory> args = {
                {DNNL_ARG_SRC, values[index(src)]}, {DNNL_ARG_WEIGHTS, weights_memory}, {DNNL_ARG_DST, values[index(dst)]}};
            if (node.bias) args[DNNL_ARG_BIAS] = host(weights, node.name + ".bias", bias_desc);
            if (is_conv && k == 3 && s == 1 && node.padding == 1) {
                const WinogradOwnShape shape{.batch = in[0], .in_channels = in[1], .out_channels = out[1], .height = out[2],
                                             .width = out[3], .layout = act_tag};
                const float* host_weights = weights.at(node.name + ".weight").f32();
                const float* host_bias = node.bias ? weights.at(node.name + ".bias").f32() : nullptr;
                refresh_mirror(host(weights, node.name + ".weight", plain), weights_memory);  // real weights for the check
                const float* src_data = static_cast<const float*>(values[index(src)].get_data_handle());
                float* dst_data = static_cast<float*>(values[index(dst)].get_data_handle());
                std::optional<OwnPass> chosen = choose_conv(
                    node.name, "forward", [&](int tile, std::string* why) { return WinogradOwn::applies(tile, shape, why); },
                    {Step{prim, args, node.name, nullptr}}, scratch, {values[index(src)]}, {values[index(dst)]},
                    [&](int tile) -> std::optional<OwnPass> {
                        std::shared_ptr<WinogradOwn> conv(WinogradOwn::create(eng, strm, tile, shape, host_weights, host_bias));
                        if (!conv) return std::nullopt;
                        return OwnPass{conv->algorithm(),
                                       [this, conv, src_data, dst_data](void* slot) { conv->execute(strm, src_data, dst_data, slot); },
                                       conv->scratch_bytes(), conv,
                                       [this, conv, host_weights, host_bias] { conv->set_weights(strm, host_weights, host_bias); }};
                    });
                if (chosen) {
                    auto own = std::static_pointer_cast<WinogradOwn>(chosen->kernel);
                    own_kernels.push_back(own);
                    activation_bytes += own->weight_bytes();
                    // Weights change every step: transformed again before each forward.
                    add_custom(prepare_steps, [this, own, host_weights, host_bias] { own->set_weights(strm, host_weights, host_bias); },
                               node.name + ".winograd_weights", 0);
                    auto run = [this, own, src_data, dst_data] { own->execute(strm, src_data, dst_data, scratchpad.get_data_handle()); };
                    add_custom(forward_train_steps, run, node.name, own->scratch_bytes());
                    add_custom(forward_eval_steps, run, node.name, own->scratch_bytes());
                    break;
                }
            }
            both(prim, args, node.name, scratch);
            break;
        }
        case OpKind::batch_norm: {
            const int src = node.inputs[0];
            const memory::desc channel_desc({out[1]}, dt::f32, tag::x);
            const int relu = fused_relu[index(node_index)];
            // Fused with its ReLU: writes the ReLU's output (the batch norm's own value aliases it).
            const memory& written = relu >= 0 ? values[index(graph.node(relu).output)] : values[index(dst)];
            const normalization_flags flags = normalization_flags::use_scale | normalization_flags::use_shift |
                                              (relu >= 0 ? normalization_flags::fuse_norm_relu : normalization_flags::none);
            plan.batch_norm = batch_normalization_forward::primitive_desc(
                batch_normalization_forward::desc(prop_kind::forward_training, value_desc[index(src)], node.epsilon, flags),
                attr, eng);
            plan.mean = allocate(plan.batch_norm.mean_desc());
            plan.variance = allocate(plan.batch_norm.variance_desc());
            memory scale = host(weights, node.name + ".weight", channel_desc);
            memory shift = host(weights, node.name + ".bias", channel_desc);
            std::unordered_map<int, memory> train_args = {
                {DNNL_ARG_SRC, values[index(src)]}, {DNNL_ARG_DST, written},         {DNNL_ARG_SCALE, scale},
                {DNNL_ARG_SHIFT, shift},            {DNNL_ARG_MEAN, plan.mean}, {DNNL_ARG_VARIANCE, plan.variance}};
            if (relu >= 0) {
                plan.workspace = allocate(plan.batch_norm.workspace_desc());  // which outputs the ReLU zeroed
                train_args[DNNL_ARG_WORKSPACE] = plan.workspace;
            }
            add(forward_train_steps, batch_normalization_forward(plan.batch_norm), std::move(train_args), node.name,
                plan.batch_norm.scratchpad_desc().get_size());
            batch_normalization_forward::primitive_desc eval_pd(
                batch_normalization_forward::desc(prop_kind::forward_inference, value_desc[index(src)], node.epsilon,
                                                  flags | normalization_flags::use_global_stats),
                attr, eng);
            add(forward_eval_steps, batch_normalization_forward(eval_pd),
                {{DNNL_ARG_SRC, values[index(src)]}, {DNNL_ARG_DST, written}, {DNNL_ARG_SCALE, scale},
                 {DNNL_ARG_SHIFT, shift}, {DNNL_ARG_MEAN, host(weights, node.name + ".running_mean", channel_desc)},
                 {DNNL_ARG_VARIANCE, host(weights, node.name + ".running_var", channel_desc)}},
                node.name, eval_pd.scratchpad_desc().get_size());
            batch_norm_nodes.push_back(node_index);
            break;
        }
        case OpKind::relu:
        case OpKind::sigmoid: {
            if (relu_fused[index(node_index)]) break;  // the batch norm before it writes its output
            const int src = node.inputs[0];
            // ReLU's backward reads its output (the next layer keeps it), so its input need not be kept.
            const algorithm alg = node.kind == OpKind::relu ? algorithm::eltwise_relu_use_dst_for_bwd : algorithm::eltwise_logistic;
            plan.eltwise = eltwise_forward::primitive_desc(
                eltwise_forward::desc(prop_kind::forward_training, alg, value_desc[index(src)], 0.0f, 0.0f), attr, eng);
            both(eltwise_forward(plan.eltwise), {{DNNL_ARG_SRC, values[index(src)]}, {DNNL_ARG_DST, values[index(dst)]}},
                 node.name, plan.eltwise.scratchpad_desc().get_size());
            break;
        }
        case OpKind::max_pool: {
            const int src = node.inputs[0];
            const Dims& in = graph.value(src).dims;
            const int64_t k = node.kernel, s = node.stride;
            plan.padding_l = {0, 0};
            plan.padding_r = {(out[2] - 1) * s + k - in[2], (out[3] - 1) * s + k - in[3]};
            plan.pool = pooling_forward::primitive_desc(
                pooling_forward::desc(prop_kind::forward_training, algorithm::pooling_max, value_desc[index(src)], dst_desc,
                                      {s, s}, {k, k}, plan.padding_l, plan.padding_r),
                attr, eng);
            plan.workspace = allocate(plan.pool.workspace_desc());
            // The eval forward runs the same primitive; writing the workspace there is harmless.
            both(pooling_forward(plan.pool),
                 {{DNNL_ARG_SRC, values[index(src)]}, {DNNL_ARG_DST, values[index(dst)]}, {DNNL_ARG_WORKSPACE, plan.workspace}},
                 node.name, plan.pool.scratchpad_desc().get_size());
            break;
        }
        case OpKind::add: {
            const int lhs = node.inputs[0], rhs = node.inputs[1];
            binary::primitive_desc pd(binary::desc(algorithm::binary_add, value_desc[index(lhs)], value_desc[index(rhs)], dst_desc),
                                      attr, eng);
            both(binary(pd),
                 {{DNNL_ARG_SRC_0, values[index(lhs)]}, {DNNL_ARG_SRC_1, values[index(rhs)]}, {DNNL_ARG_DST, values[index(dst)]}},
                 node.name, pd.scratchpad_desc().get_size());
            break;
        }
        case OpKind::concat: {
            // Copies into channel slices of the output (strided views). Writing producers straight into
            // their slice, as the inference engine does, would save these copies.
            int64_t offset = 0;
            for (size_t i = 0; i < node.inputs.size(); ++i) {
                const int src = node.inputs[i];
                const Dims& in = graph.value(src).dims;
                memory view(dst_desc.submemory_desc(to_dnnl_dims(in), {0, offset, 0, 0}), eng, values[index(dst)].get_data_handle());
                std::vector<Step> steps;
                add_reorder(steps, values[index(src)], view, fmt::format("{}.{}", node.name, i), false);
                forward_train_steps.push_back(steps[0]);
                forward_eval_steps.push_back(steps[0]);
                offset += in[1];
            }
            break;
        }
    }
}

void Trainer::Impl::lower_backward(int node_index) {
    const Node& node = graph.node(node_index);
    NodePlan& plan = plans[index(node_index)];
    const int dst = node.output;
    const Dims& out = graph.value(dst).dims;
    std::vector<PendingGradient> pending;
    switch (node.kind) {
        case OpKind::input: break;
        case OpKind::conv:
        case OpKind::conv_transpose: {
            const int src = node.inputs[0];
            const Dims& in = graph.value(src).dims;
            const int64_t k = node.kernel, s = node.stride;
            const bool is_conv = node.kind == OpKind::conv;
            const memory::dims strides = {s, s};
            const memory::desc weights_any({out[1], in[1], k, k}, dt::f32, tag::any);
            const memory::desc bias_desc({out[1]}, dt::f32, tag::x);
            const memory::desc plain({out[1], in[1], k, k}, dt::f32, is_conv ? tag::oihw : tag::iohw);
            const memory::desc& src_desc = value_desc[index(src)];
            const memory::desc& dst_desc = value_desc[index(dst)];
            const std::string weight_name = node.name + ".weight";
            // Weights gradient (and bias gradient).
            primitive weights_prim;
            memory::desc diff_weights_desc, diff_bias_desc;
            size_t scratch = 0;
            if (is_conv) {
                auto desc = node.bias ? convolution_backward_weights::desc(algorithm::convolution_direct, src_desc, weights_any,
                                                                            bias_desc, dst_desc, strides, plan.padding_l,
                                                                            plan.padding_r)
                                      : convolution_backward_weights::desc(algorithm::convolution_direct, src_desc, weights_any,
                                                                            dst_desc, strides, plan.padding_l, plan.padding_r);
                convolution_backward_weights::primitive_desc pd(desc, attr, eng, plan.conv);
                diff_weights_desc = pd.diff_weights_desc();
                diff_bias_desc = pd.diff_bias_desc();
                scratch = pd.scratchpad_desc().get_size();
                weights_prim = convolution_backward_weights(pd);
            } else {
                auto desc = node.bias ? deconvolution_backward_weights::desc(algorithm::deconvolution_direct, src_desc,
                                                                              weights_any, bias_desc, dst_desc, strides,
                                                                              plan.padding_l, plan.padding_r)
                                      : deconvolution_backward_weights::desc(algorithm::deconvolution_direct, src_desc,
                                                                              weights_any, dst_desc, strides, plan.padding_l,
                                                                              plan.padding_r);
                deconvolution_backward_weights::primitive_desc pd(desc, attr, eng, plan.deconv);
                diff_weights_desc = pd.diff_weights_desc();
                diff_bias_desc = pd.diff_bias_desc();
                scratch = pd.scratchpad_desc().get_size();
                weights_prim = deconvolution_backward_weights(pd);
            }
            std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, values[index(src)]},
                                                    {DNNL_ARG_DIFF_DST, diffs[index(dst)]},
                                                    {DNNL_ARG_DIFF_WEIGHTS, gradient_for(weight_name, plain, diff_weights_desc, pending)}};
            if (node.bias) args[DNNL_ARG_DIFF_BIAS] = gradient_for(node.name + ".bias", bias_desc, diff_bias_desc, pending);
            std::optional<OwnPass> own_weights;
            if (is_conv && k == 3 && s == 1 && node.padding == 1) {
                const WinogradOwnShape shape{.batch = in[0], .in_channels = in[1], .out_channels = out[1], .height = out[2],
                                             .width = out[3], .layout = act_tag};
                // The direct pass: the primitive, then the reorders of its results into the host gradients.
                std::vector<Step> direct{Step{weights_prim, args, node.name + ".bwd_weights", nullptr}};
                for (PendingGradient& p : pending)
                    add_reorder(direct, p.temp, host(grads, p.name, p.plain), p.name + ".grad_reorder", false);
                memory weight_grad = host(grads, weight_name, plain);
                std::vector<memory> results{weight_grad};
                float* bias_grad = nullptr;
                if (node.bias) {
                    results.push_back(host(grads, node.name + ".bias", bias_desc));
                    bias_grad = grads.at(node.name + ".bias").f32();
                }
                const float* src_data = static_cast<const float*>(values[index(src)].get_data_handle());
                const float* diff_data = static_cast<const float*>(diffs[index(dst)].get_data_handle());
                float* weight_data = grads.at(weight_name).f32();
                own_weights = choose_conv(
                    node.name, "backward_weights",
                    [&](int tile, std::string* why) { return WinogradOwnBwdWeights::applies(tile, shape, why); }, direct,
                    std::max(scratch, scratchpad_bytes), {values[index(src)], diffs[index(dst)]}, results,
                    [&](int tile) -> std::optional<OwnPass> {
                        std::shared_ptr<WinogradOwnBwdWeights> grad(WinogradOwnBwdWeights::create(eng, tile, shape));
                        if (!grad) return std::nullopt;
                        return OwnPass{grad->algorithm(),
                                       [this, grad, src_data, diff_data, weight_data, bias_grad](void* slot) {
                                           grad->execute(strm, src_data, diff_data, weight_data, bias_grad, slot);
                                       },
                                       grad->scratch_bytes(), grad};
                    });
                if (own_weights) {
                    own_kernels.push_back(own_weights->kernel);
                    scratchpad_bytes = std::max(scratchpad_bytes, own_weights->scratch_bytes);
                    // The gradients it writes, as arguments: plan_gradient_ready() finds them there (never executed).
                    std::unordered_map<int, memory> written{{DNNL_ARG_DIFF_WEIGHTS, weight_grad}};
                    if (node.bias) written[DNNL_ARG_DIFF_BIAS] = results[1];
                    auto run = own_weights->run;
                    backward_steps.push_back(Step{primitive(), std::move(written), node.name + ".bwd_weights",
                                                  [this, run] { run(scratchpad.get_data_handle()); }});
                    pending.clear();
                }
            }
            if (!own_weights) {
                add(backward_steps, weights_prim, std::move(args), node.name + ".bwd_weights", scratch);
                flush_gradients(pending);
            }
            if (!needs_diff[index(src)]) break;
            // Data gradient.
            memory target = contribution_target(src);
            if (is_conv) {
                convolution_backward_data::primitive_desc pd(
                    convolution_backward_data::desc(algorithm::convolution_direct, src_desc, weights_any, dst_desc, strides,
                                                    plan.padding_l, plan.padding_r),
                    attr, eng, plan.conv);
                std::unordered_map<int, memory> data_args = {{DNNL_ARG_DIFF_DST, diffs[index(dst)]},
                                                             {DNNL_ARG_WEIGHTS, weights_for(weight_name, plain, pd.weights_desc())},
                                                             {DNNL_ARG_DIFF_SRC, target}};
                std::optional<OwnPass> own;
                if (k == 3 && s == 1 && node.padding == 1) {
                    // d src = the 3x3 convolution of d dst with each kernel rotated by 180 degrees, channels swapped.
                    const WinogradOwnShape shape{.batch = in[0], .in_channels = out[1], .out_channels = in[1],
                                                 .height = in[2], .width = in[3], .layout = act_tag};
                    const float* host_weights = weights.at(weight_name).f32();
                    refresh_mirror(host(weights, weight_name, plain), data_args.at(DNNL_ARG_WEIGHTS));
                    const float* src_data = static_cast<const float*>(diffs[index(dst)].get_data_handle());
                    float* dst_data = static_cast<float*>(target.get_data_handle());
                    own = choose_conv(
                        node.name, "backward_data", [&](int tile, std::string* why) { return WinogradOwn::applies(tile, shape, why); },
                        {Step{convolution_backward_data(pd), data_args, node.name + ".bwd_data", nullptr}}, pd.scratchpad_desc().get_size(),
                        {diffs[index(dst)]}, {target}, [&](int tile) -> std::optional<OwnPass> {
                            std::shared_ptr<WinogradOwn> conv(WinogradOwn::create(eng, strm, tile, shape, host_weights, nullptr));
                            if (!conv) return std::nullopt;
                            return OwnPass{conv->algorithm(),
                                           [this, conv, src_data, dst_data](void* slot) { conv->execute(strm, src_data, dst_data, slot); },
                                           conv->scratch_bytes(), conv, [this, conv, host_weights] {
                                               conv->set_weights(strm, host_weights, nullptr, /*flipped_transposed=*/true);
                                           }};
                        });
                    if (own) {
                        auto conv = std::static_pointer_cast<WinogradOwn>(own->kernel);
                        own_kernels.push_back(conv);
                        activation_bytes += conv->weight_bytes();
                        add_custom(prepare_steps,
                                   [this, conv, host_weights] { conv->set_weights(strm, host_weights, nullptr, true); },
                                   node.name + ".winograd_weights_bwd", 0);
                        add_custom(backward_steps,
                                   [this, conv, src_data, dst_data] { conv->execute(strm, src_data, dst_data, scratchpad.get_data_handle()); },
                                   node.name + ".bwd_data", conv->scratch_bytes());
                    }
                }
                if (!own) add(backward_steps, convolution_backward_data(pd), std::move(data_args), node.name + ".bwd_data", pd.scratchpad_desc().get_size());
            } else {
                deconvolution_backward_data::primitive_desc pd(
                    deconvolution_backward_data::desc(algorithm::deconvolution_direct, src_desc, weights_any, dst_desc, strides,
                                                      plan.padding_l, plan.padding_r),
                    attr, eng, plan.deconv);
                add(backward_steps, deconvolution_backward_data(pd),
                    {{DNNL_ARG_DIFF_DST, diffs[index(dst)]}, {DNNL_ARG_WEIGHTS, weights_for(weight_name, plain, pd.weights_desc())},
                     {DNNL_ARG_DIFF_SRC, target}},
                    node.name + ".bwd_data", pd.scratchpad_desc().get_size());
            }
            finish_contribution(src, node.name);
            break;
        }
        case OpKind::batch_norm: {
            const int src = node.inputs[0];
            const memory::desc channel_desc({out[1]}, dt::f32, tag::x);
            const int relu = fused_relu[index(node_index)];
            const normalization_flags flags = normalization_flags::use_scale | normalization_flags::use_shift |
                                              (relu >= 0 ? normalization_flags::fuse_norm_relu : normalization_flags::none);
            batch_normalization_backward::primitive_desc pd(
                batch_normalization_backward::desc(prop_kind::backward, value_desc[index(dst)], value_desc[index(src)],
                                                   node.epsilon, flags),
                attr, eng, plan.batch_norm);
            // oneDNN 2.6 quirk: a backward created with use_shift fails at execution unless SHIFT is passed too.
            std::unordered_map<int, memory> args = {
                {DNNL_ARG_SRC, values[index(src)]},
                {DNNL_ARG_MEAN, plan.mean},
                {DNNL_ARG_VARIANCE, plan.variance},
                // Fused: the ReLU's output gradient; the workspace masks it as the ReLU's backward would.
                {DNNL_ARG_DIFF_DST, relu >= 0 ? diffs[index(graph.node(relu).output)] : diffs[index(dst)]},
                {DNNL_ARG_SCALE, host(weights, node.name + ".weight", channel_desc)},
                {DNNL_ARG_SHIFT, host(weights, node.name + ".bias", channel_desc)},
                {DNNL_ARG_DIFF_SRC, contribution_target(src)},
                {DNNL_ARG_DIFF_SCALE, host(grads, node.name + ".weight", channel_desc)},
                {DNNL_ARG_DIFF_SHIFT, host(grads, node.name + ".bias", channel_desc)}};
            if (relu >= 0) args[DNNL_ARG_WORKSPACE] = plan.workspace;
            add(backward_steps, batch_normalization_backward(pd), std::move(args), node.name + ".bwd", pd.scratchpad_desc().get_size());
            finish_contribution(src, node.name);
            break;
        }
        case OpKind::relu:
        case OpKind::sigmoid: {
            const int src = node.inputs[0];
            if (relu_fused[index(node_index)] || !needs_diff[index(src)]) break;
            const bool relu = node.kind == OpKind::relu;
            const algorithm alg = relu ? algorithm::eltwise_relu_use_dst_for_bwd : algorithm::eltwise_logistic;
            eltwise_backward::primitive_desc pd(
                eltwise_backward::desc(alg, value_desc[index(dst)], value_desc[index(src)], 0.0f, 0.0f), attr, eng, plan.eltwise);
            add(backward_steps, eltwise_backward(pd),
                {{relu ? DNNL_ARG_DST : DNNL_ARG_SRC, relu ? values[index(dst)] : values[index(src)]},
                 {DNNL_ARG_DIFF_DST, diffs[index(dst)]},
                 {DNNL_ARG_DIFF_SRC, contribution_target(src)}},
                node.name + ".bwd", pd.scratchpad_desc().get_size());
            finish_contribution(src, node.name);
            break;
        }
        case OpKind::max_pool: {
            const int src = node.inputs[0];
            if (!needs_diff[index(src)]) break;
            const int64_t k = node.kernel, s = node.stride;
            pooling_backward::primitive_desc pd(
                pooling_backward::desc(algorithm::pooling_max, value_desc[index(src)], value_desc[index(dst)], {s, s}, {k, k},
                                       plan.padding_l, plan.padding_r),
                attr, eng, plan.pool);
            add(backward_steps, pooling_backward(pd),
                {{DNNL_ARG_DIFF_DST, diffs[index(dst)]}, {DNNL_ARG_DIFF_SRC, contribution_target(src)}, {DNNL_ARG_WORKSPACE, plan.workspace}},
                node.name + ".bwd", pd.scratchpad_desc().get_size());
            finish_contribution(src, node.name);
            break;
        }
        case OpKind::add:
            for (int src : node.inputs) contribute(diffs[index(dst)], src, node.name);
            break;
        case OpKind::concat: {
            int64_t offset = 0;
            for (int src : node.inputs) {
                const Dims& in = graph.value(src).dims;
                memory view(value_desc[index(dst)].submemory_desc(to_dnnl_dims(in), {0, offset, 0, 0}), eng,
                            diffs[index(dst)].get_data_handle());
                contribute(view, src, node.name);
                offset += in[1];
            }
            break;
        }
    }
}

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

    scratchpad = memory({{static_cast<memory::dim>(std::max<size_t>(scratchpad_bytes, 1))}, dt::u8, tag::x}, eng);
    for (auto* list : {&prepare_steps, &forward_train_steps, &forward_eval_steps, &backward_steps})
        for (Step& s : *list) s.args[DNNL_ARG_SCRATCHPAD] = scratchpad;
    plan_gradient_ready();
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

void Trainer::Impl::forward(const float* images, bool training) {
    if (!images) throw Error("trainer: images must not be null");
    user_images.set_data_handle(const_cast<float*>(images));
    try {
        profile_phase = "prepare";
        run(prepare_steps);
        profile_phase = "forward";
        run(training ? forward_train_steps : forward_eval_steps);
        strm.wait();
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("trainer: oneDNN forward failed: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
}

LossValue Trainer::Impl::loss_and_backward(const float* masks, float gradient_scale) {
    if (!masks) throw Error("trainer: masks must not be null");
    const int batch = static_cast<int>(output_dims[0]);
    const int64_t pixels = num_elements(output_dims) / output_dims[0];
    LossValue loss;
    if (options.custom_loss)
        loss.total = options.custom_loss(logits.data(), masks, batch, pixels, dlogits.data());
    else
        loss = compute_loss(options.loss, logits.data(), masks, batch, pixels, dlogits.data(), options.dice_smooth);
    if (gradient_scale != 1.0f)
        for (float& d : dlogits) d *= gradient_scale;
    try {
        profile_phase = "backward";
        run_backward();
        strm.wait();
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("trainer: oneDNN backward failed: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
    last_loss = loss;
    return loss;
}

void Trainer::Impl::update_running_statistics() {
    const double m = options.bn_momentum;
    for (int n : batch_norm_nodes) {
        const Node& node = graph.node(n);
        const Dims& dims = graph.value(node.output).dims;
        const double count = static_cast<double>(dims[0] * dims[2] * dims[3]);
        const double unbias = count / (count - 1.0);  // PyTorch stores the unbiased variance
        float* running_mean = weights.at(node.name + ".running_mean").f32();
        float* running_var = weights.at(node.name + ".running_var").f32();
        const float* mean = static_cast<const float*>(plans[index(n)].mean.get_data_handle());
        const float* variance = static_cast<const float*>(plans[index(n)].variance.get_data_handle());
        for (int64_t c = 0; c < dims[1]; ++c) {
            running_mean[c] = static_cast<float>((1.0 - m) * running_mean[c] + m * mean[c]);
            running_var[c] = static_cast<float>((1.0 - m) * running_var[c] + m * variance[c] * unbias);
        }
    }
}

// Name of the first node (forward order) whose output holds a NaN or an infinity, or "".
static std::string first_non_finite_activation(const Trainer::Impl& m) {
    for (const Node& node : m.graph.nodes()) {
        if (m.forward_only[index(node.output)]) continue;  // its buffer holds a later value by now
        const memory& value = m.values[index(node.output)];
        if (!all_finite(static_cast<const float*>(value.get_data_handle()),
                        static_cast<int64_t>(m.value_desc[index(node.output)].get_size() / sizeof(float))))
            return node.name;
    }
    return "";
}

// Throws before anything is updated, naming the first layer where a non-finite number appeared. ReLU
// maps NaN to 0 in oneDNN, so a NaN input can leave the loss finite and show up in gradients only; the
// first non-finite activation (forward order) is named too when there is one.
void Trainer::Impl::check_finite_step(const LossValue& loss) const {
    const int64_t this_step = step + 1;
    auto activation_note = [&] {
        const std::string name = first_non_finite_activation(*this);
        return name.empty() ? std::string("no activation is non-finite")
                            : fmt::format("first non-finite activation in forward order: '{}'", name);
    };
    if (!std::isfinite(loss.total))
        throw Error(fmt::format("trainer: step {}: loss is {} ({}); weights left as before the step", this_step,
                                loss.total, activation_note()));
    auto gradient_error = [&](const std::string& layer, const std::string& tensor) {
        return Error(fmt::format("trainer: step {}: non-finite gradient, first in backward order at layer '{}' ({}); {}; "
                                 "weights left as before the step",
                                 this_step, layer, tensor, activation_note()));
    };
    if (!all_finite(dlogits.data(), static_cast<int64_t>(dlogits.size()))) throw gradient_error("loss", "d loss / d logits");
    for (auto it = graph.nodes().rbegin(); it != graph.nodes().rend(); ++it)
        for (const ParamInfo& p : it->params) {
            if (!p.learnable) continue;
            const HostTensor& g = grads.at(p.name);
            if (!all_finite(g.f32(), g.num_elements())) throw gradient_error(it->name, "tensor '" + p.name + "'");
        }
}

Trainer::Trainer(const Graph& graph, TensorMap weights, const TrainOptions& options) : impl_(std::make_unique<Impl>()) {
    const auto start = Clock::now();
    Impl& m = *impl_;
    if (graph.input_value() < 0 || graph.output_value() < 0) throw Error("trainer: graph has no input or no output");
    if (options.threads < 0) throw Error(fmt::format("trainer: threads must be >= 0, got {}", options.threads));
    if (!(options.learning_rate > 0)) throw Error(fmt::format("trainer: learning rate must be positive, got {}", options.learning_rate));
    if (!(options.bn_momentum >= 0 && options.bn_momentum <= 1))
        throw Error(fmt::format("trainer: bn_momentum must be in [0, 1], got {}", options.bn_momentum));
    StepLR{options.learning_rate, options.lr_step_size, options.lr_gamma}.learning_rate(0);  // validates
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(weights, expected, "trainer weights");
    for (const Node& node : graph.nodes())
        if (node.kind == OpKind::batch_norm) {
            const Dims& d = graph.value(node.output).dims;
            if (d[0] * d[2] * d[3] < 2)
                throw Error(fmt::format("trainer: batch norm '{}' sees {} value per channel ({}); training needs at least 2",
                                        node.name, d[0] * d[2] * d[3], dims_to_string(d)));
        }
    m.graph = graph;
    m.options = options;
    m.lr = options.learning_rate;
    for (const ParamInfo& p : graph.parameters()) {
        m.weights[p.name] = std::move(weights.at(p.name));
        if (!p.learnable) continue;
        m.learnable.push_back(p.name);
        m.grads[p.name] = HostTensor::zeros(p.dims);
        m.adam_m[p.name] = HostTensor::zeros(p.dims);
        m.adam_v[p.name] = HostTensor::zeros(p.dims);
    }
    m.set_threads();
    try {
        m.compile();
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("trainer: oneDNN could not compile the graph: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
    m.compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

Trainer::~Trainer() = default;

LossValue Trainer::compute_gradients(const float* images, const float* masks, float gradient_scale) {
    Impl& m = *impl_;
    m.set_threads();
    m.forward(images, true);
    return m.loss_and_backward(masks, gradient_scale);
}

std::vector<Trainer::StepTime> Trainer::profile_gradients(const float* images, const float* masks) {
    Impl& m = *impl_;
    std::vector<StepTime> times;
    m.profile = &times;
    try {
        compute_gradients(images, masks);
    } catch (...) {
        m.profile = nullptr;
        throw;
    }
    m.profile = nullptr;
    return times;
}

void Trainer::set_gradient_ready_callback(std::function<void(const std::string& name)> callback) {
    impl_->gradient_ready = std::move(callback);
}

void Trainer::update_running_statistics() { impl_->update_running_statistics(); }

void Trainer::Impl::adam_step() {
    ++step;
    for (const std::string& name : learnable) {
        HostTensor& w = weights.at(name);
        adam_update(options.adam, w.f32(), grads.at(name).f32(), adam_m.at(name).f32(), adam_v.at(name).f32(),
                    w.num_elements(), lr, step);
    }
}

void Trainer::apply_gradients(const LossValue& loss) {
    Impl& m = *impl_;
    m.set_threads();
    if (m.options.check_finite) m.check_finite_step(loss);
    m.adam_step();
}

float Trainer::step(const float* images, const float* masks) {
    Impl& m = *impl_;
    m.set_threads();
    m.forward(images, true);
    const LossValue loss = m.loss_and_backward(masks);
    if (m.options.check_finite) m.check_finite_step(loss);
    m.update_running_statistics();
    m.adam_step();
    return static_cast<float>(loss.total);
}

void Trainer::forward(const float* images, float* logits, bool training) {
    Impl& m = *impl_;
    if (!logits) throw Error("trainer: logits must not be null");
    m.set_threads();
    m.forward(images, training);
    if (training) m.update_running_statistics();
    std::memcpy(logits, m.logits.data(), m.logits.size() * sizeof(float));
}

void Trainer::end_epoch() {
    Impl& m = *impl_;
    ++m.epoch;
    m.lr = StepLR{m.options.learning_rate, m.options.lr_step_size, m.options.lr_gamma}.learning_rate(m.epoch);
}

TensorMap Trainer::weights() const { return impl_->weights; }

static void copy_into(TensorMap& destination, const TensorMap& source) {
    for (auto& [name, tensor] : destination) std::memcpy(tensor.bytes.data(), source.at(name).bytes.data(), tensor.byte_size());
}

void Trainer::set_weights(const TensorMap& weights) {
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : impl_->graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(weights, expected, "trainer weights");
    copy_into(impl_->weights, weights);
}

const TensorMap& Trainer::gradients() const { return impl_->grads; }
TensorMap& Trainer::gradients_in_place() { return impl_->grads; }
TensorMap& Trainer::weights_in_place() { return impl_->weights; }

const std::vector<float>& Trainer::input_gradient() const {
    if (!impl_->options.input_gradient) throw Error("trainer: input_gradient() needs TrainOptions::input_gradient = true");
    return impl_->input_grad;
}

std::vector<float> Trainer::activation(const std::string& node_name) const {
    Impl& m = *impl_;
    const Node* node = m.graph.find_node(node_name);
    if (!node) throw Error(fmt::format("trainer: no node named '{}'", node_name));
    if (m.forward_only[index(node->output)])
        throw Error(fmt::format("trainer: '{}' is not kept after the forward: its buffer is shared "
                                "(TrainOptions::share_forward_buffers)",
                                node_name));
    const Dims& dims = m.graph.value(node->output).dims;
    std::vector<float> out(index(num_elements(dims)));
    memory to({to_dnnl_dims(dims), dt::f32, tag::nchw}, m.eng, out.data());
    memory& from = m.values[index(node->output)];
    reorder(from, to).execute(m.strm, from, to);
    m.strm.wait();
    return out;
}

LossValue Trainer::last_loss() const { return impl_->last_loss; }

TrainerState Trainer::state() const {
    const Impl& m = *impl_;
    return TrainerState{m.weights, m.adam_m, m.adam_v, m.step, m.epoch, m.lr};
}

void Trainer::restore(const TrainerState& state) {
    Impl& m = *impl_;
    std::vector<std::pair<std::string, Dims>> expected, expected_learnable;
    for (const ParamInfo& p : m.graph.parameters()) {
        expected.emplace_back(p.name, p.dims);
        if (p.learnable) expected_learnable.emplace_back(p.name, p.dims);
    }
    check_tensors(state.weights, expected, "trainer state weights");
    check_tensors(state.adam_first_moment, expected_learnable, "trainer state Adam first moment");
    check_tensors(state.adam_second_moment, expected_learnable, "trainer state Adam second moment");
    if (state.step < 0 || state.epoch < 0 || !(state.learning_rate > 0))
        throw Error(fmt::format("trainer state: bad step {}, epoch {} or learning rate {}", state.step, state.epoch,
                                state.learning_rate));
    copy_into(m.weights, state.weights);
    copy_into(m.adam_m, state.adam_first_moment);
    copy_into(m.adam_v, state.adam_second_moment);
    m.step = state.step;
    m.epoch = state.epoch;
    m.lr = state.learning_rate;
}

int64_t Trainer::step_count() const { return impl_->step; }
int64_t Trainer::epoch() const { return impl_->epoch; }
double Trainer::learning_rate() const { return impl_->lr; }
void Trainer::set_learning_rate(double learning_rate) {
    if (!(learning_rate > 0)) throw Error(fmt::format("trainer: learning rate must be positive, got {}", learning_rate));
    impl_->lr = learning_rate;
}
const Graph& Trainer::graph() const { return impl_->graph; }
const TrainOptions& Trainer::options() const { return impl_->options; }
int Trainer::batch() const { return static_cast<int>(impl_->input_dims[0]); }
const Dims& Trainer::input_dims() const { return impl_->input_dims; }
const Dims& Trainer::output_dims() const { return impl_->output_dims; }
int Trainer::num_primitives() const {
    const Impl& m = *impl_;
    return static_cast<int>(m.prepare_steps.size() + m.forward_train_steps.size() + m.backward_steps.size());
}
double Trainer::compile_ms() const { return impl_->compile_ms; }
size_t Trainer::activation_bytes() const { return impl_->activation_bytes; }
const std::vector<TrainConvChoice>& Trainer::conv_choices() const { return impl_->conv_choices; }

std::string Trainer::activation_layout() const {
    switch (impl_->act_tag) {
        case tag::nChw16c: return "nChw16c";
        case tag::nChw8c: return "nChw8c";
        case tag::nhwc: return "nhwc";
        default: return "nchw";
    }
}

}  // namespace resunet
