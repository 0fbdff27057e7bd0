// `resunet plan`: the fp32 plan the engine chooses for a model on this machine (layout, each layer's
// kernel and algorithm, the candidates measured), and where it is cached.
//
//   resunet plan --model m.safetensors [--size 224] [--threads 2] [--tune fast|full|off] [--retune]
//                [--micro-batch N|auto [--batch 16]]
#pragma once

#include <CLI/CLI.hpp>

namespace resunet {

void add_plan_command(CLI::App& app);

}  // namespace resunet
