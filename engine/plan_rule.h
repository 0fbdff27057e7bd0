// The default planner's rule: each convolution's algorithm from its shape and the CPU class alone, with no
// timing, so the numbers a plan gives are the same for a model on a CPU class whatever the threads, the
// load, the MPI ranks or the plan cache. Measuring (Tuning::fast, full) remains available by flag.
//
// Intended usage (engine/engine_run.cpp, after lowering the all-direct plan once):
//   std::vector<resunet::RuleLayer> layers = ...;   // each convolution: shape, which Winograds apply
//   resunet::RuleChoice c = resunet::fp32_rule(layers, base_bytes, budget_bytes);
//   ...lower with c.algorithms fixed...
//
// No oneDNN types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/plan.h"

namespace resunet {

struct RuleLayer {
    std::string name;                  // head node, e.g. "e2.conv_a"
    int64_t in_channels = 0, out_channels = 0;
    int64_t height = 0, width = 0;     // output
    double macs = 0;                   // per pass
    bool f43_applies = false, f23_applies = false;  // our own fp32 Winograd (engine/winograd_own.h)
    // Weight bytes F(4x4) and F(2x2) add over direct, in the layouts they would run (WinogradOwn::weight_bytes_of);
    // 0: estimated as own_winograd_extra_bytes().
    double extra_bytes[2] = {0, 0};
};

struct RuleChoice {
    std::map<std::string, ConvAlgo> algorithms;  // every layer given
    std::map<std::string, std::string> why;
    std::string note;  // "rule: 14 winograd_f43 ...; memory budget ..."
};

// fp32: our Winograd F(4x4,3x3) wherever it applies (it measured faster than direct on every 3x3 layer of the
// width-64 network where it applies, on AVX2 and AVX-512 CPUs alike; docs/plan.md), then the memory budget:
// `base_bytes` is the all-direct plan's weights and arena (no scratchpad: it grows with the thread count,
// and the choice must not), `budget_bytes` the limit (infinite: none). While over it, the layer whose extra
// weight bytes buy the fewest multiply-adds moves to F(2x2,3x3), then to direct. Deterministic: ties by name.
RuleChoice fp32_rule(const std::vector<RuleLayer>& layers, double base_bytes, double budget_bytes);

// Extra weight bytes of our own fp32 Winograd over direct for one layer (U is (tile+2)^2 x IC x OC floats).
double own_winograd_extra_bytes(int tile, int64_t in_channels, int64_t out_channels);

}  // namespace resunet
