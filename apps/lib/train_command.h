// `resunet train`: fp32 training on oneDNN with a run folder that can be resumed bit for bit; also the one training
// run (TrainJob, run_job) that each fold of `resunet cv` is.
//
// Intended usage:
//   resunet::TrainCommandOptions options;                 // the defaults of the CLI flags (command_flags.h)
//   options.data_dir = "/data/kvasir-seg";
//   options.out_dir = "runs/w16";
//   options.epochs = 20;
//   resunet::TrainReport report = resunet::run_train(options);  // UsageError before any work, Error mid-run
//   options.resume = true;                                 // later: continue from runs/w16/last.safetensors
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
// Under mpirun (`mpirun -np N resunet train ...`) training is data-parallel (dist/data_parallel.h, docs/mpi.md):
// each rank trains on its contiguous share of every global batch of --batch images, gradients are summed with
// MPI_Allreduce and every rank applies the same Adam step; batch norm uses each rank's own images (per-rank
// statistics, as PyTorch DDP) and running statistics are averaged over ranks after each step, so the weights
// are identical everywhere. Rank 0 alone writes the run folder (atomically, as alone), validates, logs and shows
// progress; each rank runs --threads OpenMP threads, 0 = the node's cores / ranks on the node. Every rank loads
// the same checkpoint on --resume. A failure on any rank ends the job (MPI_Abort) with one line on stderr; the
// last checkpoint stays intact. `cv` runs each fold whole on one rank (folds spread over ranks), never this way.
//
// Determinism: initial weights come from the seed, the loader's shuffle and augmentation from (seed, epoch), the
// checkpoint restores the optimiser exactly, so a resumed run equals an uninterrupted one, and a fold's numbers
// depend only on its seed (seed + fold index) and its thread count, never on how many folds run side by side.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "apps/lib/cli_common.h"
#include "apps/lib/command_flags.h"
#include "train/checkpoint.h"

namespace CLI {
class App;
}

namespace resunet {

class StopOnSignal;  // apps/lib/interrupt.h

inline constexpr const char* kLastName = "last.safetensors";
inline constexpr const char* kBestName = "best.safetensors";
// Which algorithm each 3x3 convolution pass runs ("layer pass algorithm" per line): measured when the run
// starts, reused by --resume so that a resumed run computes what an uninterrupted one does.
inline constexpr const char* kConvPlanName = "conv_plan.txt";

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
    int stopped_by = 0;  // the signal that stopped the run at the end of an epoch (TrainJob::stop); 0: ran to --epochs
};

// Runs the whole command. Problems found before training starts (missing data, unwritable or mismatching run
// folder, a checkpoint of another model, bad flag values) throw UsageError; a failure while training (NaN/Inf,
// a corrupt image) is logged to train.log and thrown as resunet::Error, leaving the last good checkpoint as it was.
TrainReport run_train(const TrainCommandOptions& options);

// run_train for the CLI: prints a UsageError as "resunet train: error: ..." and returns 2, another failure as one
// line and 1, else 0.
int train_command(const TrainCommandOptions& options);

// Registers the `train` subcommand; its callback throws CLI::RuntimeError(code) for a non-zero exit.
void add_train_command(CLI::App& app);

// ---- one training run: `train` runs one, `cv` one per fold ----

// Everything one run needs, checked before it starts.
struct TrainJob {
    const TrainCommandOptions* options = nullptr;
    const Dataset* dataset = nullptr;
    std::vector<size_t> train_indices;
    std::vector<size_t> val_indices;
    std::filesystem::path run_dir;
    uint64_t seed = 0;
    int threads = 1;
    int loader_threads = 1;
    std::string validation_name;          // for the log: which ids validate
    std::string label;                    // prefix of console lines ("fold 2: "), empty for `train`
    Console* console = nullptr;
    std::optional<Checkpoint> checkpoint;  // resume from it (already checked against the flags)
    const TensorMap* init = nullptr;       // else start from these weights (--init), when not empty
    std::map<std::string, std::string> checkpoint_metadata;  // stored with every last.safetensors
    // Data-parallel over every rank of the mpirun job (train only): this rank trains on its share of each
    // batch; rank 0 alone writes, validates and prints. A failure ends the job with Comm::abort.
    bool data_parallel = false;
    // `train` alone: on SIGINT or SIGTERM, finish the epoch, write its checkpoint and stop (TrainReport::stopped_by).
    const StopOnSignal* stop = nullptr;
};

// Trains job.run_dir from its checkpoint (or the start) to options->epochs, writing the run folder's files after
// every epoch. A failure mid-run is logged and thrown as resunet::Error naming the epoch and batch.
TrainReport run_job(TrainJob& job);

// Reads a checkpoint for --resume and refuses (UsageError) one of another model than the flags describe.
Checkpoint check_checkpoint(const std::filesystem::path& path, const TrainCommandOptions& options);
// The weights of --init, checked against the graph the flags describe (names, shapes, fp32); empty without --init.
TensorMap load_init_weights(const TrainCommandOptions& options);
// Metadata stored with every last.safetensors: width, depth, size.
std::map<std::string, std::string> config_metadata(const TrainCommandOptions& options);
// UsageError when `images` cannot fill one batch.
void require_batch_fits(size_t images, int batch, const std::string& what);

}  // namespace resunet
