// Adam (Kingma & Ba 2015, as torch.optim.Adam / AdamW compute it) and a StepLR learning-rate schedule.
//
// Intended usage:
//   resunet::AdamOptions adam;                 // beta1 0.9, beta2 0.999, eps 1e-8, no weight decay
//   adam.weight_decay = 1e-4;                  // L2 (torch.optim.Adam); set decoupled = true for AdamW
//   resunet::adam_update(adam, w, g, m, v, count, /*learning_rate=*/1e-4, /*step=*/1);  // step is 1-based
//   resunet::StepLR schedule{.initial_learning_rate = 1e-4, .step_size = 30, .gamma = 0.1};
//   double lr = schedule.learning_rate(/*epoch=*/45);   // 1e-5
#pragma once

#include <cstdint>

namespace resunet {

struct AdamOptions {
    double beta1 = 0.9;          // decay of the first moment
    double beta2 = 0.999;        // decay of the second moment
    double epsilon = 1e-8;       // added to sqrt(v_hat), as torch does
    double weight_decay = 0.0;   // 0 disables it
    // false: L2 as torch.optim.Adam (g += weight_decay * w before the moments);
    // true: decoupled as torch.optim.AdamW (w -= lr * weight_decay * w before the Adam step).
    bool decoupled = false;
};

// One Adam update of `count` parameters in place. `step` is the 1-based update count (bias correction):
//   g' = g (+ wd w if L2);  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
void adam_update(const AdamOptions& options, float* weights, const float* gradients, float* first_moment,
                 float* second_moment, int64_t count, double learning_rate, int64_t step);

// torch.optim.lr_scheduler.StepLR: lr = initial * gamma ^ floor(epoch / step_size).
struct StepLR {
    double initial_learning_rate = 1e-4;  // lr of epoch 0
    int step_size = 30;                   // epochs between decays
    double gamma = 0.1;                   // factor per decay
    double learning_rate(int64_t epoch) const;
};

}  // namespace resunet
