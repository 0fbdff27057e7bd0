// The one place that turns the programs' engine flags (--tune, --int8-conv, --plan-cache, --memory-budget,
// --plan) into engine options: resunet predict, eval and plan, bench_resunet and peer_fidelity all call it, so
// a flag means the same everywhere and "none", the default cache folder and a plan file are decided once.
//
// Intended usage:
//   resunet::EngineTuningFlags flags;                 // bound by add_engine_tuning_flags
//   resunet::check_engine_flags(flags, /*fp32=*/false);   // UsageError for flags that do not apply
//   resunet::QuantOptions q = resunet::int8_engine_options(flags, threads, /*micro_batch=*/1);
//   resunet::EngineOptions f = resunet::fp32_engine_options(flags, threads, 1);
#pragma once

#include <memory>
#include <string>

#include "apps/lib/command_flags.h"
#include "engine/engine.h"
#include "engine/plan.h"
#include "quant/quant_engine.h"

namespace resunet {

// The plan-cache folder a --plan-cache value names: "" the default folder, "none" no cache.
std::string plan_cache_folder(const std::string& flag);

// UsageError for engine flags that do not apply to the engine `fp32` says (e.g. --memory-budget for int8,
// --int8-conv for fp32), and for a --plan file that is not a plan or not of that precision.
void check_engine_flags(const EngineTuningFlags& flags, bool fp32);

// The options of the fp32 / int8 engine the flags describe. With --plan, the plan (loaded once and shared)
// fixes everything that changes the numbers, and for int8 the micro-batch (its dynamic scales are per pass);
// `micro_batch` is used otherwise.
EngineOptions fp32_engine_options(const EngineTuningFlags& flags, int threads, int micro_batch);
QuantOptions int8_engine_options(const EngineTuningFlags& flags, int threads, int micro_batch);

// The fp32 micro-batch for runs of `batch` images: on CPU classes where it changes no number
// (fp32_micro_batch_keeps_numbers_here: AVX-512), 4 images per pass where the batch divides by 4 (else 2,
// else 1); elsewhere 1, as resunet predict runs. On the deep layers (28x28 and 14x14 at width 64) four images
// share each streamed weight: width 64, 224x224, batch 16 runs about 15% faster than one image per pass, for
// 250 MB more arena (docs/plan.md).
int fp32_micro_batch_for(int batch);

// The --plan file, loaded and checked (UsageError with one line), or null without --plan.
std::shared_ptr<const Plan> plan_flag(const EngineTuningFlags& flags);

// For reports: "plan p1a2b3c4d (rule)".
std::string plan_label(const Plan& plan);

}  // namespace resunet
