// The flags of train, cv and eval: see command_flags.h.
#include "apps/lib/command_flags.h"

#include <algorithm>
#include <cmath>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "graph/model_config.h"

namespace resunet {
namespace {

// `actions`: also the flags that say what to do now rather than what the run is (--resume).
// `train_only`: also the flags `cv` has no use for (--val-folds).
void register_train_flags(CLI::App& app, TrainCommandOptions& o, bool actions, bool train_only = true) {
    bind_option(app, "--data", o.data_dir, "Dataset folder with images/ and masks/ (Kvasir-SEG layout) (required)");
    bind_option(app, "--out", o.out_dir, "Run folder: config, split, metrics, checkpoints, log, curves (required)");
    bind_option(app, "--width", o.width,
                "Channels of the first stage: 64 is the paper's network and the shipped model; 16 is 16x less work")->check(CLI::Range(1, 4096));
    bind_option(app, "--depth", o.depth, "Number of poolings")->check(CLI::Range(1, kMaxResUNetDepth));
    bind_option(app, "--size", o.size, "Model input size in pixels (square), divisible by 2^depth")->check(CLI::Range(1, 65536));
    bind_option(app, "--batch", o.batch, "Images per training step")->check(CLI::Range(1, 4096));
    bind_option(app, "--epochs", o.epochs, "Epochs of the whole run")->check(CLI::Range(1, 1000000));
    bind_option(app, "--lr", o.learning_rate, "Adam learning rate of epoch 1")->check(positive_number());
    bind_option(app, "--lr-step", o.lr_step, "StepLR: epochs between decays")->check(CLI::Range(1, 1000000));
    bind_option(app, "--lr-gamma", o.lr_gamma, "StepLR: factor per decay")->check(positive_number());
    bind_option(app, "--loss", o.loss, "Training loss")->check(CLI::IsMember({"dice+bce", "dice", "bce"}));
    bind_option(app, "--seed", o.seed, "Seed of split, folds, initial weights, shuffle and augmentation");
    bind_option(app, "--max-angle", o.max_angle, "Augmentation: largest rotation in degrees (p 0.5; flips p 0.5)")
        ->check(CLI::Range(0.0, 180.0));
    bind_option(app, "--threads", o.threads, "oneDNN/OpenMP threads (cv: the budget of all folds); 0 = all cores")
        ->check(CLI::Range(0, 4096));
    bind_option(app, "--loader-threads", o.loader_threads, "Data loader threads per run; 0 = max(1, min(4, threads / 2))")
        ->check(CLI::Range(0, 4096));
    bind_option(app, "--split", o.split_path, "Train/test split file (default: RUN/split.json, made with --seed if missing)");
    bind_option(app, "--conv-algorithm", o.conv_algorithm,
                "3x3 convolutions, forward and backward-data: measured (oneDNN's direct kernel or our own Winograd, "
                "timed per layer when the run starts and kept in RUN/conv_plan.txt, which a continued run reuses), direct, or winograd")
        ->check(CLI::IsMember({"measured", "direct", "winograd"}));
    if (train_only)
        bind_option(app, "--val-folds", o.val_folds,
                    "0: validate (and choose best.safetensors) on the split's test side, whose score is then optimistic; "
                    "K >= 2: validate on 1 of K seeded folds of the training side (near-duplicates kept together) and "
                    "train on the rest, so the test side stays unseen")
            ->check(CLI::Range(0, 1000));
    bind_option(app, "--limit", o.limit, "Use only the first N image/mask pairs (sorted by id); 0 = all")->check(CLI::Range(0, 100000000));
    bind_flag(app, "--skip-bad", o.skip_bad, "Skip unreadable image/mask pairs instead of refusing the dataset");
    bind_option(app, "--init", o.init_path,
                "Start from the weights of this fp32 model file (same width and depth, any input size; fine-tuning); "
                "Adam starts fresh; ignored once the run has a checkpoint");
    if (actions) {
        bind_flag(app, "--resume", o.resume, "Continue RUN from its last.safetensors (same configuration)");
    }
}

void register_cv_flags(CLI::App& app, CvCommandOptions& o, bool actions) {
    register_train_flags(app, o.train, actions, /*train_only=*/false);
    bind_option(app, "--folds", o.folds, "k of k-fold cross-validation over the training side of the split")->check(CLI::Range(2, 1000));
    bind_option(app, "--parallel-folds", o.parallel_folds, "Folds trained side by side (K)")->check(CLI::Range(1, 1000));
    bind_option(app, "--threads-per-fold", o.threads_per_fold, "oneDNN threads of each fold (T); 0 = max(1, threads / K)")
        ->check(CLI::Range(0, 4096));
}

void register_eval_flags(CLI::App& app, EvalCommandOptions& o) {
    bind_option(app, "--model", o.model_path, "Model .safetensors: fp32 weights (e.g. RUN/best.safetensors) or int8 (required)");
    bind_option(app, "--data", o.data_dir, "Dataset folder with images/ and masks/ (required)");
    bind_option(app, "--split", o.split_path, "Split file (e.g. RUN/split.json); default: the seeded 80/20 split `train` makes");
    bind_option(app, "--seed", o.seed, "Seed of the default split");
    app.add_option_function<std::string>(
           "--precision",
           [&o](const std::string& text) {
               o.precision = parse_precision(text);
               o.precision_given = true;
           },
           "int8 (scales computed per image, the default), fp32, or static-int8 (fixed scales: the model file's, "
           "else calibrated); a file from `resunet quantize` runs its stored scales: static-int8")
        ->check(precision_validator({"fp32", "int8", "static-int8"}))
        ->default_str(precision_name(o.precision));
    bind_option(app, "--batch", o.batch,
                "Images loaded and run together; scores do not depend on it")
        ->check(CLI::Range(1, 4096));
    bind_option(app, "--threads", o.threads, "Engine and loader threads; 0 = all cores")->check(CLI::Range(0, 4096));
    bind_option(app, "--limit", o.limit, "Score only the first N test images; 0 = all")->check(CLI::Range(0, 100000000));
    app.add_option("--size", o.size, "Model input size for files without 'resunet.size' metadata (default 224)")
        ->check(CLI::Range(1, 65536));
    bind_option(app, "--calibration-count", o.calibration_images,
         "static-int8 with a model that stores no scales: calibrate on the first N images (sorted ids) of the "
         "split's train side, as `resunet quantize --data --split` does")
        ->check(CLI::Range(1, 4096))
        ->each([&o](const std::string&) { o.calibration_given = true; });
    add_renamed_flag(app, "--calibration-images", "--calibration-count");
    bind_flag(app, "--skip-bad", o.skip_bad, "Skip unreadable image/mask pairs instead of refusing the dataset");
    bind_option(app, "--json", o.json_path, "Also write the report and one row per image to this JSON file");
    bind_flag(app, "--overwrite", o.overwrite, "Replace an existing --json (default: refuse to start)");
    bind_flag(app, "--progress", o.progress, "Show a progress bar (on by default when stderr is a terminal)");
    add_engine_tuning_flags(app, o.tuning);
}

}  // namespace

void add_engine_tuning_flags(CLI::App& command, EngineTuningFlags& flags) {
    command.add_option("--tune", flags.tune,
                       "How each layer's method is chosen: rule (default: fixed for this kind of CPU, the same masks on "
                       "any thread count or load), off (the simplest everywhere), fast or full (timed on this machine at "
                       "start; may differ between starts). Details: docs/plan.md")
        ->check(CLI::IsMember({"rule", "off", "fast", "full"}))
        ->capture_default_str();
    command.add_option("--plan-cache", flags.plan_cache,
                       "With --tune fast|full: folder of measured plans (default ~/.cache/resunet/plans); 'none' to "
                       "measure every time");
    command.add_option("--memory-budget", flags.memory_budget_mb,
                       "fp32: most memory in MB for the model's weights and working buffers (faster methods give way "
                       "until it fits); 0 = automatic, -1 = no limit")
        ->check(CLI::Range(-1.0, 1e9))
        ->check(CLI::Validator(
            [](std::string& text) {  // NaN passes a range check
                return text.find_first_not_of("0123456789.+-eE") == std::string::npos ? std::string() : std::string("must be a number");
            },
            "NUMBER"))
        ->capture_default_str();
    command.add_option("--int8-conv", flags.int8_conv,
                       "int8: how 3x3 layers run: auto (default: as the plan says), direct (exact integer arithmetic), "
                       "winograd (faster, approximate, everywhere it applies), mixed (fp32 where timed faster here)")
        ->check(CLI::IsMember({"auto", "direct", "winograd", "mixed"}));
    command.add_option("--plan", flags.plan_file,
                       "Run exactly this plan file (resunet plan --save-plan): the same numbers on any machine of its class");
}

void add_train_flags(CLI::App& command, TrainCommandOptions& options) {
    command.set_config("--config", "", "Read flags from a TOML/INI file (e.g. RUN/config.toml); command-line flags win");
    register_train_flags(command, options, /*actions=*/true);
}

void add_cv_flags(CLI::App& command, CvCommandOptions& options) {
    command.set_config("--config", "", "Read flags from a TOML/INI file (e.g. RUN/config.toml); command-line flags win");
    register_cv_flags(command, options, /*actions=*/true);
}

void add_eval_flags(CLI::App& command, EvalCommandOptions& options) {
    command.set_config("--config", "", "Read flags from a TOML/INI file; command-line flags win");
    register_eval_flags(command, options);
}

std::string train_config_text(const TrainCommandOptions& options) {
    TrainCommandOptions copy = options;
    return render_config([&copy](CLI::App& app) { register_train_flags(app, copy, false); },
                         "resunet train: effective configuration (rerun with --config FILE)");
}

std::string cv_config_text(const CvCommandOptions& options) {
    CvCommandOptions copy = options;
    return render_config([&copy](CLI::App& app) { register_cv_flags(app, copy, false); },
                         "resunet cv: effective configuration (rerun with --config FILE)");
}

void check_train_values(const TrainCommandOptions& o) {
    if (o.width < 1 || o.depth < 1 || o.size < 1 || o.batch < 1 || o.epochs < 1 || o.lr_step < 1)
        throw UsageError("--width, --depth, --size, --batch, --epochs and --lr-step must be positive");
    if (o.size % (1 << std::min(o.depth, 30)) != 0)
        throw UsageError(fmt::format("--size {} is not divisible by 2^depth = {}", o.size, 1 << std::min(o.depth, 30)));
    if (!(o.learning_rate > 0) || !std::isfinite(o.learning_rate)) throw UsageError("--lr must be positive");
    if (!(o.lr_gamma > 0) || !std::isfinite(o.lr_gamma)) throw UsageError("--lr-gamma must be positive");
    if (!(o.max_angle >= 0 && o.max_angle <= 180)) throw UsageError("--max-angle must be in [0, 180]");
    if (o.threads < 0 || o.loader_threads < 0 || o.limit < 0) throw UsageError("--threads, --loader-threads and --limit must be >= 0");
    if (o.conv_algorithm != "measured" && o.conv_algorithm != "direct" && o.conv_algorithm != "winograd")
        throw UsageError(fmt::format("--conv-algorithm must be measured, direct or winograd, got '{}'", o.conv_algorithm));
    if (o.val_folds == 1 || o.val_folds < 0) throw UsageError(fmt::format("--val-folds must be 0 or at least 2, got {}", o.val_folds));
    if (o.loss != "dice+bce" && o.loss != "dice" && o.loss != "bce")
        throw UsageError(fmt::format("--loss must be dice+bce, dice or bce, got '{}'", o.loss));
}

}  // namespace resunet
