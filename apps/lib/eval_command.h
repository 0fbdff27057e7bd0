// `resunet eval`: scores a model file on the test side of a split with evaluate_split: per-image Dice, IoU and
// two-class mIoU at model and original size, their pooled counterparts, a Markdown table and optional JSON.
//
// Intended usage:
//   resunet::EvalCommandOptions options;                   // the defaults of the CLI flags (command_flags.h)
//   options.model_path = "runs/w16/best.safetensors";
//   options.data_dir = "/data/kvasir-seg";
//   options.split_path = "runs/w16/split.json";
//   resunet::EvalReport report = resunet::run_eval(options);  // UsageError for bad input
//
//   CLI::App app;
//   resunet::add_eval_command(app);                        // `resunet eval ...`, exit codes 0/1/2
#pragma once

#include <string>

#include "apps/lib/cli_common.h"
#include "apps/lib/command_flags.h"
#include "apps/lib/evaluate.h"

namespace CLI {
class App;
}

namespace resunet {

struct EvalReport {
    EvalResult result;                // evaluate_split's result
    double pooled_mean_iou_model = 0;     // two-class mIoU of all pixels pooled, at model size
    double pooled_mean_iou_original = 0;  // ... at original size
    std::string engine;               // "fp32", "int8 (dynamic scales)", ...
    std::string plan_id;              // the plan the engine ran (engine/plan.h)
    std::string split;                // where the test ids came from
    int size = 0;                     // model input size
    int threads = 0;
};

// Scores the model on the test side of the split with evaluate_split. Throws UsageError for bad input.
EvalReport run_eval(const EvalCommandOptions& options);

// run_eval for the CLI: prints a UsageError as "resunet eval: error: ..." and returns 2, another failure as one
// line and 1, else 0.
int eval_command(const EvalCommandOptions& options);

// Registers the `eval` subcommand; its callback throws CLI::RuntimeError(code) for a non-zero exit.
void add_eval_command(CLI::App& app);

// Markdown table of an evaluation.
std::string format_eval_markdown(const EvalReport& report);

}  // namespace resunet
