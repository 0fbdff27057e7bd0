// Seeded random initialisation of a graph's parameters (used when no weights file is given).
//
// Intended usage:
//   resunet::Graph g = resunet::build_resunet({});
//   resunet::TensorMap w = resunet::init_weights(g, /*seed=*/42);          // Kaiming normal convs
//   resunet::randomize_batch_norm_statistics(g, w, /*seed=*/7);            // tests: non-trivial BN
#pragma once

#include <cstdint>

#include "graph/graph.h"

namespace resunet {

// Conv and transposed-conv weights ~ N(0, 2 / fan_in) (Kaiming normal, ReLU gain), biases 0;
// BN scale 1, shift 0, running mean 0, running variance 1. Same seed, same tensors on every machine.
TensorMap init_weights(const Graph& graph, uint64_t seed);

// Replaces BN parameters, running statistics and conv biases with random but well-conditioned values,
// so tests exercise BN folding and bias handling.
void randomize_batch_norm_statistics(const Graph& graph, TensorMap& weights, uint64_t seed);

// Deterministic uniform floats in [low, high) from a seed (splitmix64 + xorshift; no std::distribution
// so values are identical across standard libraries).
void fill_uniform(float* data, int64_t count, uint64_t seed, float low, float high);

}  // namespace resunet
