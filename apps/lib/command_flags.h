// The flags of `resunet train`, `resunet cv` and `resunet eval`: their option structs, the CLI11 flags bound to
// them, and the effective configuration as CLI11 config text (what a run folder's config.toml holds). Only
// flag handling lives here, so what parses --config files (the commands, fuzz/fuzz_config.cpp) needs no engine.
//
// Intended usage:
//   resunet::TrainCommandOptions options;                  // the defaults of the CLI flags
//   CLI::App app;
//   CLI::App* command = app.add_subcommand("train");
//   resunet::add_train_flags(*command, options);           // --data, --out, --width, ... and --config FILE
//   app.parse(argc, argv);
//   resunet::apply_config_file(*command);                  // the file's values for flags not on the command line
//   std::string toml = resunet::train_config_text(options);  // reads back to the same options
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

#include "apps/lib/flag_basics.h"

namespace CLI {
class App;
}

namespace resunet {

// Flags of `resunet train` (and the training part of `resunet cv`).
struct TrainCommandOptions {
    std::string data_dir;             // Kvasir-SEG layout: images/ and masks/
    std::string out_dir;              // the run folder, created if missing
    int width = 64;                   // channels of the first stage: 64 everywhere (the paper's network, the shipped model)
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
    std::string conv_algorithm = "measured";  // 3x3 forward/backward-data: measured, direct or winograd (TrainConvAlgorithm)
    int val_folds = 0;                // train only: 0 = validate on the split's test side (best.safetensors is then
                                      // chosen on it); K >= 2 = validate on fold 1 of K seeded folds of the
                                      // training side (groups kept), train on the other K - 1
    int limit = 0;                    // keep the first N pairs of the dataset (by id); 0 = all
    bool skip_bad = false;            // skip unreadable pairs instead of refusing the dataset
    bool resume = false;              // continue RUN from its last.safetensors
    std::string init_path;            // start from this model file's weights (fine-tuning; same width and depth, any
                                      // size); Adam starts fresh; a resumed run continues its checkpoint instead
    bool progress = false;            // progress bar on `log` (the CLI turns it on when stderr is a terminal)
    std::FILE* log = stderr;          // setup lines, one line per epoch, progress; nullptr = silent
    std::FILE* out = stdout;          // the final summary; nullptr = silent
};

// Flags of `resunet cv`.
struct CvCommandOptions {
    TrainCommandOptions train;        // data, out (the cv folder), hyper-parameters, threads = the budget
    int folds = 5;                    // k of k-fold cross-validation over the training side of the split
    int parallel_folds = 1;           // folds trained side by side (K)
    int threads_per_fold = 0;         // oneDNN threads of each fold (T); 0 = max(1, budget / K)
};

// How the engines plan their convolutions (plan, predict, eval, bench_resunet; apps/lib/engine_setup.h turns
// these into EngineOptions and QuantOptions).
struct EngineTuningFlags {
    std::string tune = "rule";         // rule (fixed per CPU class), off (direct), fast (measured), full (more runs)
    std::string plan_cache;            // folder of measured plans; "" = the default folder; "none" = measure every time
    double memory_budget_mb = 0;       // engine bytes in MB; 0 = 2.5x the all-direct plan; -1 = no limit
    // int8 layers' 3x3 convolutions: auto, direct, winograd, mixed (Int8ConvAlgorithm); "" = not given:
    // auto for the int8 engine (int8_conv_or_default()), and no error with --precision fp32.
    std::string int8_conv;
    std::string int8_conv_or_default() const { return int8_conv.empty() ? "auto" : int8_conv; }
    std::string plan_file;             // --plan: run exactly this plan (resunet plan --save-plan)
};

// Flags of `resunet eval`.
struct EvalCommandOptions {
    std::string model_path;           // .safetensors: fp32 weights (best.safetensors) or an int8 file
    std::string data_dir;
    std::string split_path;           // default: make_split(dataset, seed) as `train` makes it
    uint64_t seed = 42;               // split seed when no --split is given
    Precision precision = Precision::int8;  // the same default as predict and bench_resunet's int8 row
    bool precision_given = false;     // --precision was on the command line (int8 on a file with stored scales: refused)
    int batch = 16;                   // images per engine call (run one image per pass, micro-batch 1)
    int threads = 0;                  // engine and loader threads; 0 = all cores
    int limit = 0;                    // score only the first N test images; 0 = all
    int size = 0;                     // model size for files without "resunet.size"; 0 = 224
    int calibration_images = 16;      // --calibration-count: static-int8 without stored scales: first N ids (sorted) of the train side
    bool calibration_given = false;   // --calibration-count was given (refused where nothing is calibrated)
    bool skip_bad = false;
    std::string json_path;            // also write the report as JSON, with one row per image
    bool overwrite = false;           // replace an existing json_path
    bool progress = false;            // progress bar on `log` (the CLI also turns it on when stderr is a terminal)
    EngineTuningFlags tuning;         // --precision fp32 only
    std::FILE* log = stderr;
    std::FILE* out = stdout;
};

// The flags of each command bound to `options`, with `--config FILE` (TOML/INI; flags on the command line win).
void add_train_flags(CLI::App& command, TrainCommandOptions& options);
void add_cv_flags(CLI::App& command, CvCommandOptions& options);
void add_eval_flags(CLI::App& command, EvalCommandOptions& options);
// --tune, --plan-cache, --memory-budget, --int8-conv and --plan bound to `flags`.
void add_engine_tuning_flags(CLI::App& command, EngineTuningFlags& flags);

// The effective configuration as CLI11 config text (what RUN/config.toml holds).
std::string train_config_text(const TrainCommandOptions& options);
std::string cv_config_text(const CvCommandOptions& options);

// UsageError for training values no flag validator catches (a size not divisible by 2^depth, a non-finite lr, ...).
void check_train_values(const TrainCommandOptions& options);

}  // namespace resunet
