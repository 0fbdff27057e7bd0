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
#include <optional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/arena.h"
#include "engine/conv_choice.h"
#include "engine/engine.h"
#include "engine/lowering.h"
#include "engine/schedule.h"
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

// A step of the fp32 schedule (engine/lowering.h), with what tuning measured of a convolution. Our own
// Winograd runs as the step's `custom` pass on the arena's src and dst and the shared scratchpad.
struct Step : lowering::Step {
    ConvMeasurement tuned;  // a measured convolution's candidates, for the memory budget (engine_run.cpp)
    bool own_applies[2] = {false, false};  // a convolution: our own Winograd F(4x4), F(2x2) applies (the rule's input)
    double own_extra_bytes[2] = {0, 0};    // ... and the weight bytes each adds over direct (with measure_only_for_rule)
    int64_t channels[2] = {0, 0};          // a convolution: input and output channels
    int64_t out_hw[2] = {0, 0};            // a convolution: output height and width
};

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

// The fp32 policy over the planner's schedule (engine/schedule.h): one activation layout, in-place
// storage, each convolution's measured algorithm.
// The layout and each convolution's algorithm ("direct", "winograd_f43", ...) a compile() runs as given
// instead of choosing: undef / nullopt choose. A convolution missing from `algorithms` runs direct.
struct FixedChoices {
    tag layout = tag::undef;
    std::optional<std::map<std::string, std::string>> algorithms;
};

struct Engine::Impl : lowering::Schedule<Step> {
    EngineOptions options;
    tag act_tag = tag::nchw;
    int64_t block = 1;  // channel block of the activation layout

    std::vector<int> value_storage;            // storage of each value
    std::vector<memory::desc> value_desc;      // layout of each materialised value
    std::vector<Storage> storages;
    std::vector<bool> concat_in_place;         // per op index: concat written in place
    std::vector<int> copy_residual;            // per op index: residual must be copied first
    std::vector<int> shuffle_temp;             // per op index: storage of a 1x1-conv output to pixel-shuffle, or -1
    bool input_desc_chosen = false;

    int concat_copies = 0;
    std::string tuning_summary;
    Plan plan;  // what it runs (Engine::plan())
    // What compile() was told to run (a plan, the rule's choice, the cache's), its own copy.
    FixedChoices fixed;
    // Measure each convolution's candidates but lower every one as direct, recording the faster one in
    // Step::preferred: the memory budget then decides, and the plan is lowered again with the choice
    // fixed, so the all-Winograd plan is never built (engine_run.cpp).
    bool measure_only = false;
    // Lowering the all-direct plan for the rule (engine_run.cpp): record each Winograd's exact extra bytes.
    bool measure_only_for_rule = false;

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
    void add_step(primitive prim, std::unordered_map<int, memory> args, const std::string& name,
                  const std::string& op_label, const std::string& kernel, double macs, size_t scratch);
    void lower(const TensorMap& weights);
    // Reorders OIHW weights once into the layout the primitive asked for; the bias goes as is.
    std::pair<memory, memory> upload_weights(const FoldedConv& folded, const memory::desc& weights_desc) {
        return {weight_store.upload(eng, strm, folded.weights.data(), dt::f32, to_dnnl_dims(folded.weight_dims), weights_desc),
                weight_store.floats(eng, folded.bias.data(), static_cast<int64_t>(folded.bias.size()))};
    }
    void lower_conv(const FusedOp& op, const TensorMap& weights);
    void lower_conv_transpose(const FusedOp& op, const TensorMap& weights);
    // Lowers the graph; `fixed` (a plan, the rule's choice, a cached plan) is run without choosing.
    void compile(const Graph& full_graph, const TensorMap& weights, const EngineOptions& engine_options, FixedChoices fixed = {});
    double time_pass(int reps);  // best time of `reps` passes of one micro-batch of synthetic input, ms
};

// The layout's name as activation_layout() gives it.
std::string layout_name(memory::format_tag t);

// Hands the heap's free pages back to the system between planning stages (engine_run.cpp).
void return_freed_memory();

// The blocked layout's tag where one runs without reference kernels at the graph's widths, else undef
// (engine_run.cpp; the rule's layout and the measured planner's layout contest).
tag blocked_layout_here(const Graph& graph, const EngineOptions& options);

// The measured plan (--tune fast|full, engine/plan_measured.cpp): candidates timed per convolution, the memory
// budget, the layout contest. `layouts` gets the contest's line ("" without one), `budget_note` the budget's.
std::unique_ptr<Engine::Impl> compile_measured(const Graph& graph, const TensorMap& weights, const EngineOptions& options,
                                               std::string* layouts, std::string* budget_note);

}  // namespace resunet
