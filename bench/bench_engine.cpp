// Google Benchmark: the full ResUNet forward pass through the compiled engines, fp32 and int8.
//   build/bench/bench_engine --benchmark_filter='Forward/64/224/16'
// Arguments: width, input size, batch. Counters: images/s, GFLOP/s (2 * MACs per second) and the
// engine's accounted memory.
#include <benchmark/benchmark.h>

#include <vector>

#include "engine/engine.h"
#include "graph/init.h"
#include "quant/quant_engine.h"

namespace {

enum class Kind { fp32, int8_dynamic, int8_static };

template <Kind kind>
void BM_Forward(benchmark::State& state) {
    resunet::ResUNetConfig config;
    config.width = static_cast<int>(state.range(0));
    config.height = config.width_px = static_cast<int>(state.range(1));
    const int batch = static_cast<int>(state.range(2));
    resunet::Graph graph = resunet::build_resunet(config);
    resunet::TensorMap weights = resunet::init_weights(graph, 1);
    std::vector<float> src(static_cast<size_t>(batch * 3 * config.height * config.width_px));
    std::vector<float> dst(static_cast<size_t>(batch * config.height * config.width_px));
    resunet::fill_uniform(src.data(), static_cast<int64_t>(src.size()), 2, -2.0f, 2.0f);
    auto measure = [&](auto& engine) {
        engine.run(src.data(), batch, dst.data());  // warm-up: first touch of arena and weights
        for (auto _ : state) {
            engine.run(src.data(), batch, dst.data());
            benchmark::DoNotOptimize(dst.data());
        }
        state.counters["engine_MB"] = static_cast<double>(engine.memory_usage().total()) / 1e6;
    };
    if constexpr (kind == Kind::fp32) {
        resunet::Engine engine(graph, weights, {});
        measure(engine);
    } else {
        resunet::QuantEngine engine(graph, weights, {});
        if constexpr (kind == Kind::int8_static) engine.calibrate(src.data(), std::min(batch, 4));
        measure(engine);
    }
    const double flop = 2.0 * static_cast<double>(graph.total_macs()) * batch;
    state.counters["images/s"] = benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
    state.counters["GFLOP/s"] = benchmark::Counter(flop / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

void Shapes(benchmark::internal::Benchmark* b) {
    b->Args({64, 224, 1})->Args({64, 224, 16})->Args({16, 224, 16})->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
}

}  // namespace

BENCHMARK(BM_Forward<Kind::fp32>)->Name("Forward/fp32")->Apply(Shapes);
BENCHMARK(BM_Forward<Kind::int8_dynamic>)->Name("Forward/int8_dynamic")->Apply(Shapes);
BENCHMARK(BM_Forward<Kind::int8_static>)->Name("Forward/int8_static")->Apply(Shapes);

BENCHMARK_MAIN();
