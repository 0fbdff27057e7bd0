// Google Benchmark: every distinct convolution shape of the width-64 ResUNet at 224x224, alone, in fp32
// and int8 (oneDNN's direct u8 x s8 kernel; for the 3x3 shapes also our own int8 Winograd F(2x2,3x3),
// quant/winograd_int8.h, as `int8-winograd/`), so a performance engineer can profile one kernel at a time.
//   build/bench/bench_layers --benchmark_filter='int8/conv3x3_128to64_224'
//   build/bench/bench_layers --benchmark_filter='int8.*/conv3x3_512to512_28'   (direct beside Winograd)
//   ONEDNN_VERBOSE=1 build/bench/bench_layers --benchmark_filter=... --benchmark_min_time=0.1
// A layer graph is input -> conv (+BN +ReLU, as in the network) for convolutions, input -> ConvTranspose
// 2x2/2 for the up-sampling layers. int8 timings include the layer's quantize pass (range + u8), as in
// the network. fp32 3x3 rows read the input through a ReLU pass (input -> ReLU -> conv), because the fp32
// engine offers Winograd only to convolutions that read an activation, as every 3x3 layer of the network
// but the RGB stem does; without it they timed the direct kernel where the network runs our Winograd. They
// run with no memory budget (the default 2.5x of the direct plan would refuse a lone layer's Winograd weights).
// Counter: GFLOP/s (2 * MACs per second), batch 1.
#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <set>
#include <tuple>
#include <vector>

#include "engine/engine.h"
#include "graph/fusion.h"
#include "graph/init.h"
#include "quant/quant_engine.h"

namespace {

struct LayerShape {
    resunet::OpKind kind;
    int64_t in_channels, out_channels, kernel, size;
    std::string name() const {
        if (kind == resunet::OpKind::conv_transpose) return fmt::format("deconv2x2_{}to{}_{}", in_channels, out_channels, size);
        return fmt::format("conv{}x{}_{}to{}_{}", kernel, kernel, in_channels, out_channels, size);
    }
};

std::vector<LayerShape> distinct_shapes() {
    const resunet::Graph net = resunet::build_resunet({});
    std::set<std::tuple<int, int64_t, int64_t, int64_t, int64_t>> seen;
    std::vector<LayerShape> shapes;
    for (const resunet::Node& n : net.nodes()) {
        if (n.kind != resunet::OpKind::conv && n.kind != resunet::OpKind::conv_transpose) continue;
        const resunet::Dims& in = net.value(n.inputs[0]).dims;
        LayerShape s{n.kind, in[1], n.out_channels, n.kernel, in[2]};
        if (seen.insert({static_cast<int>(s.kind), s.in_channels, s.out_channels, s.kernel, s.size}).second) shapes.push_back(s);
    }
    return shapes;
}

resunet::Graph layer_graph(const LayerShape& s, bool fp32) {
    resunet::Graph g;
    int x = g.input("input", {1, s.in_channels, s.size, s.size});
    if (fp32 && s.kind == resunet::OpKind::conv && s.kernel == 3 && s.in_channels >= 8) x = g.relu("input.relu", x);
    if (s.kind == resunet::OpKind::conv_transpose) {
        x = g.conv_transpose("layer", x, static_cast<int>(s.out_channels), 2, 2);
    } else {
        x = g.conv("layer", x, static_cast<int>(s.out_channels), static_cast<int>(s.kernel), 1, static_cast<int>(s.kernel / 2));
        x = g.batch_norm("layer.bn", x);
        x = g.relu("layer.relu", x);
    }
    g.set_output(x);
    return g;
}

enum class Mode { fp32, int8, int8_winograd };

template <Mode mode>
void run_layer(benchmark::State& state, LayerShape shape) {
    const resunet::Graph graph = layer_graph(shape, mode == Mode::fp32);
    resunet::TensorMap weights = resunet::init_weights(graph, 1);
    std::vector<float> src(static_cast<size_t>(resunet::num_elements(graph.value(graph.input_value()).dims)));
    std::vector<float> dst(static_cast<size_t>(resunet::num_elements(graph.value(graph.output_value()).dims)));
    resunet::fill_uniform(src.data(), static_cast<int64_t>(src.size()), 2, 0.0f, 2.0f);
    auto measure = [&](auto& engine) {
        engine.run(src.data(), 1, dst.data());
        for (auto _ : state) engine.run(src.data(), 1, dst.data());
    };
    if constexpr (mode != Mode::fp32) {
        resunet::QuantOptions options;
        options.int8_algorithm = mode == Mode::int8 ? resunet::Int8ConvAlgorithm::direct : resunet::Int8ConvAlgorithm::winograd_f23;
        resunet::QuantEngine engine(graph, weights, options);
        measure(engine);
    } else {
        resunet::EngineOptions options;
        options.memory_budget_mb = -1;  // one layer's Winograd weights exceed the network's default budget share
        resunet::Engine engine(graph, weights, options);
        measure(engine);
    }
    state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(graph.total_macs()) / 1e9,
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

const bool registered = [] {
    for (const LayerShape& s : distinct_shapes()) {
        benchmark::RegisterBenchmark(("fp32/" + s.name()).c_str(), run_layer<Mode::fp32>, s)->Unit(benchmark::kMillisecond)->UseRealTime();
        // The int8 engine keeps layers with fewer than 8 input or output channels in fp32.
        if (s.in_channels < 8 || s.out_channels < 8) continue;
        benchmark::RegisterBenchmark(("int8/" + s.name()).c_str(), run_layer<Mode::int8>, s)->Unit(benchmark::kMillisecond)->UseRealTime();
        if (s.kind == resunet::OpKind::conv && s.kernel == 3)
            benchmark::RegisterBenchmark(("int8-winograd/" + s.name()).c_str(), run_layer<Mode::int8_winograd>, s)
                ->Unit(benchmark::kMillisecond)
                ->UseRealTime();
    }
    return true;
}();

}  // namespace

BENCHMARK_MAIN();
