// Choosing an fp32 convolution's algorithm by measuring it, like cuDNN's benchmark mode: every candidate
// primitive runs on the layer's real shape with the layer's real weights, is checked against the direct
// algorithm's output, and the fastest one that passes the check wins. A wrong kernel never wins on speed.
// The rules are the tuner's one protocol (engine/candidate_trial.h); this file gives it convolutions.
//
// A candidate may also be our own kernel (engine/winograd_own.h): it then carries the direct pd for its
// src and dst layouts, and runs through `own` (or `make_own`) on the same data, checked and timed the
// same way.
//
// Intended usage (engine/engine.cpp, lower_conv):
//   std::vector<resunet::ConvCandidate> candidates = {{"direct", direct_pd}, {"winograd", wino_pd}};
//   candidates.push_back({"winograd_f43", direct_pd, resunet::kOwnWinogradRelativeBound, nullptr, make_f43});
//   resunet::ConvTrial trial = resunet::measure_conv(eng, strm, candidates, oihw_weights, bias, reps);
//   const auto& pd = candidates[trial.chosen].pd;
//
// Internal to engine/ (oneDNN types): the public headers speak in our own types.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/candidate_trial.h"
#include "engine/winograd_own.h"

namespace resunet {

// Largest accepted max|candidate - direct| / max|direct| on the layer's real shape, per algorithm. fp32
// Winograd F(2x2,3x3) and F(4x4,3x3) transform the data with constants such as 1/4 and 1/6; their error
// on uniform data is 1e-7..1e-6 of the output's range, so 1e-4 leaves room for real layers and rejects a
// wrong kernel (any indexing or transform error is of the order of the output itself).
inline constexpr double kWinogradRelativeBound = 1e-4;
// Our own F(4x4,3x3) and F(2x2,3x3) (engine/winograd_own.h): the same transforms in fp32 (U = G g G^T in
// double, rounded once), so the same bound. Measured on the width-64 network's 3x3 layers with uniform
// [0, 1) inputs and dst, batch 1 and 4 (bench/bench_winograd_own): F(4x4) 2.9e-6..8.3e-6 of the
// output's range (growing with the input channels, 64..1024), F(2x2) 1.2e-6..6.1e-6: 12x below the bound
// at worst, while an indexing or transform error is of the order of the output itself.
inline constexpr double kOwnWinogradRelativeBound = kWinogradRelativeBound;

struct ConvCandidate {
    std::string name;  // "direct", "winograd", "winograd_f43", "winograd_f23"
    dnnl::convolution_forward::primitive_desc pd;  // for `own`: the direct pd (src and dst layouts only)
    double bound = 0;     // accepted relative error against direct (0 for direct itself)
    std::shared_ptr<WinogradOwn> own = nullptr;  // our own kernel, run instead of pd's primitive
    // Or our own kernel built only when measure_conv reaches it, and released after unless it is the
    // fastest so far: at most two candidates' transformed weights coexist (F(4x4) at 1024 channels holds
    // 151 MB), not all of them.
    std::function<std::shared_ptr<WinogradOwn>()> make_own = nullptr;
    size_t weight_bytes = 0;   // set by measure_conv: weights in the candidate's layout (own: U + bias)
    size_t scratch_bytes = 0;  // set by measure_conv: scratchpad of one run
    double ms = -1;       // set by measure_conv: best time of one run; -1 when not measured
    double error = 0;     // set by measure_conv: max|candidate - direct| / max|direct|
    bool passed = false;  // set by measure_conv: within `bound`
};

// The choice (index into the candidates) and the summary line: "direct 12.9 ms, winograd 8.5 ms (err 3.0e-07) *".
using ConvTrial = TrialResult;

// The tuner's protocol (engine/candidate_trial.h) for convolutions: each candidate is checked, then timed
// `reps` times, on a synthetic input (uniform [0, 1), as after a ReLU) and a dst prefilled with the same
// values (so a fused residual sum sees data), with the weights given in OIHW (`weights`, f32) reordered
// into each candidate's layout; a `make_own` that builds nothing leaves its candidate unavailable.
// candidates[0] must be the direct algorithm: its output is the reference of the others. A candidate must be
// at least `margin` faster than the best so far to win (times on a loaded machine move by a few percent).
ConvTrial measure_conv(const dnnl::engine& eng, dnnl::stream& strm, std::vector<ConvCandidate>& candidates,
                       const dnnl::memory& weights, const dnnl::memory& bias, int reps, double margin = 0.03);

}  // namespace resunet
