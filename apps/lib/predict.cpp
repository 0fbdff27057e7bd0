#include "apps/lib/predict.h"
#include "apps/lib/quantize_cli.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <functional>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <unordered_map>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/parallel_pipeline.h>
#include <oneapi/tbb/task_arena.h>
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/dataset.h"
#include "engine/engine.h"
#include "engine/plan_cache.h"
#include "graph/atomic_file.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Exception text as one line (OpenCV's messages span several).
std::string one_line(std::string text) {
    for (char& c : text)
        if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    while (!text.empty() && text.back() == ' ') text.pop_back();
    return text;
}

std::string lower_extension(const fs::path& path) {
    std::string ext = path.extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return ext;
}

// Supported, non-hidden regular files of one folder, sorted by name.
std::vector<fs::path> list_image_folder(const fs::path& folder) {
    std::vector<fs::path> files;
    std::error_code ec;
    for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
        const fs::path& path = it->path();
        const std::string name = path.filename().string();
        if (name.empty() || name[0] == '.' || !is_supported_image(name)) continue;
        std::error_code type_ec;
        if (!it->is_regular_file(type_ec)) continue;
        files.push_back(path);
    }
    if (ec) throw UsageError(fmt::format("{}: cannot list folder: {}", folder.string(), ec.message()));
    std::sort(files.begin(), files.end());
    return files;
}

void add_path(const fs::path& path, bool from_list, std::vector<std::string>& images) {
    std::error_code ec;
    const fs::file_status status = fs::status(path, ec);
    if (fs::is_directory(status)) {
        for (const fs::path& file : list_image_folder(path)) images.push_back(file.string());
    } else if (fs::exists(status) || from_list) {
        images.push_back(path.string());
    } else {
        throw UsageError(fmt::format("input '{}' does not exist", path.string()));
    }
}

// ---- header probes (no pixel decode) ----

int read_byte(std::istream& in) { return in.get(); }

bool read_be16(std::istream& in, int& value) {
    const int hi = in.get(), lo = in.get();
    if (hi < 0 || lo < 0) return false;
    value = (hi << 8) | lo;
    return true;
}

cv::Size jpeg_size(std::istream& in) {
    if (read_byte(in) != 0xFF || read_byte(in) != 0xD8) return {};
    for (;;) {
        if (read_byte(in) != 0xFF) return {};
        int marker = read_byte(in);
        while (marker == 0xFF) marker = read_byte(in);
        if (marker < 0 || marker == 0xD9 || marker == 0xDA) return {};
        if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) continue;  // no length field
        int length = 0;
        if (!read_be16(in, length) || length < 2) return {};
        const bool is_frame = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
        if (is_frame) {
            int height = 0, width = 0;
            if (read_byte(in) < 0 || !read_be16(in, height) || !read_be16(in, width)) return {};
            return width > 0 && height > 0 ? cv::Size(width, height) : cv::Size();
        }
        in.seekg(length - 2, std::ios::cur);
        if (!in) return {};
    }
}

uint32_t load_u32(const unsigned char* p, bool big_endian) {
    return big_endian ? (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3])
                      : (uint32_t(p[3]) << 24) | (uint32_t(p[2]) << 16) | (uint32_t(p[1]) << 8) | uint32_t(p[0]);
}
uint32_t load_u16(const unsigned char* p, bool big_endian) {
    return big_endian ? (uint32_t(p[0]) << 8) | uint32_t(p[1]) : (uint32_t(p[1]) << 8) | uint32_t(p[0]);
}

// ImageWidth (256) and ImageLength (257) of the first IFD of a classic TIFF.
cv::Size tiff_size(std::istream& in, bool big_endian) {
    unsigned char head[8];
    in.seekg(0);
    if (!in.read(reinterpret_cast<char*>(head), 8)) return {};
    in.seekg(load_u32(head + 4, big_endian));
    unsigned char count_bytes[2];
    if (!in.read(reinterpret_cast<char*>(count_bytes), 2)) return {};
    const uint32_t count = load_u16(count_bytes, big_endian);
    int64_t width = 0, height = 0;
    for (uint32_t i = 0; i < count && i < 4096; ++i) {
        unsigned char entry[12];
        if (!in.read(reinterpret_cast<char*>(entry), 12)) return {};
        const uint32_t tag = load_u16(entry, big_endian), type = load_u16(entry + 2, big_endian);
        const uint32_t value = type == 3 ? load_u16(entry + 8, big_endian) : type == 4 ? load_u32(entry + 8, big_endian) : 0;
        if (tag == 256) width = value;
        if (tag == 257) height = value;
    }
    if (width <= 0 || height <= 0 || width > INT32_MAX || height > INT32_MAX) return {};
    return cv::Size(static_cast<int>(width), static_cast<int>(height));
}

// ---- output files ----

std::string mask_file_name(const std::string& stem) { return stem + ".png"; }
std::string overlay_file_name(const std::string& stem) { return stem + "_overlay.png"; }
constexpr const char* kMetricsCsvName = "metrics.csv";
constexpr const char* kSummaryJsonName = "summary.json";

// A file written row by row into a hidden temp file next to `path`, renamed over it by commit() (after
// fsync), so a crash never leaves a torn metrics.csv and rows need not be held in memory.
class StreamedFile {
  public:
    explicit StreamedFile(std::string path) : path_(std::move(path)) {
        const fs::path target(path_);
        temp_ = (target.parent_path() / fmt::format(".{}.partial.{}", target.filename().string(), ::getpid())).string();
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

// ---- engines ----

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
    InferenceThread() : thread_([this] { loop(); }) {}
    ~InferenceThread() {
        {
            std::lock_guard lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        thread_.join();
    }
    InferenceThread(const InferenceThread&) = delete;
    InferenceThread& operator=(const InferenceThread&) = delete;

    // Runs `job` on the thread and waits for it; rethrows what it threw.
    void run(const std::function<void()>& job) {
        std::unique_lock lock(mutex_);
        job_ = &job;
        error_ = nullptr;
        wake_.notify_all();
        wake_.wait(lock, [this] { return job_ == nullptr; });
        if (error_) std::rethrow_exception(error_);
    }

  private:
    void loop() {
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
    std::mutex mutex_;
    std::condition_variable wake_;
    const std::function<void()>* job_ = nullptr;
    std::exception_ptr error_;
    bool stop_ = false;
    std::thread thread_;  // last: starts after the members it uses
};

bool has_stored_static_scales(const TensorMap& tensors) {
    return std::any_of(tensors.begin(), tensors.end(), [](const auto& entry) {
        const std::string& name = entry.first;
        const std::string suffix = ".input_scale";
        return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    });
}

// Quietens OpenCV's "can't open/read file" warnings for the run (each failure is reported once, by us).
class QuietOpenCvLog {
  public:
    QuietOpenCvLog() : previous_(cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_ERROR)) {}
    ~QuietOpenCvLog() { cv::utils::logging::setLogLevel(previous_); }
    QuietOpenCvLog(const QuietOpenCvLog&) = delete;
    QuietOpenCvLog& operator=(const QuietOpenCvLog&) = delete;

  private:
    cv::utils::logging::LogLevel previous_;
};

// ---- the pipeline's data ----

struct Item {
    size_t index = 0;       // position in the input list
    int width = 0;          // original size, once decoded
    int height = 0;
    int slot = -1;          // position in the batch's engine buffers; -1 = not inferred
    cv::Mat original;       // decoded BGR, kept only for the overlay
    std::string error;      // one line naming the file; empty while all is well
    bool scored = false;
    MaskMetrics metrics;
};

struct Batch {
    std::vector<Item> items;
    std::vector<float> src;  // batch x 3 x size x size
    std::vector<float> dst;  // batch x 1 x size x size
};

// What every stage needs to know.
struct Run {
    const PredictOptions& options;
    std::vector<std::string> paths;
    std::vector<std::string> stems;
    std::vector<std::string> truth_paths;  // parallel to paths when masks_dir is set
    fs::path out_dir;
    int size = 0;
    size_t input_floats = 0;   // 3 x size x size
    size_t output_floats = 0;  // size x size
};

// Reads one image, refuses oversized ones, resizes to the model size (INTER_AREA) and normalises into dst.
void load_input(const Run& run, Item& item, float* dst, bool keep_original) {
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
    if (::access(path.c_str(), R_OK) != 0) throw Error(fmt::format("{}: cannot open: {}", path, std::strerror(errno)));
    refuse_if_large(probe_image_size(path));
    cv::Mat bgr;
    if (run.options.fast_decode && !keep_original) {
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
    if (keep_original) item.original = std::move(bgr);
}

std::string error_text(const std::exception& e) { return one_line(e.what()); }

// A CSV field, quoted (RFC 4180) when it holds a comma, quote or line break.
std::string csv_field(const std::string& text) {
    if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
    std::string quoted = "\"";
    for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
    return quoted + "\"";
}

// Resizes back, writes mask (and overlay), scores against the ground truth.
void finish_item(const Run& run, Item& item, const float* logits) {
    const std::string& stem = run.stems[item.index];
    const cv::Mat mask = logits_to_mask(logits, run.size, run.size, item.width, item.height);  // {0, 1}
    encode_and_write((run.out_dir / mask_file_name(stem)).string(), mask * 255);
    if (run.options.overlay) {
        encode_and_write((run.out_dir / overlay_file_name(stem)).string(), make_overlay(item.original, mask));
        item.original.release();
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

// Prints a failure line or progress on the log without the two garbling each other.
class Console {
  public:
    Console(std::FILE* log, bool progress, size_t total) : log_(log), progress_(progress && log), total_(total) {}

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

nlohmann::json summary_json(const MetricSummary& s) {
    return {{"count", s.count}, {"mean", s.mean}, {"std", s.std}, {"min", s.min}, {"max", s.max}};
}

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
        throw UsageError(fmt::format("--calibration-images must be at least 1, got {}", options.calibration_images));
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
    for (size_t i = 0; i < run.paths.size(); ++i) {
        claim(mask_file_name(run.stems[i]), i);
        if (run.options.overlay) claim(overlay_file_name(run.stems[i]), i);
    }
    if (metrics) {
        for (const char* name : {kMetricsCsvName, kSummaryJsonName})
            if (auto it = owner.find(name); it != owner.end())
                throw UsageError(fmt::format("input '{}' would write {}, which --masks needs for {}", run.paths[it->second],
                                             (run.out_dir / name).string(), name));
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
    for (size_t i = 0; i < run.paths.size(); ++i) {
        names.push_back(mask_file_name(run.stems[i]));
        if (run.options.overlay) names.push_back(overlay_file_name(run.stems[i]));
    }
    if (metrics) names.insert(names.end(), {kMetricsCsvName, kSummaryJsonName});
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

}  // namespace

// ---- public helpers ----

const char* precision_name(Precision precision) {
    switch (precision) {
        case Precision::int8: return "int8";
        case Precision::fp32: return "fp32";
        case Precision::static_int8: return "static-int8";
    }
    return "?";
}

bool is_supported_image(const std::string& path) {
    const std::string ext = lower_extension(fs::path(path));
    return ext == ".jpg" || ext == ".jpeg" || ext == ".png" || ext == ".tif" || ext == ".tiff" || ext == ".bmp";
}

std::vector<std::string> collect_input_images(const std::vector<std::string>& inputs) {
    std::vector<std::string> images;
    for (const std::string& input : inputs) {
        if (input.size() > 1 && input[0] == '@') {
            const std::string list_path = input.substr(1);
            std::error_code ec;
            if (fs::is_directory(list_path, ec)) throw UsageError(fmt::format("list file '{}' is a folder", list_path));
            std::ifstream list(list_path);
            if (!list) throw UsageError(fmt::format("cannot open list file '{}': {}", list_path, std::strerror(errno)));
            std::string line;
            while (std::getline(list, line)) {
                const size_t begin = line.find_first_not_of(" \t\r");
                if (begin == std::string::npos || line[begin] == '#') continue;
                const size_t end = line.find_last_not_of(" \t\r");
                add_path(fs::path(line.substr(begin, end - begin + 1)), true, images);
            }
            if (list.bad()) throw UsageError(fmt::format("error reading list file '{}'", list_path));
        } else {
            add_path(fs::path(input), false, images);
        }
    }
    return images;
}

cv::Size probe_image_size(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return {};
    unsigned char head[26] = {};
    in.read(reinterpret_cast<char*>(head), sizeof(head));
    const std::streamsize got = in.gcount();
    in.clear();
    if (got >= 2 && head[0] == 0xFF && head[1] == 0xD8) {
        in.seekg(0);
        return jpeg_size(in);
    }
    static const unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
    if (got >= 24 && std::equal(kPngSignature, kPngSignature + 8, head) && std::memcmp(head + 12, "IHDR", 4) == 0) {
        const uint32_t width = load_u32(head + 16, true), height = load_u32(head + 20, true);
        if (width == 0 || height == 0 || width > INT32_MAX || height > INT32_MAX) return {};
        return cv::Size(static_cast<int>(width), static_cast<int>(height));
    }
    if (got >= 26 && head[0] == 'B' && head[1] == 'M' && load_u32(head + 14, false) >= 40) {
        const auto width = static_cast<int32_t>(load_u32(head + 18, false));
        auto height = static_cast<int32_t>(load_u32(head + 22, false));
        if (height < 0 && height != INT32_MIN) height = -height;  // top-down bitmap
        return width > 0 && height > 0 ? cv::Size(width, height) : cv::Size();
    }
    if (got >= 8 && ((head[0] == 'I' && head[1] == 'I' && head[2] == 42 && head[3] == 0) ||
                     (head[0] == 'M' && head[1] == 'M' && head[2] == 0 && head[3] == 42)))
        return tiff_size(in, head[0] == 'M');
    return {};
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

// ---- the command ----

namespace {

// Inputs, their output names and ground truth, and every check on them that needs no decode.
Run plan_run(const PredictOptions& options) {
    {
        struct stat info {};
        if (::stat(options.model_path.c_str(), &info) != 0)
            throw UsageError(fmt::format("--model '{}': {}", options.model_path, std::strerror(errno)));
        if (S_ISDIR(info.st_mode)) throw UsageError(fmt::format("--model '{}' is a folder, not a .safetensors file", options.model_path));
    }
    Run run{options, collect_input_images(options.inputs), {}, {}, {}, 0, 0, 0};
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
};

// Loads the weights, infers the configuration and compiles the engine; any failure is a UsageError.
LoadedModel load_model(const PredictOptions& options, std::FILE* log) {
    const std::string& path = options.model_path;
    SafetensorsFile file;
    try {
        file = load_safetensors(path);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model: {}", error_text(e)));
    }
    LoadedModel model;
    Graph graph;
    try {
        model.config = infer_resunet_config(file.tensors, file.metadata, options.size > 0 ? options.size : kDefaultModelSize);
        graph = build_resunet(model.config);
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model '{}': {}", path, error_text(e)));
    }
    if (model.config.out_channels != 1)
        throw UsageError(fmt::format("--model '{}' has {} output channels; predict needs a one-channel (polyp) model", path,
                                     model.config.out_channels));
    if (options.size > 0 && model.config.height != options.size && log)
        fmt::print(log, "note: the model file says size {}; --size {} applies only to files without that metadata\n",
                   model.config.height, options.size);
    const bool int8_file = is_int8_weights(file.tensors);
    model.stored_scales = int8_file && has_stored_static_scales(file.tensors);
    try {
        if (options.precision == Precision::fp32) {
            if (int8_file) throw UsageError(fmt::format("--model '{}' is an int8 file; --precision fp32 needs fp32 weights", path));
            EngineOptions engine_options;
            engine_options.threads = options.threads;
            engine_options.plan_cache = default_plan_cache();  // tuned once per machine and graph
            model.runner.fp32 = std::make_unique<Engine>(graph, file.tensors, engine_options);
            model.engine = "fp32";
        } else {
            QuantOptions quant_options;
            quant_options.threads = options.threads;
            quant_options.mode = options.precision == Precision::static_int8 ? ScaleMode::static_calibrated : ScaleMode::dynamic;
            model.runner.int8 = std::make_unique<QuantEngine>(graph, file.tensors, quant_options);
            model.engine = model.stored_scales ? "int8 (static scales stored in the model)" : "int8 (dynamic scales)";
        }
    } catch (const UsageError&) {
        throw;
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model '{}': {}", path, error_text(e)));
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

// The last stage's state: counts, failures, metrics rows and progress, in input order.
class Collector {
  public:
    Collector(const Run& run, PredictReport& report, Console& console) : run_(run), report_(report), console_(console) {
        if (run.truth_paths.empty()) return;
        report.have_metrics = true;
        report.metrics_csv_path = (run.out_dir / kMetricsCsvName).string();
        report.summary_json_path = (run.out_dir / kSummaryJsonName).string();
        csv_ = std::make_unique<StreamedFile>(report.metrics_csv_path);
        fmt::print(csv_->get(), "id,width,height,dice,iou,mean_iou\n");
    }

    void add(const Item& item) {
        if (!item.error.empty()) {
            ++report_.images_failed;
            report_.failures.push_back({run_.paths[item.index], item.error});
            console_.line("error: " + item.error);
            return;
        }
        ++report_.images_ok;
        if (!item.scored) return;
        const MaskMetrics& m = item.metrics;
        fmt::print(csv_->get(), "{},{},{},{:.6f},{:.6f},{:.6f}\n", csv_field(run_.stems[item.index]), item.width, item.height,
                   m.dice, m.iou, m.mean_iou);
        dice_.push_back(m.dice);
        iou_.push_back(m.iou);
        mean_iou_.push_back(m.mean_iou);
        report_.pooled.add(m.counts);
    }

    // Summaries, metrics.csv renamed into place, summary.json.
    void finish() {
        if (!csv_) return;
        report_.dice = summarize(dice_);
        report_.iou = summarize(iou_);
        report_.mean_iou = summarize(mean_iou_);
        csv_->commit();
        const nlohmann::json json = {
            {"model", run_.options.model_path},
            {"precision", precision_name(run_.options.precision)},
            {"engine", report_.engine},
            {"model_size", run_.size},
            {"images",
             {{"total", report_.images_total}, {"ok", report_.images_ok}, {"failed", report_.images_failed}, {"scored", dice_.size()}}},
            {"resize", "logits resized to the original size with INTER_LINEAR, foreground where logit > 0"},
            {"per_image",
             {{"dice", summary_json(report_.dice)}, {"iou", summary_json(report_.iou)}, {"mean_iou", summary_json(report_.mean_iou)}}},
            {"pooled", {{"dice", report_.pooled.dice()}, {"iou", report_.pooled.iou()}, {"mean_iou", report_.pooled.mean_iou()}}},
        };
        write_file_atomic(report_.summary_json_path, json.dump(2) + "\n");
    }

  private:
    const Run& run_;
    PredictReport& report_;
    Console& console_;
    std::unique_ptr<StreamedFile> csv_;        // rows stream to disk: nothing per image is held but 3 doubles
    std::vector<double> dice_, iou_, mean_iou_;  // for summarize()
};

// Streams all images through decode -> infer -> finish -> collect with `batches_in_flight` live batches.
void run_pipeline(const Run& run, Runner& runner, InferenceThread& inference_thread, Collector& collector,
                  PredictReport& report, Console& console) {
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
    size_t next = 0;
    auto make_batch = [&](tbb::flow_control& control) -> Batch* {
        if (next >= run.paths.size()) {
            control.stop();
            return nullptr;
        }
        Batch* batch = nullptr;
        {
            std::lock_guard lock(pool_mutex);
            batch = free_batches.back();
            free_batches.pop_back();
        }
        const size_t count = std::min<size_t>(static_cast<size_t>(options.batch), run.paths.size() - next);
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
        report.inference_seconds += seconds_since(inference_start);
        report.images_inferred += static_cast<size_t>(count);
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
            item.original.release();
        });
        return batch;
    };
    // Serial, in input order: results, progress, batch back to the pool.
    size_t done = 0;
    const auto pipeline_start = Clock::now();
    auto collect = [&](Batch* batch) {
        for (const Item& item : batch->items) collector.add(item);
        done += batch->items.size();
        console.update(done, seconds_since(pipeline_start), done == run.paths.size());
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
    report.pipeline_seconds = seconds_since(pipeline_start);
}

void print_summary(std::FILE* out, const Run& run, const PredictReport& report) {
    fmt::print(out, "predict: {} images: {} ok, {} failed\n", report.images_total, report.images_ok, report.images_failed);
    fmt::print(out, "  engine      {}, batch {}\n", report.engine, run.options.batch);
    fmt::print(out, "  decode      {}\n", run.options.fast_decode && !run.options.overlay
                                                ? "--fast-decode: JPEGs at 1/2..1/8 scale, at least twice the model size"
                                                : "full resolution");
    fmt::print(out, "  setup       {:.2f} s (load, compile{})\n", report.setup_seconds,
               report.engine.find("calibrated") != std::string::npos ? ", calibrate" : "");
    fmt::print(out, "  wall        {:.2f} s for the images: {:.1f} images/s end to end\n", report.pipeline_seconds,
               report.images_per_second());
    fmt::print(out, "  inference   {:.2f} s in the engine: {:.1f} images/s\n", report.inference_seconds,
               report.inference_images_per_second());
    fmt::print(out, "  peak RSS    {:.1f} MiB (VmHWM)\n", static_cast<double>(report.peak_rss_bytes) / (1024.0 * 1024.0));
    fmt::print(out, "  masks       {}\n", (run.out_dir / "<stem>.png").string());
    if (report.have_metrics) {
        fmt::print(out, "metrics over {} images (per image: mean ± std [min, max]):\n", report.dice.count);
        fmt::print(out, "{}\n{}\n{}\n", format_summary_line("dice", report.dice), format_summary_line("iou", report.iou),
                   format_summary_line("mean_iou", report.mean_iou));
        fmt::print(out, "  pooled    dice {:.4f}  iou {:.4f}  mean_iou {:.4f}\n", report.pooled.dice(), report.pooled.iou(),
                   report.pooled.mean_iou());
        fmt::print(out, "  written   {}, {}\n", report.metrics_csv_path, report.summary_json_path);
    }
    std::fflush(out);
}

}  // namespace

PredictReport run_predict(const PredictOptions& options) {
    const auto start = Clock::now();
    check_options(options);
    Run run = plan_run(options);  // before the model loads: a typo in a path costs no load time
    LoadedModel model = load_model(options, options.log);
    run.size = model.config.height;
    run.input_floats = static_cast<size_t>(3) * run.size * run.size;
    run.output_floats = static_cast<size_t>(run.size) * run.size;
    create_out_dir(run.out_dir);

    std::optional<tbb::global_control> thread_limit;
    if (options.threads > 0) thread_limit.emplace(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(options.threads));
    const QuietOpenCvLog quiet_opencv;
    InferenceThread inference_thread;
    PredictReport report;
    report.images_total = run.paths.size();
    report.engine = model.engine;
    Console console(options.log, options.progress, run.paths.size());
    console.line(fmt::format("resunet predict: {} images, model {} (width {}, depth {}, size {}), {}, batch {}, {} threads",
                             run.paths.size(), options.model_path, model.config.width, model.config.depth, run.size,
                             model.engine, options.batch,
                             options.threads > 0 ? options.threads : tbb::this_task_arena::max_concurrency()));
    if (options.precision == Precision::static_int8 && !model.stored_scales) {
        const auto calibration_start = Clock::now();
        const int used = calibrate_on_fixed_set(run, model, inference_thread);
        console.line(fmt::format("static-int8: the model stores no static scales; calibrated on the fixed synthetic set of {} "
                                 "images ({:.2f} s; `resunet quantize` stores scales from real images)",
                                 used, seconds_since(calibration_start)));
        report.engine = fmt::format("int8 (static scales, calibrated on the fixed synthetic set of {} images)", used);
    }
    report.setup_seconds = seconds_since(start);

    Collector collector(run, report, console);
    run_pipeline(run, model.runner, inference_thread, collector, report, console);
    collector.finish();
    report.peak_rss_bytes = peak_rss_bytes();
    if (options.out) print_summary(options.out, run, report);
    return report;
}

int run_command(const char* name, const std::function<int()>& body) {
    try {
        return body();
    } catch (const UsageError& e) {
        fmt::print(stderr, "resunet {}: error: {}\n", name, one_line(e.what()));
        return 2;
    } catch (const std::exception& e) {
        fmt::print(stderr, "resunet {}: error: {}\n", name, one_line(e.what()));
        return 1;
    }
}

int predict_command(const PredictOptions& options) {
    return run_command("predict", [&] { return run_predict(options).exit_code(); });
}

void add_predict_command(CLI::App& app) {
    auto options = std::make_shared<PredictOptions>();
    auto force_progress = std::make_shared<bool>(false);
    CLI::App* command = app.add_subcommand("predict", "Segment images with a model; write 0/255 PNG masks (and metrics with --masks)");
    command->add_option("inputs", options->inputs, "Image files, folders of images (JPEG/PNG/TIFF/BMP, sorted) or @list.txt")
        ->required()
        ->type_name("INPUT");
    command->add_option("--model", options->model_path, "Model .safetensors (fp32, or int8 from `resunet quantize`)")
        ->required();
    auto precision = std::make_shared<std::string>("int8");
    command->add_option("--precision", *precision,
                        "int8 (dynamic scales, the default of predict and eval: the paper's deployed path), fp32, or "
                        "static-int8 (calibrated scales)")
        ->check(CLI::IsMember({"int8", "fp32", "static-int8"}))
        ->capture_default_str();
    command->add_option("--batch", options->batch,
                        "Images decoded together and passed to one engine call, which runs them one image per pass "
                        "(micro-batch 1), so masks do not depend on it; 3 batches are in flight at a time")
        ->check(CLI::Range(1, 1024))->default_val(16);
    command->add_option("--threads", options->threads, "Worker threads for decoding and oneDNN; 0 = all cores")
        ->check(CLI::Range(0, 4096))
        ->default_val(0);
    command->add_option("--out", options->out_dir, "Output folder for <stem>.png masks (created if missing)")->required();
    command->add_flag("--overlay", options->overlay, "Also write <stem>_overlay.png: contour and tint over the image");
    command->add_option("--masks", options->masks_dir,
                        "Ground-truth folder (masks matched by stem): writes metrics.csv and summary.json to --out");
    command->add_flag("--overwrite", options->overwrite, "Replace existing outputs (default: refuse to start)");
    command->add_flag("--fast-decode", options->fast_decode,
                      "Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg) while still at least twice the model size: several times "
                      "faster for large images; the model input differs slightly from a full decode. Not with --overlay");
    command->add_option("--size", options->size, "Model input size for files without 'resunet.size' metadata (default 224)")
        ->check(CLI::Range(1, 65536));
    command->add_option("--calibration-images", options->calibration_images,
                        "static-int8 with a model that stores no scales: calibrate on a fixed synthetic set of N images "
                        "(seeded, the same in every run, so a mask never depends on the other inputs); a `resunet quantize` "
                        "file stores scales from real images and is used as is")
        ->check(CLI::Range(1, 4096))
        ->default_val(16);
    command->add_flag("--progress", *force_progress, "Show the progress bar even when stderr is not a terminal");
    command->callback([options, force_progress, precision] {
        PredictOptions run_options = *options;
        run_options.precision = *precision == "fp32"          ? Precision::fp32
                                : *precision == "static-int8" ? Precision::static_int8
                                                              : Precision::int8;
        run_options.progress = *force_progress || ::isatty(STDERR_FILENO) != 0;
        const int code = predict_command(run_options);
        if (code != 0) throw CLI::RuntimeError(code);
    });
}

}  // namespace resunet
