// `resunet predict`: segments many images with a ResUNet model file, streaming them through a bounded TBB
// pipeline (decode -> infer -> resize back, encode, write), so memory stays flat whatever the image count.
//
// Intended usage:
//   resunet::PredictOptions options;
//   options.inputs = {"/data/images", "@more.txt", "one.png"};   // files, folders, list files
//   options.model_path = "model.safetensors";                    // fp32 weights or an int8 file
//   options.out_dir = "/tmp/pred";                                // <stem>.png masks, 0/255
//   options.masks_dir = "/data/masks";                            // optional: metrics.csv and scores
//   resunet::PredictReport report = resunet::run_predict(options);  // UsageError before any work
//   return report.exit_code();                                       // 0 all images ok, 1 some failed
//
//   CLI::App app;
//   resunet::add_predict_command(app);                            // `resunet predict ...`, exit codes 0/1/2
//
// Masks at the original resolution come from logits_to_mask(): the model-size logit map is resized with
// bilinear interpolation (cv::INTER_LINEAR) and thresholded at 0 (probability 0.5; --threshold T: logit
// log(T / (1 - T))). The written PNG and the
// metrics are both taken from that one mask. Interpolating logits (not a 0/1 mask) gives boundaries that
// follow the model's, instead of model-size pixel blocks.
//
// Pipeline (tbb::parallel_pipeline, batches_in_flight live batches): serial make-batch -> parallel decode
// and preprocess -> serial infer -> parallel resize back, encode, write, score -> serial collect and
// progress. The engine runs on one dedicated thread (oneDNN's OpenMP keeps one thread team per calling
// thread). Decoded images and engine buffers are bounded by batches_in_flight x batch; only the path list,
// three doubles per scored image and one summary.json row (about 200 bytes) per image grow with the image
// count. summary.json (always written) lists what the run wrote (predict_outputs.h), so a later run with
// --overwrite removes exactly that. The pipeline itself is predict_pipeline.h.
//
// Under `mpirun -np N` the images are sharded across ranks in whole batches (dist::shard over the batches, in
// input order), so each batch a rank runs holds exactly the images it holds in a one-process run: int8 dynamic
// scales, and so the masks, match bit for bit. Every rank writes its own masks; rank 0 gathers the per-image
// rows (metrics.csv, summary.json: byte-identical to one process), and every rank leaves with the merged report,
// so the exit status agrees. Setup lines, the progress bar and the summary come from rank 0; each rank reports
// its own failed images. Threads per rank default to dist::threads_per_rank (cores of the node / its ranks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "apps/lib/cli_common.h"
#include "apps/lib/command_flags.h"
#include "apps/lib/image_inputs.h"
#include "data/metrics.h"
#include "data/postprocess.h"  // logits_to_mask, how masks are made

namespace CLI {
class App;
}

namespace resunet {

struct PredictOptions {
    std::vector<std::string> inputs;  // image files, folders (supported images inside, sorted), "@list.txt"
    std::string model_path;           // .safetensors: fp32 weights, or int8 from `resunet quantize`
    Precision precision = Precision::int8;
    bool precision_given = false;     // --precision was given (int8 on a file with stored scales: refused)
    int batch = 16;               // images per engine call
    int threads = 0;              // TBB workers and oneDNN threads; 0 = all cores (under mpirun: cores / ranks)
    EngineTuningFlags tuning;     // --precision fp32 only: --tune, --plan-cache, --memory-budget
    std::string out_dir;          // created if missing
    bool overlay = false;         // also write <stem>_overlay.png (contour + translucent tint)
    std::string masks_dir;        // ground truth by stem; empty = no metrics
    bool overwrite = false;       // replace existing outputs instead of refusing to start
    bool fast_decode = false;     // JPEGs decode at 1/2, 1/4 or 1/8 scale while still at least twice the model size
                                  // (read_image_reduced); refused with overlay, which needs the full image
    double threshold = 0.5;       // foreground where the probability (sigmoid of the logit) is above it; in (0, 1)
    bool save_probabilities = false;  // also write <stem>_probability.png: round(255 * probability), 8-bit grey
    int size = 0;                 // model input size when the file has no "resunet.size"; 0 = 224
    int calibration_images = 16;  // --calibration-count: static-int8 without stored scales: this many fixed synthetic images
    bool calibration_given = false;  // --calibration-count was given (refused where nothing is calibrated)
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
    std::string plan_id;                // the plan the engine ran (engine/plan.h; resunet plan --save-plan)
    double setup_seconds = 0;           // model load, compile, calibration
    double pipeline_seconds = 0;        // decode to last write, all images
    double inference_seconds = 0;       // inside engine run() calls only (under mpirun: summed over ranks)
    size_t images_inferred = 0;         // images that went through the engine
    size_t peak_rss_bytes = 0;          // VmHWM of this process at the end (under mpirun: the largest rank's)
    int ranks = 1;                      // processes that shared the images (mpirun -np)
    int threads = 0;                    // oneDNN/TBB threads of each process (0: all cores)
    bool have_metrics = false;          // masks_dir was given
    MetricSummary dice, iou, mean_iou;  // over the scored images (per-image mean, sample std)
    PooledMetrics pooled;               // pixel-pooled over the scored images
    std::string metrics_csv_path, summary_json_path;  // written when have_metrics

    double images_per_second() const;            // (ok + failed) / pipeline_seconds
    double inference_images_per_second() const;  // images_inferred / inference_seconds
    int exit_code() const { return images_failed == 0 ? 0 : 1; }
};

// Runs the whole command. Every check that needs no image decode (inputs exist, model loads and compiles,
// --out writable, no output would be overwritten or collide) happens first and throws UsageError (under mpirun,
// on every rank when any rank finds one); after that, a failing image is recorded in the report and the others
// continue.
PredictReport run_predict(const PredictOptions& options);

// run_predict for the CLI: prints a UsageError as "resunet predict: error: ..." and returns 2, else the
// report's exit code (an unexpected failure mid-run also prints one line and returns 1).
int predict_command(const PredictOptions& options);

// Registers the `predict` subcommand; its callback throws CLI::RuntimeError(code) for a non-zero exit.
void add_predict_command(CLI::App& app);

// VmHWM of /proc/self/status in bytes (0 if unavailable).
size_t peak_rss_bytes();

}  // namespace resunet
