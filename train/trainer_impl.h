// The trainer's internals (train/trainer.h's Trainer::Impl), shared by its three sources:
//   trainer_lowering.cpp  each graph node's forward and backward onto oneDNN primitives (and our own
//                         Winograd kernels, chosen by measuring: choose_conv);
//   trainer_compile.cpp   layout, buffers, gradient sharing, the compile driver;
//   trainer.cpp           running a step (forward, loss, backward, Adam) and the public API.
// Internal to train/.
#pragma once

#include <fmt/format.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/lowering.h"
#include "engine/onednn_util.h"
#include "train/trainer.h"

namespace resunet {

namespace train_internal {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

using Clock = std::chrono::steady_clock;

// A step: a primitive with its arguments, or our own kernel (`custom`), named by its graph node (or
// node + ".what"); the planner's step (engine/lowering.h).
using Step = lowering::Step;

// Deterministic values in [0, 1), as after a ReLU: what candidates are timed and compared on.
inline void fill_unit(const memory& m) {
    float* p = static_cast<float*>(m.get_data_handle());
    const size_t n = m.get_desc().get_size() / sizeof(float);
    uint32_t state = 12345;
    for (size_t i = 0; i < n; ++i) {
        state = state * 1664525u + 1013904223u;
        p[i] = static_cast<float>(state >> 8) / 16777216.0f;
    }
}

inline bool all_finite(const float* data, int64_t count) {
    bool finite = true;
    for (int64_t i = 0; i < count; ++i) finite &= std::isfinite(data[i]);
    return finite;
}

inline size_t index(int64_t i) { return static_cast<size_t>(i); }

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

}  // namespace train_internal

using namespace train_internal;

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
    // primitive, and any reorder of its result into `outputs`) and their largest scratchpad; `inputs` are filled
    // with test values for the measurement and restored after; `outputs` are compared; `make(tile)` builds a
    // candidate (nothing where `applies` refuses it). Measured by the tuner's protocol (engine/candidate_trial.h);
    // a candidate's time includes its per-step work (the weights transform).
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
        s.execute(strm);
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
    void drop_unread_mirrors();
    void adam_step();
    void forward(const float* images, bool training);
    LossValue loss_and_backward(const float* masks, float gradient_scale = 1.0f);
    void update_running_statistics();
    void check_finite_step(const LossValue& loss) const;
    void set_threads() const {
        if (options.threads > 0) omp_set_num_threads(options.threads);
    }
};

}  // namespace resunet
