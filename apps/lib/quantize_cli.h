// `resunet quantize`: an fp32 model file to an int8 one with static activation scales, calibrated on a
// named, reproducible image set and stored in the file, plus a per-layer SQNR report beside it. Also the
// fixed calibration sets `eval` and `predict` fall back to for static-int8 when a file stores no scales.
//
// Intended usage:
//   resunet::QuantizeCommandOptions options;
//   options.model_path = "runs/w16/best.safetensors";
//   options.out_path = "runs/w16/best.int8.safetensors";
//   options.data_dir = "/data/kvasir-seg";               // calibrate on the split's train side:
//   options.split_path = "runs/w16/split.json";          // the first 16 ids (sorted), or 16 drawn with --seed
//   resunet::QuantizeReport report = resunet::run_quantize(options);  // UsageError before any work
//   // report.report_md_path: "runs/w16/best.int8.report.md" (and .report.json)
//
//   CLI::App app;
//   resunet::add_quantize_command(app);                   // `resunet quantize ...`, exit codes 0/1/2
//
// The file holds quantize_model_weights() (weights of +-kStoredWeightLevels, narrowed at load on CPUs with
// fewer levels), the engine's static_scales() and metadata: the model configuration, "resunet.int8.*" keys
// (stored weight levels, calibration source, count and ids, layers kept fp32, tool version, source file and
// its checksum).
#pragma once

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "quant/report.h"

namespace CLI {
class App;
}

namespace resunet {

// Images calibrated on when neither the command nor the model file says otherwise (eval, predict, quantize).
inline constexpr int kDefaultCalibrationImages = 16;

// Metadata keys of an int8 file written by `resunet quantize`.
inline constexpr const char* kInt8WeightLevelsKey = "resunet.int8.weight_levels";        // "127"
inline constexpr const char* kInt8CalibrationSourceKey = "resunet.int8.calibration_source";
inline constexpr const char* kInt8CalibrationCountKey = "resunet.int8.calibration_count";
inline constexpr const char* kInt8CalibrationIdsKey = "resunet.int8.calibration_ids";    // comma-separated
inline constexpr const char* kInt8KeepFp32Key = "resunet.int8.keep_fp32";                // comma-separated
inline constexpr const char* kInt8ToolVersionKey = "resunet.int8.tool_version";
inline constexpr const char* kInt8SourceModelKey = "resunet.int8.source_model";
inline constexpr const char* kInt8SourceChecksumKey = "resunet.int8.source_checksum";

// Flags of `resunet quantize`.
struct QuantizeCommandOptions {
    std::string model_path;                 // fp32 .safetensors (a plain model file or a checkpoint's weights)
    std::string out_path;                   // the int8 file; refused if it exists unless overwrite
    std::string data_dir;                   // calibration from the train side of split_path (Kvasir-SEG layout)
    std::string split_path;                 // split.json (needed with data_dir)
    std::vector<std::string> calibration;   // or: image files, folders, @list.txt (sorted as predict reads them)
    int calibration_count = kDefaultCalibrationImages;  // images calibrated on (fewer if the source has fewer)
    std::optional<uint64_t> seed;           // unset: the first N (sorted); set: N drawn with this seed
    std::vector<std::string> keep_fp32;     // layers (head node names, e.g. "e1.conv_a") kept fp32
    int size = 0;                           // input size for files without 'resunet.size' (0: 224)
    int threads = 0;                        // 0: all cores
    bool overwrite = false;                 // replace an existing out_path (and its reports)
    std::FILE* log = stdout;                // progress lines; nullptr for none
};

struct QuantizeReport {
    std::string out_path, report_md_path, report_json_path;
    std::string calibration_source;          // e.g. "the first 16 ids of the train side of split.json"
    std::vector<std::string> calibration_ids;
    int weight_levels_stored = 0;            // kStoredWeightLevels
    int weight_levels_here = 0;              // what this CPU narrows them to at load
    std::vector<LayerQuantReport> layers;    // SQNR per layer, the file's int8 network against fp32
};

// Writes the int8 file and its reports (write_file_atomic / save_safetensors). Throws UsageError for bad
// input found before any work (missing or int8 model, existing --out, bad --keep-fp32, no calibration image).
QuantizeReport run_quantize(const QuantizeCommandOptions& options);

// Registers the `quantize` subcommand; its callback throws CLI::RuntimeError(code) for a non-zero exit.
void add_quantize_command(CLI::App& app);

// The fixed calibration ids of a split's train side (sorted): the first `count`, or `count` drawn with
// `seed` (then sorted). What eval calibrates on without stored scales, and quantize by default.
std::vector<std::string> calibration_ids(const std::vector<std::string>& train_ids, int count,
                                         std::optional<uint64_t> seed = std::nullopt);

// Model inputs (NCHW, ImageNet-normalised, size x size) of the given dataset ids, as eval's loader makes them.
std::vector<float> load_calibration_images(const Dataset& dataset, const std::vector<std::string>& ids, int size);

// A fixed synthetic calibration set: `count` images of smooth coloured blobs plus noise, made from a fixed
// seed with integer arithmetic only, so every run on every machine gets the same pixels. What predict's
// static-int8 calibrates on when the model file stores no scales (a `resunet quantize` file does).
std::vector<float> synthetic_calibration_images(int count, int size);

}  // namespace resunet
