#include "quant/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "engine/onednn_compat.h"

namespace resunet {

int weight_levels() { return onednn::effective_isa_has_vnni() ? 127 : 63; }

WeightQuant quantize_weights(const std::vector<float>& weights, int64_t out_channels, int levels) {
    WeightQuant wq;
    const int64_t per_oc = static_cast<int64_t>(weights.size()) / out_channels;
    wq.q.resize(weights.size());
    wq.scales.resize(static_cast<size_t>(out_channels));
    wq.sums.resize(static_cast<size_t>(out_channels));
    for (int64_t oc = 0; oc < out_channels; ++oc) {
        const float* w = weights.data() + oc * per_oc;
        float max_abs = 0.0f;
        for (int64_t i = 0; i < per_oc; ++i) max_abs = std::max(max_abs, std::fabs(w[i]));
        // An all-zero channel keeps scale 1 so that dequantization never divides by zero.
        const float scale = max_abs > 0.0f ? max_abs / static_cast<float>(levels) : 1.0f;
        wq.scales[static_cast<size_t>(oc)] = scale;
        int32_t sum = 0;
        for (int64_t i = 0; i < per_oc; ++i) {
            const float v = std::clamp(std::nearbyint(w[i] / scale), -static_cast<float>(levels), static_cast<float>(levels));
            wq.q[static_cast<size_t>(oc * per_oc + i)] = static_cast<int8_t>(v);
            sum += static_cast<int32_t>(v);
        }
        wq.sums[static_cast<size_t>(oc)] = sum;
    }
    return wq;
}

void narrow_weights(WeightQuant& wq, int levels) {
    const int64_t out_channels = static_cast<int64_t>(wq.scales.size());
    if (out_channels == 0) return;
    const int64_t per_oc = static_cast<int64_t>(wq.q.size()) / out_channels;
    wq.sums.assign(static_cast<size_t>(out_channels), 0);
    for (int64_t oc = 0; oc < out_channels; ++oc) {
        int8_t* q = wq.q.data() + oc * per_oc;
        int max_q = 0;
        for (int64_t i = 0; i < per_oc; ++i) max_q = std::max(max_q, std::abs(static_cast<int>(q[i])));
        int32_t sum = 0;
        if (max_q > levels) {
            for (int64_t i = 0; i < per_oc; ++i) {
                // round-half-away(q * levels / max_q) in integers: exact, the same on every CPU
                const int numerator = 2 * std::abs(static_cast<int>(q[i])) * levels + max_q;
                const int magnitude = numerator / (2 * max_q);
                q[i] = static_cast<int8_t>(q[i] < 0 ? -magnitude : magnitude);
            }
            wq.scales[static_cast<size_t>(oc)] *= static_cast<float>(max_q) / static_cast<float>(levels);
        }
        for (int64_t i = 0; i < per_oc; ++i) sum += q[i];
        wq.sums[static_cast<size_t>(oc)] = sum;
    }
}

ActivationQuant choose_activation_quant(float min_value, float max_value) {
    const float lo = std::min(min_value, 0.0f);
    const float hi = std::max(max_value, 0.0f);
    ActivationQuant q;
    if (!(hi > lo)) return q;  // all zero: scale 1, zero point 0
    q.scale = (hi - lo) / 255.0f;
    if (!std::isfinite(q.scale)) q.scale = std::max(std::fabs(lo), std::fabs(hi));  // hi - lo > FLT_MAX
    q.scale = std::max(q.scale, kMinActivationScale);                              // see kMinActivationScale
    q.zero_point = std::clamp(static_cast<int32_t>(std::nearbyint(-lo / q.scale)), 0, 255);
    return q;
}

}  // namespace resunet
