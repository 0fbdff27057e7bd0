// The tuned fp32 plan (and the int8 engine's measured int8 3x3 choices), saved so that the next engine built
// for the same machine and graph compiles without measuring again.
//
// Intended usage (the Engine does this when EngineOptions::plan_cache names a folder):
//   resunet::PlanKey key = resunet::plan_key(graph, "f32", threads, micro_batch, "fast");
//   std::string why;
//   if (std::optional<resunet::CachedPlan> plan = resunet::load_plan(folder, key, &why)) ...use it...
//   else { ...tune...; resunet::save_plan(folder, key, tuned); }   // why: "none", "damaged: ...", "stale: ..."
//
// A file holds the key (CPU model, ISA oneDNN dispatches, oneDNN version, the graph's shapes, threads,
// micro-batch, precision, tuning mode) and the Plan (engine/plan.h: the JSON of `resunet plan --save-plan`),
// with a CRC-32 of both. A file that does not parse, fails its checksum or holds another key is not used: the engine
// tunes again and replaces it (atomically; a cache file is the engine's own, never a user's).
// The key has no weights: a plan measured with one model's weights is reused for another of the same
// graph. The check of each candidate against direct (1e-4 of the output's range) ran on the first
// model's weights; Winograd's error is a property of the transform (measured 3e-7..2e-6 on real and
// random layers), not of particular weights, so the choice stays valid.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "engine/plan.h"
#include "graph/graph.h"

namespace resunet {

struct PlanKey {
    std::string text;      // canonical JSON of every field, compared whole
    std::string filename;  // "plan-f32-<crc32 of text>.json"
};

struct CachedPlan {
    Plan plan;            // what the engine ran (engine/plan.h), stored as a plan file's JSON and checked as one
    std::string summary;  // the tuning summary when it was measured
};

PlanKey plan_key(const Graph& graph, const std::string& precision, int threads, int micro_batch,
                 const std::string& tune);

// The plan stored under `key` in `folder`, or nullopt with the reason in `why` ("no cached plan",
// "damaged: ...", "stale: ...").
std::optional<CachedPlan> load_plan(const std::string& folder, const PlanKey& key, std::string* why);

// Writes atomically (creating the folder); throws resunet::Error when it cannot.
void save_plan(const std::string& folder, const PlanKey& key, const CachedPlan& plan);

// Removes every plan the engines saved in `folder` (fp32 and int8; their own files, never a user's), so the next
// measured engine measures again (`resunet plan --retune`). Returns how many were removed.
int remove_cached_plans(const std::string& folder);

// $XDG_CACHE_HOME/resunet/plans, else $HOME/.cache/resunet/plans, else "" (no cache).
std::string default_plan_cache();

}  // namespace resunet
