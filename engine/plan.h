// The plan: what an engine runs, as an object one can print, save, load and pin. It holds everything that
// changes the numbers (the activation layout, each convolution's algorithm and precision, the micro-batch
// that sets dynamic int8 scales) and why each was chosen. What does not change them (threads, blocking,
// memory placement) is not in it, so a plan gives the same masks on any thread count, load or MPI rank.
//
// Intended usage:
//   resunet::Engine engine(graph, weights, options);            // plans (by rule, or measured), lowers, runs
//   const resunet::Plan& plan = engine.plan();                  // layout, per-conv algorithm, id
//   resunet::save_plan_file("p.json", plan);                    // `resunet plan --save-plan p.json`
//   options.plan = std::make_shared<resunet::Plan>(resunet::load_plan_file("p.json"));
//   resunet::Engine again(graph, weights, options);             // exactly that plan, nothing measured
//
// No oneDNN types: apps/ and bench/ use it.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>

namespace resunet {

// A convolution's algorithm. One table (plan.cpp) gives each its one name, used by the CLI, reports,
// plan files and the plan cache.
enum class ConvAlgo {
    direct,             // "direct": oneDNN's direct kernel (f32 or u8 x s8)
    winograd_onednn,    // "winograd": oneDNN's own f32 Winograd (AVX-512, blocked layouts, oneDNN 2.x)
    winograd_f43,       // "winograd_f43": our own f32 Winograd F(4x4,3x3) (engine/winograd_own.h)
    winograd_f23,       // "winograd_f23": our own f32 Winograd F(2x2,3x3)
    winograd_int8_f23,  // "winograd_int8_f23": our own int8 Winograd F(2x2,3x3) (quant/winograd_int8.h)
};

std::string_view conv_algo_name(ConvAlgo algorithm);
// The algorithm named `name`; any other word is a resunet::Error naming it and the valid ones.
ConvAlgo conv_algo_from_name(std::string_view name);
inline bool is_own_fp32_winograd(ConvAlgo a) { return a == ConvAlgo::winograd_f43 || a == ConvAlgo::winograd_f23; }

// One convolution of the plan (named by its fused op's head node, e.g. "e2.conv_a").
struct PlanLayer {
    ConvAlgo algorithm = ConvAlgo::direct;
    std::string precision = "f32";  // "f32" or "u8s8"
    std::string why;                // "rule: ...", "measured: direct 4.1 ms, winograd_f43 2.2 ms *", "plan file"
};

struct Plan {
    std::string precision = "fp32";  // the engine: "fp32" or "int8"
    std::string layout;              // activation layout: "nChw16c", "nChw8c", "nhwc", "nchw"
    int micro_batch = 1;             // images per pass (dynamic int8 scales are computed per pass)
    std::string source;              // how it was made: "rule", "measured", "plan cache", "file", "asked"
    std::string cpu_class;           // the class the rule used: ISA oneDNN dispatches and int8 weight levels
    std::map<std::string, PlanLayer> layers;  // every convolution

    // "p" + 8 hex digits: a CRC-32 of what changes the numbers (precision, layout, micro-batch where it
    // matters, each layer's algorithm and precision). Two plans with the same id give the same numbers on one
    // CPU class.
    std::string id() const;
    // Whether another micro-batch gives other numbers: int8 (dynamic scales per pass), fp32 with oneDNN's own
    // Winograd (its blocking follows the problem size), and fp32 below AVX-512 (our Winograd's GEMMs run on
    // oneDNN's gemm:jit there, whose kernel follows the tile count). On AVX-512 classes our kernels and oneDNN's
    // direct ones never change a sum's order with the images per pass (tests/test_plan.cpp), so such an fp32
    // plan runs at any micro-batch.
    bool micro_batch_changes_numbers() const;
    // "14 winograd_f43, 14 direct" style counts, for reports.
    std::string counts() const;
    bool same_numerics(const Plan& other) const { return id() == other.id(); }
};

// Whether fp32 plans of a CPU class (Plan::cpu_class, the ISA oneDNN dispatches) give the same numbers at every
// micro-batch: on AVX-512 classes our Winograd's GEMMs are oneDNN's brgemm, whose sums follow K alone; below,
// its gemm:jit, whose kernel follows the GEMM's shape (tests/test_plan.cpp measures both).
bool fp32_micro_batch_keeps_numbers(const std::string& cpu_class);

// The plan as JSON text (format "resunet-plan-file-1"), and back. from_json_text refuses anything else with
// a one-line resunet::Error (unknown algorithm, missing field, wrong format).
std::string plan_to_json_text(const Plan& plan);
Plan plan_from_json_text(const std::string& text, const std::string& what = "plan");

// Writes atomically; reads a file given with --plan (regular files only, at most 1 MB).
void save_plan_file(const std::string& path, const Plan& plan);
Plan load_plan_file(const std::string& path);

}  // namespace resunet
