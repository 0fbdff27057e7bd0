// Google Benchmark: one training step (forward with batch statistics, Dice + BCE, backward, Adam) of the
// full ResUNet through the compiled Trainer.
//   build/bench/bench_train --benchmark_filter='TrainStep/16/224/4/'
// Arguments: width, input size, batch, 3x3 algorithm (0 measured per layer, the default of `resunet train`;
// 1 oneDNN's direct kernels only). Counters also give the 3x3 layers' choices: winograd_layers (passes
// that run our own Winograd), and of them wino_fwd, wino_bwd_data, wino_bwd_weights. Counters: images/s, GFLOP/s (a step counted as 3 x the forward
// MACs x 2: forward, data gradient, weights gradient), first_step_ms (includes first touch of every
// buffer), compile_ms, buffers_MB (activations, their gradients, workspaces; weights and moments not
// included). The width-64 cases need about 4x the memory of width 16. RESUNET_TRAIN_PROFILE=1 prints one
// more step's time per step to stderr (Trainer::profile_gradients).
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "graph/init.h"
#include "train/trainer.h"

namespace {

// RESUNET_TRAIN_PROFILE=1: one more step timed per step, the slowest steps and the time per pass kind.
void print_profile(const std::string& name, std::vector<resunet::Trainer::StepTime> times) {
    std::map<std::string, double> kinds;
    double total = 0;
    for (const auto& t : times) {
        const size_t dot = t.name.rfind('.');
        const std::string suffix = dot == std::string::npos ? "" : t.name.substr(dot + 1);
        const bool pass = suffix == "bwd_weights" || suffix == "bwd_data" || suffix == "bwd" || suffix == "reorder" ||
                          suffix == "grad_reorder" || suffix == "accumulate" || suffix.starts_with("winograd_weights");
        kinds[t.phase + (pass ? " " + suffix : "")] += t.ms;
        total += t.ms;
    }
    std::fprintf(stderr, "%s: %.0f ms in %zu steps\n", name.c_str(), total, times.size());
    for (const auto& [kind, ms] : kinds) std::fprintf(stderr, "  %-30s %8.1f ms\n", kind.c_str(), ms);
    std::sort(times.begin(), times.end(), [](const auto& a, const auto& b) { return a.ms > b.ms; });
    for (size_t i = 0; i < std::min<size_t>(times.size(), 15); ++i)
        std::fprintf(stderr, "  %-9s %-30s %8.1f ms\n", times[i].phase.c_str(), times[i].name.c_str(), times[i].ms);
}

void BM_TrainStep(benchmark::State& state) {
    resunet::ResUNetConfig config;
    config.width = static_cast<int>(state.range(0));
    config.height = config.width_px = static_cast<int>(state.range(1));
    config.batch = static_cast<int>(state.range(2));
    const resunet::Graph graph = resunet::build_resunet(config);
    resunet::TrainOptions options;
    options.conv_algorithm = state.range(3) == 1 ? resunet::TrainConvAlgorithm::direct : resunet::TrainConvAlgorithm::measured;
    resunet::Trainer trainer(graph, resunet::init_weights(graph, 1), options);
    int winograd_layers = 0, winograd_forward = 0, winograd_backward_data = 0, winograd_backward_weights = 0;
    for (const resunet::TrainConvChoice& c : trainer.conv_choices()) {
        const bool own = c.algorithm != "direct";
        winograd_layers += own;
        winograd_forward += own && c.pass == "forward";
        winograd_backward_data += own && c.pass == "backward_data";
        winograd_backward_weights += own && c.pass == "backward_weights";
    }
    std::vector<float> images(static_cast<size_t>(resunet::num_elements(trainer.input_dims())));
    std::vector<float> masks(static_cast<size_t>(resunet::num_elements(trainer.output_dims())));
    resunet::fill_uniform(images.data(), static_cast<int64_t>(images.size()), 2, -2.0f, 2.0f);
    resunet::fill_uniform(masks.data(), static_cast<int64_t>(masks.size()), 3, 0.0f, 1.0f);
    for (float& m : masks) m = m > 0.7f ? 1.0f : 0.0f;
    const auto start = std::chrono::steady_clock::now();
    trainer.step(images.data(), masks.data());
    const double first_step_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    for (auto _ : state) benchmark::DoNotOptimize(trainer.step(images.data(), masks.data()));
    if (std::getenv("RESUNET_TRAIN_PROFILE")) print_profile(fmt::format("width {} size {} batch {} {}", state.range(0), state.range(1), state.range(2), state.range(3) == 1 ? "direct" : "measured"), trainer.profile_gradients(images.data(), masks.data()));
    const double flop = 3.0 * 2.0 * static_cast<double>(graph.total_macs());  // graph MACs are for the whole batch
    state.counters["images/s"] = benchmark::Counter(static_cast<double>(config.batch), benchmark::Counter::kIsIterationInvariantRate);
    state.counters["GFLOP/s"] = benchmark::Counter(flop / 1e9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["first_step_ms"] = first_step_ms;
    state.counters["compile_ms"] = trainer.compile_ms();
    state.counters["buffers_MB"] = static_cast<double>(trainer.activation_bytes()) / 1e6;
    state.counters["winograd_layers"] = winograd_layers;
    state.counters["wino_fwd"] = winograd_forward;
    state.counters["wino_bwd_data"] = winograd_backward_data;
    state.counters["wino_bwd_weights"] = winograd_backward_weights;
}

}  // namespace

BENCHMARK(BM_TrainStep)->Name("TrainStep")->ArgsProduct({{16}, {224}, {4, 16}, {0, 1}})->ArgsProduct({{64}, {224, 128}, {4, 8, 16}, {0, 1}})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);

BENCHMARK_MAIN();
