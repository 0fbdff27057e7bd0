// `resunet predict`: segments many images with a ResUNet model file, streaming them through a bounded TBB
// pipeline (decode -> infer -> resize back, encode, write), so memory stays flat whatever the image count.
//
// Intended usage:
//   resunet::PredictOptions options;
//   options.inputs = {"/data/images", "@more.txt", "one.png"};   // files, folders, list files
//   options.model_path = "model.safetensors";                    // fp32 weights or an int8 file
//   options.out_dir = "/tmp/pred";                                // <stem>.png masks, 0/255
//   options.masks_dir = "/data/masks";                            // optional: metrics.csv + summary.json
//   resunet::PredictReport report = resunet::run_predict(options);  // UsageError before any work
//   return report.exit_code();                                       // 0 all images ok, 1 some failed
//
//   CLI::App app;
//   resunet::add_predict_command(app);                            // `resunet predict ...`, exit codes 0/1/2
//
// Masks at the original resolution come from logits_to_mask(): the model-size logit map is resized with
// bilinear interpolation (cv::INTER_LINEAR) and thresholded at 0 (probability 0.5). The written PNG and the
// metrics are both taken from that one mask. Interpolating logits (not a 0/1 mask) gives boundaries that
// follow the model's, instead of model-size pixel blocks.
//
// Pipeline (tbb::parallel_pipeline, batches_in_flight live batches): serial make-batch -> parallel decode
// and preprocess -> serial infer -> parallel resize back, encode, write, score -> serial collect and
// progress. The engine runs on one dedicated thread (oneDNN's OpenMP keeps one thread team per calling
// thread). Decoded images and engine buffers are bounded by batches_in_flight x batch; only the path list
// and three doubles per scored image grow with the image count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

#include "data/metrics.h"
#include "data/postprocess.h"
#include "graph/tensor.h"

namespace CLI {
class App;
}

namespace resunet {

// A problem found before any image is processed (bad flag value, missing model, unwritable --out,
// outputs that exist): the command prints its one-line message and exits with status 2.
struct UsageError : Error {
    using Error::Error;
};

// Runs a subcommand's body and turns what it throws into "resunet <name>: error: <one line>" on stderr and an
// exit status: 2 for a UsageError, 1 for anything else; otherwise the body's own status.
int run_command(const char* name, const std::function<int()>& body);

// How the model runs.
enum class Precision {
    int8,         // u8 activations with dynamic scales (static if the int8 model file stores them)
    fp32,         // the fp32 engine (needs an fp32 model file)
    static_int8,  // static activation scales: the file's, else calibrated on a fixed synthetic set
};
const char* precision_name(Precision precision);  // "int8", "fp32", "static-int8"

struct PredictOptions {
    std::vector<std::string> inputs;  // image files, folders (supported images inside, sorted), "@list.txt"
    std::string model_path;           // .safetensors: fp32 weights, or int8 from `resunet quantize`
    Precision precision = Precision::int8;
    int batch = 16;               // images per engine call
    int threads = 0;              // TBB workers and oneDNN threads; 0 = all cores
    std::string out_dir;          // created if missing
    bool overlay = false;         // also write <stem>_overlay.png (contour + translucent tint)
    std::string masks_dir;        // ground truth by stem; empty = no metrics
    bool overwrite = false;       // replace existing outputs instead of refusing to start
    bool fast_decode = false;     // JPEGs decode at 1/2, 1/4 or 1/8 scale while still at least twice the model size
                                  // (read_image_reduced); ignored with overlay, which needs the full image
    int size = 0;                 // model input size when the file has no "resunet.size"; 0 = 224
    int calibration_images = 16;  // static-int8 without stored scales: this many fixed synthetic images
    int batches_in_flight = 3;    // live tokens of the pipeline: bounds decoded images held in memory
    int64_t max_pixels = 100'000'000;  // larger images are refused (per-file failure)
    bool progress = false;        // progress bar on `log` (the CLI turns it on when stderr is a TTY)
    std::FILE* log = stderr;      // setup messages, one line per failed file, progress; nullptr = silent
    std::FILE* out = stdout;      // the final summary; nullptr = silent
};

// One image that could not be processed.
struct FailedImage {
    std::string path;     // the input as listed
    std::string message;  // one line, naming the file
};

struct PredictReport {
    size_t images_total = 0;   // inputs listed
    size_t images_ok = 0;      // masks written (and scored, with masks_dir)
    size_t images_failed = 0;  // inputs with a FailedImage entry
    std::vector<FailedImage> failures;  // in input order
    std::string engine;                 // "int8 (dynamic scales)", "int8 (static scales, calibrated on 16 images)", ...
    double setup_seconds = 0;           // model load, compile, calibration
    double pipeline_seconds = 0;        // decode to last write, all images
    double inference_seconds = 0;       // inside engine run() calls only
    size_t images_inferred = 0;         // images that went through the engine
    size_t peak_rss_bytes = 0;          // VmHWM of this process at the end
    bool have_metrics = false;          // masks_dir was given
    MetricSummary dice, iou, mean_iou;  // over the scored images (per-image mean, sample std)
    PooledMetrics pooled;               // pixel-pooled over the scored images
    std::string metrics_csv_path, summary_json_path;  // written when have_metrics

    double images_per_second() const;            // (ok + failed) / pipeline_seconds
    double inference_images_per_second() const;  // images_inferred / inference_seconds
    int exit_code() const { return images_failed == 0 ? 0 : 1; }
};

// Runs the whole command. Every check that needs no image decode (inputs exist, model loads and compiles,
// --out writable, no output would be overwritten or collide) happens first and throws UsageError; after
// that, a failing image is recorded in the report and the others continue.
PredictReport run_predict(const PredictOptions& options);

// run_predict for the CLI: prints a UsageError as "resunet predict: error: ..." and returns 2, else the
// report's exit code (an unexpected failure mid-run also prints one line and returns 1).
int predict_command(const PredictOptions& options);

// Registers the `predict` subcommand; its callback throws CLI::RuntimeError(code) for a non-zero exit.
void add_predict_command(CLI::App& app);

// Image paths from files, folders and "@list" files, in order (folder contents sorted by name, hidden
// files and unsupported extensions skipped). List entries are paths relative to the working directory,
// one a line; blank lines and lines starting with '#' are skipped; a missing listed file stays in the
// list (it fails as an unreadable image). Throws UsageError for a missing command-line path or list.
std::vector<std::string> collect_input_images(const std::vector<std::string>& inputs);

// True for .jpg .jpeg .png .tif .tiff .bmp, any case.
bool is_supported_image(const std::string& path);

// Width and height from a JPEG, PNG, BMP or TIFF header without decoding, so oversized images are
// refused before their pixels are allocated; an empty size when the header is not understood.
cv::Size probe_image_size(const std::string& path);

// VmHWM of /proc/self/status in bytes (0 if unavailable).
size_t peak_rss_bytes();

}  // namespace resunet
