// What the int8 engine's tests share (tests/test_quant*.cpp): small-graph checks of the int8 engine against the
// fake-quant reference (tests/support/fake_quant.h) and fp32, the width-8 network built once per binary, and
// the tolerances they are held to.
//
// Intended usage (a test file):
//   using namespace resunet::quant_checks;
//   Graph g; g.set_output(residual_block(g, "rb", g.input("input", {1, 8, 12, 12}), 16));
//   check_graph("RB(8, 16)", g, /*seed=*/700);   // every op, end to end, static scales, SQNR vs fp32
//
// Metrics: relative error max|int8 - fake-quant| / max|fake-quant| <= 1e-5 (the two compute the same
// quantized values; they differ only in float rounding); SQNR 10 log10(sum ref^2 / sum err^2) against
// fp32; Dice of the masks (logit > 0) against the fp32 engine.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "quant/quant_engine.h"
#include "quant/quantize.h"
#include "quant/quantize_kernels.h"
#include "tests/support/fake_quant.h"
#include "tests/support/reference.h"

namespace resunet::quant_checks {

using resunet::ActivationQuant;
using resunet::ConvAlgorithm;
using resunet::Dims;
using resunet::dims_to_string;
using resunet::Error;
using resunet::fill_uniform;
using resunet::Graph;
using resunet::HostTensor;
using resunet::KernelShape;
using resunet::KernelSource;
using resunet::KernelTarget;
using resunet::LayerProfile;
using resunet::LayerQuantInfo;
using resunet::QuantEngine;
using resunet::QuantOptions;
using resunet::residual_block;
using resunet::ScaleMode;
using resunet::TensorMap;
using resunet::WeightQuant;
using resunet::reference::ErrorStats;
using resunet::reference::FakeQuantLayer;
using resunet::reference::FakeQuantOptions;
using resunet::reference::Tensor4;

inline constexpr double kFakeQuantTolerance = 1e-5;  // relative, int8 engine vs fake-quant reference
inline constexpr double kOpSqnrDb = 30.0;            // one layer (or one block) against fp32
// The whole width-8 network with random weights against the fp32 engine. The target was Dice >= 0.99;
// measured 0.944-0.951 (logit SQNR ~24 dB), and the fake-quant reference gets the same Dice: each int8
// layer adds noise at 31-41 dB, 29 int8 layers in series leave ~24 dB at the logits, and the logits of
// a random network are not confident (about 9% of pixels have |logit| < 1 at RMS 9.5), so ~1-2% of
// pixels flip sign. Ablation on the fake-quant reference: weights only (63 levels) 25.5 dB / Dice 0.959,
// activations only 29.1 dB / 0.967, 127 weight levels 26.9 dB / 0.966. Not an engine error: the engine
// matches the fake-quant reference per op to 2e-7 and end to end (micro-batch 1) to 5e-7.
inline constexpr double kNetworkDice = 0.93;
inline constexpr double kNetworkSqnrDb = 20.0;
inline constexpr double kDiceVsFakeQuant = 0.01;  // |Dice(int8, fp32) - Dice(fake-quant, fp32)|

// Engines here run on one thread. The test machine is shared: under load, libgomp's spin-waiting
// two-thread teams made this binary 15x slower (6.9 s vs 104 s wall at load 9 on 2 cores). The
// kernel tests run the OpenMP passes with the default team, and QuantNetwork.ThreadCountDoesNotChangeResults
// runs the engine with two threads against one.
inline constexpr int kThreads = 1;

// Options with kThreads.
QuantOptions quant_options();

// Uniform [low, high) values; Kaiming weights with randomized batch-norm statistics.
Tensor4 random_tensor(const Dims& dims, uint64_t seed, float low, float high);
TensorMap model_weights(const Graph& graph, uint64_t seed);

// The engine's output for `input` (NaN-filled first, so an unwritten element shows).
std::vector<float> run_quant(QuantEngine& engine, const Graph& graph, const Tensor4& input);
inline int64_t count_of(const std::vector<float>& v) { return static_cast<int64_t>(v.size()); }
bool all_finite(const std::vector<float>& v);

// A value of the engine's last pass as a Tensor4 (needs keep_values).
Tensor4 engine_value(QuantEngine& engine, const Graph& graph, const std::string& name, int64_t batch);
// The static scales of an engine (QuantEngine::static_scales) per quantized value.
std::map<std::string, ActivationQuant> to_static_quant(const TensorMap& scales);

// Runs the int8 engine pass by pass with keep_values and checks every materialized value (and the
// output) against the fake-quant reference fed the engine's own values of that pass, so every op is
// compared on exactly the inputs it saw. Returns the largest relative error.
// With `calibration`, the engine is calibrated on it first and the reference uses its static scales. Under
// Int8ConvAlgorithm::mixed the reference keeps in fp32 the layers the engine measured faster in fp32.
double check_every_op(const std::string& label, const Graph& graph, const TensorMap& weights, const Tensor4& input,
                      QuantOptions options, const Tensor4* calibration = nullptr);

// One small graph: every op against fake-quant (micro-batch 2 and 1), the whole output against the
// fake-quant reference end to end, and against fp32 (SQNR). Then static scales after calibration.
void check_graph(const std::string& label, const Graph& graph, uint64_t seed, float low = -2.0f, float high = 2.0f,
                 const std::set<std::string>& keep_fp32 = {});

// The width-8, depth-4, 64x64 ResUNet with random weights, its inputs and its fp32 engine's logits.
struct WholeNet {
    Graph graph;
    TensorMap weights;
    Tensor4 input;        // batch 2, uniform [-2, 2]
    Tensor4 calibration;  // batch 4, same distribution, other seed
    std::vector<float> fp32;  // fp32 engine logits of `input`
    std::unique_ptr<resunet::Engine> fp32_engine;
    std::vector<float> fp32_logits(const Tensor4& images) {
        std::vector<float> out(static_cast<size_t>(images.dims[0] * 64 * 64), std::numeric_limits<float>::quiet_NaN());
        fp32_engine->run(images.data.data(), static_cast<int>(images.dims[0]), out.data());
        return out;
    }
};

// Built once for the binary (compiling engines dominates its run time).
WholeNet& whole_net();

}  // namespace resunet::quant_checks
