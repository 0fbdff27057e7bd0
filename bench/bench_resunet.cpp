// bench_resunet: the paper's Table 1 on this machine, with how every figure was measured.
//
//   bench_resunet                         # width 64, 224x224, batch 16, fp32, random weights
//   bench_resunet --runs 20 --layers      # plus the per-layer table (time, GFLOP/s, oneDNN kernel)
//   bench_resunet --json out/table.json --csv out/table.csv
//
// Each precision row runs in a child process of its own (this program re-executed with --row), so its
// peak RSS is that row's alone.
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
#include <thread>

#include "engine/engine.h"
#include "graph/init.h"
#include "graph/safetensors.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct Options {
    int width = 64;
    int size = 224;
    int batch = 16;
    int micro_batch = 1;
    int threads = 0;
    int runs = 10;
    int warmup = 1;
    std::string precision = "fp32";
    std::string model;
    bool layers = false;
    std::string json_path;
    std::string csv_path;
    std::string row;       // internal: measure one row and write JSON to row_out
    std::string row_out;
};

double peak_rss_bytes() {
    std::ifstream status("/proc/self/status");
    std::string line;
    while (std::getline(status, line))
        if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;
    return 0;
}

std::string cpu_model() {
    std::ifstream info("/proc/cpuinfo");
    std::string line;
    while (std::getline(info, line))
        if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
    return "unknown";
}

double percentile(std::vector<double> v, double p) {
    std::sort(v.begin(), v.end());
    const double pos = p / 100.0 * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

// Measures one precision row in this process and returns it as JSON.
json measure_row(const Options& o) {
    using Clock = std::chrono::steady_clock;
    resunet::ResUNetConfig config;
    config.width = o.width;
    config.height = config.width_px = o.size;
    resunet::Graph graph = resunet::build_resunet(config);
    resunet::TensorMap weights;
    if (o.model.empty()) {
        weights = resunet::init_weights(graph, 1);
    } else {
        weights = resunet::load_safetensors(o.model).tensors;
    }
    resunet::EngineOptions engine_options;
    engine_options.micro_batch = o.micro_batch;
    engine_options.threads = o.threads;
    resunet::Engine engine(graph, weights, engine_options);
    weights.clear();  // the engine holds its own reordered copy
    weights = resunet::TensorMap();

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
        {"activation_layout", engine.activation_layout()},
        {"primitives", engine.num_primitives()},
        {"concat_copies", engine.num_concat_copies()},
    };
    if (o.layers) {
        json layers = json::array();
        for (const resunet::LayerProfile& l : engine.profile(src.data(), o.batch, dst.data()))
            layers.push_back({{"name", l.name}, {"op", l.op}, {"kernel", l.kernel}, {"precision", l.precision},
                              {"time_ms", l.time_ms}, {"gflop", l.gflop}, {"gflops", l.gflops()}});
        row["layers"] = layers;
    }
    return row;
}

// Runs one row in a child process so that its peak RSS is its own.
json run_row_in_child(const Options& o, const std::string& precision, const fs::path& tmp) {
    const fs::path out = tmp / fmt::format("row_{}.json", precision);
    std::vector<std::string> args = {"/proc/self/exe", "--row", precision, "--row-out", out.string(),
                                     "--width", std::to_string(o.width), "--size", std::to_string(o.size),
                                     "--batch", std::to_string(o.batch), "--micro-batch", std::to_string(o.micro_batch),
                                     "--threads", std::to_string(o.threads), "--runs", std::to_string(o.runs),
                                     "--warmup", std::to_string(o.warmup)};
    if (!o.model.empty()) args.insert(args.end(), {"--model", o.model});
    if (o.layers) args.push_back("--layers");
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
        throw resunet::Error(fmt::format("bench_resunet: the {} row failed (exit status {})", precision, status));
    std::ifstream in(out);
    return json::parse(in);
}

std::string markdown(const json& report) {
    std::string md;
    const json& p = report["provenance"];
    md += fmt::format("## ResUNet on {} — batch {}, {}x{}, width {}\n\n", p["cpu"].get<std::string>(),
                      report["batch"].get<int>(), report["size"].get<int>(), report["size"].get<int>(),
                      report["width"].get<int>());
    md += "| precision | Dice | IoU (fg) | mIoU (2-class) | latency median (ms) | P90 | P99 | min | max | std | first run (ms) | images/s | GFLOP/s | parameters | peak RSS (MB) | engine bytes (MB) | model file (MB) |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const json& r : report["rows"]) {
        md += fmt::format("| {} | {} | {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.2f} | {:.1f} | {} | {:.1f} | {:.1f} | {} |\n",
                          r["precision"].get<std::string>(), "n/a", "n/a", "n/a", r["latency_median_ms"].get<double>(),
                          r["latency_p90_ms"].get<double>(), r["latency_p99_ms"].get<double>(),
                          r["latency_min_ms"].get<double>(), r["latency_max_ms"].get<double>(),
                          r["latency_std_ms"].get<double>(), r["first_run_ms"].get<double>(),
                          r["images_per_s"].get<double>(), r["gflops"].get<double>(),
                          r["parameters"].get<int64_t>(), r["peak_rss_bytes"].get<double>() / 1e6,
                          r["engine_total_bytes"].get<double>() / 1e6,
                          report.contains("model_file_bytes") ? fmt::format("{:.1f}", report["model_file_bytes"].get<double>() / 1e6) : "n/a");
    }
    md += "\nHow each figure was measured:\n";
    md += fmt::format("- Weights: {}. Dice/IoU need --model and --data (n/a otherwise).\n",
                      report["model"].get<std::string>().empty() ? "random (Kaiming, seed 1) — speed and memory only" : report["model"].get<std::string>());
    md += fmt::format("- Latency: wall time of one engine.run() on a batch of {} images (input NCHW fp32 in memory, logits out), "
                      "{} timed runs after {} warm-up run(s); the first run (cold caches, first touch) is reported separately. "
                      "Micro-batch {} (the batch runs as {} passes of the same compiled plan).\n",
                      report["batch"].get<int>(), report["runs"].get<int>(), report["warmup"].get<int>(),
                      report["micro_batch"].get<int>(), report["batch"].get<int>() / report["micro_batch"].get<int>());
    md += "- Peak RSS: VmHWM of a separate process per row (this program re-executed), after all runs: weights, "
          "engine, input and output buffers, code and libraries.\n";
    md += "- Engine bytes: what the engine holds: reordered BN-folded weights + the planned activation arena + "
          "oneDNN's shared user scratchpad.\n";
    md += "- GFLOP/s: 2 x MACs of the graph x batch / median latency.\n";
    md += fmt::format("\nProvenance: {} | ISA {} | threads {} | {} | git {} | {}\n", p["cpu"].get<std::string>(),
                      p["isa"].get<std::string>(), p["threads"].get<std::string>(), p["onednn"].get<std::string>(),
                      p["git_commit"].get<std::string>(), p["date"].get<std::string>());
    for (const json& r : report["rows"]) {
        if (!r.contains("layers")) continue;
        md += fmt::format("\n### Per-layer profile, {} (one profiled run; waits after each primitive)\n\n", r["precision"].get<std::string>());
        md += "| layer | op | kernel | precision | time (ms) | GFLOP/s |\n|---|---|---|---|---|---|\n";
        for (const json& l : r["layers"])
            md += fmt::format("| {} | {} | {} | {} | {:.2f} | {:.1f} |\n", l["name"].get<std::string>(),
                              l["op"].get<std::string>(), l["kernel"].get<std::string>(),
                              l["precision"].get<std::string>(), l["time_ms"].get<double>(), l["gflops"].get<double>());
    }
    return md;
}

void write_atomically(const fs::path& path, const std::string& text) {
    const fs::path tmp = path.string() + ".tmp";
    {
        std::ofstream out(tmp, std::ios::binary);
        if (!out) throw resunet::Error(fmt::format("cannot write '{}'", tmp.string()));
        out << text;
        out.flush();
        if (!out) throw resunet::Error(fmt::format("writing '{}' failed (disk full?)", tmp.string()));
    }
    fs::rename(tmp, path);
}

}  // namespace

int main(int argc, char** argv) {
    Options o;
    CLI::App app{"bench_resunet: ResUNet fp32 vs int8 latency, memory and accuracy on this CPU (the paper's Table 1)"};
    app.add_option("--width", o.width, "network width (channels of the first stage)")->check(CLI::PositiveNumber);
    app.add_option("--size", o.size, "input height and width in pixels (divisible by 16)")->check(CLI::PositiveNumber);
    app.add_option("--batch", o.batch, "images per timed run")->check(CLI::PositiveNumber);
    app.add_option("--micro-batch", o.micro_batch, "images per pass through the compiled plan")->check(CLI::PositiveNumber);
    app.add_option("--threads", o.threads, "oneDNN (OpenMP) threads; 0 = all cores")->check(CLI::NonNegativeNumber);
    app.add_option("--runs", o.runs, "timed runs per row (after warm-up)")->check(CLI::PositiveNumber);
    app.add_option("--warmup", o.warmup, "warm-up runs (the first is reported separately)")->check(CLI::PositiveNumber);
    app.add_option("--precision", o.precision, "rows to run: fp32 (more come with quant/)")->check(CLI::IsMember({"fp32", "all"}));
    app.add_option("--model", o.model, "weights (.safetensors); random weights when absent")->check(CLI::ExistingFile);
    app.add_flag("--layers", o.layers, "add the per-layer table: time, GFLOP/s, oneDNN kernel");
    app.add_option("--json", o.json_path, "also write the report as JSON here");
    app.add_option("--csv", o.csv_path, "also write the table as CSV here");
    app.add_option("--row", o.row, "internal: measure one row in this process")->group("");
    app.add_option("--row-out", o.row_out, "internal: where --row writes its JSON")->group("");
    CLI11_PARSE(app, argc, argv);
    try {
        if (o.batch % o.micro_batch != 0)
            throw resunet::Error(fmt::format("--batch {} must be a multiple of --micro-batch {}", o.batch, o.micro_batch));
        if (!o.row.empty()) {
            json row = measure_row(o);
            std::ofstream(o.row_out) << row.dump();
            return 0;
        }
        // Check everything that can fail before the long work starts.
        resunet::ResUNetConfig config;
        config.width = o.width;
        config.height = config.width_px = o.size;
        resunet::Graph graph = resunet::build_resunet(config);
        if (!o.model.empty()) {
            resunet::SafetensorsFile file = resunet::load_safetensors(o.model);
            std::vector<std::pair<std::string, resunet::Dims>> expected;
            for (const resunet::ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
            resunet::check_tensors(file.tensors, expected, o.model);
        }
        for (const std::string& path : {o.json_path, o.csv_path}) {
            if (path.empty()) continue;
            const fs::path dir = fs::absolute(path).parent_path();
            if (!fs::is_directory(dir)) throw resunet::Error(fmt::format("output folder '{}' does not exist", dir.string()));
            if (access(dir.c_str(), W_OK) != 0) throw resunet::Error(fmt::format("output folder '{}' is not writable", dir.string()));
        }
        const fs::path tmp = fs::temp_directory_path() / fmt::format("bench_resunet.{}", getpid());
        fs::create_directories(tmp);
        json report = {{"width", o.width}, {"size", o.size}, {"batch", o.batch}, {"micro_batch", o.micro_batch},
                       {"runs", o.runs}, {"warmup", o.warmup}, {"model", o.model}};
        if (!o.model.empty()) report["model_file_bytes"] = static_cast<double>(fs::file_size(o.model));
        const std::time_t now = std::time(nullptr);
        char date[64];
        std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
        report["provenance"] = {{"cpu", cpu_model()}, {"isa", resunet::onednn_version()},
                                {"threads", o.threads > 0 ? std::to_string(o.threads) : fmt::format("{} (all cores)", std::thread::hardware_concurrency())},
                                {"onednn", resunet::onednn_version()}, {"git_commit", RESUNET_GIT_COMMIT}, {"date", date}};
        fmt::print(stderr, "bench_resunet: width {}, {}x{}, batch {}, {} runs per row\n", o.width, o.size, o.size, o.batch, o.runs);
        report["rows"] = json::array();
        for (const std::string precision : {"fp32"}) report["rows"].push_back(run_row_in_child(o, precision, tmp));
        fs::remove_all(tmp);
        const std::string md = markdown(report);
        fmt::print("{}", md);
        if (!o.json_path.empty()) write_atomically(o.json_path, report.dump(2));
        if (!o.csv_path.empty()) {
            std::string csv = "precision,latency_median_ms,latency_p90_ms,latency_p99_ms,latency_min_ms,latency_max_ms,latency_std_ms,first_run_ms,images_per_s,gflops,parameters,peak_rss_bytes,engine_total_bytes\n";
            for (const json& r : report["rows"])
                csv += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{}\n", r["precision"].get<std::string>(),
                                   r["latency_median_ms"].get<double>(), r["latency_p90_ms"].get<double>(),
                                   r["latency_p99_ms"].get<double>(), r["latency_min_ms"].get<double>(),
                                   r["latency_max_ms"].get<double>(), r["latency_std_ms"].get<double>(),
                                   r["first_run_ms"].get<double>(), r["images_per_s"].get<double>(),
                                   r["gflops"].get<double>(), r["parameters"].get<int64_t>(),
                                   r["peak_rss_bytes"].get<double>(), r["engine_total_bytes"].get<double>());
            write_atomically(o.csv_path, csv);
        }
    } catch (const std::exception& e) {
        fmt::print(stderr, "bench_resunet: error: {}\n", e.what());
        return 1;
    }
    return 0;
}
