// Quantization arithmetic shared by the int8 engine, its tests and its weight files. No oneDNN here.
//
// Intended usage:
//   resunet::WeightQuant wq = resunet::quantize_weights(folded.weights, out_channels, resunet::weight_levels());
//   resunet::ActivationQuant aq = resunet::choose_activation_quant(min, max);   // u8, asymmetric
//   uint8_t q = resunet::quantize_value(x, aq);                                 // clip(round(x / s + z))
#pragma once

#include <cstdint>
#include <vector>

namespace resunet {

// Symmetric per-output-channel s8 weights: w ~= q * scale[oc], |q| <= levels.
struct WeightQuant {
    std::vector<int8_t> q;      // same layout as the fp32 weights (OIHW)
    std::vector<float> scales;  // one per output channel, > 0
    std::vector<int32_t> sums;  // sum of q over each output channel (for the zero-point term)
};

// Largest |q| for weights. 127 where the CPU has VNNI; 63 on AVX2/AVX-512 without VNNI, whose
// u8 x s8 multiply (vpmaddubsw) adds two products in int16 and would saturate with full-range weights
// (255 * 127 * 2 > 32767); 63 keeps every pair exact.
int weight_levels();

WeightQuant quantize_weights(const std::vector<float>& weights, int64_t out_channels, int levels);

// u8 activation quantization q = clip(round(x / scale + zero_point), 0, 255).
struct ActivationQuant {
    float scale = 1.0f;      // > 0
    int32_t zero_point = 0;  // 0..255; 0 for non-negative tensors
};

// From a tensor's range: the range is widened to include 0 (so 0 is exact: zero padding, ReLU).
// A constant or all-zero tensor (max == min) gets scale 1, which quantizes it exactly or to its
// nearest integer; NaN or infinite bounds are refused by the caller before this is reached.
ActivationQuant choose_activation_quant(float min_value, float max_value);

inline uint8_t quantize_value(float x, const ActivationQuant& q) {
    float v = __builtin_nearbyintf(x / q.scale) + static_cast<float>(q.zero_point);
    v = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
    return static_cast<uint8_t>(v);
}

inline float dequantize_value(uint8_t q, const ActivationQuant& a) {
    return (static_cast<float>(q) - static_cast<float>(a.zero_point)) * a.scale;
}

}  // namespace resunet
