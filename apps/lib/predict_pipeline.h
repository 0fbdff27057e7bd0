// The streaming pipeline of `resunet predict` (internal to apps/lib): make batch -> parallel decode and preprocess
// -> serial infer on one dedicated engine thread -> parallel resize back, encode, write, score -> serial collect,
// with a fixed pool of batches_in_flight batches, so memory stays flat whatever the image count.
//
// Intended usage (predict_command.cpp):
//   Run run{options, paths, stems, truth_paths, out_dir, size, 3 * size * size, size * size};
//   run.begin = 0; run.end = paths.size();                  // or this rank's shard, at batch granularity
//   InferenceThread thread;
//   PipelineStats stats;
//   run_pipeline(run, runner, thread, [&](const Item& item) { ... }, [&](size_t done) { ... }, stats);
//
// Batches are cut from run.begin in steps of options.batch, so a shard that starts on a multiple of the batch
// runs exactly the batches a single process runs on those images (the same int8 dynamic scales, the same masks).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <opencv2/core.hpp>

#include "apps/lib/predict_command.h"
#include "data/metrics.h"
#include "engine/engine.h"
#include "quant/quant_engine.h"

namespace resunet {

std::string mask_file_name(const std::string& stem);     // <stem>.png
std::string overlay_file_name(const std::string& stem);  // <stem>_overlay.png
std::string probability_file_name(const std::string& stem);  // <stem>_probability.png
// The files one image writes into --out: its mask, and its overlay and probability map when asked for.
std::vector<std::string> output_file_names(const PredictOptions& options, const std::string& stem);

// The one engine of a run, fp32 or int8; called from the pipeline's serial stage only.
class Runner {
  public:
    void run(const float* src, int batch, float* dst) {
        if (fp32) fp32->run(src, batch, dst);
        else int8->run(src, batch, dst);
    }
    std::unique_ptr<Engine> fp32;
    std::unique_ptr<QuantEngine> int8;
};

// Runs jobs on one long-lived thread. oneDNN's OpenMP keeps a thread team per calling thread, and the
// pipeline's serial stage may run on any TBB worker: calling the engine from here keeps one team (not one
// per worker, each spinning after its regions) whichever worker hands the batch over.
class InferenceThread {
  public:
    InferenceThread();
    ~InferenceThread();
    InferenceThread(const InferenceThread&) = delete;
    InferenceThread& operator=(const InferenceThread&) = delete;

    // Runs `job` on the thread and waits for it; rethrows what it threw.
    void run(const std::function<void()>& job);

  private:
    void loop();
    std::mutex mutex_;
    std::condition_variable wake_;
    const std::function<void()>* job_ = nullptr;
    std::exception_ptr error_;
    bool stop_ = false;
    std::thread thread_;  // last: starts after the members it uses
};

// Quietens OpenCV's "can't open/read file" warnings for the run (each failure is reported once, by us).
class QuietOpenCvLog {
  public:
    QuietOpenCvLog();
    ~QuietOpenCvLog();
    QuietOpenCvLog(const QuietOpenCvLog&) = delete;
    QuietOpenCvLog& operator=(const QuietOpenCvLog&) = delete;

  private:
    int previous_;  // cv::utils::logging::LogLevel
};

// One image on its way through the pipeline.
struct Item {
    size_t index = 0;       // position in the input list
    int width = 0;          // original size, once decoded
    int height = 0;
    int slot = -1;          // position in the batch's engine buffers; -1 = not inferred
    std::string error;      // one line naming the file; empty while all is well
    bool scored = false;
    MaskMetrics metrics;
};

// What every stage needs to know.
struct Run {
    const PredictOptions& options;
    std::vector<std::string> paths;
    std::vector<std::string> stems;
    std::vector<std::string> truth_paths;  // parallel to paths when masks_dir is set
    std::filesystem::path out_dir;
    int size = 0;
    size_t input_floats = 0;   // 3 x size x size
    size_t output_floats = 0;  // size x size
    size_t begin = 0;          // the images this process runs: [begin, end) of paths
    size_t end = 0;
};

// Times and counts of one pipeline run.
struct PipelineStats {
    double pipeline_seconds = 0;   // first decode to last collect
    double inference_seconds = 0;  // inside the engine's run() calls
    size_t images_inferred = 0;    // images that went through the engine
};

// Streams images [run.begin, run.end) through decode -> infer -> finish -> collect with `batches_in_flight` live
// batches. `collect` sees every item in input order (item.error set for a failed one); `progress` the number done.
void run_pipeline(const Run& run, Runner& runner, InferenceThread& inference_thread, const std::function<void(const Item&)>& collect,
                  const std::function<void(size_t done)>& progress, PipelineStats& stats);

// A CSV field, quoted (RFC 4180) when it holds a comma, quote or line break.
std::string csv_field(const std::string& text);

}  // namespace resunet
