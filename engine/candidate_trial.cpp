// The tuner's protocol (engine/candidate_trial.h).
#include "engine/candidate_trial.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "graph/tensor.h"

namespace resunet {

double trial_relative_error(const std::vector<float>& out, const std::vector<float>& reference) {
    if (out.size() != reference.size()) return INFINITY;
    double largest = 0, worst = 0;
    for (size_t i = 0; i < out.size(); ++i) {
        const double ref = reference[i];
        const double err = std::fabs(static_cast<double>(out[i]) - ref);
        if (!std::isfinite(ref) || !std::isfinite(err)) return INFINITY;
        largest = std::max(largest, std::fabs(ref));
        worst = std::max(worst, err);
    }
    return largest > 0 ? worst / largest : worst;
}

std::string trial_summary(const std::vector<TrialCandidate>& candidates, size_t chosen) {
    std::string text;
    for (size_t i = 0; i < candidates.size(); ++i) {
        const TrialCandidate& c = candidates[i];
        if (!text.empty()) text += ", ";
        text += c.name;
        if (!c.available) {
            text += " (unavailable)";
            continue;
        }
        if (c.ms >= 0) text += fmt::format(" {:.3g} ms", c.ms);
        if (i > 0) text += c.passed ? fmt::format(" (err {:.1e})", c.error) : fmt::format(" (REJECTED: err {:.1e})", c.error);
        if (i == chosen) text += " *";
    }
    return text;
}

TrialResult run_trial(std::vector<TrialCandidate>& candidates, const TrialRules& rules) {
    using Clock = std::chrono::steady_clock;
    auto elapsed_ms = [](Clock::time_point start) { return std::chrono::duration<double, std::milli>(Clock::now() - start).count(); };
    if (candidates.empty()) throw Error("tuner: a trial needs a reference candidate");
    TrialResult result;
    std::vector<float> reference;
    double best_ms = INFINITY;
    for (size_t i = 0; i < candidates.size(); ++i) {
        TrialCandidate& c = candidates[i];
        c.available = c.passed = false;
        c.error = 0;
        c.ms = -1;
        std::optional<TrialRun> trial = c.prepare ? c.prepare() : std::nullopt;
        if (!trial || !trial->run) {
            if (i == 0) throw Error(fmt::format("tuner: the reference candidate '{}' is not available", c.name));
            continue;
        }
        c.available = true;
        // The check run, also the warm-up (first touch of its buffers, caches).
        if (trial->reset) trial->reset();
        auto start = Clock::now();
        trial->run();
        const double check_ms = elapsed_ms(start);
        std::vector<float> out = trial->output ? trial->output() : std::vector<float>{};
        if (i == 0) {
            reference = std::move(out);
            c.passed = true;
        } else {
            c.error = trial_relative_error(out, reference);
            c.passed = c.error <= c.bound;
        }
        out = {};
        if (!c.passed) {  // never timed: a wrong kernel cannot win
            trial.reset();
            if (c.drop) c.drop();
            continue;
        }
        double best = check_ms;
        const int reps = rules.slow_ms > 0 && check_ms > rules.slow_ms ? std::min(rules.reps, 1) : rules.reps;
        if (reps > 0) best = INFINITY;
        for (int r = 0; r < reps; ++r) {
            if (trial->reset) trial->reset();
            start = Clock::now();
            trial->run();
            best = std::min(best, elapsed_ms(start));
        }
        c.ms = best;
        trial.reset();  // its buffers go now; a kernel it keeps goes through drop()
        const bool wins = i == 0 || (rules.forced >= 0 ? static_cast<int>(i) == rules.forced
                                                         : best < best_ms * (1.0 - rules.margin));
        if (wins) {
            if (i > 0 && candidates[result.chosen].drop) candidates[result.chosen].drop();  // superseded
            result.chosen = i;
            best_ms = best;
        } else if (c.drop) {
            c.drop();
        }
    }
    result.summary = trial_summary(candidates, result.chosen);
    return result;
}

}  // namespace resunet
