// The streaming pipeline of `resunet predict`: see predict_pipeline.h.
#include "apps/lib/predict_pipeline.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <span>

#include <fmt/format.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/parallel_pipeline.h>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "apps/lib/image_inputs.h"
#include "data/dataset.h"
#include "data/postprocess.h"
#include "graph/atomic_file.h"
#include "graph/input_file.h"

namespace fs = std::filesystem;

namespace resunet {

std::string mask_file_name(const std::string& stem) { return stem + ".png"; }
std::string overlay_file_name(const std::string& stem) { return stem + "_overlay.png"; }
std::string probability_file_name(const std::string& stem) { return stem + "_probability.png"; }

std::vector<std::string> output_file_names(const PredictOptions& options, const std::string& stem) {
    std::vector<std::string> names = {mask_file_name(stem)};
    if (options.overlay) names.push_back(overlay_file_name(stem));
    if (options.save_probabilities) names.push_back(probability_file_name(stem));
    return names;
}

std::string csv_field(const std::string& text) {
    if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
    std::string quoted = "\"";
    for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
    return quoted + "\"";
}

InferenceThread::InferenceThread() : thread_([this] { loop(); }) {}

InferenceThread::~InferenceThread() {
    {
        std::lock_guard lock(mutex_);
        stop_ = true;
    }
    wake_.notify_all();
    thread_.join();
}

void InferenceThread::run(const std::function<void()>& job) {
    std::unique_lock lock(mutex_);
    job_ = &job;
    error_ = nullptr;
    wake_.notify_all();
    wake_.wait(lock, [this] { return job_ == nullptr; });
    if (error_) std::rethrow_exception(error_);
}

void InferenceThread::loop() {
    std::unique_lock lock(mutex_);
    for (;;) {
        wake_.wait(lock, [this] { return stop_ || job_ != nullptr; });
        if (stop_) return;
        try {
            (*job_)();
        } catch (...) {
            error_ = std::current_exception();
        }
        job_ = nullptr;
        wake_.notify_all();
    }
}

QuietOpenCvLog::QuietOpenCvLog() : previous_(cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_ERROR)) {}
QuietOpenCvLog::~QuietOpenCvLog() { cv::utils::logging::setLogLevel(static_cast<cv::utils::logging::LogLevel>(previous_)); }

namespace {

struct Batch {
    std::vector<Item> items;
    std::vector<float> src;  // batch x 3 x size x size
    std::vector<float> dst;  // batch x 1 x size x size
};

// Mask contour and a translucent green tint over the image.
cv::Mat make_overlay(const cv::Mat& bgr, const cv::Mat& mask) {
    cv::Mat overlay = bgr.clone();
    cv::Mat tinted;
    bgr.convertTo(tinted, -1, 0.6, 0.0);
    cv::add(tinted, cv::Scalar(0, 0.4 * 255, 0), tinted);
    tinted.copyTo(overlay, mask);
    std::vector<std::vector<cv::Point>> contours;
    cv::findContours(mask, contours, cv::RETR_EXTERNAL, cv::CHAIN_APPROX_SIMPLE);
    const int thickness = std::max(1, std::min(bgr.cols, bgr.rows) / 250);
    cv::drawContours(overlay, contours, -1, cv::Scalar(0, 255, 255), thickness, cv::LINE_8);
    return overlay;
}

void encode_and_write(const std::string& path, const cv::Mat& image) {
    std::vector<uchar> png;
    if (!cv::imencode(".png", image, png)) throw Error(fmt::format("{}: PNG encoding failed", path));
    write_file_atomic(path, {std::span<const uint8_t>(png.data(), png.size())});
}

// Reads one image, refuses oversized ones, resizes to the model size (INTER_AREA) and normalises into dst.
// `full_decode`: at full size even with --fast-decode (--overlay draws on the full-size image, decoded again
// in finish_item: keeping every in-flight original would hold batch x batches-in-flight full images).
void load_input(const Run& run, Item& item, float* dst, bool full_decode) {
    const std::string& path = run.paths[item.index];
    const int64_t max_pixels = run.options.max_pixels;
    auto refuse_if_large = [&](cv::Size size) {
        if (static_cast<int64_t>(size.width) * size.height > max_pixels)
            throw Error(fmt::format("{}: {}x{} is {:.1f} megapixels, over the limit of {:.1f}", path, size.width,
                                    size.height, static_cast<double>(size.width) * size.height / 1e6,
                                    static_cast<double>(max_pixels) / 1e6));
    };
    struct stat info {};
    if (::stat(path.c_str(), &info) != 0) throw Error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
    if (S_ISDIR(info.st_mode)) throw Error(fmt::format("{}: is a folder, not an image", path));
    if (const std::string problem = input_file_problem(path); !problem.empty()) throw Error(fmt::format("{}: {}", path, problem));
    if (::access(path.c_str(), R_OK) != 0) throw Error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
    refuse_if_large(probe_image_size(path));
    cv::Mat bgr;
    if (run.options.fast_decode && !full_decode) {
        cv::Size original;
        bgr = read_image_reduced(path, 2 * run.size, original);  // INTER_AREA still averages >= 2x2 pixels
        item.width = original.width;
        item.height = original.height;
    } else {
        bgr = read_image(path);
        refuse_if_large(bgr.size());
        item.width = bgr.cols;
        item.height = bgr.rows;
    }
    cv::Mat resized;
    cv::resize(bgr, resized, cv::Size(run.size, run.size), 0, 0, cv::INTER_AREA);
    const HostTensor tensor = image_to_tensor(resized, kImageNetMean, kImageNetStd);
    std::memcpy(dst, tensor.f32(), run.input_floats * sizeof(float));
}

std::string error_text(const std::exception& e) { return one_line(e.what()); }

// The mask at the original size: the logits resized as logits_to_mask resizes them, foreground where the
// probability is above --threshold (at 0.5, logit > 0: logits_to_mask's mask exactly). With --save-probabilities
// also the probability map, round(255 * sigmoid(logit)), into `probability`.
cv::Mat mask_at_threshold(const Run& run, const Item& item, const float* logits, cv::Mat* probability) {
    if (run.options.threshold == 0.5 && !probability) return logits_to_mask(logits, run.size, run.size, item.width, item.height);
    const cv::Mat map(run.size, run.size, CV_32F, const_cast<float*>(logits));
    cv::Mat resized;
    if (item.width == run.size && item.height == run.size) resized = map;
    else cv::resize(map, resized, cv::Size(item.width, item.height), 0, 0, cv::INTER_LINEAR);
    const double t = run.options.threshold;
    cv::Mat mask;
    cv::threshold(resized, mask, t == 0.5 ? 0.0 : std::log(t / (1.0 - t)), 1.0, cv::THRESH_BINARY);
    mask.convertTo(mask, CV_8U);
    if (probability) {
        cv::Mat negative_exp;
        cv::exp(-resized, negative_exp);
        cv::Mat sigmoid = 1.0 / (1.0 + negative_exp);
        sigmoid.convertTo(*probability, CV_8U, 255.0);  // rounds and saturates
    }
    return mask;
}

// Resizes back, writes mask (and overlay, probability map), scores against the ground truth.
void finish_item(const Run& run, Item& item, const float* logits) {
    const std::string& stem = run.stems[item.index];
    cv::Mat probability;
    const cv::Mat mask = mask_at_threshold(run, item, logits, run.options.save_probabilities ? &probability : nullptr);  // {0, 1}
    encode_and_write((run.out_dir / mask_file_name(stem)).string(), mask * 255);
    if (run.options.save_probabilities) encode_and_write((run.out_dir / probability_file_name(stem)).string(), probability);
    if (run.options.overlay) {
        // Decoded again here, so an original lives only while its overlay is drawn (one per finishing thread).
        const cv::Mat original = read_image(run.paths[item.index], run.options.max_pixels);
        if (original.size() != mask.size())
            throw Error(fmt::format("{}: changed while it was read ({}x{}, then {}x{})", run.paths[item.index], mask.cols,
                                    mask.rows, original.cols, original.rows));
        encode_and_write((run.out_dir / overlay_file_name(stem)).string(), make_overlay(original, mask));
    }
    if (!run.truth_paths.empty()) {
        const std::string& truth_path = run.truth_paths[item.index];
        const cv::Mat truth = read_mask(truth_path);
        if (truth.size() != mask.size())
            throw Error(fmt::format("{}: ground truth {} is {}x{} but the image is {}x{} (WxH)", run.paths[item.index],
                                    truth_path, truth.cols, truth.rows, mask.cols, mask.rows));
        item.metrics = compute_mask_metrics(mask, truth);
        item.scored = true;
    }
}

}  // namespace

void run_pipeline(const Run& run, Runner& runner, InferenceThread& inference_thread, const std::function<void(const Item&)>& collect_item,
                  const std::function<void(size_t done)>& progress, PipelineStats& stats) {
    const PredictOptions& options = run.options;
    // A fixed pool of batches, one per live token: memory does not grow with the image count.
    const size_t tokens = static_cast<size_t>(options.batches_in_flight);
    std::vector<std::unique_ptr<Batch>> pool_storage;
    std::vector<Batch*> free_batches;
    std::mutex pool_mutex;
    for (size_t t = 0; t < tokens; ++t) {
        auto batch = std::make_unique<Batch>();
        batch->src.resize(static_cast<size_t>(options.batch) * run.input_floats);
        batch->dst.resize(static_cast<size_t>(options.batch) * run.output_floats);
        free_batches.push_back(batch.get());
        pool_storage.push_back(std::move(batch));
    }

    // Serial: the next batch of input indices.
    size_t next = run.begin;
    auto make_batch = [&](tbb::flow_control& control) -> Batch* {
        if (next >= run.end) {
            control.stop();
            return nullptr;
        }
        Batch* batch = nullptr;
        {
            std::lock_guard lock(pool_mutex);
            batch = free_batches.back();
            free_batches.pop_back();
        }
        const size_t count = std::min<size_t>(static_cast<size_t>(options.batch), run.end - next);
        batch->items.assign(count, Item{});
        for (size_t k = 0; k < count; ++k) batch->items[k].index = next + k;
        next += count;
        return batch;
    };
    // Parallel: decode and preprocess each image into its slot.
    auto decode = [&](Batch* batch) {
        tbb::parallel_for(size_t(0), batch->items.size(), [&](size_t k) {
            Item& item = batch->items[k];
            try {
                load_input(run, item, batch->src.data() + k * run.input_floats, options.overlay);
            } catch (const std::exception& e) {
                item.error = error_text(e);
            }
        });
        return batch;
    };
    // Serial (the engine is not thread-safe): pack the decoded images together and infer.
    auto infer = [&](Batch* batch) {
        int count = 0;
        for (size_t k = 0; k < batch->items.size(); ++k) {
            Item& item = batch->items[k];
            if (!item.error.empty()) continue;
            const size_t slot = static_cast<size_t>(count);
            if (slot != k)
                std::memmove(batch->src.data() + slot * run.input_floats, batch->src.data() + k * run.input_floats,
                             run.input_floats * sizeof(float));
            item.slot = count++;
        }
        if (count == 0) return batch;
        const auto inference_start = Clock::now();
        try {
            inference_thread.run([&] { runner.run(batch->src.data(), count, batch->dst.data()); });
        } catch (const std::exception& e) {
            for (Item& item : batch->items) {
                if (item.slot < 0) continue;
                item.error = fmt::format("{}: inference failed: {}", run.paths[item.index], error_text(e));
                item.slot = -1;
            }
            return batch;
        }
        stats.inference_seconds += seconds_since(inference_start);
        stats.images_inferred += static_cast<size_t>(count);
        return batch;
    };
    // Parallel: resize back, encode, write, score.
    auto finish = [&](Batch* batch) {
        tbb::parallel_for(size_t(0), batch->items.size(), [&](size_t k) {
            Item& item = batch->items[k];
            if (item.slot < 0) return;
            try {
                finish_item(run, item, batch->dst.data() + static_cast<size_t>(item.slot) * run.output_floats);
            } catch (const std::exception& e) {
                const std::string text = error_text(e);
                const std::string& path = run.paths[item.index];
                item.error = text.find(path) == std::string::npos ? path + ": " + text : text;
            }
        });
        return batch;
    };
    // Serial, in input order: results, progress, batch back to the pool.
    size_t done = 0;
    const auto pipeline_start = Clock::now();
    auto collect = [&](Batch* batch) {
        for (const Item& item : batch->items) collect_item(item);
        done += batch->items.size();
        progress(done);
        batch->items.clear();
        std::lock_guard lock(pool_mutex);
        free_batches.push_back(batch);
    };

    using tbb::filter_mode;
    tbb::parallel_pipeline(tokens, tbb::make_filter<void, Batch*>(filter_mode::serial_in_order, make_batch) &
                                       tbb::make_filter<Batch*, Batch*>(filter_mode::parallel, decode) &
                                       tbb::make_filter<Batch*, Batch*>(filter_mode::serial_in_order, infer) &
                                       tbb::make_filter<Batch*, Batch*>(filter_mode::parallel, finish) &
                                       tbb::make_filter<Batch*, void>(filter_mode::serial_in_order, collect));
    stats.pipeline_seconds = seconds_since(pipeline_start);
}

}  // namespace resunet
