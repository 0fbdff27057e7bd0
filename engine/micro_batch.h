// The micro-batch candidate of the planner: how many images go through the compiled plan per pass.
// A larger micro-batch gives each convolution more work per call (better GEMM shapes on deep, small
// layers) but a larger arena and no in-place concats; which wins depends on the CPU, so it is measured.
// Works for any engine with run(src, batch, dst) and memory_usage() (Engine, QuantEngine).
//
//   resunet::MicroBatchSearch search;                       // candidates 1, 2, 4, ... dividing the batch
//   resunet::MicroBatchChoice choice = resunet::choose_micro_batch(
//       images.data(), 16, logit_floats_per_image, search,
//       [&](int mb) { options.micro_batch = mb; return std::make_unique<resunet::Engine>(graph, weights, options); },
//       resunet::logits_within(1e-3));                      // each candidate against micro-batch 1's logits
//   options.micro_batch = choice.micro_batch;               // then build the engine to keep
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace resunet {

struct MicroBatchSearch {
    int runs = 3;                  // timed runs of the whole batch per candidate (after one warm-up run)
    int largest = 0;               // largest candidate; 0 = the batch
    double memory_budget_mb = -1;  // a candidate whose engine bytes exceed this is not taken (negative: no limit)
    // Candidates are tried in increasing order; the search stops once one is this much slower than the
    // best so far (a larger one only grows the arena further).
    double stop_when_slower = 1.03;
};

struct MicroBatchTrial {
    int micro_batch = 0;
    double median_ms = 0;       // whole batch
    double engine_mb = 0;       // weights + arena + scratchpad
    double max_abs_diff = 0;    // against micro-batch 1's output
    std::string verdict;        // "ok", "over the memory budget", or why the check refused it
};

struct MicroBatchChoice {
    int micro_batch = 1;
    std::vector<MicroBatchTrial> trials;
    // "micro-batch 1 4210 ms *, 2 4105 ms, 4 (over the memory budget)" (* chosen)
    std::string summary() const {
        std::string s;
        for (const MicroBatchTrial& t : trials) {
            if (!s.empty()) s += ", ";
            s += fmt::format("{} {:.0f} ms", t.micro_batch, t.median_ms);
            if (t.verdict != "ok") s += fmt::format(" ({})", t.verdict);
            if (t.micro_batch == micro_batch) s += " *";
        }
        return "micro-batch " + s;
    }
};

// Powers of two that divide `batch`, up to `largest` (0: the batch): 16 -> 1 2 4 8 16; 12 -> 1 2 4.
inline std::vector<int> micro_batch_candidates(int batch, int largest = 0) {
    std::vector<int> out;
    const int top = largest > 0 ? std::min(largest, batch) : batch;
    for (int m = 1; m <= top; m *= 2)
        if (batch % m == 0) out.push_back(m);
    return out;
}

// The bounds the programs check candidates by (bench_resunet, resunet plan): fp32 logits_within this
// fraction of the largest logit; int8, whose dynamic scales follow the pass, sqnr_at_least this many dB
// (measured 31.6-31.9 dB between micro-batches of a random width-16 network).
inline constexpr double kMicroBatchFp32Bound = 1e-3;
inline constexpr double kMicroBatchInt8Db = 20.0;

// A candidate's output check: returns "" when `out` may stand for `reference` (n floats), else why not.
using MicroBatchCheck = std::function<std::string(const float* reference, const float* out, size_t n)>;

// Max |out - reference| at most `relative` x max(1, max|reference|): for the fp32 engine, whose
// micro-batches differ only by the order of additions (and each layer's algorithm, itself checked).
inline MicroBatchCheck logits_within(double relative) {
    return [relative](const float* ref, const float* out, size_t n) -> std::string {
        double peak = 1, worst = 0;
        for (size_t i = 0; i < n; ++i) {
            peak = std::max(peak, std::fabs(static_cast<double>(ref[i])));
            worst = std::max(worst, std::fabs(static_cast<double>(out[i]) - ref[i]));
        }
        if (!(worst <= relative * peak)) return fmt::format("max abs diff {:.2g} > {:.2g}", worst, relative * peak);
        return "";
    };
}

// Signal-to-quantization-noise ratio of `out` against the reference at least `db` decibels: for the
// dynamic int8 engine, whose activation scales are computed per pass and so change with the micro-batch
// (the same bound tests/test_quant.cpp holds int8 against fp32 to for a whole network).
inline MicroBatchCheck sqnr_at_least(double db) {
    return [db](const float* ref, const float* out, size_t n) -> std::string {
        double signal = 0, noise = 0;
        for (size_t i = 0; i < n; ++i) {
            signal += static_cast<double>(ref[i]) * ref[i];
            noise += (static_cast<double>(out[i]) - ref[i]) * (static_cast<double>(out[i]) - ref[i]);
        }
        const double got = noise > 0 ? 10 * std::log10(signal / noise) : 1e9;
        if (!(got >= db)) return fmt::format("SQNR {:.1f} dB < {:.0f} dB", got, db);
        return "";
    };
}

// Builds an engine per candidate with make(mb) (a pointer-like owner), times `search.runs` runs of the
// whole batch, checks the output against micro-batch 1's, and returns the fastest candidate that passed
// (micro-batch 1 always stands). `src`: `batch` images; the engine writes out_floats per image.
// Every candidate's engine is destroyed before the next is built, so peak memory is one engine's.
template <typename Make>
MicroBatchChoice choose_micro_batch(const float* src, int batch, size_t out_floats, const MicroBatchSearch& search,
                                    Make&& make, const MicroBatchCheck& check) {
    MicroBatchChoice choice;
    std::vector<float> reference(out_floats * static_cast<size_t>(batch)), out(reference.size());
    double best_ms = 0;
    for (int mb : micro_batch_candidates(batch, search.largest)) {
        MicroBatchTrial trial;
        trial.micro_batch = mb;
        auto engine = make(mb);
        const auto memory = engine->memory_usage();
        trial.engine_mb = static_cast<double>(memory.total()) / 1e6;
        if (mb > 1 && search.memory_budget_mb >= 0 && trial.engine_mb > search.memory_budget_mb) {
            trial.verdict = "over the memory budget";
            choice.trials.push_back(trial);
            break;  // larger ones only grow
        }
        float* target = mb == 1 ? reference.data() : out.data();
        engine->run(src, batch, target);  // warm-up, and the output checked
        std::vector<double> ms;
        for (int r = 0; r < std::max(1, search.runs); ++r) {
            const auto start = std::chrono::steady_clock::now();
            engine->run(src, batch, target);
            ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
        }
        std::sort(ms.begin(), ms.end());
        trial.median_ms = ms[ms.size() / 2];
        if (mb > 1) {
            for (size_t i = 0; i < out.size(); ++i)
                trial.max_abs_diff = std::max(trial.max_abs_diff, std::fabs(static_cast<double>(out[i]) - reference[i]));
            const std::string refused = check(reference.data(), out.data(), out.size());
            trial.verdict = refused.empty() ? "ok" : refused;
        } else {
            trial.verdict = "ok";
        }
        choice.trials.push_back(trial);
        if (trial.verdict != "ok") continue;  // a wrong result never wins on speed
        if (mb == 1 || trial.median_ms < best_ms) {
            best_ms = trial.median_ms;
            choice.micro_batch = mb;
        } else if (trial.median_ms > search.stop_when_slower * best_ms) {
            break;
        }
    }
    return choice;
}

}  // namespace resunet
