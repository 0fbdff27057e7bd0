// `resunet eval`: see eval_command.h.
#include "apps/lib/eval_command.h"

#include <unistd.h>

#include <cmath>
#include <map>
#include <memory>
#include <optional>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/global_control.h>
#include <opencv2/imgproc.hpp>

#include "apps/lib/quantize_cli.h"
#include "apps/lib/version.h"
#include "dist/comm.h"
#include "data/postprocess.h"
#include "engine/engine.h"
#include "apps/lib/engine_setup.h"
#include "engine/plan_cache.h"
#include "graph/atomic_file.h"
#include "quant/quant_engine.h"

namespace resunet {

namespace {

// What one rank scored, as bytes for gather(): ids, per-image metrics at both sizes, the model-size pooled counts,
// seconds, and the first error that stopped it ("" when none).
std::string pack_result(const EvalResult& result, const PixelCounts& pooled_model, const std::string& error) {
    Packer out;
    out.str(error);
    out.u64(result.ids.size());
    auto metrics = [&out](const MaskMetrics& m) {
        for (uint64_t c : {m.counts.true_positive, m.counts.false_positive, m.counts.false_negative, m.counts.true_negative}) out.u64(c);
        for (double v : {m.dice, m.iou, m.background_iou, m.mean_iou}) out.f64(v);
    };
    for (size_t i = 0; i < result.ids.size(); ++i) {
        out.str(result.ids[i]);
        metrics(result.per_image[i]);
        metrics(result.per_image_model_size[i]);
    }
    for (uint64_t c : {pooled_model.true_positive, pooled_model.false_positive, pooled_model.false_negative, pooled_model.true_negative})
        out.u64(c);
    out.f64(result.seconds);
    return out.bytes();
}

MaskMetrics unpack_metrics(Unpacker& in) {
    MaskMetrics m;
    m.counts.true_positive = in.u64();
    m.counts.false_positive = in.u64();
    m.counts.false_negative = in.u64();
    m.counts.true_negative = in.u64();
    m.dice = in.f64();
    m.iou = in.f64();
    m.background_iou = in.f64();
    m.mean_iou = in.f64();
    return m;
}

// One row per scored image, laid out as the rows of predict's summary.json: the input, its id, its size and
// its scores at the original size (dice, iou, mean_iou), plus the same at the model's size.
nlohmann::json eval_rows_json(const Dataset& dataset, const EvalResult& result) {
    std::map<std::string, const SampleInfo*> by_id;
    for (const SampleInfo& info : dataset.samples) by_id.emplace(info.id, &info);
    auto number = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < result.ids.size(); ++i) {
        const auto it = by_id.find(result.ids[i]);
        const MaskMetrics& m = result.per_image[i];
        const MaskMetrics& small = result.per_image_model_size[i];
        rows.push_back({{"input", it != by_id.end() ? it->second->image_path : std::string()},
                        {"id", result.ids[i]},
                        {"width", it != by_id.end() ? it->second->width : 0},
                        {"height", it != by_id.end() ? it->second->height : 0},
                        {"dice", number(m.dice)},
                        {"iou", number(m.iou)},
                        {"mean_iou", number(m.mean_iou)},
                        {"model_size", {{"dice", number(small.dice)}, {"iou", number(small.iou)}, {"mean_iou", number(small.mean_iou)}}}});
    }
    return rows;
}

}  // namespace

EvalReport run_eval(const EvalCommandOptions& options_in) {
    dist::Comm& comm = dist::Comm::world();
    EvalCommandOptions options = options_in;
    if (comm.distributed() && options.threads == 0) options.threads = dist::threads_per_rank(0);
    if (comm.rank() != 0) options.log = options.out = nullptr;  // rank 0 speaks for the job
    Dataset dataset;
    Split split;
    EvalReport report;
    std::vector<size_t> indices;
    ModelFile model;
    std::unique_ptr<Engine> fp32;
    std::unique_ptr<QuantEngine> int8;
    std::optional<tbb::global_control> thread_limit;
    const SafetensorsFile& file = model.file;
    const ResUNetConfig& config = model.config;
    const Graph& graph = model.graph;
    int size = 0;
    PreprocessOptions preprocess;
    // Every check before any work; under mpirun every rank agrees on it (one message, exit 2 everywhere). Rank 0
    // first: it measures and caches the plans, the other ranks take them, so every rank runs the same plan.
    agree_on_setup([&] {
        if (options.model_path.empty()) throw UsageError("--model is required");
        if (options.batch < 1) throw UsageError(fmt::format("--batch must be at least 1, got {}", options.batch));
        if (options.threads < 0 || options.limit < 0 || options.size < 0) throw UsageError("--threads, --limit and --size must be >= 0");
        if (options.calibration_images < 1) throw UsageError("--calibration-count must be at least 1");
        check_output_file(options.json_path, "--json", options.overwrite);  // before the long work, not after it
        check_model_path(options.model_path);
        dataset = load_dataset(options.data_dir, options.skip_bad, 0);
        if (!options.split_path.empty()) {
            if (!file_exists(options.split_path)) throw UsageError(fmt::format("--split '{}' does not exist", options.split_path));
            try {
                split = load_split(options.split_path, dataset);
            } catch (const Error& e) {
                throw UsageError(one_line(e.what()));
            }
            report.split = fmt::format("the test side of {}", options.split_path);
        } else {
            try {
                split = make_split(dataset, options.seed);
            } catch (const Error& e) {
                throw UsageError(one_line(e.what()));
            }
            report.split = fmt::format("the test side of the seeded 80/20 split (seed {})", options.seed);
        }
        indices = indices_of(dataset, split.test_ids);
        if (options.limit > 0 && static_cast<size_t>(options.limit) < indices.size()) indices.resize(static_cast<size_t>(options.limit));
        if (indices.empty()) throw UsageError("the split's test side is empty");

        model = load_model_file(options.model_path, options.size);
        if (config.out_channels != 1)
            throw UsageError(fmt::format("--model '{}' has {} output channels; eval needs a one-channel (polyp) model", options.model_path,
                                         config.out_channels));
        size = config.height;
        report.size = size;
        report.threads = resolve_threads(options.threads);
        if (options.threads > 0) thread_limit.emplace(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(options.threads));

        const bool int8_file = is_int8_weights(file.tensors);
        const bool stored_scales = has_stored_static_scales(file.tensors);
        check_stored_scales_precision(options.model_path, stored_scales, options.precision, options.precision_given);
        check_calibration_count_used(options.precision, stored_scales, options.calibration_given);
        check_engine_flags(options.tuning, options.precision == Precision::fp32);
        try {
            if (options.precision == Precision::fp32) {
                if (int8_file)
                    throw UsageError(fmt::format("--model '{}' is an int8 file; --precision fp32 needs fp32 weights", options.model_path));
                fp32 = std::make_unique<Engine>(graph, file.tensors, fp32_engine_options(options.tuning, options.threads, 1));
                report.engine = "fp32";
                report.plan_id = fp32->plan().id();
            } else {
                int8 = std::make_unique<QuantEngine>(graph, file.tensors, int8_engine_options(options.tuning, options.threads, 1));
                report.engine = int8_engine_label(*int8, stored_scales, options.tuning);
                report.plan_id = int8->plan().id();
            }
        } catch (const UsageError&) {
            throw;
        } catch (const Error& e) {
            throw UsageError(fmt::format("--model '{}': {}", options.model_path, one_line(e.what())));
        }
        model.file.tensors.clear();

        preprocess.width = preprocess.height = size;
        if (options.precision == Precision::static_int8 && !stored_scales) {
            // The fixed set `resunet quantize --data --split` uses by default (calibration_ids), so its file
            // reproduces this run's scales and Dice.
            std::vector<std::string> ids = calibration_ids(split.train_ids, options.calibration_images);
            if (ids.empty()) ids = calibration_ids(split.test_ids, options.calibration_images);  // a split without a train side
            const std::vector<float> calibration = load_calibration_images(dataset, ids, size);
            if (ids.empty()) throw Error("static-int8: no calibration images");
            int8->calibrate(calibration.data(), static_cast<int>(ids.size()));
            report.engine = fmt::format("int8 (static scales, calibrated on the first {} images of the split's train side)", ids.size());
        }
    }, /*rank0_first=*/true);  // agree_on_setup

    // This rank's test images: whole batches of the one-process order (an int8 batch then holds the same images).
    const size_t total = indices.size();
    const size_t batch = static_cast<size_t>(options.batch);
    const auto [first_batch, end_batch] = dist::shard((total + batch - 1) / batch, comm.rank(), comm.size());
    indices = std::vector<size_t>(indices.begin() + static_cast<std::ptrdiff_t>(std::min(total, first_batch * batch)),
                                  indices.begin() + static_cast<std::ptrdiff_t>(std::min(total, end_batch * batch)));

    // evaluate_split pools Dice and IoU; the pooled two-class mIoU at model size is counted here, against the
    // mask resized as load_sample resizes it (nearest), in the loader's order (the given indices, unshuffled).
    PooledMetrics pooled_model;
    size_t position = 0;
    const int64_t pixels = static_cast<int64_t>(size) * size;
    Console console(options.log, options.progress);
    const auto scoring_start = Clock::now();
    const LogitsRunner runner = [&](const float* images, int count, float* logits) {
        if (fp32) fp32->run(images, count, logits);
        else int8->run(images, count, logits);
        for (int i = 0; i < count; ++i, ++position) {
            const SampleInfo& info = dataset.samples[indices.at(position)];
            cv::Mat truth = read_mask(info.mask_path), small;
            cv::resize(truth, small, cv::Size(size, size), 0, 0, cv::INTER_NEAREST);
            pooled_model.add(logits_to_mask(logits + i * pixels, size, size, size, size), small);
        }
        console.bar(progress_text(position, indices.size(), seconds_since(scoring_start)));
    };
    if (!comm.distributed()) {
        report.result = evaluate_split(dataset, indices, preprocess, runner, options.batch, options.threads);
    } else {
        // Each rank scores its shard; every rank leaves with all ranks' per-image metrics in input order (the shards
        // are contiguous, in rank order) and rescores them as one list: the same numbers as one process.
        std::string error;
        EvalResult mine;
        try {
            if (!indices.empty()) mine = evaluate_split(dataset, indices, preprocess, runner, options.batch, options.threads);
        } catch (const std::exception& e) {
            error = one_line(e.what());
        }
        std::string merged;
        const std::vector<std::string> packs = comm.gather(pack_result(mine, pooled_model.totals(), error));
        if (comm.rank() == 0) {
            Packer all;
            all.u64(packs.size());
            for (const std::string& pack : packs) all.str(pack);
            merged = all.bytes();
        }
        comm.broadcast(merged);
        Unpacker all(merged);
        EvalResult& result = report.result;
        PixelCounts pooled_counts;
        std::string first_error;
        for (uint64_t rank = 0, ranks = all.u64(); rank < ranks; ++rank) {
            const std::string pack = all.str();
            Unpacker in(pack);
            const std::string rank_error = in.str();
            if (first_error.empty() && !rank_error.empty()) first_error = fmt::format("rank {}: {}", rank, rank_error);
            for (uint64_t n = in.u64(); n > 0; --n) {
                result.ids.push_back(in.str());
                result.per_image.push_back(unpack_metrics(in));
                result.per_image_model_size.push_back(unpack_metrics(in));
            }
            PixelCounts counts;
            counts.true_positive = in.u64();
            counts.false_positive = in.u64();
            counts.false_negative = in.u64();
            counts.true_negative = in.u64();
            pooled_counts += counts;
            result.seconds = std::max(result.seconds, in.f64());
        }
        if (!error.empty()) throw Error(error);  // this rank's own failure, as one process reports it
        if (!first_error.empty()) throw ReportedElsewhere(first_error);
        result.images = result.ids.size();
        result.model_size = score_set(result.per_image_model_size);
        result.original = score_set(result.per_image);
        pooled_model = PooledMetrics();
        pooled_model.add(pooled_counts);
    }
    console.end_bar();
    PixelCounts original;
    for (const MaskMetrics& m : report.result.per_image) original += m.counts;
    report.pooled_mean_iou_original = metrics_from_counts(original).mean_iou;
    report.pooled_mean_iou_model = pooled_model.mean_iou();

    if (options.log)
        fmt::print(options.log, "resunet eval: {} (width {}, depth {}, size {}), {}, {} images of {}, batch {}, threads {}{}, {:.1f} s\n",
                   options.model_path, config.width, config.depth, size, report.engine, report.result.images, report.split,
                   options.batch, report.threads, comm.distributed() ? fmt::format(" on each of {} ranks", comm.size()) : "",
                   report.result.seconds);
    if (options.out) fmt::print(options.out, "{}", format_eval_markdown(report));
    if (!options.json_path.empty() && comm.rank() == 0) {
        auto scores = [](const ScoreSet& s, double pooled_mean_iou) {
            return nlohmann::json{{"dice", metric_summary_json(s.dice)},       {"iou", metric_summary_json(s.iou)},
                                  {"mean_iou", metric_summary_json(s.mean_iou)}, {"pooled_dice", s.pooled_dice},
                                  {"pooled_iou", s.pooled_iou},           {"pooled_mean_iou", pooled_mean_iou}};
        };
        nlohmann::json json = {
            {"format", "resunet-eval"},
            {"version", 1},
            {"tool_version", tool_version("resunet")},
            {"model", options.model_path},
            {"width", config.width},
            {"depth", config.depth},
            {"size", size},
            {"engine", report.engine},
            {"plan", report.plan_id},
            {"split", report.split},
            {"images", report.result.images},
            {"threads", report.threads},
            {"seconds", report.result.seconds},
            {"metrics", "dice, iou: foreground (polyp); mean_iou: two-class (background, polyp); summaries are per-image mean "
                        "and sample std; pooled_*: all pixels of all images counted together"},
            {"model_size", scores(report.result.model_size, report.pooled_mean_iou_model)},
            {"original_size", scores(report.result.original, report.pooled_mean_iou_original)},
            {"rows", eval_rows_json(dataset, report.result)},
        };
        try {
            create_output_parent(options.json_path, "--json");
            write_file_atomic(options.json_path, json.dump(2) + "\n");
        } catch (const Error& e) {
            throw Error(fmt::format("--json: {}", one_line(e.what())));
        }
    }
    return report;
}

std::string format_eval_markdown(const EvalReport& report) {
    const EvalResult& r = report.result;
    const std::string model_header = fmt::format("model size ({}x{})", report.size, report.size);
    std::string text = fmt::format("| metric ({} images) | {} | original size |\n| --- | --- | --- |\n", r.images, model_header);
    auto row = [&](const char* name, const std::string& a, const std::string& b) { text += fmt::format("| {} | {} | {} |\n", name, a, b); };
    row("Dice (foreground), per-image mean ± std", mean_std(r.model_size.dice), mean_std(r.original.dice));
    row("IoU (foreground), per-image mean ± std", mean_std(r.model_size.iou), mean_std(r.original.iou));
    row("mIoU (background and polyp), per-image mean ± std", mean_std(r.model_size.mean_iou), mean_std(r.original.mean_iou));
    row("Dice (foreground), pooled over all pixels", fmt::format("{:.4f}", r.model_size.pooled_dice),
        fmt::format("{:.4f}", r.original.pooled_dice));
    row("IoU (foreground), pooled over all pixels", fmt::format("{:.4f}", r.model_size.pooled_iou), fmt::format("{:.4f}", r.original.pooled_iou));
    row("mIoU (background and polyp), pooled over all pixels", fmt::format("{:.4f}", report.pooled_mean_iou_model),
        fmt::format("{:.4f}", report.pooled_mean_iou_original));
    text += fmt::format("\nEngine: {} (plan {}). Images: {}. Threshold: probability 0.5 (logit 0); at original size the logits are "
                        "resized bilinearly before thresholding. ± is the sample standard deviation over images. Tool: {}.\n",
                        report.engine, report.plan_id, report.split, tool_version("resunet"));
    return text;
}

int eval_command(const EvalCommandOptions& options) {
    return run_command("eval", [&] {
        run_eval(options);
        return 0;
    });
}

void add_eval_command(CLI::App& app) {
    auto options = std::make_shared<EvalCommandOptions>();
    CLI::App* command = app.add_subcommand("eval", "Score a model on the test split: Dice, IoU, mIoU at model and original size");
    add_eval_flags(*command, *options);
    command->callback([command, options] {
        apply_config_file(*command);
        EvalCommandOptions run_options = *options;
        run_options.progress = options->progress || ::isatty(STDERR_FILENO) != 0;
        const int code = eval_command(run_options);
        if (code != 0) throw CLI::RuntimeError(code);
    });
}

}  // namespace resunet
