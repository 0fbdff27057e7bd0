#include "train/optimizer.h"

#include <fmt/format.h>

#include <cmath>

#include "graph/tensor.h"

namespace resunet {

void adam_update(const AdamOptions& options, float* weights, const float* gradients, float* first_moment,
                 float* second_moment, int64_t count, double learning_rate, int64_t step) {
    if (step < 1) throw Error(fmt::format("adam: step must be >= 1 (1-based), got {}", step));
    const double correction1 = 1.0 - std::pow(options.beta1, static_cast<double>(step));
    const double correction2 = 1.0 - std::pow(options.beta2, static_cast<double>(step));
    const float beta1 = static_cast<float>(options.beta1);
    const float beta2 = static_cast<float>(options.beta2);
    const float step_size = static_cast<float>(learning_rate / correction1);
    const float inverse_sqrt_correction2 = static_cast<float>(1.0 / std::sqrt(correction2));
    const float epsilon = static_cast<float>(options.epsilon);
    const float l2 = options.decoupled ? 0.0f : static_cast<float>(options.weight_decay);
    const float decay = options.decoupled ? static_cast<float>(1.0 - learning_rate * options.weight_decay) : 1.0f;
#pragma omp parallel for simd schedule(static) if (count > 65536)
    for (int64_t i = 0; i < count; ++i) {
        const float g = gradients[i] + l2 * weights[i];
        const float m = beta1 * first_moment[i] + (1.0f - beta1) * g;
        const float v = beta2 * second_moment[i] + (1.0f - beta2) * g * g;
        first_moment[i] = m;
        second_moment[i] = v;
        weights[i] = weights[i] * decay - step_size * m / (std::sqrt(v) * inverse_sqrt_correction2 + epsilon);
    }
}

double StepLR::learning_rate(int64_t epoch) const {
    if (step_size <= 0) throw Error(fmt::format("StepLR: step_size must be positive, got {}", step_size));
    if (epoch < 0) throw Error(fmt::format("StepLR: epoch must be >= 0, got {}", epoch));
    return initial_learning_rate * std::pow(gamma, static_cast<double>(epoch / step_size));
}

}  // namespace resunet
