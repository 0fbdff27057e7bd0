// Google Benchmark: the full ResUNet fp32 forward pass through the compiled engine.
//   build/bench/bench_engine --benchmark_filter='Forward/64/224/16'
// Arguments: width, input size, batch. Counters: images/s and GFLOP/s (2 * MACs per second).
#include <benchmark/benchmark.h>

#include <vector>

#include "engine/engine.h"
#include "graph/init.h"

namespace {

void BM_Forward(benchmark::State& state) {
    resunet::ResUNetConfig config;
    config.width = static_cast<int>(state.range(0));
    config.height = config.width_px = static_cast<int>(state.range(1));
    const int batch = static_cast<int>(state.range(2));
    resunet::Graph graph = resunet::build_resunet(config);
    resunet::TensorMap weights = resunet::init_weights(graph, 1);
    resunet::Engine engine(graph, weights, {});
    std::vector<float> src(static_cast<size_t>(batch * 3 * config.height * config.width_px));
    std::vector<float> dst(static_cast<size_t>(batch * config.height * config.width_px));
    resunet::fill_uniform(src.data(), static_cast<int64_t>(src.size()), 2, -2.0f, 2.0f);
    engine.run(src.data(), batch, dst.data());  // warm-up: first-touch of arena and weights
    for (auto _ : state) {
        engine.run(src.data(), batch, dst.data());
        benchmark::DoNotOptimize(dst.data());
    }
    const double flop = 2.0 * static_cast<double>(graph.total_macs()) * batch;
    state.counters["images/s"] = benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
    state.counters["GFLOP/s"] = benchmark::Counter(flop / 1e9, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["engine_MB"] = static_cast<double>(engine.memory_usage().total()) / 1e6;
}

}  // namespace

BENCHMARK(BM_Forward)->Name("Forward")->Args({64, 224, 1})->Args({64, 224, 16})->Args({16, 224, 16})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);

BENCHMARK_MAIN();
