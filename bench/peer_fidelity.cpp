// Our engines on the peers' exact network and input (../shared/peers: export_weights.py writes the
// weights under our names, prep.py the 16 x 3 x 224 x 224 input.bin and PyTorch's fp32 ref_logits.bin),
// so that our rows sit beside PyTorch's and ONNX Runtime's in one sitting: latency (median and spread of
// N timed runs of the whole batch), peak RSS, and fidelity against the PyTorch reference (max and mean
// abs difference, Dice of the masks at logit > 0). One precision per process, so peak RSS is its own.
//
//   peer_fidelity --weights W.safetensors --input input.bin --reference ref_logits.bin --precision fp32
//   peer_fidelity ... --precision int8 | static-int8 [--runs 5] [--tune fast] [--json out.json]
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <vector>

#include "apps/lib/flag_basics.h"
#include "engine/engine.h"
#include "apps/lib/engine_setup.h"
#include "engine/plan_cache.h"
#include "graph/atomic_file.h"
#include "graph/graph.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace {

std::vector<float> read_floats(const std::string& path, size_t count) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw resunet::Error(fmt::format("{}: cannot open", path));
    std::vector<float> data(count);
    in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(count * sizeof(float)));
    if (in.gcount() != static_cast<std::streamsize>(count * sizeof(float)) || in.peek() != EOF)
        throw resunet::Error(fmt::format("{}: expected exactly {} float32 values", path, count));
    return data;
}

double peak_rss_mb() {
    std::ifstream status("/proc/self/status");
    for (std::string line; std::getline(status, line);)
        if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
    return 0;
}

template <typename AnyEngine>
nlohmann::json measure(AnyEngine& engine, const std::vector<float>& input, const std::vector<float>& reference,
                       int batch, int runs) {
    using Clock = std::chrono::steady_clock;
    std::vector<float> out(reference.size());
    engine.run(input.data(), batch, out.data());  // warm-up
    std::vector<double> ms;
    for (int r = 0; r < runs; ++r) {
        const auto start = Clock::now();
        engine.run(input.data(), batch, out.data());
        ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
        fmt::print(stderr, "\r  run {}/{}: {:.0f} ms   ", r + 1, runs, ms.back());
    }
    fmt::print(stderr, "\n");
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    double max_abs = 0, sum_abs = 0;
    int64_t both = 0, ours = 0, theirs = 0;
    for (size_t i = 0; i < out.size(); ++i) {
        const double d = std::fabs(static_cast<double>(out[i]) - reference[i]);
        max_abs = std::max(max_abs, std::isfinite(d) ? d : INFINITY);
        sum_abs += d;
        const bool a = out[i] > 0, b = reference[i] > 0;
        both += a && b;
        ours += a;
        theirs += b;
    }
    const double dice = ours + theirs == 0 ? 1.0 : 2.0 * static_cast<double>(both) / static_cast<double>(ours + theirs);
    return {{"latency_median_ms", sorted[sorted.size() / 2]},
            {"latency_min_ms", sorted.front()},
            {"latency_max_ms", sorted.back()},
            {"runs_ms", ms},
            {"max_abs_diff", max_abs},
            {"mean_abs_diff", sum_abs / static_cast<double>(out.size())},
            {"mask_dice_vs_reference", dice}};
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"Our engines on the peers' network, input and reference logits (../shared/peers)"};
    std::string weights_path, input_path, reference_path, precision = "fp32", json_path;
    resunet::EngineTuningFlags flags;  // the programs' engine flags and defaults (apps/lib/engine_setup.h)
    int runs = 5, batch = 16, size = 224, threads = 2;
    app.add_option("--weights", weights_path, "peers' weights in our names (export_weights.py)")->required();
    app.add_option("--input", input_path, "input.bin: batch x 3 x size x size float32")->required();
    app.add_option("--reference", reference_path, "ref_logits.bin: batch x 1 x size x size float32")->required();
    app.add_option("--precision", precision, "fp32 | int8 (dynamic scales) | static-int8")
        ->check(resunet::precision_validator({"fp32", "int8", "static-int8"}));
    resunet::add_engine_tuning_flags(app, flags);
    app.add_option("--runs", runs, "timed runs of the whole batch")->check(resunet::positive_number());
    app.add_option("--batch", batch, "images in input.bin")->check(resunet::positive_number());
    app.add_option("--size", size, "image height and width")->check(resunet::positive_number());
    app.add_option("--threads", threads, "OpenMP threads")->check(resunet::positive_number());
    app.add_option("--json", json_path, "also write the row as JSON here");
    CLI11_PARSE(app, argc, argv);
    try {
        const auto start = std::chrono::steady_clock::now();
        resunet::SafetensorsFile file = resunet::load_safetensors(weights_path);
        resunet::ResUNetConfig config = resunet::infer_resunet_config(file.tensors, file.metadata, size);
        config.height = config.width_px = size;
        const resunet::Graph graph = resunet::build_resunet(config);
        const std::vector<float> input = read_floats(input_path, static_cast<size_t>(batch) * 3 * size * size);
        const std::vector<float> reference = read_floats(reference_path, static_cast<size_t>(batch) * size * size);
        nlohmann::json row;
        std::string plan, row_plan_id;
        if (precision == "fp32") {
            const resunet::EngineOptions options = resunet::fp32_engine_options(flags, threads, resunet::fp32_micro_batch_for(batch));
            auto engine = std::make_unique<resunet::Engine>(graph, file.tensors, options);
            file.tensors.clear();
            const double compile_ms = engine->compile_ms();
            plan = engine->tuning_summary();
            row_plan_id = engine->plan().id();
            row = measure(*engine, input, reference, batch, runs);
            row["compile_ms"] = compile_ms;
            row["engine_bytes"] = engine->memory_usage().total();
        } else {
            const resunet::QuantOptions options = resunet::int8_engine_options(flags, threads, 1);
            auto engine = std::make_unique<resunet::QuantEngine>(graph, file.tensors, options);
            file.tensors.clear();
            if (precision == "static-int8") engine->calibrate(input.data(), 4);  // the first 4 images of the batch
            plan = engine->conv_summary();
            row_plan_id = engine->plan().id();
            row = measure(*engine, input, reference, batch, runs);
            row["compile_ms"] = engine->compile_ms();
            row["engine_bytes"] = engine->memory_usage().total();
        }
        row["precision"] = precision;
        row["tune"] = flags.tune;
        if (precision != "fp32") row["int8_conv"] = flags.int8_conv_or_default();
        row["plan"] = plan;
        row["plan_id"] = row_plan_id;
        row["threads"] = threads;
        row["peak_rss_mb"] = peak_rss_mb();
        row["isa"] = resunet::onednn_version();
        row["wall_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        fmt::print("{}\n", row.dump(1));
        if (!json_path.empty()) resunet::write_file_atomic(json_path, row.dump(1) + "\n");
    } catch (const resunet::Error& e) {
        fmt::print(stderr, "peer_fidelity: error: {}\n", e.what());
        return 2;
    }
    return 0;
}
