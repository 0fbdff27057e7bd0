// `resunet cv`: see cv_command.h.
#include "apps/lib/cv_command.h"

#include <omp.h>

#include <algorithm>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include "apps/lib/version.h"
#include "dist/comm.h"
#include "graph/atomic_file.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

constexpr const char* kCvSummaryName = "cv_summary.json";

void pack_fold(Packer& out, const FoldReport& fold) {
    out.u64(static_cast<uint64_t>(fold.fold));
    out.u64(fold.seed);
    out.u64(fold.ok ? 1 : 0);
    out.str(fold.error);
    const TrainReport& t = fold.train;
    out.str(t.run_dir);
    out.u64(t.epochs.size());
    for (const EpochRecord& r : t.epochs) {
        out.u64(static_cast<uint64_t>(r.epoch));
        for (double v : {r.learning_rate, r.train_loss, r.val_dice, r.val_iou, r.val_miou, r.epoch_seconds, r.loader_wait_seconds,
                         r.loader_wait_share})
            out.f64(v);
    }
    for (int v : {t.first_epoch, t.best_epoch, t.threads, t.loader_threads}) out.u64(static_cast<uint64_t>(v));
    out.f64(t.best_val_dice);
    out.u64(t.train_images);
    out.u64(t.val_images);
    out.f64(t.train_seconds);
    out.f64(t.loader_wait_seconds);
}

FoldReport unpack_fold(Unpacker& in) {
    FoldReport fold;
    fold.fold = static_cast<int>(in.u64());
    fold.seed = in.u64();
    fold.ok = in.u64() != 0;
    fold.error = in.str();
    TrainReport& t = fold.train;
    t.run_dir = in.str();
    t.epochs.resize(in.u64());
    for (EpochRecord& r : t.epochs) {
        r.epoch = static_cast<int>(in.u64());
        for (double* v : {&r.learning_rate, &r.train_loss, &r.val_dice, &r.val_iou, &r.val_miou, &r.epoch_seconds,
                          &r.loader_wait_seconds, &r.loader_wait_share})
            *v = in.f64();
    }
    for (int* v : {&t.first_epoch, &t.best_epoch, &t.threads, &t.loader_threads}) *v = static_cast<int>(in.u64());
    t.best_val_dice = in.f64();
    t.train_images = in.u64();
    t.val_images = in.u64();
    t.train_seconds = in.f64();
    t.loader_wait_seconds = in.f64();
    return fold;
}

// Under mpirun: every rank sends the reports of the folds it ran (`mine`) and leaves with every fold's report, so
// rank 0 can write the summary and every rank returns the same exit status.
void gather_folds(dist::Comm& comm, const std::vector<size_t>& mine, std::vector<FoldReport>& folds) {
    Packer out;
    out.u64(mine.size());
    for (size_t k : mine) pack_fold(out, folds[k]);
    const std::vector<std::string> packs = comm.gather(out.bytes());
    std::string merged;
    if (comm.rank() == 0) {
        Packer all;
        all.u64(packs.size());
        for (const std::string& pack : packs) all.str(pack);
        merged = all.bytes();
    }
    comm.broadcast(merged);
    Unpacker all(merged);
    for (uint64_t rank = 0, ranks = all.u64(); rank < ranks; ++rank) {
        const std::string pack = all.str();
        Unpacker in(pack);
        for (uint64_t n = in.u64(); n > 0; --n) {
            FoldReport fold = unpack_fold(in);
            if (fold.fold < 0 || static_cast<size_t>(fold.fold) >= folds.size()) throw Error("gathered a fold report out of range");
            folds[static_cast<size_t>(fold.fold)] = std::move(fold);
        }
    }
}

}  // namespace

bool CvReport::all_ok() const {
    return std::all_of(folds.begin(), folds.end(), [](const FoldReport& f) { return f.ok; });
}

CvReport run_cv(const CvCommandOptions& options) {
    const auto start = Clock::now();
    dist::Comm& comm = dist::Comm::world();
    const bool root = comm.rank() == 0;
    const TrainCommandOptions& train = options.train;
    Console console(train.log, false);
    Dataset dataset;
    fs::path run_dir;
    std::string config_text;
    bool save_split_file = false;
    Split split;
    std::vector<Fold> folds;
    int parallel = 1, threads = 1, loader_threads = 1;
    TensorMap init;
    std::vector<TrainJob> jobs;
    // Every check before any fold starts; under mpirun every rank agrees on it (one message, exit 2 everywhere).
    agree_on_setup([&] {
        check_train_values(train);
        if (options.folds < 2) throw UsageError(fmt::format("--folds must be at least 2, got {}", options.folds));
        if (options.parallel_folds < 1) throw UsageError("--parallel-folds must be at least 1");
        if (options.threads_per_fold < 0) throw UsageError("--threads-per-fold must be >= 0");
        dataset = load_dataset(train.data_dir, train.skip_bad, train.limit);
        run_dir = prepare_run_dir(train.out_dir, "--out");
        config_text = cv_config_text(options);
        check_same_config(run_dir, config_text, train.resume);
        if (train.resume && !file_exists(run_dir / kConfigName))
            throw UsageError(fmt::format("--resume: '{}' holds no cross-validation (no {})", train.out_dir, kConfigName));
        split = resolve_split(dataset, train.split_path, train.seed, run_dir, save_split_file);
        try {
            folds = make_folds(split.train_ids, options.folds, train.seed);
        } catch (const Error& e) {
            throw UsageError(one_line(e.what()));
        }

        // Under mpirun the budget is this rank's share of the node's cores.
        const int budget = comm.distributed() && train.threads == 0 ? dist::threads_per_rank(0) : resolve_threads(train.threads);
        parallel = std::min(options.parallel_folds, options.folds);
        threads = options.threads_per_fold > 0 ? options.threads_per_fold : std::max(1, budget / parallel);
        loader_threads = train.loader_threads > 0 ? train.loader_threads : auto_loader_threads(threads);

        init = load_init_weights(train);  // folds that resume ignore it
        jobs.resize(folds.size());
        for (size_t k = 0; k < folds.size(); ++k) {
            TrainJob& job = jobs[k];
            job.options = &train;
            job.dataset = &dataset;
            job.train_indices = indices_of(dataset, folds[k].train_ids);
            job.val_indices = indices_of(dataset, folds[k].val_ids);
            require_batch_fits(job.train_indices.size(), train.batch, fmt::format("fold {}'s training ids", k));
            if (job.val_indices.empty()) throw UsageError(fmt::format("fold {} has no validation ids", k));
            job.run_dir = run_dir / fmt::format("fold{}", k);
            prepare_run_dir(job.run_dir.string(), "--out");
            const fs::path last = job.run_dir / kLastName;
            if (file_exists(last)) {
                if (!train.resume)
                    throw UsageError(fmt::format("{} exists; pass --resume to continue the cross-validation, or choose another --out",
                                                 last.string()));
                job.checkpoint = check_checkpoint(last, train);
            }
            job.init = &init;
            job.seed = train.seed + k;
            job.threads = threads;
            job.loader_threads = loader_threads;
            job.validation_name = fmt::format("fold {}'s validation ids ({} of the {} training ids of {})", k, folds[k].val_ids.size(),
                                              split.train_ids.size(), (run_dir / kSplitName).string());
            job.label = fmt::format("fold {}: ", k);
            job.console = &console;
            job.checkpoint_metadata = config_metadata(train);
            job.checkpoint_metadata["fold"] = std::to_string(k);
        }
    });  // agree_on_setup

    // Every check passed: the cross-validation starts here. Rank 0 writes the shared files; the broadcast after
    // them keeps a fold's first clean-up of temp files (run_job) from meeting rank 0's writes into its folder.
    std::string start_error;  // rank 0 failing to write them stops every rank
    if (root) {
        try {
            write_file_atomic((run_dir / kConfigName).string(), config_text);
            if (save_split_file) save_split(split, (run_dir / kSplitName).string());
            for (size_t k = 0; k < folds.size(); ++k) {
                const TrainJob& job = jobs[k];
                write_file_atomic((job.run_dir / kConfigName).string(),
                                  fmt::format("# fold {} of {} (seed {}): trained by `resunet cv` with these flags\n{}", k, folds.size(),
                                              job.seed, config_text));
                Split fold_split;
                fold_split.seed = job.seed;
                fold_split.test_fraction = static_cast<double>(folds[k].val_ids.size()) / static_cast<double>(split.train_ids.size());
                fold_split.train_ids = folds[k].train_ids;
                fold_split.test_ids = folds[k].val_ids;
                save_split(fold_split, (job.run_dir / kSplitName).string());
            }
            append_log(run_dir / kLogName,
                       fmt::format("resunet cv {}: {} folds over {} training ids, {} side by side, threads per fold {}, loader threads per fold {}",
                                   train.resume ? "--resume" : "start", folds.size(), split.train_ids.size(), parallel, threads, loader_threads));
            console.line(fmt::format("resunet cv: {} folds over the {} training ids of the split, {} at a time; per fold: oneDNN threads {}, "
                                     "loader threads {}",
                                     folds.size(), split.train_ids.size(), parallel, threads, loader_threads));
            if (comm.distributed())
                console.line(fmt::format("resunet cv: {} ranks; fold k runs on rank k % {}", comm.size(), comm.size()));
        } catch (const std::exception& e) {
            start_error = one_line(e.what());
        }
    }
    comm.broadcast(start_error);
    if (!start_error.empty()) {
        if (root) throw Error(start_error);
        throw ReportedElsewhere(start_error);
    }

    CvReport report;
    report.folds.resize(folds.size());
    report.threads_per_fold = threads;
    report.parallel_folds = parallel;
    auto run_fold = [&](size_t k) {
        FoldReport& fold = report.folds[k];
        fold.fold = static_cast<int>(k);
        fold.seed = jobs[k].seed;
        try {
            omp_set_num_threads(threads);  // this fold's thread; the trainer and engine set it again
            fold.train = run_job(jobs[k]);
            fold.ok = true;
        } catch (const std::exception& e) {
            fold.error = one_line(e.what());
            console.line(fmt::format("fold {}: failed: {}", k, fold.error));
        }
    };
    // This rank's folds: fold k runs on rank k % size (all of them when alone).
    std::vector<size_t> mine;
    for (size_t k = 0; k < folds.size(); ++k)
        if (static_cast<int>(k % static_cast<size_t>(comm.size())) == comm.rank()) mine.push_back(k);
    if (!mine.empty()) {
        const int side_by_side = std::min(parallel, static_cast<int>(mine.size()));
        // Loader arenas and the folds' own TBB work need workers beyond the K fold threads.
        const size_t wanted = static_cast<size_t>(side_by_side) * static_cast<size_t>(1 + loader_threads);
        const size_t current = tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism);
        tbb::global_control workers(tbb::global_control::max_allowed_parallelism, std::max(current, wanted));
        tbb::task_arena arena(side_by_side);
        arena.execute([&] {
            tbb::task_group group;
            for (size_t i = mine.size(); i-- > 0;)  // the calling thread pops the last one spawned: the first fold
                group.run([&run_fold, k = mine[i]] {
                    // A fold waiting inside OpenCV's or a loader's TBB work must not pick up another whole fold.
                    tbb::this_task_arena::isolate([&] { run_fold(k); });
                });
            group.wait();
        });
    }
    if (comm.distributed()) gather_folds(comm, mine, report.folds);

    std::vector<double> dice, iou, mean_iou;
    for (const FoldReport& fold : report.folds) {
        const EpochRecord* last = fold.train.last();
        if (!fold.ok || !last) continue;
        dice.push_back(last->val_dice);
        iou.push_back(last->val_iou);
        mean_iou.push_back(last->val_miou);
    }
    report.dice = summarize(dice);
    report.iou = summarize(iou);
    report.mean_iou = summarize(mean_iou);
    report.seconds = seconds_since(start);

    nlohmann::json json;
    json["format"] = "resunet-cv-summary";
    json["version"] = 1;
    json["folds_total"] = folds.size();
    json["parallel_folds"] = parallel;
    json["threads_per_fold"] = threads;
    json["loader_threads_per_fold"] = loader_threads;
    json["epochs"] = train.epochs;
    json["seconds"] = report.seconds;
    json["tool_version"] = tool_version("resunet");
    json["metrics"] = "final epoch's validation scores: per-image means at original size; mean_iou is two-class";
    json["folds"] = nlohmann::json::array();
    for (const FoldReport& fold : report.folds) {
        nlohmann::json f = {{"fold", fold.fold}, {"seed", fold.seed}, {"ok", fold.ok}, {"folder", fmt::format("fold{}", fold.fold)},
                            {"train_images", fold.train.train_images}, {"val_images", fold.train.val_images},
                            {"loader_wait_share", fold.train.loader_wait_share()}, {"train_seconds", fold.train.train_seconds}};
        if (!fold.ok) f["error"] = fold.error;
        if (const EpochRecord* last = fold.train.last()) {
            f["epochs_done"] = last->epoch;
            f["dice"] = last->val_dice;
            f["iou"] = last->val_iou;
            f["mean_iou"] = last->val_miou;
        }
        f["best_epoch"] = fold.train.best_epoch;
        f["best_dice"] = fold.train.best_val_dice;
        json["folds"].push_back(f);
    }
    json["summary"] = {{"dice", metric_summary_json(report.dice)}, {"iou", metric_summary_json(report.iou)}, {"mean_iou", metric_summary_json(report.mean_iou)}};
    report.summary_path = (run_dir / kCvSummaryName).string();
    if (!root) return report;  // rank 0 writes the summary and speaks for the job
    write_file_atomic(report.summary_path, json.dump(2) + "\n");
    append_log(run_dir / kLogName, fmt::format("done: Dice {}, IoU {}, mIoU {} over {} folds{}", mean_std(report.dice),
                                               mean_std(report.iou), mean_std(report.mean_iou), dice.size(),
                                               report.all_ok() ? "" : " (some folds failed)"));
    if (train.out) fmt::print(train.out, "{}", format_cv_markdown(report));
    return report;
}

std::string format_cv_markdown(const CvReport& report) {
    std::string text = "| fold | seed | train images | val images | epochs | Dice | IoU | mIoU | best Dice (epoch) | loader wait share |\n"
                       "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    size_t finished = 0;
    for (const FoldReport& fold : report.folds) {
        const EpochRecord* last = fold.train.last();
        if (fold.ok) ++finished;
        if (last)
            text += fmt::format("| {} | {} | {} | {} | {}{} | {:.4f} | {:.4f} | {:.4f} | {:.4f} ({}) | {:.1f}% |\n", fold.fold, fold.seed,
                                fold.train.train_images, fold.train.val_images, last->epoch, fold.ok ? "" : " (failed)", last->val_dice,
                                last->val_iou, last->val_miou, fold.train.best_val_dice, fold.train.best_epoch,
                                100.0 * fold.train.loader_wait_share());
        else
            text += fmt::format("| {} | {} | {} | {} | 0 (failed) | | | | | |\n", fold.fold, fold.seed, fold.train.train_images,
                                fold.train.val_images);
    }
    text += fmt::format("| **mean ± std** ({} folds) | | | | | {} | {} | {} | | |\n", finished, mean_std(report.dice), mean_std(report.iou),
                        mean_std(report.mean_iou));
    text += "\nDice and IoU: foreground (polyp); mIoU: mean of background and polyp IoU. Each is the per-image mean over the "
            "fold's validation ids at original image size, after the final epoch; ± is the sample standard deviation over folds. "
            "Loader wait share: time the training loop waited for batches.\n";
    for (const FoldReport& fold : report.folds)
        if (!fold.ok) text += fmt::format("\nfold {} failed: {}\n", fold.fold, fold.error);
    if (!report.summary_path.empty()) text += fmt::format("\nWritten: {}\n", report.summary_path);
    return text;
}

int cv_command(const CvCommandOptions& options) {
    return run_command("cv", [&] { return run_cv(options).exit_code(); });
}

void add_cv_command(CLI::App& app) {
    auto options = std::make_shared<CvCommandOptions>();
    CLI::App* command = app.add_subcommand("cv", "k-fold cross-validation on the training side of the split, folds side by side");
    add_cv_flags(*command, *options);
    command->callback([command, options] {
        apply_config_file(*command);
        const int code = cv_command(*options);
        if (code != 0) throw CLI::RuntimeError(code);
    });
}

}  // namespace resunet
