// `resunet predict`: the checks before any work, the model, the collection of results (and, under mpirun,
// their gathering on rank 0), metrics.csv and summary.json, and the CLI. See predict_command.h; the pipeline
// itself is predict_pipeline.h.
#include "apps/lib/predict_command.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <unordered_map>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include "apps/lib/predict_outputs.h"
#include "apps/lib/predict_pipeline.h"
#include "apps/lib/quantize_cli.h"
#include "apps/lib/version.h"
#include "dist/comm.h"
#include "apps/lib/engine_setup.h"
#include "engine/plan_cache.h"
#include "graph/atomic_file.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

constexpr const char* kMetricsCsvName = "metrics.csv";
constexpr const char* kSummaryJsonName = "summary.json";
constexpr const char* kMetricsCsvHeader = "id,width,height,dice,iou,mean_iou\n";

// Prints a failure line or progress on the log without the two garbling each other.
class ProgressConsole {
  public:
    ProgressConsole(std::FILE* log, bool progress, size_t total) : log_(log), progress_(progress && log), total_(total) {}

    void line(const std::string& text) {
        if (!log_) return;
        clear_bar();
        fmt::print(log_, "{}\n", text);
        std::fflush(log_);
    }

    void update(size_t done, double elapsed_seconds, bool final) {
        if (!progress_) return;
        if (!final && elapsed_seconds - last_seconds_ < 0.25) return;
        last_seconds_ = elapsed_seconds;
        const double rate = elapsed_seconds > 0 ? static_cast<double>(done) / elapsed_seconds : 0.0;
        const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0.0;
        constexpr int kBarWidth = 24;
        const int filled = total_ ? static_cast<int>(kBarWidth * done / total_) : kBarWidth;
        const long eta_s = std::lround(eta);
        std::string text = fmt::format("  [{}{}] {}/{} images  {:.1f} images/s  ETA {}:{:02d}", std::string(filled, '#'),
                                       std::string(kBarWidth - filled, '.'), done, total_, rate, eta_s / 60, eta_s % 60);
        fmt::print(log_, "\r{:<{}}", text, bar_width_);
        bar_width_ = std::max(bar_width_, text.size());
        if (final) {
            fmt::print(log_, "\n");
            bar_width_ = 0;
        }
        std::fflush(log_);
    }

  private:
    void clear_bar() {
        if (bar_width_ == 0) return;
        fmt::print(log_, "\r{}\r", std::string(bar_width_, ' '));
        bar_width_ = 0;
    }
    std::FILE* log_;
    bool progress_;
    size_t total_;
    size_t bar_width_ = 0;
    double last_seconds_ = -1.0;
};

// A file written row by row into a hidden temp file next to `path`, renamed over it by commit() (after
// fsync), so a crash never leaves a torn metrics.csv and rows need not be held in memory.
class StreamedFile {
  public:
    explicit StreamedFile(std::string path) : path_(std::move(path)) {
        // Named as write_file_atomic's temp files: short enough for any target name, and removed by
        // remove_stale_temp_files when this process dies before commit().
        temp_ = new_temp_file_beside(path_);
        file_ = std::fopen(temp_.c_str(), "wb");
        if (!file_) throw Error(fmt::format("{}: cannot create: {}", temp_, std::strerror(errno)));
    }
    StreamedFile(const StreamedFile&) = delete;
    StreamedFile& operator=(const StreamedFile&) = delete;
    ~StreamedFile() {
        if (file_) {
            std::fclose(file_);
            ::unlink(temp_.c_str());
        }
    }
    std::FILE* get() { return file_; }
    void commit() {
        std::FILE* file = file_;
        file_ = nullptr;
        const bool ok = std::fflush(file) == 0 && !std::ferror(file) && ::fsync(::fileno(file)) == 0;
        const int error = errno;
        if (std::fclose(file) != 0 || !ok) {
            ::unlink(temp_.c_str());
            throw Error(fmt::format("{}: write failed: {}", path_, std::strerror(ok ? errno : error)));
        }
        if (::rename(temp_.c_str(), path_.c_str()) != 0) {
            const int rename_error = errno;
            ::unlink(temp_.c_str());
            throw Error(fmt::format("{}: cannot rename {} over it: {}", path_, temp_, std::strerror(rename_error)));
        }
    }

  private:
    std::string path_, temp_;
    std::FILE* file_ = nullptr;
};

std::string format_summary_line(const char* name, const MetricSummary& s) {
    return fmt::format("  {:<9} {:.4f} ± {:.4f}  [{:.4f}, {:.4f}]", name, s.mean, s.std, s.min, s.max);
}

void check_options(const PredictOptions& options) {
    if (options.inputs.empty()) throw UsageError("no INPUT given (image files, folders or @list.txt)");
    if (options.model_path.empty()) throw UsageError("--model is required");
    if (options.out_dir.empty()) throw UsageError("--out is required");
    if (options.batch < 1) throw UsageError(fmt::format("--batch must be at least 1, got {}", options.batch));
    if (options.threads < 0) throw UsageError(fmt::format("--threads must be 0 (all cores) or more, got {}", options.threads));
    if (options.size < 0) throw UsageError(fmt::format("--size must be positive, got {}", options.size));
    if (options.calibration_images < 1)
        throw UsageError(fmt::format("--calibration-count must be at least 1, got {}", options.calibration_images));
    if (!(options.threshold > 0 && options.threshold < 1))
        throw UsageError(fmt::format("--threshold must be between 0 and 1 (exclusive), got {}", options.threshold));
    if (options.fast_decode && options.overlay)
        throw UsageError("--fast-decode and --overlay exclude each other: an overlay is drawn on the full-size image");
    if (options.batches_in_flight < 1) throw UsageError("batches in flight must be at least 1");
    if (options.max_pixels < 1) throw UsageError("the megapixel limit must be positive");
}

// Proves --out writable without creating it: a probe file if it exists, else its nearest existing ancestor
// must be a writable folder (the folder itself is created once the model has loaded).
void check_out_dir(const fs::path& dir) {
    std::error_code ec;
    if (fs::exists(dir, ec)) {
        if (!fs::is_directory(dir, ec)) throw UsageError(fmt::format("--out '{}' is not a folder", dir.string()));
        std::string probe = (dir / ".resunet-write-test.XXXXXX").string();
        const int fd = ::mkstemp(probe.data());
        if (fd < 0) throw UsageError(fmt::format("--out '{}' is not writable: {}", dir.string(), std::strerror(errno)));
        ::close(fd);
        ::unlink(probe.c_str());
        return;
    }
    fs::path ancestor = fs::absolute(dir, ec).parent_path();
    while (!ancestor.empty() && !fs::exists(ancestor, ec) && ancestor != ancestor.root_path()) ancestor = ancestor.parent_path();
    if (!fs::is_directory(ancestor, ec))
        throw UsageError(fmt::format("--out '{}' cannot be created: {} is not a folder", dir.string(), ancestor.string()));
    if (::access(ancestor.c_str(), W_OK | X_OK) != 0)
        throw UsageError(fmt::format("--out '{}' cannot be created in {}: {}", dir.string(), ancestor.string(), std::strerror(errno)));
}

void create_out_dir(const fs::path& dir) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec || !fs::is_directory(dir)) throw UsageError(fmt::format("--out '{}': cannot create folder: {}", dir.string(), ec.message()));
    remove_stale_temp_files(dir.string());  // of runs killed mid-write (their streamed metrics.csv included)
}

// stem -> file for the supported images of the ground-truth folder; ambiguous stems map to "".
std::unordered_map<std::string, std::string> index_masks(const std::string& dir) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) throw UsageError(fmt::format("--masks '{}' is not a folder", dir));
    std::unordered_map<std::string, std::string> by_stem;
    for (const fs::path& file : list_image_folder(dir)) {
        auto [it, inserted] = by_stem.emplace(file.stem().string(), file.string());
        if (!inserted) it->second.clear();
    }
    return by_stem;
}

std::string canonical_or_absolute(const fs::path& path) {
    std::error_code ec;
    fs::path result = fs::weakly_canonical(path, ec);
    if (ec) result = fs::absolute(path, ec);
    return result.lexically_normal().string();
}

// Refuses colliding outputs, outputs that would replace an input or a ground-truth mask, and (without
// --overwrite) outputs that exist.
void check_targets(const Run& run) {
    const bool metrics = !run.truth_paths.empty();
    std::unordered_map<std::string, size_t> owner;  // output file name -> input index
    auto claim = [&](const std::string& name, size_t index) {
        auto [it, inserted] = owner.emplace(name, index);
        if (!inserted)
            throw UsageError(fmt::format("inputs '{}' and '{}' would both write {}; rename one or predict them separately",
                                         run.paths[it->second], run.paths[index], (run.out_dir / name).string()));
    };
    for (size_t i = 0; i < run.paths.size(); ++i)
        for (const std::string& name : output_file_names(run.options, run.stems[i])) claim(name, i);
    for (const char* name : {kMetricsCsvName, kSummaryJsonName}) {
        if (name == std::string(kMetricsCsvName) && !metrics) continue;
        if (auto it = owner.find(name); it != owner.end())
            throw UsageError(fmt::format("input '{}' would write {}, which predict writes for its report", run.paths[it->second],
                                         (run.out_dir / name).string()));
    }

    std::unordered_map<std::string, std::string> protected_paths;  // canonical path -> what it is
    for (const std::string& path : run.paths) protected_paths.emplace(canonical_or_absolute(path), "an input image");
    for (const std::string& path : run.truth_paths) protected_paths.emplace(canonical_or_absolute(path), "a ground-truth mask");
    const fs::path out_canonical(canonical_or_absolute(run.out_dir));
    for (const auto& [name, index] : owner) {
        auto it = protected_paths.find((out_canonical / name).string());
        if (it != protected_paths.end())
            throw UsageError(fmt::format("{} would replace {} ({}); choose another --out", (run.out_dir / name).string(),
                                         it->second, it->first));
    }
    if (run.options.overwrite) return;

    std::vector<std::string> names;  // in input order, then the metrics files
    names.reserve(owner.size() + 2);
    for (size_t i = 0; i < run.paths.size(); ++i)
        for (const std::string& name : output_file_names(run.options, run.stems[i])) names.push_back(name);
    if (metrics) names.push_back(kMetricsCsvName);
    names.push_back(kSummaryJsonName);
    size_t existing = 0;
    std::string first;
    for (const std::string& name : names) {
        std::error_code ec;
        const fs::path target = run.out_dir / name;
        if (fs::exists(fs::symlink_status(target, ec))) {
            if (existing++ == 0) first = target.string();
        }
    }
    if (existing > 0)
        throw UsageError(fmt::format("{} exists{}; pass --overwrite to replace outputs", first,
                                     existing > 1 ? fmt::format(" (and {} more outputs)", existing - 1) : ""));
}

// Inputs, their output names and ground truth, and every check on them that needs no decode.
Run plan_run(const PredictOptions& options) {
    check_model_path(options.model_path);
    Run run{options, collect_input_images(options.inputs), {}, {}, {}, 0, 0, 0, 0, 0};
    if (run.paths.empty()) throw UsageError("no images found in the inputs (JPEG, PNG, TIFF or BMP by extension)");
    run.stems.reserve(run.paths.size());
    for (const std::string& path : run.paths) {
        run.stems.push_back(fs::path(path).stem().string());
        if (run.stems.back().empty()) throw UsageError(fmt::format("input '{}' has no file name to name its mask after", path));
    }
    if (!options.masks_dir.empty()) {
        const auto masks = index_masks(options.masks_dir);
        run.truth_paths.reserve(run.paths.size());
        size_t missing = 0;
        std::string first_missing;
        for (size_t i = 0; i < run.paths.size(); ++i) {
            auto it = masks.find(run.stems[i]);
            if (it != masks.end() && it->second.empty())
                throw UsageError(fmt::format("--masks '{}' has several files with stem '{}'", options.masks_dir, run.stems[i]));
            if (it == masks.end() && missing++ == 0) first_missing = run.paths[i];
            run.truth_paths.push_back(it == masks.end() ? std::string() : it->second);
        }
        if (missing > 0)
            throw UsageError(fmt::format("no ground-truth mask in '{}' for '{}'{}", options.masks_dir, first_missing,
                                         missing > 1 ? fmt::format(" (and {} more images)", missing - 1) : ""));
    }
    run.out_dir = options.out_dir;
    check_out_dir(run.out_dir);
    check_targets(run);
    return run;
}

struct LoadedModel {
    ResUNetConfig config;
    Runner runner;
    bool stored_scales = false;  // an int8 file carrying static activation scales
    std::string engine;          // for the report
    std::string plan_id;         // the plan the engine runs (engine/plan.h)
};

// Loads the weights, infers the configuration and compiles the engine; any failure is a UsageError.
LoadedModel load_model(const PredictOptions& options, std::FILE* log) {
    const std::string& path = options.model_path;
    ModelFile loaded = load_model_file(path, options.size);
    const SafetensorsFile& file = loaded.file;
    const Graph& graph = loaded.graph;
    LoadedModel model;
    model.config = loaded.config;
    if (model.config.out_channels != 1)
        throw UsageError(fmt::format("--model '{}' has {} output channels; predict needs a one-channel (polyp) model", path,
                                     model.config.out_channels));
    if (options.size > 0 && model.config.height != options.size && log)
        fmt::print(log, "note: the model file says size {}; --size {} applies only to files without that metadata\n",
                   model.config.height, options.size);
    const bool int8_file = is_int8_weights(file.tensors);
    model.stored_scales = int8_file && has_stored_static_scales(file.tensors);
    check_stored_scales_precision(path, model.stored_scales, options.precision, options.precision_given);
    check_calibration_count_used(options.precision, model.stored_scales, options.calibration_given);
    check_engine_flags(options.tuning, options.precision == Precision::fp32);
    try {
        if (options.precision == Precision::fp32) {
            if (int8_file) throw UsageError(fmt::format("--model '{}' is an int8 file; --precision fp32 needs fp32 weights", path));
            model.runner.fp32 = std::make_unique<Engine>(graph, file.tensors, fp32_engine_options(options.tuning, options.threads, 1));
            model.engine = "fp32";
            model.plan_id = model.runner.fp32->plan().id();
        } else {
            QuantOptions quant_options = int8_engine_options(options.tuning, options.threads, 1);
            quant_options.mode = options.precision == Precision::static_int8 ? ScaleMode::static_calibrated : ScaleMode::dynamic;
            model.runner.int8 = std::make_unique<QuantEngine>(graph, file.tensors, quant_options);
            model.engine = int8_engine_label(*model.runner.int8, model.stored_scales, options.tuning);
            model.plan_id = model.runner.int8->plan().id();
        }
    } catch (const UsageError&) {
        throw;
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model '{}': {}", path, one_line(e.what())));
    }
    return model;
}

// static-int8 without stored scales: calibrates on the fixed synthetic set (synthetic_calibration_images, never
// on the run's own inputs, so a mask never depends on what else is in the run); returns how many images.
int calibrate_on_fixed_set(const Run& run, LoadedModel& model, InferenceThread& inference_thread) {
    const int count = run.options.calibration_images;
    const std::vector<float> calibration = synthetic_calibration_images(count, run.size);
    inference_thread.run([&] { model.runner.int8->calibrate(calibration.data(), count); });
    return count;
}

void print_summary(std::FILE* out, const Run& run, const PredictReport& report) {
    fmt::print(out, "predict: {} images: {} ok, {} failed\n", report.images_total, report.images_ok, report.images_failed);
    fmt::print(out, "  engine      {}, batch {}\n", report.engine, run.options.batch);
    fmt::print(out, "  decode      {}\n", run.options.fast_decode
                                                ? "--fast-decode: JPEGs at 1/2..1/8 scale, at least twice the model size"
                                                : "full resolution");
    fmt::print(out, "  setup       {:.2f} s (load, compile{})\n", report.setup_seconds,
               report.engine.find("calibrated") != std::string::npos ? ", calibrate" : "");
    fmt::print(out, "  wall        {:.2f} s for the images: {:.1f} images/s end to end\n", report.pipeline_seconds,
               report.images_per_second());
    fmt::print(out, "  inference   {:.2f} s in the engine: {:.1f} images/s\n", report.inference_seconds,
               report.inference_images_per_second());
    fmt::print(out, "  peak RSS    {:.1f} MiB (VmHWM{})\n", static_cast<double>(report.peak_rss_bytes) / (1024.0 * 1024.0),
               report.ranks > 1 ? ", the largest rank's" : "");
    if (report.ranks > 1)
        fmt::print(out, "  ranks       {} (images sharded in whole batches), {} threads each; inference time summed over ranks\n",
                   report.ranks, report.threads);
    fmt::print(out, "  masks       {}\n", (run.out_dir / "<stem>.png").string());
    if (report.have_metrics) {
        fmt::print(out, "metrics over {} images (per image: mean ± std [min, max]):\n", report.dice.count);
        fmt::print(out, "{}\n{}\n{}\n", format_summary_line("dice", report.dice), format_summary_line("iou", report.iou),
                   format_summary_line("mean_iou", report.mean_iou));
        fmt::print(out, "  pooled    dice {:.4f}  iou {:.4f}  mean_iou {:.4f}\n", report.pooled.dice(), report.pooled.iou(),
                   report.pooled.mean_iou());
        fmt::print(out, "  written   {}\n", report.metrics_csv_path);
    }
    fmt::print(out, "  summary     {}\n", report.summary_json_path);
    std::fflush(out);
}

// The last stage's state, in input order: counts, failures, metrics rows. Alone, rows stream to metrics.csv (nothing
// per image is held but 3 doubles); under mpirun they are kept as text, to be gathered on rank 0.
class Collector {
  public:
    Collector(const Run& run, PredictReport& report, ProgressConsole& console, bool stream)
        : run_(run), report_(report), console_(console) {
        report.summary_json_path = (run.out_dir / kSummaryJsonName).string();
        if (run.truth_paths.empty()) return;
        report.have_metrics = true;
        report.metrics_csv_path = (run.out_dir / kMetricsCsvName).string();
        if (!stream) return;
        csv_ = std::make_unique<StreamedFile>(report.metrics_csv_path);
        fmt::print(csv_->get(), "{}", kMetricsCsvHeader);
    }

    void add(const Item& item) {
        summary_rows_ += summary_row(run_, item) + "\n";
        if (!item.error.empty()) {
            ++report_.images_failed;
            report_.failures.push_back({run_.paths[item.index], item.error});
            console_.line("error: " + item.error);
            // What it wrote before failing, or (with --overwrite) an earlier run's file of that name: no output
            // of a failed image may look like this run's.
            for (const std::string& name : output_file_names(run_.options, run_.stems[item.index]))
                ::unlink((run_.out_dir / name).c_str());
            return;
        }
        ++report_.images_ok;
        if (!item.scored) return;
        const MaskMetrics& m = item.metrics;
        const std::string row = fmt::format("{},{},{},{:.6f},{:.6f},{:.6f}\n", csv_field(run_.stems[item.index]), item.width,
                                            item.height, m.dice, m.iou, m.mean_iou);
        if (csv_) fmt::print(csv_->get(), "{}", row);
        else rows_ += row;
        dice_.push_back(m.dice);
        iou_.push_back(m.iou);
        mean_iou_.push_back(m.mean_iou);
        report_.pooled.add(m.counts);
    }

    // Alone: summaries, metrics.csv renamed into place, summary.json.
    void finish() {
        summarize_metrics();
        if (csv_) csv_->commit();
        write_file_atomic(report_.summary_json_path, summary_text());
    }

    // Under mpirun: what this rank collected, and the report's figures, as bytes for gather().
    std::string pack(const PipelineStats& stats) const {
        Packer out;
        out.u64(report_.images_ok);
        out.u64(report_.images_failed);
        out.u64(report_.failures.size());
        for (const FailedImage& f : report_.failures) {
            out.str(f.path);
            out.str(f.message);
        }
        out.str(rows_);
        out.str(summary_rows_);
        out.u64(dice_.size());
        for (size_t i = 0; i < dice_.size(); ++i) {
            out.f64(dice_[i]);
            out.f64(iou_[i]);
            out.f64(mean_iou_[i]);
        }
        const PixelCounts& counts = report_.pooled.totals();
        for (uint64_t c : {counts.true_positive, counts.false_positive, counts.false_negative, counts.true_negative}) out.u64(c);
        out.f64(stats.pipeline_seconds);
        out.f64(stats.inference_seconds);
        out.u64(stats.images_inferred);
        out.u64(peak_rss_bytes());
        return out.bytes();
    }

    // Under mpirun: replaces what this rank collected by the ranks' packs, concatenated in rank order (the shards
    // are contiguous and in rank order, so this is input order). Every rank calls it with the same packs.
    void merge(const std::vector<std::string>& packs) {
        report_.images_ok = report_.images_failed = report_.images_inferred = report_.peak_rss_bytes = 0;
        report_.pipeline_seconds = report_.inference_seconds = 0;
        report_.failures.clear();
        report_.pooled = PooledMetrics();
        rows_.clear();
        summary_rows_.clear();
        dice_.clear();
        iou_.clear();
        mean_iou_.clear();
        for (const std::string& pack : packs) {
            Unpacker in(pack);
            report_.images_ok += in.u64();
            report_.images_failed += in.u64();
            for (uint64_t n = in.u64(); n > 0; --n) {
                FailedImage failure;
                failure.path = in.str();
                failure.message = in.str();
                report_.failures.push_back(std::move(failure));
            }
            rows_ += in.str();
            summary_rows_ += in.str();
            for (uint64_t n = in.u64(); n > 0; --n) {
                dice_.push_back(in.f64());
                iou_.push_back(in.f64());
                mean_iou_.push_back(in.f64());
            }
            PixelCounts counts;
            counts.true_positive = in.u64();
            counts.false_positive = in.u64();
            counts.false_negative = in.u64();
            counts.true_negative = in.u64();
            report_.pooled.add(counts);
            report_.pipeline_seconds = std::max(report_.pipeline_seconds, in.f64());
            report_.inference_seconds += in.f64();
            report_.images_inferred += in.u64();
            report_.peak_rss_bytes = std::max<size_t>(report_.peak_rss_bytes, in.u64());
        }
        summarize_metrics();
    }

    // Under mpirun, on rank 0 after merge(): metrics.csv and summary.json, the same bytes as one process writes.
    void write_merged() const {
        if (report_.have_metrics) write_file_atomic(report_.metrics_csv_path, std::string(kMetricsCsvHeader) + rows_);
        write_file_atomic(report_.summary_json_path, summary_text());
    }

  private:
    void summarize_metrics() {
        if (!report_.have_metrics) return;
        report_.dice = summarize(dice_);
        report_.iou = summarize(iou_);
        report_.mean_iou = summarize(mean_iou_);
    }

    // summary.json: what was run and the scores; no timings or host names, so it depends on the inputs and the
    // tool's version only.
    std::string summary_text() const {
        nlohmann::json files = {kSummaryJsonName};
        if (report_.have_metrics) files.push_back(kMetricsCsvName);
        nlohmann::json failures = nlohmann::json::array();
        for (const FailedImage& f : report_.failures) failures.push_back({{"input", f.path}, {"error", f.message}});
        nlohmann::json json = {
            {"format", kPredictSummaryFormat},
            {"tool_version", tool_version("resunet")},
            {"model", run_.options.model_path},
            {"precision", precision_name(run_.options.precision)},
            {"engine", report_.engine},
            {"plan", report_.plan_id},
            {"model_size", run_.size},
            {"images",
             {{"total", report_.images_total}, {"ok", report_.images_ok}, {"failed", report_.images_failed}, {"scored", dice_.size()}}},
            {"threshold", run_.options.threshold},
            {"resize", "logits resized to the original size with INTER_LINEAR, foreground where the probability > threshold"},
            {"files", files},
            {"failures", failures},
        };
        if (report_.have_metrics) {
            json["per_image"] = {{"dice", metric_summary_json(report_.dice)}, {"iou", metric_summary_json(report_.iou)},
                                 {"mean_iou", metric_summary_json(report_.mean_iou)}};
            json["pooled"] = {{"dice", report_.pooled.dice()}, {"iou", report_.pooled.iou()}, {"mean_iou", report_.pooled.mean_iou()}};
        }
        json["rows"] = rows_json(summary_rows_);
        return json.dump(2) + "\n";
    }

    const Run& run_;
    PredictReport& report_;
    ProgressConsole& console_;
    std::unique_ptr<StreamedFile> csv_;          // alone: rows stream to disk
    std::string rows_;                           // under mpirun: this rank's rows (after merge: all rows)
    std::string summary_rows_;                   // summary.json's rows, one JSON object a line (after merge: all)
    std::vector<double> dice_, iou_, mean_iou_;  // for summarize()
};

}  // namespace

PredictReport run_predict(const PredictOptions& options) {
    const auto start = Clock::now();
    dist::Comm& comm = dist::Comm::world();
    const bool root = comm.rank() == 0;
    PredictOptions effective = options;
    if (comm.distributed() && effective.threads == 0) effective.threads = dist::threads_per_rank(0);
    std::FILE* info = root ? effective.log : nullptr;  // setup lines once per job, not once per rank

    std::optional<Run> planned;
    LoadedModel model;
    agree_on_setup([&] {
        check_options(effective);
        planned.emplace(plan_run(effective));  // before the model loads: a typo in a path costs no load time
    });
    // Rank 0 compiles first and caches its measured plans; the other ranks take them (the same masks as one process).
    agree_on_setup(
        [&] {
            model = load_model(effective, info);
            create_out_dir(planned->out_dir);
            if (effective.overwrite && root) {
                const size_t removed = remove_earlier_run(*planned);
                if (removed > 0 && info)
                    fmt::print(info, "--overwrite: removed the {} files of the earlier run in {} (its summary.json)\n", removed,
                               planned->out_dir.string());
            }
        },
        /*rank0_first=*/true);
    Run& run = *planned;
    run.size = model.config.height;
    run.input_floats = static_cast<size_t>(3) * run.size * run.size;
    run.output_floats = static_cast<size_t>(run.size) * run.size;
    // This rank's images: whole batches of the one-process order, so every batch holds the same images.
    const size_t batch = static_cast<size_t>(effective.batch);
    const size_t batches = (run.paths.size() + batch - 1) / batch;
    const auto [first_batch, end_batch] = dist::shard(batches, comm.rank(), comm.size());
    run.begin = std::min(first_batch * batch, run.paths.size());
    run.end = std::min(end_batch * batch, run.paths.size());

    std::optional<tbb::global_control> thread_limit;
    if (effective.threads > 0)
        thread_limit.emplace(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(effective.threads));
    const QuietOpenCvLog quiet_opencv;
    InferenceThread inference_thread;
    PredictReport report;
    report.images_total = run.paths.size();
    report.engine = model.engine;
    report.plan_id = model.plan_id;
    report.ranks = comm.size();
    report.threads = effective.threads;
    ProgressConsole console(effective.log, effective.progress && root, run.end - run.begin);
    const int threads = effective.threads > 0 ? effective.threads : tbb::this_task_arena::max_concurrency();
    if (info)
        console.line(fmt::format("resunet predict: {} images, model {} (width {}, depth {}, size {}), {}, plan {}, batch {}, {} threads{}",
                                 run.paths.size(), effective.model_path, model.config.width, model.config.depth, run.size,
                                 model.engine, model.plan_id, effective.batch, threads,
                                 comm.distributed() ? fmt::format(" on each of {} ranks", comm.size()) : std::string()));
    if (effective.precision == Precision::static_int8 && !model.stored_scales) {
        const auto calibration_start = Clock::now();
        const int used = calibrate_on_fixed_set(run, model, inference_thread);
        if (info)
            console.line(fmt::format("static-int8: the model stores no static scales; calibrated on the fixed synthetic set of {} "
                                     "images ({:.2f} s; `resunet quantize` stores scales from real images)",
                                     used, seconds_since(calibration_start)));
        report.engine = fmt::format("int8 (static scales, calibrated on the fixed synthetic set of {} images)", used);
    }
    report.setup_seconds = seconds_since(start);

    Collector collector(run, report, console, /*stream=*/!comm.distributed());
    PipelineStats stats;
    const auto pipeline_start = Clock::now();
    run_pipeline(
        run, model.runner, inference_thread, [&](const Item& item) { collector.add(item); },
        [&](size_t done) { console.update(done, seconds_since(pipeline_start), done == run.end - run.begin); }, stats);
    if (!comm.distributed()) {
        report.pipeline_seconds = stats.pipeline_seconds;
        report.inference_seconds = stats.inference_seconds;
        report.images_inferred = stats.images_inferred;
        collector.finish();
        report.peak_rss_bytes = peak_rss_bytes();
    } else {
        // Rank 0 gathers every rank's results and sends the whole back, so every rank ends with the same report
        // (and exit status); a failure writing the merged files on rank 0 still reaches every rank.
        std::string merged;
        std::vector<std::string> packs = comm.gather(collector.pack(stats));
        if (root) {
            Packer all;
            all.u64(packs.size());
            for (const std::string& pack : packs) all.str(pack);
            merged = all.bytes();
        }
        comm.broadcast(merged);
        Unpacker in(merged);
        packs.assign(in.u64(), std::string());
        for (std::string& pack : packs) pack = in.str();
        collector.merge(packs);
        std::string write_error;
        if (root) {
            try {
                collector.write_merged();
            } catch (const std::exception& e) {
                write_error = one_line(e.what());
            }
        }
        double failed = write_error.empty() ? 0.0 : 1.0;
        comm.allreduce_max(&failed, 1);
        if (!write_error.empty()) throw Error(write_error);
        if (failed > 0) throw Error("rank 0 could not write metrics.csv or summary.json");
    }
    if (effective.out && root) print_summary(effective.out, run, report);
    return report;
}

size_t peak_rss_bytes() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.rfind("VmHWM:", 0) == 0) return static_cast<size_t>(std::stoull(line.substr(6))) * 1024;
    }
    return 0;
}

double PredictReport::images_per_second() const {
    return pipeline_seconds > 0 ? static_cast<double>(images_ok + images_failed) / pipeline_seconds : 0.0;
}

double PredictReport::inference_images_per_second() const {
    return inference_seconds > 0 ? static_cast<double>(images_inferred) / inference_seconds : 0.0;
}

int predict_command(const PredictOptions& options) {
    return run_command("predict", [&] { return run_predict(options).exit_code(); });
}

void add_predict_command(CLI::App& app) {
    auto options = std::make_shared<PredictOptions>();
    auto force_progress = std::make_shared<bool>(false);
    CLI::App* command = app.add_subcommand(
        "predict", "Segment images with a model; write 0/255 PNG masks and summary.json (and metrics with --masks)");
    command->add_option("inputs", options->inputs, "Image files, folders of images (JPEG/PNG/TIFF/BMP, sorted) or @list.txt")
        ->required()
        ->type_name("INPUT");
    command->add_option("--model", options->model_path, "Model .safetensors (fp32, or int8 from `resunet quantize`)")
        ->required();
    auto precision = std::make_shared<std::string>("int8");
    CLI::Option* precision_option =
        command->add_option("--precision", *precision,
                            "int8 (scales computed per image, the default), fp32, or static-int8 (fixed scales: the "
                            "model file's, else calibrated); a file from `resunet quantize` runs its stored scales")
            ->check(precision_validator({"int8", "fp32", "static-int8"}))
            ->capture_default_str();
    command->add_option("--batch", options->batch,
                        "Images decoded and run together; masks do not depend on it")
        ->check(CLI::Range(1, 1024))->default_val(16);
    command->add_option("--threads", options->threads, "Worker threads for decoding and the model; 0 = all cores")
        ->check(CLI::Range(0, 4096))
        ->default_val(0);
    command->add_option("--out", options->out_dir, "Output folder (created if missing): <stem>.png masks and summary.json")
        ->required();
    command->add_flag("--overlay", options->overlay, "Also write <stem>_overlay.png: contour and tint over the image");
    command->add_flag("--save-probabilities", options->save_probabilities,
                      "Also write <stem>_probability.png: the polyp probability per pixel, 8-bit grey (0-255 = 0-1)");
    command->add_option("--threshold", options->threshold,
                        "Polyp where the probability is above this, between 0 and 1 (exclusive)")
        ->default_val(0.5);
    command->add_option("--masks", options->masks_dir,
                        "Ground-truth folder (masks matched by stem): adds metrics.csv and scores to --out");
    command->add_flag("--overwrite", options->overwrite,
                      "Replace existing outputs, and remove the files an earlier run listed in --out's summary.json "
                      "(default: refuse to start)");
    command->add_flag("--fast-decode", options->fast_decode,
                      "Decode JPEGs at a reduced scale, still at least twice the model size: faster for large images, "
                      "slightly different input. Not with --overlay");
    command->add_option("--size", options->size, "Model input size for files without 'resunet.size' metadata (default 224)")
        ->check(CLI::Range(1, 65536));
    CLI::Option* calibration = command->add_option("--calibration-count", options->calibration_images,
                        "static-int8 with a model that stores no scales: calibrate on a fixed synthetic set of N images "
                        "(the same in every run); a `resunet quantize` file is used as is")
        ->check(CLI::Range(1, 4096))
        ->default_val(16);
    add_renamed_flag(*command, "--calibration-images", "--calibration-count");
    add_engine_tuning_flags(*command, options->tuning);
    command->add_flag("--progress", *force_progress, "Show the progress bar even when stderr is not a terminal");
    command->callback([options, force_progress, precision, precision_option, calibration] {
        PredictOptions run_options = *options;
        run_options.calibration_given = calibration->count() > 0;
        run_options.precision = parse_precision(*precision);
        run_options.precision_given = precision_option->count() > 0;
        run_options.progress = *force_progress || ::isatty(STDERR_FILENO) != 0;
        const int code = predict_command(run_options);
        if (code != 0) throw CLI::RuntimeError(code);
    });
}

}  // namespace resunet
