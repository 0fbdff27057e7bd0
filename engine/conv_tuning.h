// Choosing a convolution's algorithm by measuring it, like cuDNN's benchmark mode: every candidate
// primitive runs on the layer's real shape with the layer's real weights, is checked against the direct
// algorithm's output, and the fastest one that passes the check wins. A wrong kernel never wins on speed.
//
// Intended usage (engine/engine.cpp, lower_conv):
//   std::vector<resunet::ConvCandidate> candidates = {{"direct", direct_pd}, {"winograd", wino_pd}};
//   resunet::ConvTrial trial = resunet::measure_conv(eng, strm, candidates, oihw_weights, bias, reps);
//   const auto& pd = candidates[trial.chosen].pd;
//
// Internal to engine/ (oneDNN types): the public headers speak in our own types.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <string>
#include <vector>

namespace resunet {

// Largest accepted max|candidate - direct| / max|direct| on the layer's real shape, per algorithm. fp32
// Winograd F(2x2,3x3) and F(4x4,3x3) transform the data with constants such as 1/4 and 1/6; their error
// on uniform data is 1e-7..1e-6 of the output's range, so 1e-4 leaves room for real layers and rejects a
// wrong kernel (any indexing or transform error is of the order of the output itself).
inline constexpr double kWinogradRelativeBound = 1e-4;

struct ConvCandidate {
    std::string name;  // "direct", "winograd"
    dnnl::convolution_forward::primitive_desc pd;
    double bound = 0;     // accepted relative error against direct (0 for direct itself)
    double ms = -1;       // best time of one run; -1 when not measured
    double error = 0;     // measured max|candidate - direct| / max|direct|
    bool passed = false;  // within `bound`
};

struct ConvTrial {
    size_t chosen = 0;  // index of the fastest candidate that passed; 0 (direct) when none beats it
    // "direct 12.9 ms, winograd 8.5 ms (err 3e-07)": what was tried, for the profile and the report.
    std::string summary(const std::vector<ConvCandidate>& candidates) const;
};

// Runs each candidate `reps` times (after one warm-up) on a synthetic input (uniform [0, 1), as after a
// ReLU) and a dst prefilled with the same values (so a fused residual sum sees data), with the weights
// given in OIHW (`weights`, f32) reordered into each candidate's layout. candidates[0] must be the direct
// algorithm: its output is the reference of the others. A candidate must be at least `margin` faster
// than the best so far to win (times on a loaded machine move by a few percent).
ConvTrial measure_conv(const dnnl::engine& eng, dnnl::stream& strm, std::vector<ConvCandidate>& candidates,
                       const dnnl::memory& weights, const dnnl::memory& bias, int reps, double margin = 0.03);

}  // namespace resunet
