#include "apps/lib/train_cli.h"
#include "apps/lib/quantize_cli.h"

#include <omp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/dataset.h"
#include "data/loader.h"
#include "data/split.h"
#include "engine/engine.h"
#include "engine/plan_cache.h"
#include "graph/atomic_file.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kConfigName = "config.toml";
constexpr const char* kSplitName = "split.json";
constexpr const char* kMetricsName = "metrics.csv";
constexpr const char* kLastName = "last.safetensors";
constexpr const char* kBestName = "best.safetensors";
constexpr const char* kLogName = "train.log";
constexpr const char* kCurvesName = "curves.png";
constexpr const char* kCvSummaryName = "cv_summary.json";
constexpr const char* kMetricsHeader =
    "epoch,lr,train_loss,val_dice,val_iou,val_miou,epoch_seconds,loader_wait_seconds,loader_wait_share";

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Exception text as one line (OpenCV's messages span several).
std::string one_line(std::string text) {
    for (char& c : text)
        if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    while (!text.empty() && text.back() == ' ') text.pop_back();
    return text;
}

int hardware_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}
int resolve_threads(int threads) { return threads > 0 ? threads : hardware_threads(); }
int auto_loader_threads(int threads) { return std::max(1, std::min(4, threads / 2)); }

std::string local_timestamp() {
    const std::time_t now = std::time(nullptr);
    std::tm parts{};
    localtime_r(&now, &parts);
    char text[32];
    std::strftime(text, sizeof text, "%Y-%m-%d %H:%M:%S", &parts);
    return text;
}

// One timestamped line appended to a run's train.log (opened per line: survives crashes, shared by nobody).
void append_log(const fs::path& path, const std::string& text) {
    std::FILE* file = std::fopen(path.c_str(), "a");
    if (!file) return;  // the log is a convenience; the run's files carry the results
    fmt::print(file, "{} {}\n", local_timestamp(), text);
    std::fclose(file);
}

std::string format_duration(double seconds) {
    const long total = std::lround(std::max(0.0, seconds));
    if (total >= 3600) return fmt::format("{}:{:02d}:{:02d}", total / 3600, (total / 60) % 60, total % 60);
    return fmt::format("{}:{:02d}", total / 60, total % 60);
}

// Lines and a one-line progress bar on one stream, from several threads without garbling.
class Console {
  public:
    Console(std::FILE* log, bool progress) : log_(log), progress_(progress && log) {}

    void line(const std::string& text) {
        if (!log_) return;
        std::lock_guard lock(mutex_);
        clear_bar();
        fmt::print(log_, "{}\n", text);
        std::fflush(log_);
    }

    void bar(const std::string& text) {
        if (!progress_) return;
        std::lock_guard lock(mutex_);
        fmt::print(log_, "\r{:<{}}", text, bar_width_);
        bar_width_ = std::max(bar_width_, text.size());
        std::fflush(log_);
    }

    bool progress() const { return progress_; }

  private:
    void clear_bar() {
        if (bar_width_ == 0) return;
        fmt::print(log_, "\r{}\r", std::string(bar_width_, ' '));
        bar_width_ = 0;
    }
    std::mutex mutex_;
    std::FILE* log_;
    bool progress_;
    size_t bar_width_ = 0;
};

// ---- flags and configuration files ----

// An option whose default (shown by --help and written by config_to_str) is the bound value's shortest text.
template <typename T>
CLI::Option* bind_option(CLI::App& app, const std::string& name, T& value, const std::string& help) {
    return app.add_option(name, value, help)->default_function([&value] { return fmt::format("{}", value); })->capture_default_str();
}

CLI::Option* bind_flag(CLI::App& app, const std::string& name, bool& value, const std::string& help) {
    return app.add_flag(name, value, help)
        ->default_function([&value] { return std::string(value ? "true" : "false"); })
        ->capture_default_str();
}

// `actions`: also the flags that say what to do now rather than what the run is (--resume).
void register_train_flags(CLI::App& app, TrainCommandOptions& o, bool actions) {
    bind_option(app, "--data", o.data_dir, "Dataset folder with images/ and masks/ (Kvasir-SEG layout) (required)");
    bind_option(app, "--out", o.out_dir, "Run folder: config, split, metrics, checkpoints, log, curves (required)");
    bind_option(app, "--width", o.width, "Channels of the first stage")->check(CLI::Range(1, 4096));
    bind_option(app, "--depth", o.depth, "Number of poolings")->check(CLI::Range(1, kMaxResUNetDepth));
    bind_option(app, "--size", o.size, "Model input size in pixels (square), divisible by 2^depth")->check(CLI::Range(1, 65536));
    bind_option(app, "--batch", o.batch, "Images per training step")->check(CLI::Range(1, 4096));
    bind_option(app, "--epochs", o.epochs, "Epochs of the whole run")->check(CLI::Range(1, 1000000));
    bind_option(app, "--lr", o.learning_rate, "Adam learning rate of epoch 1")->check(CLI::PositiveNumber);
    bind_option(app, "--lr-step", o.lr_step, "StepLR: epochs between decays")->check(CLI::Range(1, 1000000));
    bind_option(app, "--lr-gamma", o.lr_gamma, "StepLR: factor per decay")->check(CLI::PositiveNumber);
    bind_option(app, "--loss", o.loss, "Training loss")->check(CLI::IsMember({"dice+bce", "dice", "bce"}));
    bind_option(app, "--seed", o.seed, "Seed of split, folds, initial weights, shuffle and augmentation");
    bind_option(app, "--max-angle", o.max_angle, "Augmentation: largest rotation in degrees (p 0.5; flips p 0.5)")
        ->check(CLI::Range(0.0, 180.0));
    bind_option(app, "--threads", o.threads, "oneDNN/OpenMP threads (cv: the budget of all folds); 0 = all cores")
        ->check(CLI::Range(0, 4096));
    bind_option(app, "--loader-threads", o.loader_threads, "Data loader threads per run; 0 = max(1, min(4, threads / 2))")
        ->check(CLI::Range(0, 4096));
    bind_option(app, "--split", o.split_path, "Train/test split file (default: RUN/split.json, made with --seed if missing)");
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
    register_train_flags(app, o.train, actions);
    bind_option(app, "--folds", o.folds, "k of k-fold cross-validation over the training side of the split")->check(CLI::Range(2, 1000));
    bind_option(app, "--parallel-folds", o.parallel_folds, "Folds trained side by side (K)")->check(CLI::Range(1, 1000));
    bind_option(app, "--threads-per-fold", o.threads_per_fold, "oneDNN threads of each fold (T); 0 = max(1, threads / K)")
        ->check(CLI::Range(0, 4096));
}

Precision parse_precision(const std::string& text);

void register_eval_flags(CLI::App& app, EvalCommandOptions& o) {
    bind_option(app, "--model", o.model_path, "Model .safetensors: fp32 weights (e.g. RUN/best.safetensors) or int8 (required)");
    bind_option(app, "--data", o.data_dir, "Dataset folder with images/ and masks/ (required)");
    bind_option(app, "--split", o.split_path, "Split file (e.g. RUN/split.json); default: the seeded 80/20 split `train` makes");
    bind_option(app, "--seed", o.seed, "Seed of the default split");
    app.add_option_function<std::string>(
           "--precision", [&o](const std::string& text) { o.precision = parse_precision(text); },
           "int8 (dynamic scales, the default of eval and predict: the paper's deployed path), fp32, or static-int8 "
           "(calibrated scales)")
        ->check(CLI::IsMember({"fp32", "int8", "static-int8"}))
        ->default_str(precision_name(o.precision));
    bind_option(app, "--batch", o.batch,
                "Images loaded together and passed to one engine call, which runs them one image per pass "
                "(micro-batch 1): scores do not depend on it")
        ->check(CLI::Range(1, 4096));
    bind_option(app, "--threads", o.threads, "Engine and loader threads; 0 = all cores")->check(CLI::Range(0, 4096));
    bind_option(app, "--limit", o.limit, "Score only the first N test images; 0 = all")->check(CLI::Range(0, 100000000));
    app.add_option("--size", o.size, "Model input size for files without 'resunet.size' metadata (default 224)")
        ->check(CLI::Range(1, 65536));
    bind_option(app, "--calibration-images", o.calibration_images,
         "static-int8 without stored scales: calibrate on the first N images (sorted ids) of the split's train side, "
         "the set `resunet quantize --data --split` uses by default")
        ->check(CLI::Range(1, 4096));
    bind_flag(app, "--skip-bad", o.skip_bad, "Skip unreadable image/mask pairs instead of refusing the dataset");
    bind_option(app, "--json", o.json_path, "Also write the report to this JSON file");
}

Precision parse_precision(const std::string& text) {
    if (text == "fp32") return Precision::fp32;
    if (text == "static-int8") return Precision::static_int8;
    if (text == "int8") return Precision::int8;
    throw UsageError(fmt::format("--precision must be fp32, int8 or static-int8, got '{}'", text));
}

LossKind parse_loss(const std::string& text) {
    if (text == "dice+bce") return LossKind::dice_bce;
    if (text == "dice") return LossKind::dice;
    if (text == "bce") return LossKind::bce;
    throw UsageError(fmt::format("--loss must be dice+bce, dice or bce, got '{}'", text));
}

// Key -> value text of a CLI11 config (comments and sections dropped).
std::map<std::string, std::string> parse_config_text(const std::string& text, const std::string& what) {
    std::istringstream in(text);
    std::vector<CLI::ConfigItem> items;
    try {
        items = CLI::ConfigTOML().from_config(in);
    } catch (const CLI::Error& e) {
        throw UsageError(fmt::format("{}: cannot parse: {}", what, one_line(e.what())));
    }
    std::map<std::string, std::string> values;
    for (const CLI::ConfigItem& item : items) {
        if (item.name == "++" || item.name == "--") continue;
        std::string joined;
        for (const std::string& input : item.inputs) joined += (joined.empty() ? "" : ",") + input;
        values[item.name] = joined;
    }
    return values;
}

// Refuses a run folder whose config.toml differs from `config_text` in a key that changes the results.
void check_same_config(const fs::path& run_dir, const std::string& config_text, bool resume) {
    const fs::path path = run_dir / kConfigName;
    std::error_code ec;
    if (!fs::exists(path, ec)) return;
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) throw UsageError(fmt::format("{}: cannot read", path.string()));
    const auto before = parse_config_text(text.str(), path.string());
    const auto now = parse_config_text(config_text, "the flags");
    // Keys that say how fast or where, not what: threads (folds' numbers depend on T, but T is the user's call),
    // the folder itself, and (when resuming) the number of epochs, which a resumed run may raise.
    std::set<std::string> ignored = {"threads", "loader-threads", "parallel-folds", "threads-per-fold", "out"};
    if (resume) ignored.insert("epochs");
    std::vector<std::string> differences;
    std::set<std::string> keys;
    for (const auto& [key, value] : before) keys.insert(key);
    for (const auto& [key, value] : now) keys.insert(key);
    for (const std::string& key : keys) {
        if (ignored.count(key)) continue;
        auto a = before.find(key), b = now.find(key);
        const std::string was = a == before.end() ? "(unset)" : a->second;
        const std::string is = b == now.end() ? "(unset)" : b->second;
        if (was != is) differences.push_back(fmt::format("{} = {} there, {} now", key, was, is));
    }
    if (differences.empty()) return;
    constexpr size_t kShown = 3;
    std::string listed;
    for (size_t i = 0; i < std::min(kShown, differences.size()); ++i) listed += (i ? "; " : "") + differences[i];
    if (differences.size() > kShown) listed += fmt::format("; and {} more", differences.size() - kShown);
    throw UsageError(fmt::format("--out '{}' holds a run with a different configuration ({}); {}", run_dir.string(), listed,
                                 resume ? "resume it with its own flags (--config RUN/config.toml)"
                                        : "choose another --out, or pass the same flags and --resume"));
}

// The flags' current values as a CLI11 TOML file. A value that does not read back unchanged is refused with a
// UsageError, since the run folder's config.toml must reproduce the run: found by fuzz_config, CLI11 2.3's reader
// takes '#' for a comment even inside quotes, so a path holding '#' cannot be stored.
std::string render_config(const std::function<void(CLI::App&)>& add_flags, const std::string& description) {
    CLI::App app{description};
    add_flags(app);
    const std::string text = app.config_to_str(/*default_also=*/true, /*write_description=*/true);
    std::istringstream in(text);
    for (const CLI::ConfigItem& item : app.get_config_formatter()->from_config(in)) {
        const CLI::Option* option = app.get_option_no_throw("--" + item.name);
        if (option == nullptr) continue;
        const std::string value = option->get_default_str();
        if (item.inputs.size() != 1 || item.inputs.front() != value)
            throw UsageError(fmt::format("--{} '{}' cannot be written to config.toml and read back unchanged{}; choose "
                                         "another value",
                                         item.name, one_line(value),
                                         value.find('#') != std::string::npos ? " (CLI11 reads '#' as a comment, even in quotes)"
                                                                              : ""));
    }
    return text;
}

// ---- run folders ----

// Creates the folder if needed and proves it writable with a probe file.
fs::path prepare_run_dir(const std::string& out, const char* flag) {
    if (out.empty()) throw UsageError(fmt::format("{} is required", flag));
    const fs::path dir(out);
    std::error_code ec;
    if (fs::exists(dir, ec) && !fs::is_directory(dir, ec)) throw UsageError(fmt::format("{} '{}' is not a folder", flag, out));
    fs::create_directories(dir, ec);
    if (ec) throw UsageError(fmt::format("{} '{}': cannot create folder: {}", flag, out, ec.message()));
    std::string probe = (dir / ".resunet-write-test.XXXXXX").string();
    const int fd = ::mkstemp(probe.data());
    if (fd < 0) throw UsageError(fmt::format("{} '{}' is not writable: {}", flag, out, std::strerror(errno)));
    ::close(fd);
    ::unlink(probe.c_str());
    return dir;
}

bool file_exists(const fs::path& path) {
    std::error_code ec;
    return fs::exists(path, ec);
}

Dataset load_dataset(const std::string& dir, bool skip_bad, int limit) {
    if (dir.empty()) throw UsageError("--data is required");
    std::error_code ec;
    if (!fs::exists(dir, ec)) throw UsageError(fmt::format("--data '{}' does not exist", dir));
    if (!fs::is_directory(dir, ec)) throw UsageError(fmt::format("--data '{}' is not a folder", dir));
    ScanOptions scan;
    scan.skip_bad = skip_bad;
    Dataset dataset;
    try {
        dataset = scan_dataset(dir, scan);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--data: {}", one_line(e.what())));
    }
    if (limit > 0 && static_cast<size_t>(limit) < dataset.samples.size()) dataset.samples.resize(static_cast<size_t>(limit));
    if (dataset.samples.size() < 2) throw UsageError(fmt::format("--data '{}': {} image/mask pairs, need at least 2", dir, dataset.size()));
    return dataset;
}

// The split of a run: --split, else RUN/split.json, else a new seeded one. `save` says RUN/split.json is missing.
Split resolve_split(const Dataset& dataset, const std::string& split_path, uint64_t seed, const fs::path& run_dir,
                    bool& save) {
    const fs::path run_split = run_dir / kSplitName;
    const bool have_run_split = file_exists(run_split);
    save = !have_run_split;
    auto load = [&](const std::string& path) {
        try {
            return load_split(path, dataset);
        } catch (const Error& e) {
            throw UsageError(one_line(e.what()));
        }
    };
    if (!split_path.empty()) {
        if (!file_exists(split_path)) throw UsageError(fmt::format("--split '{}' does not exist", split_path));
        Split split = load(split_path);
        if (have_run_split) {
            const Split existing = load(run_split.string());
            if (existing.train_ids != split.train_ids || existing.test_ids != split.test_ids)
                throw UsageError(fmt::format("--split '{}' differs from the run's {}", split_path, run_split.string()));
        }
        return split;
    }
    if (have_run_split) return load(run_split.string());
    try {
        return make_split(dataset, seed);
    } catch (const Error& e) {
        throw UsageError(one_line(e.what()));
    }
}

// Reads a checkpoint for --resume and refuses one of another model than the flags describe.
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

// The weights of --init, checked against the graph the flags describe (names, shapes, fp32); empty without --init.
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

void check_train_values(const TrainCommandOptions& o) {
    if (o.width < 1 || o.depth < 1 || o.size < 1 || o.batch < 1 || o.epochs < 1 || o.lr_step < 1)
        throw UsageError("--width, --depth, --size, --batch, --epochs and --lr-step must be positive");
    if (o.size % (1 << std::min(o.depth, 30)) != 0)
        throw UsageError(fmt::format("--size {} is not divisible by 2^depth = {}", o.size, 1 << std::min(o.depth, 30)));
    if (!(o.learning_rate > 0) || !std::isfinite(o.learning_rate)) throw UsageError("--lr must be positive");
    if (!(o.lr_gamma > 0) || !std::isfinite(o.lr_gamma)) throw UsageError("--lr-gamma must be positive");
    if (!(o.max_angle >= 0 && o.max_angle <= 180)) throw UsageError("--max-angle must be in [0, 180]");
    if (o.threads < 0 || o.loader_threads < 0 || o.limit < 0) throw UsageError("--threads, --loader-threads and --limit must be >= 0");
    parse_loss(o.loss);
}

// ---- metrics.csv and curves.png ----

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

// A step up from `value` to a round number (1, 2 or 5 times a power of ten).
double nice_ceiling(double value) {
    if (!(value > 0) || !std::isfinite(value)) return 1.0;
    const double power = std::pow(10.0, std::floor(std::log10(value)));
    for (double step : {1.0, 2.0, 5.0, 10.0})
        if (step * power >= value) return step * power;
    return 10.0 * power;
}

std::string tick_text(double value, double range) {
    if (range >= 10) return fmt::format("{:.0f}", value);
    if (range >= 1) return fmt::format("{:.1f}", value);
    return fmt::format("{:.2f}", value);
}

// One panel: axes with ticks and labels, and the curve of (epoch, value).
void draw_panel(cv::Mat& image, const cv::Rect& area, const std::vector<EpochRecord>& rows, double (*value_of)(const EpochRecord&),
                const std::string& title, const std::string& y_label, double y_max, const cv::Scalar& color) {
    const cv::Scalar black(0, 0, 0), grey(210, 210, 210);
    const int font = cv::FONT_HERSHEY_SIMPLEX;
    const int left = area.x + 64, right = area.x + area.width - 20, top = area.y + 34, bottom = area.y + area.height - 48;
    cv::putText(image, title, {area.x + 64, area.y + 22}, font, 0.55, black, 1, cv::LINE_AA);
    const int last_epoch = rows.empty() ? 1 : rows.back().epoch;
    const int first_epoch = rows.empty() ? 1 : rows.front().epoch;
    const double x_min = first_epoch - 0.5, x_max = std::max(last_epoch, first_epoch + 1) + 0.5;
    auto x_of = [&](double epoch) { return left + static_cast<int>(std::lround((epoch - x_min) / (x_max - x_min) * (right - left))); };
    auto y_of = [&](double v) { return bottom - static_cast<int>(std::lround(std::clamp(v / y_max, 0.0, 1.0) * (bottom - top))); };
    for (int i = 0; i <= 5; ++i) {  // y grid and ticks
        const double v = y_max * i / 5.0;
        const int y = y_of(v);
        cv::line(image, {left, y}, {right, y}, grey, 1);
        cv::line(image, {left - 4, y}, {left, y}, black, 1);
        const std::string text = tick_text(v, y_max);
        int baseline = 0;
        const cv::Size size = cv::getTextSize(text, font, 0.4, 1, &baseline);
        cv::putText(image, text, {left - 8 - size.width, y + size.height / 2}, font, 0.4, black, 1, cv::LINE_AA);
    }
    const int span = std::max(last_epoch, first_epoch + 1) - first_epoch + 1;
    const int step = std::max(1, static_cast<int>(nice_ceiling(span / 10.0)));
    for (int e = first_epoch; e <= std::max(last_epoch, first_epoch + 1); ++e) {  // x ticks
        if ((e - first_epoch) % step != 0 && e != last_epoch) continue;
        const int x = x_of(e);
        cv::line(image, {x, bottom}, {x, bottom + 4}, black, 1);
        const std::string text = std::to_string(e);
        int baseline = 0;
        const cv::Size size = cv::getTextSize(text, font, 0.4, 1, &baseline);
        cv::putText(image, text, {x - size.width / 2, bottom + 18}, font, 0.4, black, 1, cv::LINE_AA);
    }
    cv::line(image, {left, top}, {left, bottom}, black, 1);
    cv::line(image, {left, bottom}, {right, bottom}, black, 1);
    cv::putText(image, "epoch", {(left + right) / 2 - 20, bottom + 38}, font, 0.45, black, 1, cv::LINE_AA);
    // The y label, written horizontally then turned a quarter to the left.
    int baseline = 0;
    const cv::Size label_size = cv::getTextSize(y_label, font, 0.45, 1, &baseline);
    cv::Mat label(label_size.height + baseline + 4, label_size.width + 4, CV_8UC3, cv::Scalar(255, 255, 255));
    cv::putText(label, y_label, {2, label_size.height + 2}, font, 0.45, black, 1, cv::LINE_AA);
    cv::rotate(label, label, cv::ROTATE_90_COUNTERCLOCKWISE);
    const int label_y = std::max(area.y, (top + bottom) / 2 - label.rows / 2);
    if (label_y + label.rows <= image.rows && area.x + 4 + label.cols <= image.cols)
        label.copyTo(image(cv::Rect(area.x + 4, label_y, label.cols, label.rows)));
    std::vector<cv::Point> points;
    for (const EpochRecord& r : rows) points.emplace_back(x_of(r.epoch), y_of(value_of(r)));
    if (points.size() > 1) cv::polylines(image, points, false, color, 2, cv::LINE_AA);
    for (const cv::Point& p : points) cv::circle(image, p, 3, color, cv::FILLED, cv::LINE_AA);
}

void write_curves(const fs::path& path, const std::vector<EpochRecord>& rows, const std::string& title) {
    cv::Mat image(430, 1000, CV_8UC3, cv::Scalar(255, 255, 255));
    cv::putText(image, title, {16, 24}, cv::FONT_HERSHEY_SIMPLEX, 0.55, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    double loss_max = 0;
    for (const EpochRecord& r : rows)
        if (std::isfinite(r.train_loss)) loss_max = std::max(loss_max, r.train_loss);
    draw_panel(image, {0, 30, 500, 400}, rows, [](const EpochRecord& r) { return r.train_loss; }, "Training loss (mean over steps)",
               "train loss", nice_ceiling(loss_max * 1.05), cv::Scalar(180, 90, 20));
    draw_panel(image, {500, 30, 500, 400}, rows, [](const EpochRecord& r) { return r.val_dice; },
               "Validation Dice (per-image mean)", "val Dice", 1.0, cv::Scalar(40, 40, 200));
    std::vector<uchar> png;
    if (!cv::imencode(".png", image, png)) throw Error(fmt::format("{}: PNG encoding failed", path.string()));
    write_file_atomic(path.string(), {std::span<const uint8_t>(png.data(), png.size())});
}

// ---- one training run ----

struct TrainJob {
    const TrainCommandOptions* options = nullptr;
    const Dataset* dataset = nullptr;
    std::vector<size_t> train_indices;
    std::vector<size_t> val_indices;
    fs::path run_dir;
    uint64_t seed = 0;
    int threads = 1;
    int loader_threads = 1;
    std::string validation_name;          // for the log: which ids validate
    std::string label;                    // prefix of console lines ("fold 2: "), empty for `train`
    Console* console = nullptr;
    std::optional<Checkpoint> checkpoint;  // resume from it (already checked against the flags)
    const TensorMap* init = nullptr;       // else start from these weights (--init), when not empty
    std::map<std::string, std::string> checkpoint_metadata;  // stored with every last.safetensors
};

double metadata_number(const std::map<std::string, std::string>& metadata, const std::string& key, double fallback) {
    auto it = metadata.find(key);
    if (it == metadata.end()) return fallback;
    try {
        return std::stod(it->second);
    } catch (const std::exception&) {
        return fallback;
    }
}

TrainReport run_job(TrainJob& job) {
    const TrainCommandOptions& o = *job.options;
    omp_set_num_threads(job.threads);
    const fs::path log_path = job.run_dir / kLogName;
    auto note = [&](const std::string& text) {
        append_log(log_path, text);
        if (job.console) job.console->line(job.label + text);
    };

    // A run killed mid-write (kill -9) leaves a temp file beside the checkpoint it was replacing.
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
    Trainer trainer(graph, init_weights(graph, job.seed), train_options);

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
    note(fmt::format("validation after each epoch: {} ({} images); val_* = per-image means at original size", job.validation_name,
                     job.val_indices.size()));

    const auto run_start = Clock::now();
    size_t batches_done = 0;
    const size_t batches_total = batches * static_cast<size_t>(o.epochs - start_epoch);
    double last_bar = -1.0;
    for (int epoch = start_epoch; epoch < o.epochs; ++epoch) {
        const auto epoch_start = Clock::now();
        const double learning_rate = trainer.learning_rate();
        double loss_sum = 0;
        size_t steps = 0;
        EpochRecord row;
        try {
            loader.start_epoch(static_cast<uint64_t>(epoch));
            Batch batch;
            while (loader.next(batch)) {
                loss_sum += trainer.step(batch.images.f32(), batch.masks.f32());
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

            EvalResult val;
            {
                EngineOptions engine_options;
                engine_options.threads = job.threads;
                engine_options.tune = Tuning::off;  // once per epoch, new weights: a plan is not worth measuring here
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
            write_curves(job.run_dir / kCurvesName, report.epochs,
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
        } catch (const UsageError&) {
            throw;
        } catch (const std::exception& e) {
            const std::string where = steps < batches ? fmt::format("epoch {}, batch {}/{}", epoch + 1, steps + 1, batches)
                                                      : fmt::format("epoch {} (after training, saving or validating)", epoch + 1);
            const std::string kept = epoch > 0 ? fmt::format("{} keeps epoch {}", (job.run_dir / kLastName).string(), epoch)
                                               : std::string("no checkpoint was written yet");
            const std::string message = fmt::format("{}: {}; {}", where, one_line(e.what()), kept);
            note("stopped: " + message);
            throw Error(message);
        }
    }
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

nlohmann::json summary_json(const MetricSummary& s) {
    auto number = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
    return {{"count", s.count}, {"mean", number(s.mean)}, {"std", number(s.std)}, {"min", number(s.min)}, {"max", number(s.max)}};
}

std::string mean_std(const MetricSummary& s) {
    if (s.count == 0) return "n/a";
    return fmt::format("{:.4f} ± {:.4f}", s.mean, s.std);
}

}  // namespace

// ---- public: flags and configuration ----

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

void apply_config_file(CLI::App& command) {
    CLI::Option* config = command.get_config_ptr();
    if (config == nullptr || config->count() == 0) return;
    const std::string path = config->as<std::string>();
    const std::shared_ptr<CLI::Config> formatter = command.get_config_formatter();
    const std::vector<CLI::ConfigItem> items = formatter->from_file(path);  // CLI::FileError when unreadable
    for (const CLI::ConfigItem& item : items) {
        if (item.name == "++" || item.name == "--") continue;
        if (!item.parents.empty() && item.parents.front() != command.get_name()) continue;  // another command's section
        CLI::Option* option = command.get_option_no_throw("--" + item.name);
        if (option == nullptr) throw CLI::ConfigError::Extras(item.fullname() + " in " + path);
        if (!option->get_configurable()) throw CLI::ConfigError::NotConfigurable(item.fullname());
        if (option->count() > 0) continue;  // given on the command line
        if (option->get_expected_min() == 0) {
            option->add_result(option->get_flag_value(item.name, formatter->to_flag(item)));
        } else {
            option->add_result(item.inputs);
        }
        option->run_callback();  // validators, then the bound variable
    }
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

bool CvReport::all_ok() const {
    return std::all_of(folds.begin(), folds.end(), [](const FoldReport& f) { return f.ok; });
}

// ---- train ----

TrainReport run_train(const TrainCommandOptions& options) {
    check_train_values(options);
    Console console(options.log, options.progress);
    const Dataset dataset = load_dataset(options.data_dir, options.skip_bad, options.limit);
    const fs::path run_dir = prepare_run_dir(options.out_dir, "--out");
    const std::string config_text = train_config_text(options);
    check_same_config(run_dir, config_text, options.resume);
    const fs::path last = run_dir / kLastName;
    const bool have_checkpoint = file_exists(last);
    if (!options.resume && have_checkpoint)
        throw UsageError(fmt::format("--out '{}' already holds a run ({} exists); pass --resume to continue it, or choose another --out",
                                     options.out_dir, last.string()));
    if (options.resume && !have_checkpoint && !file_exists(run_dir / kConfigName))
        throw UsageError(fmt::format("--resume: '{}' holds no run (no {} and no {})", options.out_dir, kConfigName, kLastName));
    std::optional<Checkpoint> checkpoint;
    if (options.resume && have_checkpoint) checkpoint = check_checkpoint(last, options);
    const TensorMap init = checkpoint ? TensorMap{} : load_init_weights(options);
    bool save_split_file = false;
    const Split split = resolve_split(dataset, options.split_path, options.seed, run_dir, save_split_file);
    TrainJob job;
    job.options = &options;
    job.dataset = &dataset;
    try {
        job.train_indices = indices_of(dataset, split.train_ids);
        job.val_indices = indices_of(dataset, split.test_ids);
    } catch (const Error& e) {
        throw UsageError(one_line(e.what()));
    }
    require_batch_fits(job.train_indices.size(), options.batch, "the training side of the split");
    if (job.val_indices.empty()) throw UsageError("the test side of the split is empty");

    // Every check passed: the run starts here.
    write_file_atomic((run_dir / kConfigName).string(), config_text);
    if (save_split_file) save_split(split, (run_dir / kSplitName).string());
    job.run_dir = run_dir;
    job.seed = options.seed;
    job.threads = resolve_threads(options.threads);
    job.loader_threads = options.loader_threads > 0 ? options.loader_threads : auto_loader_threads(job.threads);
    job.validation_name = fmt::format("the test side of {} (seed {}, {} train / {} test ids)", (run_dir / kSplitName).string(),
                                      split.seed, split.train_ids.size(), split.test_ids.size());
    job.console = &console;
    job.checkpoint = std::move(checkpoint);
    job.init = &init;
    job.checkpoint_metadata = config_metadata(options);
    append_log(run_dir / kLogName, fmt::format("resunet train {} ({} pairs in {}{})", options.resume ? "--resume" : "start",
                                               dataset.size(), options.data_dir,
                                               dataset.skipped.empty() ? "" : fmt::format(", {} skipped", dataset.skipped.size())));
    for (const SkippedFile& skipped : dataset.skipped)
        append_log(run_dir / kLogName, fmt::format("skipped {}: {}", skipped.file, skipped.reason));
    TrainReport report = run_job(job);
    if (options.out) {
        if (const EpochRecord* r = report.last())
            fmt::print(options.out,
                       "resunet train: {} epochs in {}; final val Dice {:.4f}, IoU {:.4f}, mIoU {:.4f}; best val Dice {:.4f} "
                       "(epoch {}, {}); loader wait {:.1f}% of the training loop\n",
                       r->epoch, report.run_dir, r->val_dice, r->val_iou, r->val_miou, report.best_val_dice, report.best_epoch,
                       (run_dir / kBestName).string(), 100.0 * report.loader_wait_share());
    }
    return report;
}

int train_command(const TrainCommandOptions& options) {
    return run_command("train", [&] {
        run_train(options);
        return 0;
    });
}

// ---- cv ----

CvReport run_cv(const CvCommandOptions& options) {
    const auto start = Clock::now();
    const TrainCommandOptions& train = options.train;
    check_train_values(train);
    if (options.folds < 2) throw UsageError(fmt::format("--folds must be at least 2, got {}", options.folds));
    if (options.parallel_folds < 1) throw UsageError("--parallel-folds must be at least 1");
    if (options.threads_per_fold < 0) throw UsageError("--threads-per-fold must be >= 0");
    Console console(train.log, false);
    const Dataset dataset = load_dataset(train.data_dir, train.skip_bad, train.limit);
    const fs::path run_dir = prepare_run_dir(train.out_dir, "--out");
    const std::string config_text = cv_config_text(options);
    check_same_config(run_dir, config_text, train.resume);
    if (train.resume && !file_exists(run_dir / kConfigName))
        throw UsageError(fmt::format("--resume: '{}' holds no cross-validation (no {})", train.out_dir, kConfigName));
    bool save_split_file = false;
    const Split split = resolve_split(dataset, train.split_path, train.seed, run_dir, save_split_file);
    std::vector<Fold> folds;
    try {
        folds = make_folds(split.train_ids, options.folds, train.seed);
    } catch (const Error& e) {
        throw UsageError(one_line(e.what()));
    }

    const int budget = resolve_threads(train.threads);
    const int parallel = std::min(options.parallel_folds, options.folds);
    const int threads = options.threads_per_fold > 0 ? options.threads_per_fold : std::max(1, budget / parallel);
    const int loader_threads = train.loader_threads > 0 ? train.loader_threads : auto_loader_threads(threads);

    const TensorMap init = load_init_weights(train);  // folds that resume ignore it
    std::vector<TrainJob> jobs(folds.size());
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

    // Every check passed: the cross-validation starts here.
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
    {
        // Loader arenas and the folds' own TBB work need workers beyond the K fold threads.
        const size_t wanted = static_cast<size_t>(parallel) * static_cast<size_t>(1 + loader_threads);
        const size_t current = tbb::global_control::active_value(tbb::global_control::max_allowed_parallelism);
        tbb::global_control workers(tbb::global_control::max_allowed_parallelism, std::max(current, wanted));
        tbb::task_arena arena(parallel);
        arena.execute([&] {
            tbb::task_group group;
            for (size_t k = folds.size(); k-- > 0;)  // the calling thread pops the last one spawned: fold 0
                group.run([&run_fold, k] {
                    // A fold waiting inside OpenCV's or a loader's TBB work must not pick up another whole fold.
                    tbb::this_task_arena::isolate([&] { run_fold(k); });
                });
            group.wait();
        });
    }

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
    json["summary"] = {{"dice", summary_json(report.dice)}, {"iou", summary_json(report.iou)}, {"mean_iou", summary_json(report.mean_iou)}};
    report.summary_path = (run_dir / kCvSummaryName).string();
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

// ---- eval ----

EvalReport run_eval(const EvalCommandOptions& options) {
    if (options.model_path.empty()) throw UsageError("--model is required");
    if (options.batch < 1) throw UsageError(fmt::format("--batch must be at least 1, got {}", options.batch));
    if (options.threads < 0 || options.limit < 0 || options.size < 0) throw UsageError("--threads, --limit and --size must be >= 0");
    if (options.calibration_images < 1) throw UsageError("--calibration-images must be at least 1");
    {
        struct stat info {};
        if (::stat(options.model_path.c_str(), &info) != 0)
            throw UsageError(fmt::format("--model '{}': {}", options.model_path, std::strerror(errno)));
        if (S_ISDIR(info.st_mode)) throw UsageError(fmt::format("--model '{}' is a folder, not a .safetensors file", options.model_path));
    }
    const Dataset dataset = load_dataset(options.data_dir, options.skip_bad, 0);
    Split split;
    EvalReport report;
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
    std::vector<size_t> indices = indices_of(dataset, split.test_ids);
    if (options.limit > 0 && static_cast<size_t>(options.limit) < indices.size()) indices.resize(static_cast<size_t>(options.limit));
    if (indices.empty()) throw UsageError("the split's test side is empty");

    SafetensorsFile file;
    try {
        file = load_safetensors(options.model_path);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model: {}", one_line(e.what())));
    }
    ResUNetConfig config;
    Graph graph;
    try {
        config = infer_resunet_config(file.tensors, file.metadata, options.size > 0 ? options.size : kDefaultModelSize);
        graph = build_resunet(config);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model '{}': {}", options.model_path, one_line(e.what())));
    }
    if (config.out_channels != 1)
        throw UsageError(fmt::format("--model '{}' has {} output channels; eval needs a one-channel (polyp) model", options.model_path,
                                     config.out_channels));
    const int size = config.height;
    report.size = size;
    report.threads = resolve_threads(options.threads);
    std::optional<tbb::global_control> thread_limit;
    if (options.threads > 0) thread_limit.emplace(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(options.threads));

    std::unique_ptr<Engine> fp32;
    std::unique_ptr<QuantEngine> int8;
    const bool int8_file = is_int8_weights(file.tensors);
    bool stored_scales = false;
    for (const auto& [name, tensor] : file.tensors)
        if (name.size() > 12 && name.compare(name.size() - 12, 12, ".input_scale") == 0) stored_scales = true;
    try {
        if (options.precision == Precision::fp32) {
            if (int8_file)
                throw UsageError(fmt::format("--model '{}' is an int8 file; --precision fp32 needs fp32 weights", options.model_path));
            EngineOptions engine_options;
            engine_options.threads = options.threads;
            engine_options.plan_cache = default_plan_cache();  // tuned once per machine and graph
            fp32 = std::make_unique<Engine>(graph, file.tensors, engine_options);
            report.engine = "fp32";
        } else {
            QuantOptions quant_options;
            quant_options.threads = options.threads;
            int8 = std::make_unique<QuantEngine>(graph, file.tensors, quant_options);
            report.engine = stored_scales ? "int8 (static scales stored in the model)" : "int8 (dynamic scales)";
        }
    } catch (const UsageError&) {
        throw;
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model '{}': {}", options.model_path, one_line(e.what())));
    }
    file.tensors.clear();

    PreprocessOptions preprocess;
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

    // evaluate_split pools Dice and IoU; the pooled two-class mIoU at model size is counted here, against the
    // mask resized as load_sample resizes it (nearest), in the loader's order (the given indices, unshuffled).
    PooledMetrics pooled_model;
    size_t position = 0;
    const int64_t pixels = static_cast<int64_t>(size) * size;
    const LogitsRunner runner = [&](const float* images, int count, float* logits) {
        if (fp32) fp32->run(images, count, logits);
        else int8->run(images, count, logits);
        for (int i = 0; i < count; ++i, ++position) {
            const SampleInfo& info = dataset.samples[indices.at(position)];
            cv::Mat truth = read_mask(info.mask_path), small;
            cv::resize(truth, small, cv::Size(size, size), 0, 0, cv::INTER_NEAREST);
            pooled_model.add(logits_to_mask(logits + i * pixels, size, size, size, size), small);
        }
    };
    report.result = evaluate_split(dataset, indices, preprocess, runner, options.batch, options.threads);
    PixelCounts original;
    for (const MaskMetrics& m : report.result.per_image) original += m.counts;
    report.pooled_mean_iou_original = metrics_from_counts(original).mean_iou;
    report.pooled_mean_iou_model = pooled_model.mean_iou();

    if (options.log)
        fmt::print(options.log, "resunet eval: {} (width {}, depth {}, size {}), {}, {} images of {}, batch {}, threads {}, {:.1f} s\n",
                   options.model_path, config.width, config.depth, size, report.engine, report.result.images, report.split,
                   options.batch, report.threads, report.result.seconds);
    if (options.out) fmt::print(options.out, "{}", format_eval_markdown(report));
    if (!options.json_path.empty()) {
        auto scores = [](const ScoreSet& s, double pooled_mean_iou) {
            return nlohmann::json{{"dice", summary_json(s.dice)},       {"iou", summary_json(s.iou)},
                                  {"mean_iou", summary_json(s.mean_iou)}, {"pooled_dice", s.pooled_dice},
                                  {"pooled_iou", s.pooled_iou},           {"pooled_mean_iou", pooled_mean_iou}};
        };
        nlohmann::json json = {
            {"format", "resunet-eval"},
            {"version", 1},
            {"model", options.model_path},
            {"width", config.width},
            {"depth", config.depth},
            {"size", size},
            {"engine", report.engine},
            {"split", report.split},
            {"images", report.result.images},
            {"threads", report.threads},
            {"seconds", report.result.seconds},
            {"metrics", "dice, iou: foreground (polyp); mean_iou: two-class (background, polyp); summaries are per-image mean "
                        "and sample std; pooled_*: all pixels of all images counted together"},
            {"model_size", scores(report.result.model_size, report.pooled_mean_iou_model)},
            {"original_size", scores(report.result.original, report.pooled_mean_iou_original)},
        };
        try {
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
    text += fmt::format("\nEngine: {}. Images: {}. Threshold: probability 0.5 (logit 0); at original size the logits are resized "
                        "bilinearly before thresholding. ± is the sample standard deviation over images.\n",
                        report.engine, report.split);
    return text;
}

int eval_command(const EvalCommandOptions& options) {
    return run_command("eval", [&] {
        run_eval(options);
        return 0;
    });
}

// ---- registration ----

void add_train_command(CLI::App& app) {
    auto options = std::make_shared<TrainCommandOptions>();
    auto force_progress = std::make_shared<bool>(false);
    CLI::App* command = app.add_subcommand("train", "Train a ResUNet (fp32, oneDNN) with per-epoch validation; resumable run folder");
    add_train_flags(*command, *options);
    command->add_flag("--progress", *force_progress, "Show the progress bar even when stderr is not a terminal")->configurable(false);
    command->callback([command, options, force_progress] {
        apply_config_file(*command);
        TrainCommandOptions run_options = *options;
        run_options.progress = *force_progress || ::isatty(STDERR_FILENO) != 0;
        const int code = train_command(run_options);
        if (code != 0) throw CLI::RuntimeError(code);
    });
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

void add_eval_command(CLI::App& app) {
    auto options = std::make_shared<EvalCommandOptions>();
    CLI::App* command = app.add_subcommand("eval", "Score a model on the test split: Dice, IoU, mIoU at model and original size");
    add_eval_flags(*command, *options);
    command->callback([command, options] {
        apply_config_file(*command);
        const int code = eval_command(*options);
        if (code != 0) throw CLI::RuntimeError(code);
    });
}

}  // namespace resunet
