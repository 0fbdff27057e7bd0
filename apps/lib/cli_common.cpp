// The shared part of the subcommands: see cli_common.h.
#include "apps/lib/cli_common.h"
#include "apps/lib/command_flags.h"
#include "engine/engine.h"
#include "quant/quant_engine.h"
#include "engine/plan_cache.h"
#include "graph/input_file.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "dist/comm.h"

namespace fs = std::filesystem;

namespace resunet {

int run_command(const char* name, const std::function<int()>& body) {
    try {
        return body();
    } catch (const AgreedUsageError& e) {
        if (dist::Comm::world().rank() == 0) fmt::print(stderr, "resunet {}: error: {}\n", name, one_line(e.what()));
        return 2;
    } catch (const UsageError& e) {
        fmt::print(stderr, "resunet {}: error: {}\n", name, one_line(e.what()));
        return 2;
    } catch (const ReportedElsewhere&) {
        return 1;
    } catch (const std::exception& e) {
        fmt::print(stderr, "resunet {}: error: {}\n", name, one_line(e.what()));
        return 1;
    }
}

namespace {

// What the ranks found, as agree_on_setup says: `mine` is "" when all is well, else '2' (usage) or '1' (other)
// and the one-line message; throws on every rank when any rank found something.
void agree_on(const std::string& mine) {
    dist::Comm& comm = dist::Comm::world();
    std::string first;
    for (const std::string& found : comm.gather(mine))
        if (!found.empty()) {
            first = found;
            break;
        }
    comm.broadcast(first);
    if (first.empty()) return;
    if (first[0] == '2') throw AgreedUsageError(first.substr(1));
    // Another failure: each rank says its own (or, where it had none, which rank failed); exit status 1.
    throw Error(mine.empty() ? fmt::format("another rank failed during setup: {}", first.substr(1)) : mine.substr(1));
}

std::string run_setup(const std::function<void()>& setup) {
    try {
        setup();
    } catch (const UsageError& e) {
        return "2" + one_line(e.what());
    } catch (const std::exception& e) {
        return "1" + one_line(e.what());
    }
    return std::string();
}

}  // namespace

void agree_on_setup(const std::function<void()>& setup, bool rank0_first) {
    dist::Comm& comm = dist::Comm::world();
    if (!comm.distributed()) {
        setup();
        return;
    }
    if (rank0_first) {
        agree_on(comm.rank() == 0 ? run_setup(setup) : std::string());
        agree_on(comm.rank() == 0 ? std::string() : run_setup(setup));
        return;
    }
    agree_on(run_setup(setup));
}

void Packer::u64(uint64_t value) { bytes_.append(reinterpret_cast<const char*>(&value), sizeof value); }
void Packer::f64(double value) { bytes_.append(reinterpret_cast<const char*>(&value), sizeof value); }
void Packer::str(const std::string& text) {
    u64(text.size());
    bytes_ += text;
}

void Unpacker::take(void* dst, size_t count) {
    if (count > bytes_.size() - offset_) throw Error("gathered results are truncated");
    std::memcpy(dst, bytes_.data() + offset_, count);
    offset_ += count;
}
uint64_t Unpacker::u64() {
    uint64_t value = 0;
    take(&value, sizeof value);
    return value;
}
double Unpacker::f64() {
    double value = 0;
    take(&value, sizeof value);
    return value;
}
std::string Unpacker::str() {
    const uint64_t size = u64();
    if (size > bytes_.size() - offset_) throw Error("gathered results are truncated");
    std::string text = bytes_.substr(offset_, size);
    offset_ += size;
    return text;
}

// ---- run folders, datasets, splits ----

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

std::string int8_engine_label(const QuantEngine& engine, bool stored_scales, const EngineTuningFlags& flags) {
    std::string label = stored_scales ? "int8 (static scales stored in the model)" : "int8 (dynamic scales)";
    const std::string conv = flags.int8_conv_or_default();
    // The default (auto) says what it chose; a flag given is named. Not whence (a warm plan cache or a
    // measurement): the reports of one job must not depend on it (one process and mpirun ranks write the same).
    if (conv != "direct")
        label += fmt::format("; {}{}", flags.int8_conv.empty() ? "" : fmt::format("--int8-conv {}: ", conv),
                             engine.conv_summary(/*with_source=*/false));
    return label;
}

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
    // conv-algorithm: how fast; a run's RUN/conv_plan.txt decides what a resumed run computes.
    std::set<std::string> ignored = {"threads", "loader-threads", "parallel-folds", "threads-per-fold", "out", "conv-algorithm"};
    if (resume) ignored.insert("epochs");
    std::vector<std::string> differences;
    std::set<std::string> keys;
    for (const auto& [key, value] : before) keys.insert(key);
    for (const auto& [key, value] : now) keys.insert(key);
    for (const std::string& key : keys) {
        if (ignored.count(key)) continue;
        auto a = before.find(key), b = now.find(key);
        // Keys added after a run was made read as their default there (--val-folds: 0, the old behaviour).
        static const std::map<std::string, std::string> added_later = {{"val-folds", "0"}};
        const auto added = added_later.find(key);
        const std::string was = a != before.end() ? a->second : added != added_later.end() ? added->second : "(unset)";
        const std::string is = b != now.end() ? b->second : added != added_later.end() ? added->second : "(unset)";
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

static std::string local_timestamp() {
    const std::time_t now = std::time(nullptr);
    std::tm parts{};
    localtime_r(&now, &parts);
    char text[32];
    std::strftime(text, sizeof text, "%Y-%m-%d %H:%M:%S", &parts);
    return text;
}

void append_log(const fs::path& path, const std::string& text) {
    std::FILE* file = std::fopen(path.c_str(), "a");
    if (!file) return;  // the log is a convenience; the run's files carry the results
    fmt::print(file, "{} {}\n", local_timestamp(), text);
    std::fclose(file);
}

bool file_exists(const fs::path& path) {
    std::error_code ec;
    return fs::exists(path, ec);
}

void check_output_folder(const fs::path& dir, const std::string& flag) {
    std::error_code ec;
    if (fs::exists(dir, ec)) {
        if (!fs::is_directory(dir, ec)) throw UsageError(fmt::format("{} '{}' is not a folder", flag, dir.string()));
        if (::access(dir.c_str(), W_OK | X_OK) != 0)
            throw UsageError(fmt::format("{}: folder '{}' is not writable: {}", flag, dir.string(), std::strerror(errno)));
        return;
    }
    fs::path ancestor = fs::absolute(dir, ec).parent_path();
    while (!ancestor.empty() && !fs::exists(ancestor, ec) && ancestor != ancestor.root_path()) ancestor = ancestor.parent_path();
    if (!fs::is_directory(ancestor, ec))
        throw UsageError(fmt::format("{}: folder '{}' cannot be created: {} is not a folder", flag, dir.string(), ancestor.string()));
    if (::access(ancestor.c_str(), W_OK | X_OK) != 0)
        throw UsageError(fmt::format("{}: folder '{}' cannot be created in {}: {}", flag, dir.string(), ancestor.string(),
                                     std::strerror(errno)));
}

void check_output_file(const std::string& path, const std::string& flag, bool overwrite) {
    if (path.empty()) return;
    std::error_code ec;
    const fs::file_status status = fs::symlink_status(path, ec);
    if (fs::is_directory(status)) throw UsageError(fmt::format("{} '{}' is a folder, not a file", flag, path));
    if (fs::exists(status) && !overwrite) throw UsageError(fmt::format("{} '{}' exists; pass --overwrite to replace it", flag, path));
    const fs::path parent = fs::path(path).parent_path();
    check_output_folder(parent.empty() ? fs::path(".") : parent, flag);
}

void create_output_parent(const std::string& path, const std::string& flag) {
    const fs::path parent = fs::path(path).parent_path();
    if (parent.empty()) return;
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec || !fs::is_directory(parent, ec))
        throw Error(fmt::format("{}: cannot create folder '{}': {}", flag, parent.string(), ec.message()));
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
        if (const std::string problem = input_file_problem(split_path); !problem.empty())
            throw UsageError(fmt::format("--split '{}': {}", split_path, problem));
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

// ---- models ----

void check_model_path(const std::string& path) {
    if (path.empty()) throw UsageError("--model is required");
    struct stat info {};
    if (::stat(path.c_str(), &info) != 0) throw UsageError(fmt::format("--model '{}': {}", path, std::strerror(errno)));
    if (S_ISDIR(info.st_mode)) throw UsageError(fmt::format("--model '{}' is a folder, not a .safetensors file", path));
    if (const std::string problem = input_file_problem(path); !problem.empty())
        throw UsageError(fmt::format("--model '{}': {}", path, problem));
}

ModelFile load_model_file(const std::string& path, int size, const std::function<void(const SafetensorsFile&)>& check) {
    ModelFile model;
    try {
        model.file = load_safetensors(path);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model: {}", one_line(e.what())));
    }
    if (check) check(model.file);
    try {
        model.config = infer_resunet_config(model.file.tensors, model.file.metadata, size > 0 ? size : kDefaultModelSize);
        model.graph = build_resunet(model.config);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model '{}': {}", path, one_line(e.what())));
    }
    return model;
}

void check_stored_scales_precision(const std::string& model_path, bool stored_scales, Precision precision, bool given) {
    if (stored_scales && given && precision == Precision::int8)
        throw UsageError(fmt::format("--model '{}' stores static scales, which it always runs; use --precision static-int8 "
                                     "(or leave --precision out), or run the fp32 model for scales computed per image",
                                     model_path));
}

void check_calibration_count_used(Precision precision, bool stored_scales, bool given) {
    if (!given) return;
    if (precision != Precision::static_int8)
        throw UsageError(fmt::format("--calibration-count applies to --precision static-int8 only, not {}", precision_name(precision)));
    if (stored_scales)
        throw UsageError("--calibration-count: the model stores its static scales, so nothing is calibrated; leave it out");
}

bool has_stored_static_scales(const TensorMap& tensors) {
    return std::any_of(tensors.begin(), tensors.end(), [](const auto& entry) {
        const std::string& name = entry.first;
        const std::string suffix = ".input_scale";
        return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    });
}

// ---- text, time, threads ----

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

std::string format_duration(double seconds) {
    const long total = std::lround(std::max(0.0, seconds));
    if (total >= 3600) return fmt::format("{}:{:02d}:{:02d}", total / 3600, (total / 60) % 60, total % 60);
    return fmt::format("{}:{:02d}", total / 60, total % 60);
}

std::string progress_text(size_t done, size_t total, double elapsed_seconds) {
    const double rate = elapsed_seconds > 0 ? static_cast<double>(done) / elapsed_seconds : 0.0;
    const long eta_s = rate > 0 && total > done ? std::lround(static_cast<double>(total - done) / rate) : 0;
    constexpr size_t kBarWidth = 24;
    const size_t filled = total ? std::min(kBarWidth, kBarWidth * done / total) : kBarWidth;
    return fmt::format("  [{}{}] {}/{} images  {:.1f} images/s  ETA {}:{:02d}", std::string(filled, '#'),
                       std::string(kBarWidth - filled, '.'), done, total, rate, eta_s / 60, eta_s % 60);
}

std::string mean_std(const MetricSummary& s) {
    if (s.count == 0) return "n/a";
    return fmt::format("{:.4f} ± {:.4f}", s.mean, s.std);
}

nlohmann::json metric_summary_json(const MetricSummary& s) {
    auto number = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
    return {{"count", s.count}, {"mean", number(s.mean)}, {"std", number(s.std)}, {"min", number(s.min)}, {"max", number(s.max)}};
}

int hardware_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}
int resolve_threads(int threads) { return threads > 0 ? threads : hardware_threads(); }
int auto_loader_threads(int threads) { return std::max(1, std::min(4, threads / 2)); }

void Console::line(const std::string& text) {
    if (!log_) return;
    std::lock_guard lock(mutex_);
    clear_bar();
    fmt::print(log_, "{}\n", text);
    std::fflush(log_);
}

void Console::bar(const std::string& text) {
    if (!progress_) return;
    std::lock_guard lock(mutex_);
    fmt::print(log_, "\r{:<{}}", text, bar_width_);
    bar_width_ = std::max(bar_width_, text.size());
    std::fflush(log_);
}

void Console::end_bar() {
    if (!progress_) return;
    std::lock_guard lock(mutex_);
    clear_bar();
    std::fflush(log_);
}

void Console::clear_bar() {
    if (bar_width_ == 0) return;
    fmt::print(log_, "\r{}\r", std::string(bar_width_, ' '));
    bar_width_ = 0;
}

}  // namespace resunet
