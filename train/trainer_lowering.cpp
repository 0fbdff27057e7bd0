// Each graph node's forward and backward lowered onto oneDNN primitives, and our own Winograd kernels
// for the 3x3 convolutions' passes where measuring chooses them (train/trainer_impl.h).
#include "train/trainer_impl.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/candidate_trial.h"
#include "engine/conv_tuning.h"
#include "engine/winograd_own.h"
#include "engine/winograd_own_bwd_weights.h"

namespace resunet {

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
    // The tuner's protocol (engine/candidate_trial.h): direct is the reference; each of our kernels is checked
    // against it on the same inputs before it is timed. The inputs get test values, and their contents back
    // after: a diff buffer may hold the zeros of a gradient that no step ever writes.
    std::vector<std::vector<char>> saved;
    for (const memory& m : inputs) {
        const char* data = static_cast<const char*>(m.get_data_handle());
        saved.emplace_back(data, data + m.get_desc().get_size());
        fill_unit(m);
    }
    auto read_outputs = [&outputs] {
        std::vector<float> all;
        for (const memory& m : outputs) {
            const float* out = static_cast<const float*>(m.get_data_handle());
            all.insert(all.end(), out, out + m.get_desc().get_size() / sizeof(float));
        }
        return all;
    };
    const memory direct_scratchpad({{static_cast<memory::dim>(std::max<size_t>(direct_scratch, 1))}, dt::u8, tag::x}, eng);
    std::vector<TrialCandidate> trial(1);
    trial[0].name = "direct";
    trial[0].prepare = [&]() -> std::optional<TrialRun> {
        return TrialRun{nullptr,
                        [&] {
                            for (const Step& pass_step : direct) {
                                std::unordered_map<int, memory> args = pass_step.args;
                                args[DNNL_ARG_SCRATCHPAD] = direct_scratchpad;
                                pass_step.prim.execute(strm, args);
                            }
                            strm.wait();
                        },
                        read_outputs};
    };
    // The plan's tile; under `winograd` F(4x4), or F(2x2) where only that applies (it has more tiles); else both.
    const bool from_plan = planned != options.conv_plan.end();
    std::vector<int> tiles;
    if (from_plan)
        tiles = {planned->second == "winograd_f43" ? 4 : 2};
    else if (options.conv_algorithm == TrainConvAlgorithm::winograd)
        tiles = {applies(4, nullptr) ? 4 : 2};
    else
        tiles = {4, 2};
    std::vector<std::optional<OwnPass>> built(1);  // per candidate: our kernel while it is measured or chosen
    for (int tile : tiles) {
        if (!applies(tile, nullptr)) continue;
        const size_t slot = trial.size();
        built.emplace_back();
        TrialCandidate& c = trial.emplace_back();
        c.name = tile == 4 ? "winograd_f43" : "winograd_f23";
        c.bound = kOwnWinogradRelativeBound;
        c.drop = [&built, slot] { built[slot].reset(); };
        c.prepare = [&, tile, slot]() -> std::optional<TrialRun> {
            built[slot] = make(tile);
            if (!built[slot]) return std::nullopt;
            const memory scratch({{static_cast<memory::dim>(std::max<size_t>(built[slot]->scratch_bytes, 1))}, dt::u8, tag::x}, eng);
            // Its time includes its per-step work (the weights transform).
            return TrialRun{nullptr,
                            [own = &*built[slot], scratch] {
                                if (own->per_step) own->per_step();
                                own->run(scratch.get_data_handle());
                            },
                            read_outputs};
        };
    }
    // A pass the plan names runs once, for the check only; one asked for wins if it passes. Else the best of
    // two runs, or of one when a run takes over 50 ms (a width-64 224x224 batch-16 layer: the noise is small
    // against it, and building stays near a minute).
    const bool forced = from_plan || options.conv_algorithm == TrainConvAlgorithm::winograd;
    const TrialResult result =
        run_trial(trial, {.reps = from_plan ? 0 : 2, .slow_ms = 50, .margin = 0.03, .forced = forced && trial.size() > 1 ? 1 : -1});
    for (size_t k = 0; k < inputs.size(); ++k) std::memcpy(inputs[k].get_data_handle(), saved[k].data(), saved[k].size());
    choice.summary = result.summary;
    if (from_plan && trial.size() > 1 && trial[1].available && !trial[1].passed)
        throw Error(fmt::format("trainer: conv plan's {} for {}/{} is {:.1e} of the range off the direct result (bound {:.0e})",
                                trial[1].name, layer, pass, trial[1].error, kOwnWinogradRelativeBound));
    std::optional<OwnPass> chosen;
    if (result.chosen > 0) {
        chosen = std::move(built[result.chosen]);
        choice.algorithm = chosen->algorithm;
    }
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
            const memory::desc bias_desc({out[1]}, dt::f32, tag::x);
            lowering::ConvSpec spec;  // direct, no post-ops: the planner's convolution for training
            spec.prop = prop_kind::forward_training;
            spec.src = value_desc[index(src)];
            spec.dst = dst_desc;
            spec.weight_dims = {out[1], in[1], k, k};
            spec.bias = node.bias;
            spec.strides = strides;
            spec.padding_l = plan.padding_l;
            spec.padding_r = plan.padding_r;
            // PyTorch layouts: Conv2d [O, I, k, k] is oneDNN's oihw; ConvTranspose2d [I, O, k, k] is oneDNN's
            // deconvolution weights {O, I, k, k} stored as iohw. So the host tensors are used as they are.
            const memory::desc plain({out[1], in[1], k, k}, dt::f32, is_conv ? tag::oihw : tag::iohw);
            memory weights_memory;
            size_t scratch = 0;
            primitive prim;
            if (is_conv) {
                plan.conv = lowering::make_conv(eng, spec);
                weights_memory = weights_for(node.name + ".weight", plain, plan.conv.weights_desc());
                scratch = plan.conv.scratchpad_desc().get_size();
                prim = convolution_forward(plan.conv);
            } else {
                plan.deconv = lowering::make_deconv(eng, spec);
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
            plan.batch_norm =
                onednn::batch_norm_forward(eng, prop_kind::forward_training, value_desc[index(src)], node.epsilon, flags, attr);
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
            const batch_normalization_forward::primitive_desc eval_pd = onednn::batch_norm_forward(
                eng, prop_kind::forward_inference, value_desc[index(src)], node.epsilon,
                flags | normalization_flags::use_global_stats, attr);
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
            plan.eltwise = onednn::eltwise_forward(eng, prop_kind::forward_training, alg, value_desc[index(src)], 0.0f, 0.0f, attr);
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
            plan.pool = onednn::max_pool_forward(eng, prop_kind::forward_training, value_desc[index(src)], dst_desc, {s, s},
                                                 {k, k}, plan.padding_l, plan.padding_r, attr);
            plan.workspace = allocate(plan.pool.workspace_desc());
            // The eval forward runs the same primitive; writing the workspace there is harmless.
            both(pooling_forward(plan.pool),
                 {{DNNL_ARG_SRC, values[index(src)]}, {DNNL_ARG_DST, values[index(dst)]}, {DNNL_ARG_WORKSPACE, plan.workspace}},
                 node.name, plan.pool.scratchpad_desc().get_size());
            break;
        }
        case OpKind::add: {
            const int lhs = node.inputs[0], rhs = node.inputs[1];
            const binary::primitive_desc pd =
                onednn::binary(eng, algorithm::binary_add, value_desc[index(lhs)], value_desc[index(rhs)], dst_desc, attr);
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
            const memory::desc bias_or_none = node.bias ? bias_desc : memory::desc();  // oneDNN: an empty desc is no bias
            const memory::desc plain({out[1], in[1], k, k}, dt::f32, is_conv ? tag::oihw : tag::iohw);
            const memory::desc& src_desc = value_desc[index(src)];
            const memory::desc& dst_desc = value_desc[index(dst)];
            const std::string weight_name = node.name + ".weight";
            // Weights gradient (and bias gradient).
            primitive weights_prim;
            memory::desc diff_weights_desc, diff_bias_desc;
            size_t scratch = 0;
            if (is_conv) {
                const convolution_backward_weights::primitive_desc pd =
                    onednn::conv_backward_weights(eng, algorithm::convolution_direct, src_desc, weights_any, bias_or_none,
                                                  dst_desc, strides, plan.padding_l, plan.padding_r, plan.conv, attr);
                diff_weights_desc = pd.diff_weights_desc();
                diff_bias_desc = pd.diff_bias_desc();
                scratch = pd.scratchpad_desc().get_size();
                weights_prim = convolution_backward_weights(pd);
            } else {
                const deconvolution_backward_weights::primitive_desc pd =
                    onednn::deconv_backward_weights(eng, algorithm::deconvolution_direct, src_desc, weights_any, bias_or_none,
                                                    dst_desc, strides, plan.padding_l, plan.padding_r, plan.deconv, attr);
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
                const convolution_backward_data::primitive_desc pd =
                    onednn::conv_backward_data(eng, algorithm::convolution_direct, src_desc, weights_any, dst_desc, strides,
                                               plan.padding_l, plan.padding_r, plan.conv, attr);
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
                const deconvolution_backward_data::primitive_desc pd =
                    onednn::deconv_backward_data(eng, algorithm::deconvolution_direct, src_desc, weights_any, dst_desc, strides,
                                                 plan.padding_l, plan.padding_r, plan.deconv, attr);
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
            const batch_normalization_backward::primitive_desc pd =
                onednn::batch_norm_backward(eng, prop_kind::backward, value_desc[index(dst)], value_desc[index(src)],
                                            node.epsilon, flags, plan.batch_norm, attr);
            std::unordered_map<int, memory> args = {
                {DNNL_ARG_SRC, values[index(src)]},
                {DNNL_ARG_MEAN, plan.mean},
                {DNNL_ARG_VARIANCE, plan.variance},
                // Fused: the ReLU's output gradient; the workspace masks it as the ReLU's backward would.
                {DNNL_ARG_DIFF_DST, relu >= 0 ? diffs[index(graph.node(relu).output)] : diffs[index(dst)]},
                {DNNL_ARG_SCALE, host(weights, node.name + ".weight", channel_desc)},
                {DNNL_ARG_DIFF_SRC, contribution_target(src)},
                {DNNL_ARG_DIFF_SCALE, host(grads, node.name + ".weight", channel_desc)},
                {DNNL_ARG_DIFF_SHIFT, host(grads, node.name + ".bias", channel_desc)}};
            if (relu >= 0) args[DNNL_ARG_WORKSPACE] = plan.workspace;
            if (onednn::batch_norm_backward_takes_shift()) args[DNNL_ARG_SHIFT] = host(weights, node.name + ".bias", channel_desc);
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
            const eltwise_backward::primitive_desc pd = onednn::eltwise_backward(
                eng, alg, value_desc[index(dst)], relu ? value_desc[index(dst)] : value_desc[index(src)], 0.0f, 0.0f, plan.eltwise, attr);
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
            const pooling_backward::primitive_desc pd =
                onednn::max_pool_backward(eng, value_desc[index(src)], value_desc[index(dst)], {s, s}, {k, k}, plan.padding_l,
                                          plan.padding_r, plan.pool, attr);
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

}  // namespace resunet
