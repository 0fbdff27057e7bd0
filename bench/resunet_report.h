// bench_resunet's report: the Markdown table with how every figure was measured, and the PNG chart, both
// from the report's JSON (rows, provenance), so a saved --json renders the same.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace resunet::bench {

// --micro-batch auto's checks of each candidate against micro-batch 1's logits (engine/micro_batch.h).
inline constexpr double kMicroBatchFp32Bound = 1e-3;  // max abs diff <= this x max|logit|
inline constexpr double kMicroBatchInt8Db = 20.0;     // SQNR: dynamic scales follow the pass

std::string markdown(const nlohmann::json& report);
// A bar panel per figure (latency, peak RSS, Dice), one bar per row, in the spirit of the paper's figure 3.
void write_chart(const nlohmann::json& report, const std::string& path);

}  // namespace resunet::bench
