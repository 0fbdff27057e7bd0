// `resunet plan`: the plan an engine runs for a model on this machine (engine/plan.h: layout, each layer's
// precision, kernel and algorithm and why, its id), optionally saved to a file that --plan runs again.
//
//   resunet plan --model m.safetensors [--precision fp32|int8] [--size 224] [--threads 2]
//                [--tune rule|fast|full|off] [--retune] [--micro-batch N|auto [--batch 16]]
//                [--save-plan p.json [--overwrite]] [--plan p.json]
#pragma once

#include <CLI/CLI.hpp>

namespace resunet {

void add_plan_command(CLI::App& app);

}  // namespace resunet
