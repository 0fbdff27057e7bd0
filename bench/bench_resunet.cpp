// bench_resunet: the paper's Table 1 on this machine, with how every figure was measured.
//
//   bench_resunet                         # width 64, 224x224, batch 16, fp32/int8/static-int8, with the trained
//                                         # models/resunet-w64-s224 and its test-split Dice (random weights
//                                         # until that model exists, or with --random-weights)
//   bench_resunet --runs 20 --layers      # plus the per-layer table (time, GFLOP/s, oneDNN kernel)
//   bench_resunet --json out/table.json --csv out/table.csv
//
// Each precision row runs in a child process of its own (this program re-executed with --row), so its
// peak RSS is that row's alone. Exit status, as `resunet`'s: 0 success, 1 the work failed, 2 a usage error
// (bad flags, missing or mismatched files) found before any work started.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <optional>
#include <thread>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "apps/lib/cli_common.h"
#include "apps/lib/evaluate.h"
#include "bench/resunet_report.h"
#include "apps/lib/flag_basics.h"
#include "apps/lib/help_format.h"
#include "data/dataset.h"
#include "data/postprocess.h"
#include "data/split.h"
#include "engine/engine.h"
#include "engine/micro_batch.h"
#include "apps/lib/engine_setup.h"
#include "engine/plan_cache.h"
#include "graph/atomic_file.h"
#include "graph/model_config.h"
#include "quant/quant_engine.h"
#include "graph/init.h"
#include "graph/safetensors.h"
#include "apps/lib/version.h"
#include "git_commit.h"  // RESUNET_GIT_COMMIT, written at build time (cmake/git_commit.cmake)

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct Options {
    int width = 64;
    int depth = 4;            // poolings: a model file's, else the paper's 4
    int size = 224;
    int batch = 16;
    int micro_batch = 1;
    // --micro-batch: "default" (fp32 rows resunet::fp32_micro_batch_for(batch), int8 rows 1), a count, or "auto"
    // (measured per row, engine/micro_batch.h)
    std::string micro_batch_text = "default";
    int threads = 0;
    int runs = 10;
    int warmup = 1;
    std::string precision = "all";
    std::string model;
    // The trained paper network Table 1 uses by default (its model.safetensors and split.json), and the
    // data it is scored on; --random-weights times random weights instead (choose_default_model).
    std::string model_dir = RESUNET_DEFAULT_MODEL_DIR;
    std::string default_data = RESUNET_DEFAULT_DATA;
    bool random_weights = false;
    bool layers = false;
    std::string json_path;
    std::string csv_path;
    std::string data;         // Kvasir-SEG style folder: Dice/IoU on its test split
    std::string split;        // split JSON (made with seed 42 and saved here if absent)
    int eval_limit = 0;       // --limit: score only the first N test images (0 = all)
    bool overwrite = false;   // replace existing --json, --csv, --chart, --examples
    int eval_size = 0;        // input size of the scoring run: 0 = the model file's resunet.size, else --size
    int also_width = 0;       // also time the rows at this width with random weights (0 = no)
    std::string chart;        // PNG: latency, memory and Dice per row
    std::string examples;     // PNG: example predictions (image, truth, fp32, int8)
    std::string row;          // internal: measure one row and write JSON to row_out
    std::string row_out;
    bool eval_row = false;    // internal: score instead of timing
    bool choose_row = false;  // internal: measure the micro-batch candidates instead of timing
    bool plan_row = false;    // internal: only compile the row's engine (measuring and caching its plan)
    std::string tune = "rule";  // both engines: rule | off | fast | full (EngineTuningFlags, apps/lib/engine_setup.h)
    std::string int8_conv = "auto";  // int8 rows' 3x3 convolutions: auto | direct | winograd | mixed (QuantOptions)
    std::vector<std::string> plan_files;  // --plan: at most one per precision (fp32, int8), run exactly
    std::string plan_cache = resunet::default_plan_cache();  // "" or "none": measure every time
    double memory_budget_mb = 0;  // EngineOptions::memory_budget_mb
};

// Without --model: the trained width-64 network of models/resunet-w64-s224 (or --model-dir), scored on
// the test split of its split.json in ../shared/data/kvasir-seg, when that model exists and has --width.
// Random weights when --random-weights says so, or (with a note) when there is no such model; a
// --model-dir the user named must hold one.
// Returns why the weights are what they are, for the report ("" when --model named them). `kept` receives
// the file it read when it chooses it, so the caller reads the 130 MB once.
std::string choose_default_model(Options& o, bool dir_given, bool width_given, std::optional<resunet::SafetensorsFile>& kept) {
    if (o.random_weights) {
        if (!o.model.empty()) throw resunet::Error("--random-weights and --model exclude each other");
        if (dir_given) throw resunet::Error("--random-weights and --model-dir exclude each other");
        return "--random-weights";
    }
    if (!o.model.empty()) return "";
    const fs::path file = fs::path(o.model_dir) / "model.safetensors";
    if (!fs::exists(file)) {
        if (dir_given) throw resunet::Error(fmt::format("--model-dir {}: no model.safetensors there", o.model_dir));
        return fmt::format("no trained model at {}", file.string());
    }
    resunet::SafetensorsFile loaded = resunet::load_safetensors(file.string());
    const resunet::ResUNetConfig found = resunet::infer_resunet_config(loaded.tensors, loaded.metadata, o.size);
    if (found.width != o.width && width_given) {
        if (dir_given)
            throw resunet::Error(fmt::format("{} is a width-{} model but --width is {}", file.string(), found.width, o.width));
        return fmt::format("{} is a width-{} model and --width is {}", file.string(), found.width, o.width);
    }
    o.width = found.width;
    o.model = file.string();
    kept = std::move(loaded);
    const fs::path split = fs::path(o.model_dir) / "split.json";
    if (o.data.empty() && fs::is_directory(fs::path(o.default_data) / "images")) {
        o.data = o.default_data;
        if (o.split.empty() && fs::exists(split)) o.split = split.string();
    }
    return "the default model (--model-dir)";
}

// The engine flags of one precision's rows, as `resunet` has them (apps/lib/engine_setup.h).
resunet::EngineTuningFlags tuning_flags_of(const Options& o, bool fp32) {
    resunet::EngineTuningFlags flags;
    flags.tune = o.tune;
    flags.plan_cache = o.plan_cache.empty() ? std::string("none") : o.plan_cache;
    // bench's --plan-cache has a default; for the int8 rows it matters only to measured choices
    if (!fp32 && !((o.tune == "fast" || o.tune == "full") && o.int8_conv == "auto")) flags.plan_cache = "none";
    if (fp32) flags.memory_budget_mb = o.memory_budget_mb;
    if (!fp32) flags.int8_conv = o.int8_conv;
    for (const std::string& file : o.plan_files) {
        resunet::EngineTuningFlags probe;
        probe.plan_file = file;
        if ((resunet::plan_flag(probe)->precision == "fp32") == fp32) {
            flags.plan_file = file;
            flags.tune = "rule";
            flags.int8_conv.clear();
            flags.memory_budget_mb = 0;
        }
    }
    return flags;
}

// --micro-batch default: fp32 rows fp32_micro_batch_for (the same numbers at any micro-batch), int8 rows 1
// (their dynamic scales are per pass: one image per pass is what resunet predict and eval run).
int default_micro_batch(const Options& o, const std::string& precision) {
    return precision == "fp32" ? resunet::fp32_micro_batch_for(o.batch) : 1;
}

// The engines' options a row runs with, at `micro_batch` images per pass (a --plan's own where one is given).
resunet::EngineOptions engine_options_of(const Options& o, int micro_batch) {
    return resunet::fp32_engine_options(tuning_flags_of(o, true), o.threads, micro_batch);
}

resunet::QuantOptions quant_options_of(const Options& o, int micro_batch) {
    return resunet::int8_engine_options(tuning_flags_of(o, false), o.threads, micro_batch);
}

// Builds the engine a row names and hands it to `use` as a LogitsRunner.
template <typename Use>
auto with_engine(const Options& o, const resunet::Graph& graph, const resunet::TensorMap& weights, const std::string& row,
                 const float* calibration, int calibration_count, Use&& use) {
    if (row == "fp32") {
        resunet::Engine engine(graph, weights, engine_options_of(o, o.micro_batch));
        return use(engine);
    }
    resunet::QuantEngine engine(graph, weights, quant_options_of(o, o.micro_batch));
    // an int8 file with stored scales (resunet quantize) starts static and keeps them
    if (row == "static-int8" && engine.mode() != resunet::ScaleMode::static_calibrated) engine.calibrate(calibration, calibration_count);
    return use(engine);
}

resunet::Graph graph_for(const Options& o) {
    resunet::ResUNetConfig config;
    config.width = o.width;
    config.depth = o.depth;
    config.height = config.width_px = o.size;
    return resunet::build_resunet(config);
}

// A row's weights: --model's, else random (Kaiming, seed 1).
resunet::TensorMap row_weights(const Options& o, const resunet::Graph& graph) {
    return o.model.empty() ? resunet::init_weights(graph, 1) : resunet::load_safetensors(o.model).tensors;
}

// The test split's dataset indices: from --split, or made with seed 42 and written there.
std::vector<size_t> test_indices(const Options& o, const resunet::Dataset& dataset) {
    resunet::Split split;
    if (!o.split.empty() && std::filesystem::exists(o.split)) {
        split = resunet::load_split(o.split, dataset);
    } else {
        split = resunet::make_split(dataset, 42, 0.2);
        if (!o.split.empty()) resunet::save_split(split, o.split);
    }
    std::vector<size_t> indices = resunet::indices_of(dataset, split.test_ids);
    if (o.eval_limit > 0 && indices.size() > static_cast<size_t>(o.eval_limit)) indices.resize(static_cast<size_t>(o.eval_limit));
    return indices;
}

// Calibration images for static-int8: the first training images when --data is given, else random.
std::vector<float> calibration_images(const Options& o, int count) {
    std::vector<float> images(static_cast<size_t>(3LL * o.size * o.size * count));
    if (o.data.empty()) {
        resunet::fill_uniform(images.data(), static_cast<int64_t>(images.size()), 11, -2.0f, 2.0f);
        return images;
    }
    resunet::Dataset dataset = resunet::scan_dataset(o.data);
    resunet::Split split = resunet::make_split(dataset, 42, 0.2);
    if (!o.split.empty() && std::filesystem::exists(o.split)) split = resunet::load_split(o.split, dataset);
    resunet::PreprocessOptions prep;
    prep.width = prep.height = o.size;
    prep.keep_original_mask = false;
    const std::vector<size_t> train = resunet::indices_of(dataset, split.train_ids);
    for (int i = 0; i < count; ++i) {
        resunet::Sample s = resunet::load_sample(dataset, train[static_cast<size_t>(i) % train.size()], prep);
        std::copy(s.image.f32(), s.image.f32() + s.image.num_elements(), images.begin() + static_cast<long>(i) * s.image.num_elements());
    }
    return images;
}

json scores_json(const resunet::ScoreSet& s) {
    return {{"dice_mean", s.dice.mean}, {"dice_std", s.dice.std}, {"iou_mean", s.iou.mean}, {"iou_std", s.iou.std},
            {"miou_mean", s.mean_iou.mean}, {"miou_std", s.mean_iou.std}, {"pooled_dice", s.pooled_dice}, {"pooled_iou", s.pooled_iou}};
}

// Scores one row on the test split (a separate process from the timed one, so loading data does not
// count in that row's memory).
json evaluate_row(const Options& timed) {
    Options o = timed;  // scored at the model's own input size
    o.size = timed.eval_size > 0 ? timed.eval_size : timed.size;
    resunet::Graph graph = graph_for(o);
    resunet::TensorMap weights = resunet::load_safetensors(o.model).tensors;
    resunet::Dataset dataset = resunet::scan_dataset(o.data);
    const std::vector<size_t> indices = test_indices(o, dataset);
    resunet::PreprocessOptions prep;
    prep.width = prep.height = o.size;
    const int calibration_count = 4 * o.micro_batch;
    std::vector<float> calibration = calibration_images(o, calibration_count);
    return with_engine(o, graph, weights, o.row, calibration.data(), calibration_count, [&](auto& engine) {
        // A last batch that is not a multiple of the micro-batch is padded with copies of its last image,
        // which leave a pass's dynamic scales (min and max over the pass) as they were.
        const int64_t in = 3LL * o.size * o.size, out = static_cast<int64_t>(o.size) * o.size;
        std::vector<float> padded_x, padded_y;
        auto run = [&](const float* x, int n, float* y) {
            const int whole = (n + o.micro_batch - 1) / o.micro_batch * o.micro_batch;
            if (whole == n) return engine.run(x, n, y);
            padded_x.assign(x, x + n * in);
            for (int i = n; i < whole; ++i) padded_x.insert(padded_x.end(), x + (n - 1) * in, x + n * in);
            padded_y.resize(static_cast<size_t>(whole * out));
            engine.run(padded_x.data(), whole, padded_y.data());
            std::copy(padded_y.begin(), padded_y.begin() + n * out, y);
        };
        resunet::EvalResult r = resunet::evaluate_split(dataset, indices, prep, run, o.batch, 1);
        fmt::print(stderr, "  {} scored {} test images in {:.0f} s\n", o.row, r.images, r.seconds);
        return json{{"precision", o.row}, {"images", r.images}, {"size", o.size}, {"model_size", scores_json(r.model_size)},
                    {"original_size", scores_json(r.original)}};
    });
}

double peak_rss_bytes() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;
    return 0;
}


double percentile(std::vector<double> v, double p) {
    std::sort(v.begin(), v.end());
    const double pos = p / 100.0 * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

// --micro-batch auto: times each micro-batch candidate of one row on the whole batch, each checked against
// micro-batch 1's logits (fp32: max abs diff <= kMicroBatchFp32Bound x max|logit|; int8, whose dynamic
// scales follow the pass: SQNR >= kMicroBatchInt8Db; engine/micro_batch.h), in this process; the timed
// row then runs the choice.

json choose_micro_batch_row(const Options& o) {
    resunet::Graph graph = graph_for(o);
    const resunet::TensorMap weights = row_weights(o, graph);
    std::vector<float> src(static_cast<size_t>(3LL * o.size * o.size * o.batch));
    resunet::fill_uniform(src.data(), static_cast<int64_t>(src.size()), 7, -2.0f, 2.0f);
    resunet::MicroBatchSearch search;
    search.runs = std::min(o.runs, 3);
    search.memory_budget_mb = o.memory_budget_mb > 0 ? o.memory_budget_mb : -1.0;
    const size_t out_floats = static_cast<size_t>(o.size) * static_cast<size_t>(o.size);
    auto progress = [&](int mb) { fmt::print(stderr, "\r  {} micro-batch candidate {}   ", o.row, mb); };
    resunet::MicroBatchChoice choice;
    if (o.row == "fp32") {
        choice = resunet::choose_micro_batch(src.data(), o.batch, out_floats, search, [&](int mb) {
            progress(mb);
            return std::make_unique<resunet::Engine>(graph, weights, engine_options_of(o, mb));
        }, resunet::logits_within(resunet::kMicroBatchFp32Bound));
    } else {
        // static-int8: the same calibration images for every candidate, one batch (a multiple of each)
        const std::vector<float> calibration = o.row == "static-int8" ? calibration_images(o, o.batch) : std::vector<float>();
        choice = resunet::choose_micro_batch(src.data(), o.batch, out_floats, search, [&](int mb) {
            progress(mb);
            auto engine = std::make_unique<resunet::QuantEngine>(graph, weights, quant_options_of(o, mb));
            if (o.row == "static-int8" && engine->mode() != resunet::ScaleMode::static_calibrated)
                engine->calibrate(calibration.data(), o.batch);
            return engine;
        }, resunet::sqnr_at_least(resunet::kMicroBatchInt8Db));
    }
    fmt::print(stderr, "\r  {}: {}\n", o.row, choice.summary());
    json trials = json::array();
    for (const resunet::MicroBatchTrial& t : choice.trials)
        trials.push_back({{"micro_batch", t.micro_batch}, {"median_ms", t.median_ms}, {"engine_mb", t.engine_mb},
                          {"max_abs_diff", t.max_abs_diff}, {"verdict", t.verdict}});
    return {{"micro_batch", choice.micro_batch}, {"summary", choice.summary()}, {"trials", trials}};
}

// Measures one precision row in this process and returns it as JSON.
template <typename AnyEngine>
json measure_engine(const Options& o, const resunet::Graph& graph, AnyEngine& engine, const std::string& precision);

// --plan-row: compiles the row's engine and nothing else, so that a cold plan cache is filled (the plans
// measured and saved) in a process of its own; the timed row then reads the plan and its peak RSS is the
// plan's, not the measuring's. Returns what compiling cost: time, peak RSS, where the plan came from.
json plan_row(const Options& o) {
    resunet::Graph graph = graph_for(o);
    const resunet::TensorMap weights = row_weights(o, graph);
    json row;
    if (o.row == "fp32") {
        resunet::Engine engine(graph, weights, engine_options_of(o, o.micro_batch));
        row = {{"compile_ms", engine.compile_ms()}, {"plan", engine.tuning_summary()}};
    } else {
        resunet::QuantEngine engine(graph, weights, quant_options_of(o, o.micro_batch));
        row = {{"compile_ms", engine.compile_ms()}, {"plan", engine.conv_summary()}};
    }
    row["peak_rss_bytes"] = peak_rss_bytes();
    return row;
}

json measure_row(const Options& o) {
    resunet::Graph graph = graph_for(o);
    resunet::TensorMap weights = row_weights(o, graph);
    if (o.row == "fp32") {
        resunet::Engine engine(graph, weights, engine_options_of(o, o.micro_batch));
        weights = resunet::TensorMap();  // the engine holds its own reordered copy
        json row = measure_engine(o, graph, engine, "f32");
        row["tune"] = o.tune;
        row["plan"] = engine.tuning_summary();
        row["plan_id"] = engine.plan().id();
        row["activation_layout"] = engine.activation_layout();
        return row;
    }
    resunet::QuantEngine engine(graph, weights, quant_options_of(o, o.micro_batch));
    weights = resunet::TensorMap();
    if (o.row == "static-int8" && engine.mode() != resunet::ScaleMode::static_calibrated) {  // stored scales win
        std::vector<float> calibration = calibration_images(o, 4 * o.micro_batch);
        engine.calibrate(calibration.data(), 4 * o.micro_batch);
    }
    json row = measure_engine(o, graph, engine, "u8s8");
    row["int8_conv"] = o.int8_conv;
    row["int8_plan"] = engine.conv_summary();
    row["plan_id"] = engine.plan().id();
    return row;
}

template <typename AnyEngine>
json measure_engine(const Options& o, const resunet::Graph& graph, AnyEngine& engine, const std::string& precision) {
    using Clock = std::chrono::steady_clock;
    const int64_t image = 3LL * o.size * o.size;
    std::vector<float> src(static_cast<size_t>(image * o.batch));
    std::vector<float> dst(static_cast<size_t>(o.batch) * static_cast<size_t>(o.size * o.size));
    resunet::fill_uniform(src.data(), static_cast<int64_t>(src.size()), 7, -2.0f, 2.0f);

    auto timed = [&] {
        const auto start = Clock::now();
        engine.run(src.data(), o.batch, dst.data());
        return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    };
    const double first_ms = timed();
    for (int i = 1; i < o.warmup; ++i) timed();
    std::vector<double> ms;
    for (int i = 0; i < o.runs; ++i) {
        ms.push_back(timed());
        fmt::print(stderr, "\r  {} run {}/{}: {:.1f} ms   ", o.row, i + 1, o.runs, ms.back());
    }
    fmt::print(stderr, "\n");
    const double mean = std::accumulate(ms.begin(), ms.end(), 0.0) / static_cast<double>(ms.size());
    double var = 0;
    for (double x : ms) var += (x - mean) * (x - mean);
    const double stddev = ms.size() > 1 ? std::sqrt(var / static_cast<double>(ms.size() - 1)) : 0.0;
    const double median = percentile(ms, 50);
    const resunet::EngineMemory mem = engine.memory_usage();
    json row = {
        {"precision", o.row},
        {"micro_batch", o.micro_batch},
        {"width", o.width},
        {"weights", o.model.empty() ? "random" : "model"},
        {"first_run_ms", first_ms},
        {"latency_median_ms", median},
        {"latency_mean_ms", mean},
        {"latency_std_ms", stddev},
        {"latency_p90_ms", percentile(ms, 90)},
        {"latency_p99_ms", percentile(ms, 99)},
        {"latency_min_ms", *std::min_element(ms.begin(), ms.end())},
        {"latency_max_ms", *std::max_element(ms.begin(), ms.end())},
        {"runs", o.runs},
        {"images_per_s", 1000.0 * o.batch / median},
        {"gflops", 2.0 * static_cast<double>(graph.total_macs()) * o.batch / 1e9 / (median / 1e3)},
        {"parameters", graph.num_parameters()},
        {"compile_ms", engine.compile_ms()},
        {"peak_rss_bytes", peak_rss_bytes()},
        {"engine_weights_bytes", mem.weights_bytes},
        {"engine_arena_bytes", mem.arena_bytes},
        {"engine_arena_naive_bytes", mem.arena_naive_bytes},
        {"engine_scratchpad_bytes", mem.scratchpad_bytes},
        {"engine_total_bytes", mem.total()},
        {"primitives", engine.num_primitives()},
        {"compute_precision", precision},
    };
    if (o.layers) {
        json layers = json::array();
        for (const resunet::LayerProfile& l : engine.profile(src.data(), o.batch, dst.data()))
            layers.push_back({{"name", l.name}, {"op", l.op}, {"kernel", l.kernel}, {"precision", l.precision},
                              {"time_ms", l.time_ms}, {"gflop", l.gflop}, {"gflops", l.gflops()},
                              {"algorithm", l.algorithm}, {"candidates", l.candidates}});
        row["layers"] = layers;
    }
    return row;
}

// Runs one row in a child process so that its peak RSS is its own.
// mode: "row" (timed), "eval" (scored) or "choose" (--micro-batch auto's candidates).
json run_row_in_child(const Options& o, const std::string& precision, const fs::path& tmp, const std::string& mode) {
    const bool eval = mode == "eval";
    const fs::path out = tmp / fmt::format("{}_{}.json", mode, precision);
    std::vector<std::string> args = {"/proc/self/exe", "--row", precision, "--row-out", out.string(),
                                     "--width", std::to_string(o.width), "--depth", std::to_string(o.depth),
                                     "--size", std::to_string(o.size),
                                     "--batch", std::to_string(o.batch), "--micro-batch", std::to_string(o.micro_batch),
                                     "--threads", std::to_string(o.threads), "--runs", std::to_string(o.runs),
                                     "--warmup", std::to_string(o.warmup), "--tune", o.tune, "--int8-conv", o.int8_conv,
                                     "--plan-cache", o.plan_cache.empty() ? std::string("none") : o.plan_cache,
                                     "--memory-budget", fmt::format("{}", o.memory_budget_mb)};
    for (const std::string& file : o.plan_files) args.insert(args.end(), {"--plan", file});
    if (!o.model.empty()) args.insert(args.end(), {"--model", o.model});
    if (!o.data.empty()) args.insert(args.end(), {"--data", o.data});
    if (!o.split.empty()) args.insert(args.end(), {"--split", o.split});
    if (o.eval_limit > 0) args.insert(args.end(), {"--limit", std::to_string(o.eval_limit)});
    if (o.eval_size > 0) args.insert(args.end(), {"--eval-size", std::to_string(o.eval_size)});
    if (o.layers && mode == "row") args.push_back("--layers");
    if (eval) args.push_back("--eval-row");
    if (mode == "choose") args.push_back("--choose-micro-batch");
    if (mode == "plan") args.push_back("--plan-row");
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid < 0) throw resunet::Error("bench_resunet: fork failed");
    if (pid == 0) {
        execv("/proc/self/exe", argv.data());
        _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        throw resunet::Error(fmt::format("bench_resunet: the {} {} failed (exit status {})", precision,
                                         mode == "choose" ? "micro-batch search" : mode == "plan" ? "plan" : "row", status));
    std::ifstream in(out);
    return json::parse(in);
}

// One timed row; with --micro-batch auto its candidates are measured first (another child) and `o` takes
// the chosen micro-batch, which the row's scoring then uses too.
json timed_row(Options& o, const std::string& precision, const fs::path& tmp, bool micro_batch_auto) {
    json search;
    if (micro_batch_auto) {
        search = run_row_in_child(o, precision, tmp, "choose");
        o.micro_batch = search["micro_batch"].get<int>();
    }
    // A plan that a cache keeps (fp32 tuned; int8 measured) is measured in a child of its own first, so the
    // timed row's peak RSS and compile time are those of running the plan; what measuring it cost is kept.
    json planning;
    const bool cached_plan = !o.plan_cache.empty() && o.plan_cache != "none" && (o.tune == "fast" || o.tune == "full") &&
                             (precision == "fp32" || o.int8_conv == "auto") && tuning_flags_of(o, precision == "fp32").plan_file.empty();
    if (cached_plan) planning = run_row_in_child(o, precision, tmp, "plan");
    json row = run_row_in_child(o, precision, tmp, "row");
    if (micro_batch_auto) row["micro_batch_search"] = search;
    if (cached_plan) row["planning"] = planning;
    return row;
}

// Overlays a {0, 1} mask on an image: tinted area and a contour.
cv::Mat overlay(const cv::Mat& bgr, const cv::Mat& mask, const cv::Scalar& color) {
    cv::Mat out = bgr.clone(), tint(bgr.size(), bgr.type(), color), blended;
    cv::addWeighted(bgr, 0.6, tint, 0.4, 0, blended);
    blended.copyTo(out, mask);
    std::vector<std::vector<cv::Point>> contours;
    cv::findContours(mask.clone(), contours, cv::RETR_EXTERNAL, cv::CHAIN_APPROX_SIMPLE);
    cv::drawContours(out, contours, -1, color, 2, cv::LINE_AA);
    return out;
}

// Rows of (image, ground truth, fp32 mask, int8 mask) for the first test images, as the paper's figure 2.
void write_examples(const Options& timed, const std::string& path) {
    Options o = timed;  // predicted at the model's own input size
    o.size = timed.eval_size > 0 ? timed.eval_size : timed.size;
    const int count = 4, tile = 224;
    resunet::Dataset dataset = resunet::scan_dataset(o.data);
    std::vector<size_t> indices = test_indices(o, dataset);
    indices.resize(std::min<size_t>(indices.size(), count));
    resunet::PreprocessOptions prep;
    prep.width = prep.height = o.size;
    resunet::Graph graph = graph_for(o);
    resunet::TensorMap weights = resunet::load_safetensors(o.model).tensors;
    const int64_t pixels = static_cast<int64_t>(o.size) * o.size;
    std::vector<float> images(static_cast<size_t>(3 * pixels) * indices.size()), fp32(static_cast<size_t>(pixels) * indices.size()),
        int8(fp32.size());
    std::vector<resunet::Sample> samples;
    for (size_t i = 0; i < indices.size(); ++i) {
        samples.push_back(resunet::load_sample(dataset, indices[i], prep));
        std::copy(samples.back().image.f32(), samples.back().image.f32() + 3 * pixels, images.begin() + static_cast<long>(i * 3 * pixels));
    }
    const int n = static_cast<int>(indices.size());
    resunet::Engine(graph, weights, {}).run(images.data(), n, fp32.data());
    resunet::QuantEngine(graph, weights, {}).run(images.data(), n, int8.data());
    cv::Mat grid(tile * n + 30, tile * 4, CV_8UC3, cv::Scalar(255, 255, 255));
    const char* titles[] = {"image", "ground truth", "fp32", "int8 (dynamic)"};
    for (int c = 0; c < 4; ++c) cv::putText(grid, titles[c], {c * tile + 8, 20}, cv::FONT_HERSHEY_SIMPLEX, 0.55, {0, 0, 0}, 1, cv::LINE_AA);
    for (int i = 0; i < n; ++i) {
        cv::Mat bgr;
        cv::resize(resunet::read_image(dataset.samples[indices[static_cast<size_t>(i)]].image_path), bgr, {tile, tile}, 0, 0, cv::INTER_AREA);
        cv::Mat truth(o.size, o.size, CV_32F, samples[static_cast<size_t>(i)].mask.f32()), truth8;
        truth.convertTo(truth8, CV_8U);
        const cv::Mat masks[] = {cv::Mat(), truth8, resunet::logits_to_mask(fp32.data() + i * pixels, o.size, o.size, o.size, o.size),
                                 resunet::logits_to_mask(int8.data() + i * pixels, o.size, o.size, o.size, o.size)};
        for (int c = 0; c < 4; ++c) {
            cv::Mat cell = bgr;
            if (c > 0) {
                cv::Mat m;
                cv::resize(masks[c], m, {tile, tile}, 0, 0, cv::INTER_NEAREST);
                cell = overlay(bgr, m, c == 1 ? cv::Scalar(0, 255, 0) : cv::Scalar(0, 0, 255));
            }
            cell.copyTo(grid(cv::Rect(c * tile, 30 + i * tile, tile, tile)));
        }
    }
    std::vector<uint8_t> png;
    cv::imencode(".png", grid, png);
    resunet::write_file_atomic(path, std::string_view(reinterpret_cast<const char*>(png.data()), png.size()));
}

// --model (or the default model): its width, and its size unless --size is given, come from the file as
// `resunet` takes them; an explicit --width that differs is a usage error. Checks its tensors against that graph,
// and an int8 file's precision (a file with stored scales runs them: static-int8).
void check_model_file(Options& o, std::optional<resunet::SafetensorsFile>& default_file, bool width_given, bool size_given) {
    resunet::SafetensorsFile file;
    try {
        file = default_file ? std::move(*default_file) : resunet::load_safetensors(o.model);
    } catch (const resunet::Error& e) {
        throw resunet::Error(fmt::format("--model: {}", resunet::one_line(e.what())));
    }
    default_file.reset();
    const resunet::ResUNetConfig found = resunet::infer_resunet_config(file.tensors, file.metadata, o.size);
    if (width_given && found.width != o.width)
        throw resunet::Error(fmt::format("{} is a width-{} model but --width is {} (leave --width out: it is read from the file)",
                                         o.model, found.width, o.width));
    o.width = found.width;
    o.depth = found.depth;
    if (!size_given) o.size = found.height;
    if (o.eval_size == 0) o.eval_size = found.height;
    if (!resunet::is_int8_weights(file.tensors)) {
        std::vector<std::pair<std::string, resunet::Dims>> expected;
        for (const resunet::ParamInfo& p : graph_for(o).parameters()) expected.emplace_back(p.name, p.dims);
        resunet::check_tensors(file.tensors, expected, o.model);
        return;
    }
    const bool stored = resunet::has_stored_static_scales(file.tensors);  // an int8 file (resunet quantize)
    if (stored && o.precision != "static-int8")
        throw resunet::Error(fmt::format("{} is an int8 file with stored static scales, which it always runs: use --precision "
                                         "static-int8", o.model));
    if (o.precision != "int8" && o.precision != "static-int8")
        throw resunet::Error(fmt::format("{} is an int8 file: use --precision static-int8 or int8", o.model));
}

// Every flag of bench_resunet, bound to `o`.
void add_flags(CLI::App& app, Options& o) {
    app.formatter(std::make_shared<resunet::WrappingHelpFormatter>());
    app.set_version_flag("--version", resunet::tool_version("bench_resunet"), "Print the version and the git commit, then exit");
    app.add_option("--width", o.width,
                   "network width (channels of the first stage) of random weights; a model file's own is read from it")
        ->check(resunet::positive_number())
        ->capture_default_str();
    app.add_option("--depth", o.depth, "internal: a model file's poolings, for the rows")->group("");
    app.add_option("--size", o.size, "input height and width in pixels; default: a model file's size, else 224")
        ->check(resunet::positive_number());
    app.add_option("--batch", o.batch, "images per timed run")->check(resunet::positive_number());
    app.add_option("--micro-batch", o.micro_batch_text,
                   "images per pass through the compiled plan. default: fp32 rows 4 where that gives the same "
                   "numbers as 1 (AVX-512 CPUs), else 1; int8 rows 1 (their scales are per pass, as in resunet "
                   "predict); or a count; or auto: each row's candidates (1, 2, 4, ... dividing --batch) timed on "
                   "the whole batch, checked against micro-batch 1, the fastest kept")
        ->capture_default_str()
        ->check(resunet::count_or_auto(4096, /*or_default=*/true));
    app.add_option("--threads", o.threads, "oneDNN (OpenMP) threads; 0 = all cores")->check(resunet::non_negative_number());
    app.add_option("--runs", o.runs, "timed runs per row (after warm-up)")->check(resunet::positive_number());
    app.add_option("--warmup", o.warmup, "warm-up runs (the first is reported separately)")->check(resunet::positive_number());
    app.add_option("--precision", o.precision,
                   "rows to run: all (default: the Table 1 comparison), or one of fp32, int8 (scales computed per "
                   "image, `resunet`'s default), static-int8 (fixed scales: the model file's, else calibrated)")
        ->check(resunet::precision_validator({"all", "fp32", "int8", "static-int8"}));
    app.add_option("--model", o.model,
                   "weights (.safetensors); without it, the trained model of --model-dir when it has --width, else random "
                   "weights")
        ->check(CLI::ExistingFile);
    app.add_option("--model-dir", o.model_dir,
                   "folder of the default model (model.safetensors, split.json), scored on the test split of "
                   "../shared/data/kvasir-seg")
        ->capture_default_str();
    app.add_flag("--random-weights", o.random_weights, "time random weights (Kaiming, seed 1) instead of the default model");
    app.add_flag("--layers", o.layers, "add the per-layer table: time, GFLOP/s, oneDNN kernel, algorithm candidates tried");
    app.add_option("--tune", o.tune,
                   "How convolution algorithms are chosen: rule (default: fixed for this CPU class), off (direct), "
                   "fast or full (timed on this machine; may differ between starts)")
        ->check(CLI::IsMember({"rule", "off", "fast", "full"}))
        ->capture_default_str();
    app.add_option("--int8-conv", o.int8_conv,
                   "int8 rows' 3x3 convolutions: auto (default: our int8 Winograd where the plan says), direct, "
                   "winograd (everywhere it applies), mixed (fp32 where timed faster)")
        ->check(CLI::IsMember({"auto", "direct", "winograd", "mixed"}))
        ->capture_default_str();
    app.add_option("--plan", o.plan_files,
                   "Run exactly this plan file (resunet plan --save-plan) in the rows of its precision; once per precision")
        ->check(CLI::ExistingFile);
    app.add_option("--plan-cache", o.plan_cache,
                   "with --tune fast|full: folder of measured plans reused across runs; 'none' to measure every time")
        ->capture_default_str();
    app.add_option("--memory-budget", o.memory_budget_mb,
                   "fp32 plan: largest engine bytes in MB (Winograd kept where it saves the most time per byte); "
                   "0 = 2.5x the all-direct plan, -1 = no limit; with --micro-batch auto, a positive budget also bounds "
                   "every row's micro-batch candidates")
        ->capture_default_str();
    app.add_option("--json", o.json_path, "also write the report as JSON here");
    app.add_option("--csv", o.csv_path, "also write the table as CSV here");
    app.add_option("--data", o.data, "Kvasir-SEG style folder (images/, masks/): adds Dice/IoU on its test split (needs --model)");
    app.add_option("--split", o.split, "split JSON to use; made with seed 42 and written here if it does not exist");
    app.add_option("--limit", o.eval_limit, "score only the first N test images (0 = all)")->check(resunet::non_negative_number());
    resunet::add_renamed_flag(app, "--eval-limit", "--limit");
    app.add_flag("--overwrite", o.overwrite, "replace existing --json, --csv, --chart and --examples files (default: refuse)");
    app.add_option("--eval-size", o.eval_size, "input size for Dice/IoU and --examples (0 = the model file's resunet.size, else --size)")
        ->check(resunet::non_negative_number());
    app.add_option("--also-width", o.also_width,
                   "also time every row at this width with random weights, e.g. 64 (the paper's 32.5 M network); 0 = no")
        ->check(resunet::non_negative_number());
    app.add_option("--chart", o.chart, "write a PNG chart of latency, memory and Dice per row");
    app.add_option("--examples", o.examples, "write a PNG grid of example predictions (needs --model and --data)");
    app.add_flag("--eval-row", o.eval_row, "internal: score instead of timing")->group("");
    app.add_flag("--choose-micro-batch", o.choose_row, "internal: measure the micro-batch candidates")->group("");
    app.add_flag("--plan-row", o.plan_row, "internal: only compile the row's engine (fills the plan cache)")->group("");
    app.add_option("--row", o.row, "internal: measure one row in this process")->group("");
    app.add_option("--row-out", o.row_out, "internal: where --row writes its JSON")->group("");
}
}  // namespace

int main(int argc, char** argv) {
    Options o;
    CLI::App app{"bench_resunet: ResUNet fp32 vs int8 latency, memory and accuracy on this CPU (the paper's Table 1)"};
    add_flags(app, o);
    app.failure_message([](const CLI::App*, const CLI::Error& e) {
        return fmt::format("bench_resunet: error: {} (see --help)\n", e.what());
    });
    resunet::check_values_strictly(app);  // typed values as resunet takes them: no nan, no wrapped negatives
    try {
        app.parse(argc, argv);
    } catch (const CLI::Success& e) {  // --help, --version
        return app.exit(e);
    } catch (const CLI::Error& e) {  // bad flags: CLI11 prints the one-line reason
        app.exit(e);
        return 2;
    }
    // Exit status as `resunet`'s: 2 for what the checks below find before any work starts, 1 once it has.
    bool checked = false;
    try {
        const bool micro_batch_auto = o.micro_batch_text == "auto";
        const bool micro_batch_default = o.micro_batch_text == "default";
        if (!micro_batch_auto && !micro_batch_default) o.micro_batch = std::stoi(o.micro_batch_text);
        if (o.batch % o.micro_batch != 0)
            throw resunet::Error(fmt::format("--batch {} must be a multiple of --micro-batch {}", o.batch, o.micro_batch));
        if (!o.row.empty()) {
            checked = true;  // a child of this program: its failures are the row's
            json row = o.eval_row     ? evaluate_row(o)
                       : o.choose_row ? choose_micro_batch_row(o)
                       : o.plan_row   ? plan_row(o)
                                      : measure_row(o);
            std::ofstream(o.row_out) << row.dump();
            return 0;
        }
        std::optional<resunet::SafetensorsFile> default_file;
        const bool width_given = app.count("--width") > 0, size_given = app.count("--size") > 0;
        const std::string weights_note = choose_default_model(o, app.count("--model-dir") > 0, width_given, default_file);
        for (const auto& [path, flag] : {std::pair{o.json_path, "--json"}, {o.csv_path, "--csv"}, {o.chart, "--chart"},
                                         {o.examples, "--examples"}})
            resunet::check_output_file(path, flag, o.overwrite);
        // Check everything that can fail before the long work starts.
        if (!o.data.empty() && o.model.empty()) throw resunet::Error("--data needs --model: accuracy of random weights means nothing");
        if (!o.examples.empty() && (o.data.empty() || o.model.empty())) throw resunet::Error("--examples needs --model and --data");
        if (!o.model.empty()) check_model_file(o, default_file, width_given, size_given);
        resunet::Graph graph = graph_for(o);
        if (!o.data.empty()) {
            resunet::Dataset dataset = resunet::scan_dataset(o.data);  // fails now on a missing or broken folder
            test_indices(o, dataset);
        }
        checked = true;
        const fs::path tmp = fs::temp_directory_path() / fmt::format("bench_resunet.{}", getpid());
        fs::create_directories(tmp);
        json report = {{"width", o.width}, {"size", o.size}, {"batch", o.batch}, {"micro_batch", micro_batch_auto ? json("auto") : micro_batch_default ? json("default") : json(o.micro_batch)},
                       {"runs", o.runs}, {"warmup", o.warmup}, {"model", o.model}};
        if (!o.model.empty()) report["model_file_bytes"] = static_cast<double>(fs::file_size(o.model));
        if (!weights_note.empty()) report["weights_note"] = weights_note;
        const std::time_t now = std::time(nullptr);
        char date[64];
        std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
        report["provenance"] = {{"cpu", resunet::cpu_model_name()}, {"isa", resunet::onednn_version()},
                                {"threads", o.threads > 0 ? std::to_string(o.threads) : fmt::format("{} (all cores)", std::thread::hardware_concurrency())},
                                {"onednn", resunet::onednn_version()}, {"git_commit", RESUNET_GIT_COMMIT}, {"date", date}};
        report["tool_version"] = resunet::tool_version("bench_resunet");
        fmt::print(stderr, "bench_resunet: width {}, {}x{}, batch {}, {} runs per row\n", o.width, o.size, o.size, o.batch, o.runs);
        report["rows"] = json::array();
        std::vector<std::string> rows = {"fp32", "int8", "static-int8"};
        if (o.precision != "all") rows = {o.precision};
        for (const std::string& precision : rows) {
            Options row_options = o;
            if (micro_batch_default) row_options.micro_batch = default_micro_batch(o, precision);
            json row = timed_row(row_options, precision, tmp, micro_batch_auto);
            if (!o.data.empty()) {
                row["eval"] = run_row_in_child(row_options, precision, tmp, "eval");
                report["eval_images"] = row["eval"]["images"];
                report["eval_size"] = row["eval"]["size"];
                report["data"] = o.data;
            }
            report["rows"].push_back(row);
        }
        if (o.also_width > 0 && o.also_width != o.width) {  // the same rows at another width, random weights
            Options wide = o;
            wide.width = o.also_width;
            wide.model.clear();
            wide.data.clear();
            report["also_width"] = o.also_width;
            for (const std::string& precision : rows) {
                Options row_options = wide;
                if (micro_batch_default) row_options.micro_batch = default_micro_batch(wide, precision);
                report["rows"].push_back(timed_row(row_options, precision, tmp, micro_batch_auto));
            }
        }
        // The paper's "improvement rate": (fp32 - int8) / int8 for memory, (fp32 - int8) / fp32 for latency;
        // each row against the fp32 row of its own width.
        for (json& r : report["rows"]) {
            const json* fp32_row = nullptr;
            for (const json& f : report["rows"])
                if (f["precision"] == "fp32" && f["width"] == r["width"]) fp32_row = &f;
            if (fp32_row) {
                const double lat = (*fp32_row)["latency_median_ms"].get<double>(), rss = (*fp32_row)["peak_rss_bytes"].get<double>();
                r["latency_reduction_vs_fp32_pct"] = 100.0 * (lat - r["latency_median_ms"].get<double>()) / lat;
                r["speedup_vs_fp32"] = lat / r["latency_median_ms"].get<double>();
                r["memory_improvement_rate_pct"] = 100.0 * (rss - r["peak_rss_bytes"].get<double>()) / r["peak_rss_bytes"].get<double>();
            }
        }
        fs::remove_all(tmp);
        for (const auto& [path, flag] : {std::pair{o.json_path, "--json"}, {o.csv_path, "--csv"}, {o.chart, "--chart"},
                                         {o.examples, "--examples"}})
            if (!path.empty()) resunet::create_output_parent(path, flag);
        if (!o.chart.empty()) resunet::bench::write_chart(report, o.chart);
        if (!o.examples.empty()) write_examples(o, o.examples);
        const std::string md = resunet::bench::markdown(report);
        fmt::print("{}", md);
        if (!o.json_path.empty()) resunet::write_file_atomic(o.json_path, report.dump(2));
        if (!o.csv_path.empty()) resunet::write_file_atomic(o.csv_path, resunet::bench::csv(report));
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench_resunet: error: {}\n", e.what());
        return checked ? 1 : 2;
    }
    return 0;
}
