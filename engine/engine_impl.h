// The fp32 engine's compiled state (Engine::Impl), shared by its two sources: engine/engine.cpp (the
// lowering: layout, storage plan, arena, primitives) and engine/engine_run.cpp (construction with the
// measured choices and the plan cache, run, profile, accessors). Internal to engine/.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/engine.h"
#include "engine/onednn_util.h"
#include "engine/winograd_own.h"
#include "graph/fusion.h"
#include "graph/safetensors.h"

namespace resunet {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace engine_detail {

using Clock = std::chrono::steady_clock;

struct Step {
    primitive prim;
    // Our own kernel instead of `prim` (a convolution on engine/winograd_own.h): it reads its src, dst and
    // scratchpad pointers from `args` (DNNL_ARG_SRC, DNNL_ARG_DST, DNNL_ARG_SCRATCHPAD) when it runs.
    std::shared_ptr<WinogradOwn> own;
    std::unordered_map<int, memory> args;
    std::string name;
    std::string op;
    std::string kernel;
    double macs = 0;  // per micro-batch
    // Convolutions: "direct", "winograd" (oneDNN's), "winograd_f43" or "winograd_f23" (ours).
    std::string algorithm;
    std::string candidates;  // what tuning tried (ConvTrial::summary)
    size_t scratch_bytes = 0;  // this primitive's scratchpad
    // A measured convolution: {direct, the fastest other candidate that passed its check, `fallback`}
    // best time, weight bytes and scratchpad bytes (the memory budget trades them; engine_run.cpp).
    bool measured = false;
    std::string preferred;  // measure_only: the fastest algorithm that passed its check
    // The leaner runner-up: the fastest other candidate that passed, beats direct and takes fewer bytes
    // than `preferred` (F(2x2) when F(4x4) is preferred); the budget falls back to it before direct.
    std::string fallback;
    double ms[3] = {0, 0, 0};
    size_t weight_bytes[3] = {0, 0, 0};
    size_t scratch[3] = {0, 0, 0};

    void execute(stream& strm) {
        if (own)
            own->execute(strm, static_cast<const float*>(args.at(DNNL_ARG_SRC).get_data_handle()),
                         static_cast<float*>(args.at(DNNL_ARG_DST).get_data_handle()),
                         args.at(DNNL_ARG_SCRATCHPAD).get_data_handle());
        else
            prim.execute(strm, args);
    }
};

// The algorithms of our own Winograd (engine/winograd_own.h): name and output tile.
inline bool is_own_winograd(const std::string& algorithm) {
    return algorithm == "winograd_f43" || algorithm == "winograd_f23";
}

// A buffer in the arena, or a channel slice of another (concat in place).
struct Storage {
    int parent = -1;             // storage this one lives inside, or -1 for an arena root
    int64_t channel_offset = 0;  // first channel inside the parent
    memory::desc desc;           // layout of the whole buffer
    int first_step = INT_MAX;
    int last_step = -1;
    size_t arena_offset = 0;
};

}  // namespace engine_detail

using engine_detail::Clock;
using engine_detail::Step;
using engine_detail::Storage;
using engine_detail::is_own_winograd;

struct Engine::Impl {
    dnnl::engine eng{dnnl::engine::kind::cpu, 0};
    stream strm{eng};
    EngineOptions options;
    Graph graph;  // with the micro-batch as N
    std::vector<FusedOp> ops;
    tag act_tag = tag::nchw;
    int64_t block = 1;  // channel block of the activation layout

    std::vector<int> value_storage;            // storage of each value
    std::vector<memory::desc> value_desc;      // layout of each materialised value
    std::vector<Storage> storages;
    std::vector<bool> concat_in_place;         // per op index: concat written in place
    std::vector<int> copy_residual;            // per op index: residual must be copied first
    std::vector<int> shuffle_temp;             // per op index: storage of a 1x1-conv output to pixel-shuffle, or -1
    bool input_desc_chosen = false;

    std::unique_ptr<char, decltype(&std::free)> arena{nullptr, &std::free};
    size_t arena_bytes = 0;
    size_t arena_naive_bytes = 0;
    memory scratchpad;
    size_t scratchpad_bytes = 0;
    size_t weights_bytes = 0;
    std::vector<memory> weight_memories;  // kept alive for the steps' argument maps

    std::vector<Step> steps;
    memory user_src;
    memory user_dst;
    Dims input_dims;
    Dims output_dims;
    double compile_ms = 0;
    std::atomic<bool> running{false};  // a run()/profile() is in progress (checked without NDEBUG)
    int concat_copies = 0;
    std::string tuning_summary;
    // A plan from the cache: the layout and each convolution's algorithm, applied without measuring.
    tag forced_tag = tag::undef;
    const std::map<std::string, std::string>* forced_algorithms = nullptr;
    // Measure each convolution's candidates but lower every one as direct, recording the faster one in
    // Step::preferred: the memory budget then decides, and the plan is lowered again with the choice
    // fixed, so the all-Winograd plan is never built (engine_run.cpp).
    bool measure_only = false;

    memory::desc act_desc(const Dims& dims) const { return memory::desc(to_dnnl_dims(dims), dt::f32, act_tag); }

    int root_of(int storage, int64_t* channel_offset) const {
        int64_t offset = 0;
        while (storages[static_cast<size_t>(storage)].parent >= 0) {
            offset += storages[static_cast<size_t>(storage)].channel_offset;
            storage = storages[static_cast<size_t>(storage)].parent;
        }
        if (channel_offset) *channel_offset = offset;
        return storage;
    }

    void choose_layout();
    bool shuffle_eligible(const FusedOp& op) const {
        const Node& node = graph.node(op.node);
        const int64_t channels = graph.value(op.dst).dims[1];
        return options.deconv_as_conv && node.kernel == 2 && node.stride == 2 && op.activation == Activation::none &&
               (act_tag == tag::nChw8c || act_tag == tag::nChw16c || act_tag == tag::nchw) && channels % block == 0;
    }
    void plan_storage();
    void allocate_arena();
    memory value_memory(int value);
    primitive_attr make_attr(const FusedOp& op) const;
    void add_step(primitive prim, std::unordered_map<int, memory> args, const std::string& name,
                  const std::string& op_label, const std::string& kernel, double macs, size_t scratch);
    void lower(const TensorMap& weights);
    // Reorders OIHW weights once into the layout the primitive asked for; the bias goes as is.
    std::pair<memory, memory> upload_weights(const FoldedConv& folded, const memory::desc& weights_desc) {
        memory user_weights({to_dnnl_dims(folded.weight_dims), dt::f32, tag::oihw}, eng,
                            const_cast<float*>(folded.weights.data()));
        memory prepared(weights_desc, eng);
        reorder(user_weights, prepared).execute(strm, user_weights, prepared);
        memory bias({{static_cast<memory::dim>(folded.bias.size())}, dt::f32, tag::x}, eng);
        std::memcpy(bias.get_data_handle(), folded.bias.data(), folded.bias.size() * sizeof(float));
        strm.wait();
        weights_bytes += weights_desc.get_size() + bias.get_desc().get_size();
        weight_memories.push_back(prepared);
        weight_memories.push_back(bias);
        return {prepared, bias};
    }
    void lower_conv(const FusedOp& op, const TensorMap& weights);
    void lower_conv_transpose(const FusedOp& op, const TensorMap& weights);
    void run_chunk(const float* src, float* dst, std::vector<double>* step_ms);
    void compile(const Graph& full_graph, const TensorMap& weights, const EngineOptions& engine_options);
    double time_pass(int reps);  // best time of `reps` passes of one micro-batch of synthetic input, ms
};

// The layout's name as activation_layout() gives it.
std::string layout_name(memory::format_tag t);

}  // namespace resunet
