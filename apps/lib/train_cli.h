// `resunet train`, `resunet cv` and `resunet eval`: fp32 training runs on oneDNN with a run folder that can be
// resumed bit for bit, k-fold cross-validation with several folds side by side, and scoring a model file.
//
// Intended usage:
//   resunet::TrainCommandOptions options;                 // the defaults of the CLI flags
//   options.data_dir = "/data/kvasir-seg";
//   options.out_dir = "runs/w16";
//   options.epochs = 20;
//   resunet::TrainReport report = resunet::run_train(options);  // UsageError before any work, Error mid-run
//   options.resume = true;                                 // later: continue from runs/w16/last.safetensors
//
//   resunet::CvCommandOptions cv;                          // cv.train holds the training flags
//   cv.folds = 5;
//   cv.parallel_folds = 2;                                 // two folds at a time, each with threads / 2
//   resunet::CvReport folds = resunet::run_cv(cv);         // runs/cv/fold<k>/..., runs/cv/cv_summary.json
//
//   CLI::App app;
//   resunet::add_train_command(app);                       // `resunet train ...`, exit codes 0/1/2
//
// A run folder (`--out RUN`, and each RUN/fold<k>/ of `cv`) holds:
//   config.toml        the effective flags (CLI11 config format; `--config RUN/config.toml` reruns them)
//   split.json         the train/test split (train), or the fold's train/validation ids (cv)
//   metrics.csv        epoch,lr,train_loss,val_dice,val_iou,val_miou,epoch_seconds,loader_wait_seconds,loader_wait_share
//   last.safetensors   training checkpoint of the last finished epoch (weights, Adam moments, step, lr)
//   best.safetensors   weights of the epoch with the best validation Dice (a plain model file)
//   train.log          timestamped events, appended across resumes
//   curves.png         training loss and validation Dice per epoch
// Validation metrics are per-image means at the original image size (evaluate_split's `original`); val_miou is
// the two-class (background, polyp) mean IoU. epoch_seconds covers training and validation; loader_wait_share is
// loader_wait_seconds over the seconds of the training loop alone (validation excluded).
//
// Determinism: initial weights come from the seed, the loader's shuffle and augmentation from (seed, epoch), the
// checkpoint restores the optimiser exactly, so a resumed run equals an uninterrupted one, and a fold's numbers
// depend only on its seed (seed + fold index) and its thread count, never on how many folds run side by side.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "apps/lib/evaluate.h"
#include "apps/lib/predict.h"
#include "data/metrics.h"

namespace CLI {
class App;
}

namespace resunet {

// Flags of `resunet train` (and the training part of `resunet cv`).
struct TrainCommandOptions {
    std::string data_dir;             // Kvasir-SEG layout: images/ and masks/
    std::string out_dir;              // the run folder, created if missing
    int width = 16;                   // channels of the first stage
    int depth = 4;                    // poolings
    int size = 224;                   // model input size (square), divisible by 2^depth
    int batch = 8;                    // images per step; each epoch drops the last incomplete batch
    int epochs = 20;                  // epochs of the whole run (a resumed run may raise it)
    double learning_rate = 1e-4;      // Adam lr of epoch 1
    int lr_step = 30;                 // StepLR: epochs between decays
    double lr_gamma = 0.1;            // StepLR: factor per decay
    std::string loss = "dice+bce";    // "dice+bce", "dice" or "bce"
    uint64_t seed = 42;               // split, folds, initial weights, shuffle and augmentation
    double max_angle = 15.0;          // augmentation: rotation in [-max, +max] degrees (p 0.5), flip (p 0.5)
    int threads = 0;                  // oneDNN/OpenMP threads (cv: the budget shared by the folds); 0 = all cores
    int loader_threads = 0;           // loader threads per run; 0 = max(1, min(4, threads / 2))
    std::string split_path;           // train/test split file; default RUN/split.json, made if missing
    int limit = 0;                    // keep the first N pairs of the dataset (by id); 0 = all
    bool skip_bad = false;            // skip unreadable pairs instead of refusing the dataset
    bool resume = false;              // continue RUN from its last.safetensors
    std::string init_path;            // start from this model file's weights (fine-tuning; same width and depth, any
                                      // size); Adam starts fresh; a resumed run continues its checkpoint instead
    bool progress = false;            // progress bar on `log` (the CLI turns it on when stderr is a terminal)
    std::FILE* log = stderr;          // setup lines, one line per epoch, progress; nullptr = silent
    std::FILE* out = stdout;          // the final summary; nullptr = silent
};

// One row of metrics.csv.
struct EpochRecord {
    int epoch = 0;                    // 1-based
    double learning_rate = 0;         // lr used during the epoch
    double train_loss = 0;            // mean loss of the epoch's steps
    double val_dice = 0;              // per-image mean foreground Dice, original size
    double val_iou = 0;               // per-image mean foreground IoU, original size
    double val_miou = 0;              // per-image mean two-class IoU, original size
    double epoch_seconds = 0;         // training loop plus validation
    double loader_wait_seconds = 0;   // time the training loop waited for batches
    double loader_wait_share = 0;     // loader_wait_seconds / seconds of the training loop
};

// What one training run (train, or one fold of cv) did.
struct TrainReport {
    std::string run_dir;
    std::vector<EpochRecord> epochs;  // every epoch of the run so far, resumed ones included
    int first_epoch = 1;              // first epoch trained by this call (epochs + 1: nothing left to do)
    int best_epoch = 0;               // epoch of best.safetensors (0: none yet)
    double best_val_dice = 0;
    size_t train_images = 0;          // images of the training side (before drop-last)
    size_t val_images = 0;            // validation images
    int threads = 0;                  // oneDNN/OpenMP threads used
    int loader_threads = 0;           // loader threads used
    double train_seconds = 0;         // this call's training loops (validation excluded)
    double loader_wait_seconds = 0;   // this call's waits for batches
    // Summed loader waits over summed training-loop seconds of this call (0 when nothing was trained).
    double loader_wait_share() const { return train_seconds > 0 ? loader_wait_seconds / train_seconds : 0.0; }
    const EpochRecord* last() const { return epochs.empty() ? nullptr : &epochs.back(); }
};

// Flags of `resunet cv`.
struct CvCommandOptions {
    TrainCommandOptions train;        // data, out (the cv folder), hyper-parameters, threads = the budget
    int folds = 5;                    // k of k-fold cross-validation over the training side of the split
    int parallel_folds = 1;           // folds trained side by side (K)
    int threads_per_fold = 0;         // oneDNN threads of each fold (T); 0 = max(1, budget / K)
};

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

// Flags of `resunet eval`.
struct EvalCommandOptions {
    std::string model_path;           // .safetensors: fp32 weights (best.safetensors) or an int8 file
    std::string data_dir;
    std::string split_path;           // default: make_split(dataset, seed) as `train` makes it
    uint64_t seed = 42;               // split seed when no --split is given
    Precision precision = Precision::int8;  // the same default as predict and bench_resunet's int8 row
    int batch = 16;                   // images per engine call (run one image per pass, micro-batch 1)
    int threads = 0;                  // engine and loader threads; 0 = all cores
    int limit = 0;                    // score only the first N test images; 0 = all
    int size = 0;                     // model size for files without "resunet.size"; 0 = 224
    int calibration_images = 16;      // static-int8 without stored scales: first N ids (sorted) of the train side
    bool skip_bad = false;
    std::string json_path;            // also write the report as JSON
    std::FILE* log = stderr;
    std::FILE* out = stdout;
};

struct EvalReport {
    EvalResult result;                // evaluate_split's result
    double pooled_mean_iou_model = 0;     // two-class mIoU of all pixels pooled, at model size
    double pooled_mean_iou_original = 0;  // ... at original size
    std::string engine;               // "fp32", "int8 (dynamic scales)", ...
    std::string split;                // where the test ids came from
    int size = 0;                     // model input size
    int threads = 0;
};

// Runs the whole command. Problems found before training starts (missing data, unwritable or mismatching run
// folder, a checkpoint of another model, bad flag values) throw UsageError; a failure while training (NaN/Inf,
// a corrupt image) is logged to train.log and thrown as resunet::Error, leaving the last good checkpoint as it was.
TrainReport run_train(const TrainCommandOptions& options);
// Cross-validation; all usage checks happen before any fold starts. A failing fold is reported (FoldReport::error)
// while the others continue.
CvReport run_cv(const CvCommandOptions& options);
// Scores the model on the test side of the split with evaluate_split. Throws UsageError for bad input.
EvalReport run_eval(const EvalCommandOptions& options);

// The commands for the CLI: print a UsageError as "resunet <command>: error: ..." and return 2, another failure
// as one line and 1, else 0.
int train_command(const TrainCommandOptions& options);
int cv_command(const CvCommandOptions& options);
int eval_command(const EvalCommandOptions& options);

// Register the subcommands; each has `--config FILE` (TOML/INI; flags on the command line win) and its callback
// throws CLI::RuntimeError(code) for a non-zero exit.
void add_train_command(CLI::App& app);
void add_cv_command(CLI::App& app);
void add_eval_command(CLI::App& app);

// The flags of each command bound to `options` (for tests and for rendering a configuration).
void add_train_flags(CLI::App& command, TrainCommandOptions& options);
void add_cv_flags(CLI::App& command, CvCommandOptions& options);
void add_eval_flags(CLI::App& command, EvalCommandOptions& options);
// Reads the file given to `command`'s --config (set_config) into the options not given on the command line, with
// CLI11's own config parser and validators. CLI11 2.1 reads config files of the top-level app only.
void apply_config_file(CLI::App& command);

// The effective configuration as CLI11 config text (what RUN/config.toml holds).
std::string train_config_text(const TrainCommandOptions& options);
std::string cv_config_text(const CvCommandOptions& options);

// Markdown tables of a cross-validation and of an evaluation.
std::string format_cv_markdown(const CvReport& report);
std::string format_eval_markdown(const EvalReport& report);

}  // namespace resunet
