// What the fp32 engine's tests share (tests/test_engine*.cpp): random weights and inputs, running an engine,
// and one checked comparison against the plain reference (tests/support/reference.h) within kTolerance, with
// the largest error reported once at the end of the binary.
//
// Intended usage (a test file):
//   using namespace resunet::engine_checks;
//   const TensorMap weights = random_weights(graph, 7);
//   const Tensor4 input = random_input(graph, 2, 8);
//   check_case("conv 3x3", graph, weights, EngineOptions{}, input, resunet::reference::run_graph(graph, weights, input));
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "tests/support/reference.h"

namespace resunet::engine_checks {

using resunet::Dims;
using resunet::dims_to_string;
using resunet::Engine;
using resunet::EngineOptions;
using resunet::Error;
using resunet::fill_uniform;
using resunet::Graph;
using resunet::HostTensor;
using resunet::Node;
using resunet::OpKind;
using resunet::ParamInfo;
using resunet::residual_block;
using resunet::TensorMap;
using resunet::reference::ErrorStats;
using resunet::reference::Tensor4;

inline constexpr double kTolerance = 1e-4;  // relative: max|a - b| / max|reference|

// Every parameter drawn uniformly with its own fixed seed. Conv weights have Kaiming variance
// (bound sqrt(6 / fan_in)) so activations keep their scale; biases and BN statistics are far from the
// identity so that bias handling and BN folding are exercised.
TensorMap random_weights(const Graph& graph, uint64_t seed);
// Uniform [-2, 2) images of the graph's input shape, `batch` of them.
Tensor4 random_input(const Graph& graph, int batch, uint64_t seed);
// The options that change the lowering, in words.
std::string describe(const EngineOptions& o);
// The engine's output for `input` (NaN-filled first, so an unwritten element shows).
std::vector<float> run_engine(Engine& engine, const Tensor4& input, const Dims& output_dims);
// Runs the engine and the reference on the same input, prints the shapes and the error, checks it.
ErrorStats check_case(const std::string& label, const Graph& graph, const TensorMap& weights, const EngineOptions& options,
                      const Tensor4& input, const Tensor4& expected, std::vector<float>* output = nullptr);
// Two threads call `run` (one run() of one shared engine, returning its output) up to `iterations` times each:
// builds without NDEBUG must refuse some of the overlapping runs with an error naming "another run()", every
// run that goes through must give `expected`, and no other error may occur; the engine stays usable after.
void expect_concurrent_runs_refused(const std::function<std::vector<float>()>& run, const std::vector<float>& expected,
                                    int iterations);

}  // namespace resunet::engine_checks
