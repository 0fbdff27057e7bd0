// What the fp32 engine's tests share (tests/support/engine_checks.h).
#include "tests/support/engine_checks.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <iostream>
#include <limits>
#include <mutex>
#include <thread>

namespace resunet::engine_checks {

namespace {

// The largest relative errors the comparisons saw, reported once at the end of the run.
struct Worst {
    double relative = 0;         // largest relative error of a comparison within tolerance
    std::string where;           // which comparison
    int failures = 0;            // comparisons over tolerance
    double failed_relative = 0;  // largest relative error among those
    std::string failed_where;    // which comparison
};
Worst& worst() {
    static Worst w;
    return w;
}

class WorstErrorReport : public ::testing::Environment {
  public:
    void TearDown() override {
        if (worst().where.empty() && worst().failures == 0) return;  // this binary compared nothing
        std::cout << fmt::format("[ reference ] largest relative error within tolerance {:.0e}: {:.3g} ({})\n", kTolerance,
                                 worst().relative, worst().where);
        if (worst().failures > 0)
            std::cout << fmt::format("[ reference ] {} comparisons over tolerance; the worst: {:.3g} ({})\n",
                                     worst().failures, worst().failed_relative, worst().failed_where);
    }
};
[[maybe_unused]] ::testing::Environment* const kReport = ::testing::AddGlobalTestEnvironment(new WorstErrorReport);

}  // namespace

TensorMap random_weights(const Graph& graph, uint64_t seed) {
    TensorMap weights;
    uint64_t index = 0;
    for (const Node& node : graph.nodes())
        for (const ParamInfo& p : node.params) {
            HostTensor t = HostTensor::zeros(p.dims);
            const uint64_t s = seed * 1000003ULL + ++index;
            float low = -0.5f, high = 0.5f;
            const bool is_weight = p.name.ends_with(".weight");
            if ((node.kind == OpKind::conv || node.kind == OpKind::conv_transpose) && is_weight) {
                // conv [O, I, k, k]: fan_in I*k*k; conv_transpose [I, O, k, k]: each output sees about I*(k/s)^2.
                const double fan_in = node.kind == OpKind::conv
                                          ? static_cast<double>(p.dims[1] * p.dims[2] * p.dims[3])
                                          : static_cast<double>(p.dims[0]) *
                                                std::max(1.0, static_cast<double>(p.dims[2] * p.dims[3]) /
                                                                  static_cast<double>(node.stride * node.stride));
                high = static_cast<float>(std::sqrt(6.0 / fan_in));
                low = -high;
            } else if (node.kind == OpKind::batch_norm && is_weight) {
                low = 0.5f, high = 1.5f;
            } else if (p.name.ends_with(".running_var")) {
                low = 0.25f, high = 2.0f;
            }
            fill_uniform(t.f32(), t.num_elements(), s, low, high);
            weights.emplace(p.name, std::move(t));
        }
    return weights;
}

Tensor4 random_input(const Graph& graph, int batch, uint64_t seed) {
    Dims dims = graph.value(graph.input_value()).dims;
    dims[0] = batch;
    Tensor4 input = Tensor4::zeros(dims);
    fill_uniform(input.data.data(), input.size(), seed, -2.0f, 2.0f);
    return input;
}

std::string describe(const EngineOptions& o) {
    return fmt::format("micro_batch {} concat_in_place {} deconv_as_conv {}", o.micro_batch, o.concat_in_place,
                       o.deconv_as_conv);
}

std::vector<float> run_engine(Engine& engine, const Tensor4& input, const Dims& output_dims) {
    std::vector<float> out(static_cast<size_t>(resunet::num_elements(output_dims)),
                           std::numeric_limits<float>::quiet_NaN());
    engine.run(input.data.data(), static_cast<int>(input.dims[0]), out.data());
    return out;
}

ErrorStats check_case(const std::string& label, const Graph& graph, const TensorMap& weights, const EngineOptions& options,
                      const Tensor4& input, const Tensor4& expected, std::vector<float>* output) {
    Engine engine(graph, weights, options);
    std::vector<float> actual = run_engine(engine, input, expected.dims);
    const ErrorStats e = resunet::reference::compare(actual.data(), expected);
    std::cout << fmt::format("  {:<42} in {:<16} out {:<16} {:<58} layout {:<7} {}\n", label,
                             dims_to_string(input.dims), dims_to_string(expected.dims), describe(options),
                             engine.activation_layout(), e.to_string());
    const std::string where = fmt::format("{}, {}, out {}", label, describe(options), dims_to_string(expected.dims));
    Worst& w = worst();
    if (e.relative() <= kTolerance && e.relative() > w.relative) {
        w.relative = e.relative();
        w.where = where;
    } else if (!(e.relative() <= kTolerance)) {
        ++w.failures;
        if (!(e.relative() <= w.failed_relative)) {
            w.failed_relative = e.relative();
            w.failed_where = where;
        }
    }
    EXPECT_LE(e.relative(), kTolerance) << where << ": " << e.to_string();
    if (output) *output = std::move(actual);
    return e;
}

void expect_concurrent_runs_refused(const std::function<std::vector<float>()>& run, const std::vector<float>& expected,
                                    int iterations) {
    std::atomic<int> refused{0}, wrong{0}, other_errors{0};
    std::atomic<bool> stop{false};
    std::string message;
    std::mutex message_mutex;
    auto worker = [&] {
        for (int i = 0; i < iterations && !stop.load(); ++i) {
            try {
                if (run() != expected) ++wrong;
            } catch (const Error& e) {
                const std::string text = e.what();
                if (text.find("another run()") == std::string::npos) {
                    ++other_errors;
                } else if (++refused >= 3) {
                    stop = true;
                }
                const std::lock_guard<std::mutex> lock(message_mutex);
                message = text;
            }
        }
    };
    std::thread a(worker), b(worker);
    a.join();
    b.join();
    EXPECT_GT(refused.load(), 0) << "no concurrent run was caught";
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_EQ(other_errors.load(), 0) << message;
    std::cout << "  concurrent run refused " << refused.load() << " times: " << message << "\n";
    EXPECT_EQ(run(), expected) << "usable afterwards";
}

}  // namespace resunet::engine_checks
