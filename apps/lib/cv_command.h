// `resunet cv`: k-fold cross-validation over the training side of the split, several folds side by side (each a
// TrainJob of train_command.h in RUN/fold<k>/), and RUN/cv_summary.json with the folds' final validation scores.
//
// Intended usage:
//   resunet::CvCommandOptions cv;                          // cv.train holds the training flags (command_flags.h)
//   cv.train.data_dir = "/data/kvasir-seg";
//   cv.train.out_dir = "runs/cv";
//   cv.folds = 5;
//   cv.parallel_folds = 2;                                 // two folds at a time, each with threads / 2
//   resunet::CvReport folds = resunet::run_cv(cv);         // runs/cv/fold<k>/..., runs/cv/cv_summary.json
//
//   CLI::App app;
//   resunet::add_cv_command(app);                          // `resunet cv ...`, exit codes 0/1/2
//
// A fold's numbers depend only on its seed (seed + fold index) and its thread count, never on how many folds run
// side by side.
#pragma once

#include <string>
#include <vector>

#include "apps/lib/cli_common.h"
#include "apps/lib/command_flags.h"
#include "apps/lib/train_command.h"
#include "data/metrics.h"

namespace CLI {
class App;
}

namespace resunet {

// One fold of a cross-validation.
struct FoldReport {
    int fold = 0;                     // 0-based; its folder is fold<fold>
    uint64_t seed = 0;                // seed + fold
    bool ok = false;                  // trained to the last epoch
    std::string error;                // why not, one line
    TrainReport train;                // as far as it got
};

struct CvReport {
    std::vector<FoldReport> folds;    // by fold index
    // Over the folds that finished: their final epoch's validation Dice, IoU and two-class mIoU.
    MetricSummary dice, iou, mean_iou;
    int threads_per_fold = 0;
    int parallel_folds = 0;
    std::string summary_path;         // RUN/cv_summary.json
    double seconds = 0;
    bool all_ok() const;
    int exit_code() const { return all_ok() ? 0 : 1; }
};

// Cross-validation; all usage checks happen before any fold starts. A failing fold is reported (FoldReport::error)
// while the others continue.
CvReport run_cv(const CvCommandOptions& options);

// run_cv for the CLI: prints a UsageError as "resunet cv: error: ..." and returns 2; 1 when a fold failed.
int cv_command(const CvCommandOptions& options);

// Registers the `cv` subcommand; its callback throws CLI::RuntimeError(code) for a non-zero exit.
void add_cv_command(CLI::App& app);

// Markdown table of a cross-validation.
std::string format_cv_markdown(const CvReport& report);

}  // namespace resunet
