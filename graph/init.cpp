#include "graph/init.h"

#include <cmath>

namespace resunet {

namespace {

uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

double uniform01(uint64_t& state) { return static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53; }

uint64_t name_seed(uint64_t seed, const std::string& name) {
    uint64_t h = 1469598103934665603ULL ^ seed;
    for (unsigned char c : name) h = (h ^ c) * 1099511628211ULL;
    return h;
}

// Box-Muller; the cosine half only, so each value costs two uniforms and nothing is cached.
void fill_normal(float* data, int64_t count, uint64_t seed, double stddev) {
    uint64_t state = seed;
    for (int64_t i = 0; i < count; ++i) {
        double u1 = uniform01(state), u2 = uniform01(state);
        if (u1 < 1e-300) u1 = 1e-300;
        data[i] = static_cast<float>(stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
}

}  // namespace

void fill_uniform(float* data, int64_t count, uint64_t seed, float low, float high) {
    uint64_t state = seed;
    for (int64_t i = 0; i < count; ++i)
        data[i] = low + static_cast<float>(uniform01(state)) * (high - low);
}

TensorMap init_weights(const Graph& graph, uint64_t seed) {
    TensorMap weights;
    for (const Node& node : graph.nodes()) {
        for (const ParamInfo& p : node.params) {
            HostTensor t = HostTensor::zeros(p.dims);
            const bool is_weight = p.name.size() > 7 && p.name.ends_with(".weight");
            if (node.kind == OpKind::conv && is_weight) {
                const double fan_in = static_cast<double>(p.dims[1] * p.dims[2] * p.dims[3]);
                fill_normal(t.f32(), t.num_elements(), name_seed(seed, p.name), std::sqrt(2.0 / fan_in));
            } else if (node.kind == OpKind::conv_transpose && is_weight) {
                // PyTorch's fan_in for ConvTranspose2d weight [I, O, k, k] is O * k * k.
                const double fan_in = static_cast<double>(p.dims[1] * p.dims[2] * p.dims[3]);
                fill_normal(t.f32(), t.num_elements(), name_seed(seed, p.name), std::sqrt(2.0 / fan_in));
            } else if (node.kind == OpKind::batch_norm && (is_weight || p.name.ends_with(".running_var"))) {
                for (int64_t i = 0; i < t.num_elements(); ++i) t.f32()[i] = 1.0f;
            }
            weights.emplace(p.name, std::move(t));
        }
    }
    return weights;
}

void randomize_batch_norm_statistics(const Graph& graph, TensorMap& weights, uint64_t seed) {
    for (const Node& node : graph.nodes()) {
        for (const ParamInfo& p : node.params) {
            HostTensor& t = weights.at(p.name);
            const uint64_t s = name_seed(seed, p.name);
            if (node.kind == OpKind::batch_norm) {
                if (p.name.ends_with(".weight")) fill_uniform(t.f32(), t.num_elements(), s, 0.5f, 1.5f);
                if (p.name.ends_with(".bias")) fill_uniform(t.f32(), t.num_elements(), s, -0.2f, 0.2f);
                if (p.name.ends_with(".running_mean")) fill_uniform(t.f32(), t.num_elements(), s, -0.3f, 0.3f);
                if (p.name.ends_with(".running_var")) fill_uniform(t.f32(), t.num_elements(), s, 0.5f, 2.0f);
            } else if (p.name.ends_with(".bias")) {
                fill_uniform(t.f32(), t.num_elements(), s, -0.1f, 0.1f);
            }
        }
    }
}

}  // namespace resunet
