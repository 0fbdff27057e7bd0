// The fp32 inference engine: compiles a Graph once into oneDNN primitives and argument lists, then
// runs them as often as asked. No oneDNN type appears in this header.
//
// Intended usage:
//   resunet::Graph graph = resunet::build_resunet({.width = 64});
//   resunet::TensorMap weights = resunet::load_safetensors("model.safetensors").tensors;
//   resunet::EngineOptions options;
//   options.micro_batch = 1;                               // batch 16 runs as 16 passes of 1
//   resunet::Engine engine(graph, weights, options);      // primitives, reorders, arena: once
//   std::vector<float> logits(16 * 224 * 224);
//   engine.run(images.data(), /*batch=*/16, logits.data());   // NCHW in, NCHW out
//   for (const resunet::LayerProfile& l : engine.profile(images.data(), 16)) ...  // per layer
//   resunet::EngineMemory m = engine.memory_usage();            // weights, arena, scratchpad bytes
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "engine/plan.h"
#include "graph/graph.h"

namespace resunet {

// Activation layout used through the whole fp32 network.
enum class EngineLayout {
    automatic,  // the one oneDNN's convolution asks for with format_tag::any on this CPU (nChw8c with AVX2,
                // nhwc for brgconv with AVX-512)
    blocked,    // the widest channel-blocked layout (nChw16c, else nChw8c) that the graph's convolutions run
                // on without a reference kernel; concat slices are then dense sub-tensors
    nhwc,       // channels last; a concat slice would be strided, so concats are copied (see plan_storage)
    nchw,       // plain
};

// How the engine chooses each convolution's algorithm and the activation layout.
enum class Tuning {
    rule,  // the default: fixed per CPU class (engine/plan_rule.h): the blocked layout where one runs, our own
           // Winograd where it applies, within the memory budget; nothing timed, so the numbers do not depend on
           // the threads, the load, MPI ranks or the plan cache
    off,   // oneDNN's direct algorithm everywhere, in the layout `layout` names (the engine before tuning)
    fast,  // measured at compile time on this machine: each 3x3 stride-1 convolution's candidates (direct;
           // Winograd where oneDNN has it for the layout; our own Winograd F(4x4) and F(2x2) where it
           // applies, engine/winograd_own.h), 3 timed runs each on the layer's real shape and
           // weights, each checked against direct first (engine/conv_tuning.h); with layout `automatic`,
           // oneDNN's layout against the blocked one by a timed pass of the whole network. The choice may
           // differ between starts and machines: save the plan (Engine::plan()) to pin it
    full,  // the same with 7 runs per candidate and 3 timed passes per layout
};

// "rule", "off", "fast" or "full" (the words of the programs' --tune flag) as a Tuning; any other word is a
// resunet::Error naming it. tuning_name() is the reverse.
Tuning tuning_from_name(const std::string& name);
std::string tuning_name(Tuning tuning);
// Whether the tuning measures (fast, full): its choices then depend on timing.
inline bool tuning_measures(Tuning t) { return t == Tuning::fast || t == Tuning::full; }

// One algorithm for every 3x3 stride-1 convolution, for tests and comparisons; `tuned` measures.
// own_winograd_f43 / own_winograd_f23: our own Winograd F(4x4,3x3) / F(2x2,3x3) (engine/winograd_own.h)
// wherever it applies (3x3 stride 1 pad 1, channels multiples of 8, nChw8c/nChw16c/nhwc, a CPU with AVX2
// and FMA, not the graph's input), direct elsewhere.
enum class ConvAlgorithm { tuned, direct, winograd, own_winograd_f43, own_winograd_f23 };

// The default memory budget (EngineOptions::memory_budget_mb = 0) as a multiple of the all-direct plan's
// engine bytes. 2.5x keeps the width-64 network's default plan under the paper's fp32 565 MB peak RSS with
// room for Winograd on the deep layers, whose 4x weights a smaller factor left direct (figures:
// docs/design.md, "Tuning constants").
inline constexpr double kDefaultMemoryBudgetFactor = 2.5;

struct EngineOptions {
    int micro_batch = 1;  // images per pass through the compiled plan; the run batch must be a multiple
    int threads = 0;      // OpenMP threads for oneDNN (omp_set_num_threads in the calling thread, before primitives
                          // are created and at each run); 0 leaves the current setting alone
    // Concat inputs are written in place into their slice of the concat buffer when the layout allows
    // (micro_batch 1, channel offsets on the layout's block); false forces oneDNN's concat (a copy).
    bool concat_in_place = true;
    EngineLayout layout = EngineLayout::automatic;
    Tuning tune = Tuning::rule;
    // winograd: wherever oneDNN has it for the layer and layout (direct elsewhere), without measuring.
    ConvAlgorithm conv_algorithm = ConvAlgorithm::tuned;
    // Folder of saved tuned plans (engine/plan_cache.h): with tuning on, a plan measured before for this
    // CPU, oneDNN, graph, threads and micro-batch is reused without measuring; a damaged or stale one is
    // measured again and replaced. Empty: always measure. The programs pass default_plan_cache().
    std::string plan_cache;
    // Largest engine bytes (weights + arena + scratchpad) a tuned plan may take, in MB. Winograd's
    // weights are 1.8x (F(2x2,3x3)) to 4x (F(4x4,3x3)) the direct ones and its scratchpad is larger, so
    // when the measured plan exceeds the budget the Winograd layers that save the least time per extra
    // byte fall back to a leaner candidate that still beat direct (F(2x2) for F(4x4)), else to direct,
    // until it fits (never below the direct plan). 0: kDefaultMemoryBudgetFactor x the bytes of the same
    // plan with every convolution direct; negative: no limit.
    double memory_budget_mb = 0;
    // ConvTranspose 2x2 stride 2 runs as a 1x1 convolution to 4x the channels plus a pixel-shuffle
    // reorder (faster than oneDNN 2.6's deconvolution on AVX2); false uses the deconvolution primitive.
    bool deconv_as_conv = true;
    // Keep every materialised activation until the end of a pass (no arena reuse, no in-place residual
    // accumulation), so read_value() can return it afterwards. For per-layer comparisons; costs memory.
    bool keep_values = false;
    // A plan to run exactly (engine/plan.h: an fp32 plan, made for `micro_batch` unless another changes no number,
    // Plan::micro_batch_changes_numbers): its layout and algorithms, nothing measured. A layer it names that the
    // graph lacks, a convolution it leaves out, or an algorithm without a kernel here is a resunet::Error. Null:
    // planned by `tune`.
    std::shared_ptr<const Plan> plan;
};

// Bytes the engine holds, by purpose (resident set of the process is measured separately).
struct EngineMemory {
    size_t weights_bytes = 0;     // reordered, BN-folded weights and biases
    size_t arena_bytes = 0;       // planned activation arena (one micro-batch)
    size_t arena_naive_bytes = 0; // what one buffer per tensor would have taken
    size_t scratchpad_bytes = 0;  // the one user scratchpad shared by all primitives
    size_t total() const { return weights_bytes + arena_bytes + scratchpad_bytes; }
};

// One executed primitive of a profiled run.
struct LayerProfile {
    std::string name;       // fused-op name: the head node's name, e.g. "e1.conv_a"
    std::string op;         // "conv+bn+relu", "deconv", "maxpool", "reorder", ...
    std::string kernel;     // oneDNN implementation, e.g. "jit:avx2" (ONEDNN_VERBOSE's name)
    std::string precision;  // "f32", "s8", ...
    double time_ms = 0;     // summed over the micro-batches of the run
    double gflop = 0;       // 2 * MACs over the whole run batch
    std::string algorithm;  // convolutions: "direct", "winograd" (oneDNN's), "winograd_f43"/"winograd_f23"
                            // (ours); empty otherwise
    std::string candidates; // what tuning tried: "direct 12.9 ms, winograd 8.5 ms (err 3.1e-07) *"
    double gflops() const { return time_ms > 0 ? gflop / (time_ms * 1e-3) : 0; }
};

// Threading contract. Several engines may run at the same time, one per thread (each owns its arena,
// scratchpad and stream; the Graph and weights passed in are only read while constructing). One engine
// must not be used from two threads at once: run() and profile() write its arena and scratchpad, so
// concurrent calls would corrupt each other's output silently; in builds without NDEBUG a second
// concurrent run()/profile() throws resunet::Error instead. With EngineOptions::threads > 0 the
// constructor, run() and profile() set omp_set_num_threads(threads) for their own duration and restore
// the caller's omp_get_max_threads() on return, also when they throw. run() refuses NaN/Inf input
// (resunet::Error), as the int8 engine does.
class Engine {
  public:
    Engine(const Graph& graph, const TensorMap& weights, const EngineOptions& options = {});
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    // src: batch x C x H x W floats (NCHW); dst: batch x outC x H x W floats. batch % micro_batch == 0.
    void run(const float* src, int batch, float* dst);
    // Runs once, timing each primitive (waits after each, so a little slower than run()).
    std::vector<LayerProfile> profile(const float* src, int batch, float* dst);

    EngineMemory memory_usage() const;
    // A fused op's output from the last micro-batch run, as NCHW floats (needs keep_values). The name is
    // the graph value's, e.g. "e1.relu"; values fused away inside an op (e.g. "e1.bn_a") are refused.
    std::vector<float> read_value(const std::string& name);
    // Names of the values read_value() can return, in execution order.
    std::vector<std::string> materialized_values() const;
    double compile_ms() const;            // primitive creation, weight reorders, planning
    const Dims& input_dims() const;       // per image: {1, C, H, W}
    const Dims& output_dims() const;      // per image: {1, outC, H, W}
    // How the plan was chosen: the layouts timed (whole-network pass each) and how many convolutions took
    // each algorithm, e.g. "layout nChw16c 512 ms * vs nhwc 640 ms; conv3x3: 14 winograd, 6 direct".
    std::string tuning_summary() const;
    // The plan this engine runs (engine/plan.h): save it to run the same numbers elsewhere.
    const Plan& plan() const;
    std::string activation_layout() const;  // the layout in use: "nChw16c", "nChw8c", "nhwc" or "nchw"
    int num_primitives() const;
    int num_concat_copies() const;        // concats that could not be done in place
    std::string isa() const;              // ISA oneDNN dispatches to, e.g. "avx2"

    struct Impl;

  private:
    std::unique_ptr<Impl> impl_;
};

// oneDNN's version and CPU ISA as a string, for reports.
// The CPU's model name with its family and model numbers from /proc/cpuinfo, e.g. "AMD EPYC (family 23
// model 49)" (a Zen 2); "unknown" when absent. For reports and plan-cache keys.
std::string cpu_model_name();
std::string onednn_version();

// fp32_micro_batch_keeps_numbers (engine/plan.h) for the class oneDNN dispatches on this CPU.
bool fp32_micro_batch_keeps_numbers_here();

}  // namespace resunet
