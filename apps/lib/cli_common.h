// What every `resunet` subcommand shares: the exit-status convention (UsageError, run_command), the precision
// flag, flags bound to option structs with their defaults shown, --config files, run folders and their logs,
// dataset and split loading with usage errors, one model-file loader, and small text helpers.
//
// Intended usage (inside a command's .cpp):
//   int my_command(const MyOptions& options) {
//       return run_command("my", [&] {                         // UsageError -> exit 2, other errors -> 1
//           ModelFile model = load_model_file(options.model_path, options.size);  // UsageError on a bad file
//           const Dataset dataset = load_dataset(options.data_dir, false, 0);     // UsageError on a bad folder
//           ...
//           return 0;
//       });
//   }
//   bind_option(command, "--batch", options.batch, "Images per step")->check(CLI::Range(1, 4096));
//   command.callback([&] { apply_config_file(command); ... });   // --config FILE, command-line flags win
//
// Nothing here knows a command's own flags: those live in command_flags.h (train, cv, eval) and in each
// command's add_*_command.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "apps/lib/flag_basics.h"
#include "data/dataset.h"
#include "data/metrics.h"
#include "data/split.h"
#include "graph/graph.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "graph/tensor.h"

namespace resunet {

struct EngineOptions;
struct EngineTuningFlags;
class QuantEngine;

// The int8 engine as reports name it: "int8 (dynamic scales)" or "int8 (static scales stored in the model)",
// and with an --int8-conv other than direct what it chose, e.g. "...; --int8-conv mixed: int8 3x3
// convolutions: 0 winograd_int8_f23, 2 direct; 15 run fp32, measured faster here (e1.conv_b, ...)".
std::string int8_engine_label(const QuantEngine& engine, bool stored_scales, const EngineTuningFlags& flags);

// A UsageError every rank of an mpirun job throws together (agree_on_setup): only rank 0 prints it.
struct AgreedUsageError : UsageError {
    using UsageError::UsageError;
};

// A failure another rank reports itself (its own message on its own stderr): this rank exits 1 without a word.
struct ReportedElsewhere : Error {
    using Error::Error;
};

// Runs a subcommand's body and turns what it throws into "resunet <name>: error: <one line>" on stderr and an
// exit status: 2 for a UsageError, 1 for anything else; otherwise the body's own status. An AgreedUsageError is
// printed by rank 0 only, so an mpirun job says it once.
int run_command(const char* name, const std::function<int()>& body);

// ---- several processes (mpirun) ----

// Runs a command's setup (every check before any work) on each rank and makes the ranks agree on it: when any
// rank's setup throws, every rank throws the first failing rank's error (AgreedUsageError for a UsageError,
// else Error), so no rank starts work (or waits in a collective) alone. It is a barrier: no rank writes an output
// before every rank has checked that none exists. Alone, it runs `setup` and lets its exceptions through as they are.
// `rank0_first`: rank 0 runs `setup` alone first and the others after it succeeded, so what it measured and
// saved (the fp32 and int8 plans in the plan cache) the others read instead of measuring anew: every rank then
// runs the same plan (masks byte-identical to one process) and no two ranks time kernels at once. Ranks that
// do not share the cache folder (other machines, --plan-cache none) still measure their own.
void agree_on_setup(const std::function<void()>& setup, bool rank0_first = false);

// Plain bytes of numbers and strings, for gathering results across ranks (all ranks run the same build).
class Packer {
  public:
    void u64(uint64_t value);
    void f64(double value);   // bit for bit, NaN included
    void str(const std::string& text);
    const std::string& bytes() const { return bytes_; }

  private:
    std::string bytes_;
};

// Reads what a Packer wrote, in the same order; resunet::Error when the bytes run out.
class Unpacker {
  public:
    explicit Unpacker(const std::string& bytes) : bytes_(bytes) {}
    uint64_t u64();
    double f64();
    std::string str();

  private:
    void take(void* dst, size_t count);
    const std::string& bytes_;
    size_t offset_ = 0;
};

// ---- run folders, datasets, splits ----

// File names of a run folder (train, cv and each fold).
inline constexpr const char* kConfigName = "config.toml";
inline constexpr const char* kSplitName = "split.json";
inline constexpr const char* kLogName = "train.log";

// Creates the folder if needed and proves it writable with a probe file; UsageError naming `flag` otherwise.
std::filesystem::path prepare_run_dir(const std::string& out, const char* flag);
// Refuses a run folder whose config.toml differs from `config_text` in a key that changes the results.
void check_same_config(const std::filesystem::path& run_dir, const std::string& config_text, bool resume);
// One timestamped line appended to a run's train.log (opened per line: survives crashes).
void append_log(const std::filesystem::path& path, const std::string& text);

bool file_exists(const std::filesystem::path& path);

// ---- output files ----
// The rule of every program: an output file that exists is refused unless --overwrite; a missing folder for
// it is created; and both are checked before any work.

// UsageError naming `flag` when `dir` exists and is not a writable folder, or is missing and cannot be created
// (its nearest existing ancestor is not a writable folder). Creates nothing.
void check_output_folder(const std::filesystem::path& dir, const std::string& flag);
// UsageError naming `flag` when the file `path` is a folder, exists without `overwrite`, or its folder fails
// check_output_folder. Creates nothing; an empty path passes.
void check_output_file(const std::string& path, const std::string& flag, bool overwrite);
// Creates the folder of `path` if missing (after check_output_file); Error naming `flag` on failure.
void create_output_parent(const std::string& path, const std::string& flag);
// The Kvasir-SEG folder of --data, its first `limit` pairs (0 = all); UsageError if missing or under 2 pairs.
Dataset load_dataset(const std::string& dir, bool skip_bad, int limit);
// The split of a run: --split, else RUN/split.json, else a new seeded one. `save` says RUN/split.json is missing.
Split resolve_split(const Dataset& dataset, const std::string& split_path, uint64_t seed, const std::filesystem::path& run_dir,
                    bool& save);

// ---- models ----

// A model file read and understood: its tensors and metadata, the configuration they describe, and its graph.
struct ModelFile {
    SafetensorsFile file;
    ResUNetConfig config;
    Graph graph;
};
// Reads `path` (--model) and builds its graph; `size` is the input size for files without "resunet.size"
// (0: kDefaultModelSize). Every failure is a UsageError naming --model. `check`, if given, sees the file before
// its configuration is inferred (to refuse, say, an int8 file with a message of its own).
ModelFile load_model_file(const std::string& path, int size, const std::function<void(const SafetensorsFile&)>& check = {});
// UsageError unless `path` names an existing file that is not a folder (checked before anything slow).
void check_model_path(const std::string& path);
// True if the tensors carry static activation scales ("*.input_scale", written by `resunet quantize`).
bool has_stored_static_scales(const TensorMap& tensors);
// A file with stored static scales runs them: `--precision int8` (scales computed per image) given on the command
// line for such a file is a UsageError naming static-int8, not a flag silently not obeyed. Not given: the file's.
void check_stored_scales_precision(const std::string& model_path, bool stored_scales, Precision precision, bool given);
// --calibration-count given where nothing is calibrated (a precision other than static-int8, or a file with stored
// scales): a UsageError, not a flag silently not used.
void check_calibration_count_used(Precision precision, bool stored_scales, bool given);

// ---- text, time, threads ----

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start);
// "m:ss", or "h:mm:ss" from an hour.
std::string format_duration(double seconds);
// "  [#####...] 12/200 images  3.1 images/s  ETA 1:01", the progress bar of predict and eval.
std::string progress_text(size_t done, size_t total, double elapsed_seconds);
// "0.8123 ± 0.0456", "n/a" for an empty summary.
std::string mean_std(const MetricSummary& summary);
// {"count", "mean", "std", "min", "max"}, non-finite numbers as null.
nlohmann::json metric_summary_json(const MetricSummary& summary);

int hardware_threads();
int resolve_threads(int threads);       // 0 -> hardware_threads()
int auto_loader_threads(int threads);   // max(1, min(4, threads / 2))

// Lines and a one-line progress bar on one stream, from several threads without garbling; silent for nullptr.
class Console {
  public:
    Console(std::FILE* log, bool progress) : log_(log), progress_(progress && log) {}
    void line(const std::string& text);
    void bar(const std::string& text);  // replaces the previous bar; only when progress is on
    void end_bar();                     // clears the bar, if any
    bool progress() const { return progress_; }

  private:
    void clear_bar();
    std::mutex mutex_;
    std::FILE* log_;
    bool progress_;
    size_t bar_width_ = 0;
};

}  // namespace resunet
