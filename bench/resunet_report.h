// bench_resunet's report: the Markdown table with how every figure was measured, and the PNG chart, both
// from the report's JSON (rows, provenance), so a saved --json renders the same.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace resunet::bench {

std::string markdown(const nlohmann::json& report);
// The rows as CSV: latency, memory and, for rows scored with --data, Dice and IoU at the original size (the
// figures of the JSON's "eval"; empty cells when not scored).
std::string csv(const nlohmann::json& report);
// A bar panel per figure (latency, peak RSS, Dice), one bar per row, in the spirit of the paper's figure 3.
void write_chart(const nlohmann::json& report, const std::string& path);

}  // namespace resunet::bench
