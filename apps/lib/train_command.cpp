// `resunet train` and the one training run of each cv fold: see train_command.h.
#include "apps/lib/train_command.h"

#include <omp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "apps/lib/curves.h"
#include "apps/lib/evaluate.h"
#include "apps/lib/interrupt.h"
#include "data/loader.h"
#include "data/split.h"
#include "dist/comm.h"
#include "dist/data_parallel.h"
#include "engine/engine.h"
#include "graph/atomic_file.h"
#include "graph/init.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

constexpr const char* kMetricsName = "metrics.csv";
constexpr const char* kCurvesName = "curves.png";
constexpr const char* kMetricsHeader =
    "epoch,lr,train_loss,val_dice,val_iou,val_miou,epoch_seconds,loader_wait_seconds,loader_wait_share";

LossKind parse_loss(const std::string& text) {
    if (text == "dice+bce") return LossKind::dice_bce;
    if (text == "dice") return LossKind::dice;
    if (text == "bce") return LossKind::bce;
    throw UsageError(fmt::format("--loss must be dice+bce, dice or bce, got '{}'", text));
}

void write_metrics_csv(const fs::path& path, const std::vector<EpochRecord>& rows) {
    std::string text = std::string(kMetricsHeader) + "\n";
    for (const EpochRecord& r : rows)
        text += fmt::format("{},{},{:.8f},{:.8f},{:.8f},{:.8f},{:.3f},{:.3f},{:.4f}\n", r.epoch, r.learning_rate, r.train_loss,
                            r.val_dice, r.val_iou, r.val_miou, r.epoch_seconds, r.loader_wait_seconds, r.loader_wait_share);
    write_file_atomic(path.string(), text);
}

// Rows of a metrics.csv; throws resunet::Error naming the file and line on anything unexpected.
std::vector<EpochRecord> read_metrics_csv(const fs::path& path) {
    std::ifstream in(path);
    if (!in) throw Error(fmt::format("{}: cannot open", path.string()));
    std::string line;
    if (!std::getline(in, line) || line != kMetricsHeader) throw Error(fmt::format("{}: unexpected header", path.string()));
    std::vector<EpochRecord> rows;
    for (int number = 2; std::getline(in, line); ++number) {
        if (line.empty()) continue;
        std::vector<double> values;
        std::stringstream fields(line);
        std::string field;
        try {
            while (std::getline(fields, field, ',')) values.push_back(std::stod(field));
        } catch (const std::exception&) {
            values.clear();
        }
        if (values.size() != 9) throw Error(fmt::format("{}:{}: expected 9 numbers", path.string(), number));
        rows.push_back({static_cast<int>(values[0]), values[1], values[2], values[3], values[4], values[5], values[6], values[7],
                        values[8]});
    }
    return rows;
}

double metadata_number(const std::map<std::string, std::string>& metadata, const std::string& key, double fallback) {
    auto it = metadata.find(key);
    if (it == metadata.end()) return fallback;
    try {
        return std::stod(it->second);
    } catch (const std::exception&) {
        return fallback;
    }
}

// Test hook (tests/test_dist.cpp, MpiJob.TrainCommand*): RESUNET_TEST_KILL_RANK_AT_STEP="R:S" makes rank R kill
// itself with SIGKILL just before global step S, as a crashed or OOM-killed node would.
void maybe_kill_for_test(int rank, int64_t next_step) {
    static const char* hook = std::getenv("RESUNET_TEST_KILL_RANK_AT_STEP");
    if (!hook) return;
    int kill_rank = -1;
    long long kill_step = -1;
    if (std::sscanf(hook, "%d:%lld", &kill_rank, &kill_step) == 2 && kill_rank == rank && kill_step == next_step)
        ::kill(::getpid(), SIGKILL);
}

void write_run_curves(const fs::path& path, const std::vector<EpochRecord>& rows, const std::string& title) {
    std::vector<CurvePoint> points;
    points.reserve(rows.size());
    for (const EpochRecord& r : rows) points.push_back({r.epoch, r.train_loss, r.val_dice});
    write_curves(path, points, title);
}

}  // namespace

Checkpoint check_checkpoint(const fs::path& path, const TrainCommandOptions& o) {
    Checkpoint checkpoint;
    try {
        checkpoint = load_checkpoint(path.string());
    } catch (const Error& e) {
        throw UsageError(fmt::format("cannot resume: {}", one_line(e.what())));
    }
    ResUNetConfig stored;
    try {
        stored = infer_resunet_config(checkpoint.state.weights, {}, o.size);
    } catch (const Error& e) {
        throw UsageError(fmt::format("cannot resume from {}: {}", path.string(), one_line(e.what())));
    }
    if (stored.width != o.width || stored.depth != o.depth)
        throw UsageError(fmt::format("{} is a checkpoint of a width-{} depth-{} model, but --width {} --depth {} was asked",
                                     path.string(), stored.width, stored.depth, o.width, o.depth));
    const Dims expected = {3, o.size, o.size};
    if (!checkpoint.input_shape.empty() && checkpoint.input_shape != expected)
        throw UsageError(fmt::format("{} was trained on {} images, but --size {} was asked", path.string(),
                                     dims_to_string(checkpoint.input_shape), o.size));
    if (checkpoint.state.epoch > o.epochs)
        throw UsageError(fmt::format("{} has already trained {} epochs, more than --epochs {}", path.string(),
                                     checkpoint.state.epoch, o.epochs));
    return checkpoint;
}

TensorMap load_init_weights(const TrainCommandOptions& o) {
    if (o.init_path.empty()) return {};
    SafetensorsFile file;
    try {
        file = load_safetensors(o.init_path);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--init: {}", one_line(e.what())));
    }
    ResUNetConfig config;
    config.width = o.width;
    config.depth = o.depth;
    config.height = config.width_px = o.size;
    std::vector<std::pair<std::string, Dims>> expected;
    TensorMap weights;
    for (const ParamInfo& p : build_resunet(config).parameters()) {
        expected.emplace_back(p.name, p.dims);
        auto it = file.tensors.find(p.name);
        if (it != file.tensors.end() && it->second.dtype != DType::f32)
            throw UsageError(fmt::format("--init {}: tensor {} is not fp32 (an int8 file cannot seed training)", o.init_path, p.name));
        if (it != file.tensors.end()) weights.emplace(p.name, it->second);
    }
    try {
        check_tensors(weights, expected, o.init_path);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--init: {} (--width {} --depth {})", one_line(e.what()), o.width, o.depth));
    }
    return weights;
}

// `source` names the text in messages (the file, or "rank 0's plan").
std::map<std::string, std::string> parse_conv_plan(const std::string& text, const std::string& source) {
    std::istringstream in(text);
    std::map<std::string, std::string> plan;
    std::string line;
    for (int number = 1; std::getline(in, line); ++number) {
        if (line.empty() || line[0] == '#') continue;
        std::istringstream fields(line);
        std::string layer, pass, algorithm, extra;
        if (!(fields >> layer >> pass >> algorithm) || (fields >> extra))
            throw UsageError(fmt::format("{}:{}: expected 'layer pass algorithm', got '{}'", source, number, line));
        plan[layer + "/" + pass] = algorithm;
    }
    return plan;
}

std::map<std::string, std::string> read_conv_plan(const fs::path& path) {
    std::ifstream in(path);
    if (!in) throw UsageError(fmt::format("{}: cannot read", path.string()));
    std::ostringstream text;
    text << in.rdbuf();
    return parse_conv_plan(text.str(), path.string());
}

std::string conv_plan_text(const std::vector<TrainConvChoice>& choices) {
    std::string text = "# resunet train: algorithm of each 3x3 convolution pass (layer pass algorithm; candidates and times)\n";
    for (const TrainConvChoice& c : choices) text += fmt::format("{} {} {}\n# {}\n", c.layer, c.pass, c.algorithm, c.summary);
    return text;
}

TrainReport run_job(TrainJob& job) {
    const TrainCommandOptions& o = *job.options;
    omp_set_num_threads(job.threads);
    dist::Comm* comm = job.data_parallel ? &dist::Comm::world() : nullptr;
    const int rank = comm ? comm->rank() : 0;
    const bool writer = rank == 0;  // the one rank that writes the run folder, validates and prints
    const fs::path log_path = job.run_dir / kLogName;
    auto note = [&](const std::string& text) {
        if (!writer) return;
        append_log(log_path, text);
        if (job.console) job.console->line(job.label + text);
    };

    // A run killed mid-write (kill -9) leaves a temp file beside the checkpoint it was replacing.
    if (writer)
        if (const int stale = remove_stale_temp_files(job.run_dir.string()); stale > 0)
            note(fmt::format("removed {} temp file{} of an interrupted write", stale, stale == 1 ? "" : "s"));

    ResUNetConfig config;
    config.width = o.width;
    config.depth = o.depth;
    config.height = config.width_px = o.size;
    config.batch = o.batch;
    const Graph graph = build_resunet(config);
    TrainOptions train_options;
    train_options.learning_rate = o.learning_rate;
    train_options.lr_step_size = o.lr_step;
    train_options.lr_gamma = o.lr_gamma;
    train_options.loss = parse_loss(o.loss);
    train_options.threads = job.threads;
    train_options.conv_algorithm = o.conv_algorithm == "direct"     ? TrainConvAlgorithm::direct
                                   : o.conv_algorithm == "winograd" ? TrainConvAlgorithm::winograd
                                                                    : TrainConvAlgorithm::measured;
    const fs::path plan_path = job.run_dir / kConvPlanName;
    const bool have_plan = file_exists(plan_path);
    if (have_plan) {
        train_options.conv_plan = read_conv_plan(plan_path);
        // A pass the plan does not name ran direct when the plan was written (older plans name no
        // backward_weights): it runs direct again, so the resumed run computes what the first one did.
        train_options.conv_algorithm = TrainConvAlgorithm::direct;
    }
    // Under mpirun without a plan, rank 0 measures and every other rank runs rank 0's choices (ranks
    // measuring apart could choose apart): they wait for its plan, or for an empty text if it failed.
    const bool plan_from_rank0 = !have_plan && comm && comm->size() > 1;
    if (plan_from_rank0 && rank != 0) {
        std::string text;
        comm->broadcast(text);
        if (text.empty()) throw Error("rank 0 could not build its trainer");
        train_options.conv_plan = parse_conv_plan(text, "rank 0's conv plan");
        train_options.conv_algorithm = TrainConvAlgorithm::direct;
    }
    // Alone (comm null, or cv's folds) this is Trainer::step bit for bit; under mpirun, this rank's share of each batch.
    std::optional<dist::DataParallelTrainer> built;
    try {
        built.emplace(graph, init_weights(graph, job.seed), train_options, dist::DataParallelOptions{}, comm);
    } catch (const Error& e) {
        if (plan_from_rank0 && rank == 0) {
            std::string none;
            comm->broadcast(none);
        }
        if (!have_plan) throw;
        throw UsageError(fmt::format("{} (delete {} to measure the algorithms again)", one_line(e.what()), plan_path.string()));
    }
    dist::DataParallelTrainer& parallel = *built;
    Trainer& trainer = parallel.trainer();
    if (plan_from_rank0 && rank == 0) {
        std::string text = conv_plan_text(trainer.conv_choices());
        comm->broadcast(text);
    }
    if (writer && !have_plan) write_file_atomic(plan_path.string(), conv_plan_text(trainer.conv_choices()));
    {
        size_t own = 0;
        for (const TrainConvChoice& c : trainer.conv_choices()) own += c.algorithm != "direct";
        note(fmt::format("3x3 convolutions: {} of {} passes (forward, backward-data, backward-weights) run our own Winograd, the rest oneDNN's "
                         "direct kernel ({} {}); trainer built in {:.1f} s",
                         own, trainer.conv_choices().size(), kConvPlanName,
                         have_plan ? "reused" : plan_from_rank0 ? "measured on rank 0, run by every rank, and written" : "measured and written",
                         trainer.compile_ms() / 1000.0));
    }
    const auto [share_begin, share_end] = parallel.local_images();
    const size_t image_floats = static_cast<size_t>(3) * static_cast<size_t>(o.size) * static_cast<size_t>(o.size);
    const size_t mask_floats = static_cast<size_t>(o.size) * static_cast<size_t>(o.size);

    TrainReport report;
    report.run_dir = job.run_dir.string();
    report.train_images = job.train_indices.size();
    report.val_images = job.val_indices.size();
    report.threads = job.threads;
    report.loader_threads = job.loader_threads;
    double best = -std::numeric_limits<double>::infinity();
    if (job.checkpoint) {
        try {
            apply_checkpoint(*job.checkpoint, trainer, (job.run_dir / kLastName).string());
        } catch (const Error& e) {
            throw UsageError(fmt::format("cannot resume: {}", one_line(e.what())));
        }
        report.best_epoch = static_cast<int>(metadata_number(job.checkpoint->metadata, "best_epoch", 0));
        best = metadata_number(job.checkpoint->metadata, "best_val_dice", best);
        job.checkpoint.reset();
        const fs::path csv = job.run_dir / kMetricsName;
        try {
            for (const EpochRecord& r : read_metrics_csv(csv))
                if (r.epoch <= trainer.epoch()) report.epochs.push_back(r);
        } catch (const Error& e) {
            note(fmt::format("warning: {}; earlier epochs are left out of metrics.csv", one_line(e.what())));
        }
        note(fmt::format("resumed from {} at the end of epoch {} (step {}, next lr {:.4g})", kLastName, trainer.epoch(),
                         trainer.step_count(), trainer.learning_rate()));
    } else if (job.init && !job.init->empty()) {
        trainer.set_weights(*job.init);
        note(fmt::format("initial weights from {} (--init)", o.init_path));
    }
    if (report.best_epoch > 0) report.best_val_dice = best;
    const int start_epoch = static_cast<int>(trainer.epoch());
    report.first_epoch = start_epoch + 1;

    LoaderOptions loader_options;
    loader_options.batch_size = static_cast<size_t>(o.batch);
    loader_options.drop_last = true;  // the trainer is compiled for exactly `batch` images
    loader_options.shuffle = true;
    AugmentOptions augment;
    augment.max_angle_degrees = o.max_angle;
    loader_options.augment = augment;
    loader_options.seed = job.seed;
    loader_options.num_threads = job.loader_threads;
    loader_options.preprocess.width = loader_options.preprocess.height = o.size;
    loader_options.preprocess.keep_original_mask = false;
    BatchLoader loader(*job.dataset, job.train_indices, loader_options);
    const size_t batches = loader.num_batches();

    ResUNetConfig eval_config = config;
    eval_config.batch = 1;
    const Graph eval_graph = build_resunet(eval_config);
    PreprocessOptions eval_preprocess;
    eval_preprocess.width = eval_preprocess.height = o.size;

    if (start_epoch >= o.epochs) {
        note(fmt::format("nothing to train: all {} epochs are done", o.epochs));
        return report;
    }
    note(fmt::format("training: {} images, {} batches of {} per epoch ({} images left out of each shuffled epoch), epochs {}..{}, "
                     "width {}, depth {}, size {}, loss {}, lr {} (x{} every {} epochs), seed {}, threads {}, loader threads {}",
                     job.train_indices.size(), batches, o.batch, job.train_indices.size() - batches * static_cast<size_t>(o.batch),
                     start_epoch + 1, o.epochs, o.width, o.depth, o.size, o.loss, o.learning_rate, o.lr_gamma, o.lr_step, job.seed,
                     job.threads, job.loader_threads));
    if (comm)
        note(fmt::format("data-parallel: {} ranks x {} threads, {} batch-norm groups of {}..{} images per batch (per-rank statistics); "
                         "rank 0 validates and writes",
                         comm->size(), job.threads, parallel.num_groups(), o.batch / comm->size(),
                         (o.batch + comm->size() - 1) / comm->size()));
    note(fmt::format("validation after each epoch: {} ({} images); val_* = per-image means at original size", job.validation_name,
                     job.val_indices.size()));

    const auto run_start = Clock::now();
    size_t batches_done = 0;
    const size_t batches_total = batches * static_cast<size_t>(o.epochs - start_epoch);
    double last_bar = -1.0;
    bool stop_noted = false;
    for (int epoch = start_epoch; epoch < o.epochs; ++epoch) {
        if (job.stop && job.stop->requested()) {  // it came while the trainer was being built
            report.stopped_by = job.stop->requested();
            note(fmt::format("stopped on {} before epoch {}/{}: {}", signal_name(report.stopped_by), epoch + 1, o.epochs,
                             epoch > 0 ? fmt::format("{} keeps epoch {}; --resume continues", (job.run_dir / kLastName).string(), epoch)
                                       : std::string("nothing was trained")));
            return report;
        }
        const auto epoch_start = Clock::now();
        const double learning_rate = trainer.learning_rate();
        double loss_sum = 0;
        size_t steps = 0;
        EpochRecord row;
        try {
            loader.start_epoch(static_cast<uint64_t>(epoch));
            Batch batch;
            while (loader.next(batch)) {
                maybe_kill_for_test(rank, trainer.step_count() + 1);
                if (job.stop) {
                    maybe_interrupt_for_test(trainer.step_count() + 1);
                    if (job.stop->requested() && !stop_noted) {
                        stop_noted = true;
                        note(fmt::format("{} received: finishing epoch {}/{} (batch {} of {}) and its checkpoint, then stopping; "
                                         "a second signal stops at once, {}",
                                         signal_name(job.stop->requested()), epoch + 1, o.epochs, steps + 1, batches,
                                         epoch > 0 ? fmt::format("and last.safetensors keeps epoch {}", epoch)
                                                   : std::string("with nothing saved yet")));
                    }
                }
                loss_sum += parallel.step(batch.images.f32() + share_begin * image_floats, batch.masks.f32() + share_begin * mask_floats);
                ++steps;
                ++batches_done;
                if (job.console && job.console->progress()) {
                    const double elapsed = seconds_since(run_start);
                    if (elapsed - last_bar >= 0.2 || steps == batches) {
                        last_bar = elapsed;
                        const double epoch_elapsed = seconds_since(epoch_start);
                        const double rate = epoch_elapsed > 0 ? static_cast<double>(steps * o.batch) / epoch_elapsed : 0.0;
                        const double eta = elapsed / static_cast<double>(batches_done) * static_cast<double>(batches_total - batches_done);
                        job.console->bar(fmt::format("{}epoch {}/{}  batch {}/{}  loss {:.4f}  {:.1f} images/s  ETA {}", job.label,
                                                     epoch + 1, o.epochs, steps, batches, loss_sum / static_cast<double>(steps), rate,
                                                     format_duration(eta)));
                    }
                }
            }
            const double loop_seconds = seconds_since(epoch_start);
            const double wait_seconds = loader.wait_seconds();
            trainer.end_epoch();
            if (!writer) continue;  // the weights are the same on every rank: rank 0 validates and writes alone

            EvalResult val;
            {
                EngineOptions engine_options;
                engine_options.threads = job.threads;
                // The default plan (a rule, nothing timed): the plan `resunet eval` runs, so eval reproduces this score.
                engine_options.tune = Tuning::rule;
                Engine engine(eval_graph, trainer.weights(), engine_options);
                val = evaluate_split(
                    *job.dataset, job.val_indices, eval_preprocess,
                    [&engine](const float* images, int count, float* logits) { engine.run(images, count, logits); }, o.batch,
                    job.loader_threads);
            }
            row.epoch = epoch + 1;
            row.learning_rate = learning_rate;
            row.train_loss = steps > 0 ? loss_sum / static_cast<double>(steps) : 0.0;
            row.val_dice = val.original.dice.mean;
            row.val_iou = val.original.iou.mean;
            row.val_miou = val.original.mean_iou.mean;
            row.epoch_seconds = seconds_since(epoch_start);
            row.loader_wait_seconds = wait_seconds;
            row.loader_wait_share = loop_seconds > 0 ? wait_seconds / loop_seconds : 0.0;
            report.train_seconds += loop_seconds;
            report.loader_wait_seconds += wait_seconds;
            report.epochs.push_back(row);

            // metrics and best first, last.safetensors last: a crash in between redoes this epoch on --resume.
            write_metrics_csv(job.run_dir / kMetricsName, report.epochs);
            const bool improved = row.val_dice > best;
            if (improved) {
                best = row.val_dice;
                report.best_epoch = row.epoch;
                report.best_val_dice = best;
                std::map<std::string, std::string> metadata = resunet_metadata(config);
                metadata["resunet.epoch"] = std::to_string(row.epoch);
                metadata["resunet.val_dice"] = fmt::format("{}", row.val_dice);
                save_safetensors((job.run_dir / kBestName).string(), trainer.weights(), metadata);
            }
            write_run_curves(job.run_dir / kCurvesName, report.epochs,
                         fmt::format("{} - width {}, depth {}, size {}, batch {}, lr {}", job.run_dir.filename().string(), o.width,
                                     o.depth, o.size, o.batch, o.learning_rate));
            CheckpointExtras extras;
            extras.rng_state = job.seed;  // the loader draws from (seed, epoch): the seed is all the data pipeline needs
            extras.metadata = job.checkpoint_metadata;
            extras.metadata["best_val_dice"] = fmt::format("{}", best);
            extras.metadata["best_epoch"] = std::to_string(report.best_epoch);
            save_checkpoint((job.run_dir / kLastName).string(), trainer, extras);
            note(fmt::format("epoch {}/{}: lr {:.4g}, train loss {:.4f}, val Dice {:.4f}, IoU {:.4f}, mIoU {:.4f}{}, {:.1f} s, loader wait "
                             "{:.2f} s ({:.1f}%)",
                             row.epoch, o.epochs, row.learning_rate, row.train_loss, row.val_dice, row.val_iou, row.val_miou,
                             improved ? " (best so far)" : "", row.epoch_seconds, row.loader_wait_seconds,
                             100.0 * row.loader_wait_share));
            if (job.stop && job.stop->requested() && row.epoch < o.epochs) {
                report.stopped_by = job.stop->requested();
                note(fmt::format("stopped on {} after epoch {}/{}: {} keeps it; --resume continues with epoch {}",
                                 signal_name(report.stopped_by), row.epoch, o.epochs, (job.run_dir / kLastName).string(),
                                 row.epoch + 1));
                return report;
            }
        } catch (const UsageError&) {
            throw;
        } catch (const std::exception& e) {
            const std::string where = steps < batches ? fmt::format("epoch {}, batch {}/{}", epoch + 1, steps + 1, batches)
                                                      : fmt::format("epoch {} (after training, saving or validating)", epoch + 1);
            const std::string kept = epoch > 0 ? fmt::format("{} keeps epoch {}", (job.run_dir / kLastName).string(), epoch)
                                               : std::string("no checkpoint was written yet");
            const std::string message = fmt::format("{}: {}; {}", where, one_line(e.what()), kept);
            note("stopped: " + message);
            if (comm) comm->abort(1, "train: " + message);  // the other ranks would wait in the next allreduce
            throw Error(message);
        }
    }
    if (comm) comm->barrier();  // every rank leaves once rank 0 has written the last epoch
    note(fmt::format("done: {} epochs; best val Dice {:.4f} at epoch {} ({}); training loops {:.1f} s, loader wait {:.1f}%",
                     o.epochs, report.best_val_dice, report.best_epoch, kBestName, report.train_seconds,
                     100.0 * report.loader_wait_share()));
    return report;
}

std::map<std::string, std::string> config_metadata(const TrainCommandOptions& o) {
    return {{"width", std::to_string(o.width)}, {"depth", std::to_string(o.depth)}, {"size", std::to_string(o.size)}};
}

void require_batch_fits(size_t images, int batch, const std::string& what) {
    if (images < static_cast<size_t>(batch))
        throw UsageError(fmt::format("{} has {} images, fewer than --batch {}", what, images, batch));
}

TrainReport run_train(const TrainCommandOptions& options) {
    // Under mpirun: data-parallel over every rank; rank 0 alone writes and prints (see train_command.h).
    dist::Comm& comm = dist::Comm::world();
    const bool writer = comm.rank() == 0;
    Console console(options.log, options.progress);
    Dataset dataset;
    fs::path run_dir;
    std::string config_text;
    std::optional<Checkpoint> checkpoint;
    TensorMap init;
    bool save_split_file = false;
    Split split;
    TrainJob job;
    // Every rank checks everything before any rank writes (agree_on_setup is a barrier); alone, as it always was.
    agree_on_setup([&] {
        check_train_values(options);
        dataset = load_dataset(options.data_dir, options.skip_bad, options.limit);
        run_dir = prepare_run_dir(options.out_dir, "--out");
        config_text = train_config_text(options);
        check_same_config(run_dir, config_text, options.resume);
        const fs::path last = run_dir / kLastName;
        const bool have_checkpoint = file_exists(last);
        if (!options.resume && have_checkpoint)
            throw UsageError(fmt::format("--out '{}' already holds a run ({} exists); pass --resume to continue it, or choose another --out",
                                         options.out_dir, last.string()));
        if (options.resume && !have_checkpoint && !file_exists(run_dir / kConfigName))
            throw UsageError(fmt::format("--resume: '{}' holds no run (no {} and no {})", options.out_dir, kConfigName, kLastName));
        if (options.resume && have_checkpoint) checkpoint = check_checkpoint(last, options);  // every rank loads the same file
        init = checkpoint ? TensorMap{} : load_init_weights(options);
        split = resolve_split(dataset, options.split_path, options.seed, run_dir, save_split_file);
        try {
            if (options.val_folds >= 2) {
                // Validation on the training side: fold 0 of K (the seed's folds, as `cv` makes them).
                const std::vector<Fold> folds = make_folds(split.train_ids, options.val_folds, options.seed);
                job.train_indices = indices_of(dataset, folds[0].train_ids);
                job.val_indices = indices_of(dataset, folds[0].val_ids);
            } else {
                job.train_indices = indices_of(dataset, split.train_ids);
                job.val_indices = indices_of(dataset, split.test_ids);
            }
        } catch (const Error& e) {
            throw UsageError(one_line(e.what()));
        }
        require_batch_fits(job.train_indices.size(), options.batch,
                           options.val_folds >= 2 ? "the training side less its validation fold" : "the training side of the split");
        if (job.val_indices.empty())
            throw UsageError(options.val_folds >= 2 ? "the validation fold is empty" : "the test side of the split is empty");
        if (options.batch < comm.size())
            throw UsageError(fmt::format("--batch {} is smaller than the {} ranks of the mpirun job: each rank trains on at least one "
                                         "image of every batch",
                                         options.batch, comm.size()));
    });
    job.options = &options;
    job.dataset = &dataset;

    // Every check passed: the run starts here.
    if (writer) {
        write_file_atomic((run_dir / kConfigName).string(), config_text);
        if (save_split_file) save_split(split, (run_dir / kSplitName).string());
    }
    job.run_dir = run_dir;
    job.seed = options.seed;
    job.data_parallel = comm.distributed();
    job.threads = job.data_parallel ? dist::threads_per_rank(options.threads) : resolve_threads(options.threads);
    job.loader_threads = options.loader_threads > 0 ? options.loader_threads : auto_loader_threads(job.threads);
    job.validation_name =
        options.val_folds >= 2
            ? fmt::format("fold 1 of {} of the training side of {} ({} of its {} train ids; the {} test ids stay unseen)",
                          options.val_folds, (run_dir / kSplitName).string(), job.val_indices.size(), split.train_ids.size(),
                          split.test_ids.size())
            : fmt::format("the test side of {} (seed {}, {} train / {} test ids; best.safetensors is chosen on it, so its test "
                          "score is optimistic: --val-folds K validates on the training side)",
                          (run_dir / kSplitName).string(), split.seed, split.train_ids.size(), split.test_ids.size());
    job.console = writer ? &console : nullptr;
    job.checkpoint = std::move(checkpoint);
    job.init = &init;
    job.checkpoint_metadata = config_metadata(options);
    if (writer) {
        append_log(run_dir / kLogName, fmt::format("resunet train {} ({} pairs in {}{}{})", options.resume ? "--resume" : "start",
                                                   dataset.size(), options.data_dir,
                                                   dataset.skipped.empty() ? "" : fmt::format(", {} skipped", dataset.skipped.size()),
                                                   comm.distributed() ? fmt::format(", mpirun -np {}", comm.size()) : ""));
        for (const SkippedFile& skipped : dataset.skipped)
            append_log(run_dir / kLogName, fmt::format("skipped {}: {}", skipped.file, skipped.reason));
    }
    // Alone, the first SIGINT or SIGTERM ends the run at the end of the epoch, its checkpoint written (under
    // mpirun the signal reaches every rank at its own moment, and a rank's share of an epoch is not a checkpoint).
    std::optional<StopOnSignal> stop;
    if (!comm.distributed()) job.stop = &stop.emplace();
    TrainReport report = run_job(job);
    if (options.out && writer) {
        if (const EpochRecord* r = report.last())
            fmt::print(options.out,
                       "resunet train: {} epoch{} in {}; final val Dice {:.4f}, IoU {:.4f}, mIoU {:.4f}; best val Dice {:.4f} "
                       "(epoch {}, {}); loader wait {:.1f}% of the training loop\n",
                       r->epoch, r->epoch == 1 ? "" : "s", report.run_dir, r->val_dice, r->val_iou, r->val_miou, report.best_val_dice, report.best_epoch,
                       (run_dir / kBestName).string(), 100.0 * report.loader_wait_share());
    }
    return report;
}

int train_command(const TrainCommandOptions& options) {
    return run_command("train", [&] {
        const TrainReport report = run_train(options);
        return report.stopped_by ? 128 + report.stopped_by : 0;  // the shell's convention for a run a signal ended
    });
}

void add_train_command(CLI::App& app) {
    auto options = std::make_shared<TrainCommandOptions>();
    auto force_progress = std::make_shared<bool>(false);
    CLI::App* command = app.add_subcommand("train", "Train a ResUNet (fp32, oneDNN) with per-epoch validation; resumable run folder");
    add_train_flags(*command, *options);
    command->footer("Ctrl-C (SIGINT) or SIGTERM stops the run at the end of the current epoch, once its checkpoint is written "
                    "(exit status 130 or 143; --resume continues); a second one stops it at once.");
    command->add_flag("--progress", *force_progress, "Show the progress bar even when stderr is not a terminal")->configurable(false);
    command->callback([command, options, force_progress] {
        apply_config_file(*command);
        TrainCommandOptions run_options = *options;
        run_options.progress = *force_progress || ::isatty(STDERR_FILENO) != 0;
        const int code = train_command(run_options);
        if (code != 0) throw CLI::RuntimeError(code);
    });
}

}  // namespace resunet
