// The tuner's one protocol, shared by every place that chooses a kernel by measuring it (like cuDNN's
// benchmark mode): the fp32 engine's convolutions (engine/conv_tuning.h), the int8 engine's direct-or-Winograd
// choice (quant/int8_conv_choice.h) and the trainer's forward and backward passes (train/trainer_lowering.cpp).
// The places differ in what a candidate is (a oneDNN primitive in its own layouts, our own kernel, a chain of
// steps); the rules are these, in one place:
//   1. the first candidate is the reference (the direct algorithm): it always passes;
//   2. every candidate runs once (warm-up) and its output is checked against the reference's: its error is
//      max|out - reference| / max|reference|, and it passes only within its own bound (a NaN fails);
//   3. a candidate that fails is never timed, so a wrong kernel can never win on speed;
//   4. one that passes is timed: the best of `reps` runs (one where its check run took over `slow_ms`);
//   5. it wins when faster than the best so far by `margin`, or when it is the `forced` one.
// A candidate is built only when its turn comes (`prepare`) and what that built is released right after its
// measurement; a kernel kept for the winner is released through `drop` once something beats it. So at most
// the current winner and the candidate being measured coexist (our F(4x4) at 1024 channels holds 151 MB).
//
// Intended usage:
//   std::vector<resunet::TrialCandidate> c(2);
//   c[0].name = "direct"; c[0].prepare = [&]() -> std::optional<TrialRun> { return TrialRun{reset, run, output}; };
//   c[1] = {"winograd_f23", 1e-4, make_f23_run, [&] { kernel.reset(); }};
//   const resunet::TrialResult r = resunet::run_trial(c, {.reps = 3, .margin = 0.03});
//   use(c[r.chosen]);  log(r.summary);
//
// No oneDNN types: any engine, quant or train code may use it.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace resunet {

// What a prepared candidate does. Every function is synchronous (waits for its stream).
struct TrialRun {
    std::function<void()> reset;                 // untimed, before every run: restores what a run changed (may be null)
    std::function<void()> run;                   // one run
    std::function<std::vector<float>()> output;  // its result, in the same element order for every candidate
};

struct TrialCandidate {
    std::string name;  // "direct", "winograd", "winograd_f43", ...
    double bound = 0;  // accepted relative error against the reference (unused for the reference itself)
    // Builds the candidate just before it is measured; nothing: not available here (skipped, never chosen).
    // The TrialRun (and what it captured) is released right after the candidate's measurement.
    std::function<std::optional<TrialRun>()> prepare;
    // Releases a kernel the candidate keeps beyond its TrialRun, once it is not (or no longer) the choice.
    std::function<void()> drop = nullptr;

    // Filled by run_trial.
    bool available = false;  // prepare gave a TrialRun
    double error = 0;        // its check's relative error (0 for the reference)
    bool passed = false;     // within `bound` (the reference always)
    double ms = -1;          // best time of one run; -1 when never timed
};

struct TrialRules {
    int reps = 3;          // timed runs after the check run, best of; 0: the check run's own time
    double slow_ms = 0;    // > 0: a candidate whose check run took longer is timed once (its noise is small)
    double margin = 0.03;  // a candidate must be this fraction faster than the best so far to win
    int forced = -1;       // >= 0: this candidate is the choice if it passes its check (else the reference)
};

struct TrialResult {
    size_t chosen = 0;    // index of the choice; 0 (the reference) when nothing else passed and won
    std::string summary;  // "direct 12.9 ms, winograd 8.5 ms (err 3.0e-07) *": what was tried, for reports
};

// max|out - reference| / max|reference| (the absolute error when the reference is all zeros); infinite on a
// NaN or infinity in either, or on a size mismatch.
double trial_relative_error(const std::vector<float>& out, const std::vector<float>& reference);

// Runs the trial by the rules above. candidates[0] is the reference and must be available (else Error).
TrialResult run_trial(std::vector<TrialCandidate>& candidates, const TrialRules& rules);

// The summary line of a finished trial (TrialResult::summary).
std::string trial_summary(const std::vector<TrialCandidate>& candidates, size_t chosen);

}  // namespace resunet
