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

// Levels of the weights the int8 model files store (and the engine quantizes to first): full range on every
// CPU, so a file made on any CPU runs on every other; narrow_weights() fits them to a CPU with fewer levels.
inline constexpr int kStoredWeightLevels = 127;

// Fits full-range weights to `levels` (63 on CPUs without VNNI): each output channel whose largest |q| is
// above `levels` gets q' = round-half-away(q * levels / max_q) and scale' = scale * max_q / levels, so
// q' * scale' stays within half a new step of q * scale (the channel's largest weight maps to +-levels
// exactly); channels already within `levels` are kept as they are. Recomputes the sums.
void narrow_weights(WeightQuant& wq, int levels);

// u8 activation quantization q = clip(round(x / scale + zero_point), 0, 255).
struct ActivationQuant {
    float scale = 1.0f;      // > 0
    int32_t zero_point = 0;  // 0..255; 0 for non-negative tensors
};

// Smallest activation scale, 2^-80 (about 8.3e-25). The int8 engine dequantizes with
// mul = scale * weight_scale[oc] and feeds the bias as bias / mul. With scale >= 2^-80, mul is a
// normal float for every weight scale >= 2^-46 (a channel whose largest |w| is above ~1e-12) and
// bias / mul is finite for |bias| < 2^48 * weight_scale; trained weights sit far inside both bounds.
// Without a floor, an input of max ~1e-36 gives a subnormal scale, mul underflows and the bias becomes
// Inf. Only tensors whose whole range is below 255 * 2^-80 (~2e-22) are quantized more coarsely than
// their range allows (absolute error still at most 2^-81 per value).
inline constexpr float kMinActivationScale = 0x1p-80f;

// From a tensor's range: the range is widened to include 0 (so 0 is exact: zero padding, ReLU), and
// scale = max((max - min) / 255, kMinActivationScale). Only an all-zero tensor (both bounds 0) gets
// scale 1 and zero point 0; a constant c != 0 gets the range [min(c, 0), max(c, 0)], so c maps to 255
// (c > 0) or 0 (c < 0) and back to c up to float rounding (for |c| >= 255 * kMinActivationScale). A
// range wider than FLT_MAX gets scale max(|min|, |max|). NaN or infinite bounds are refused by the
// caller before this is reached.
ActivationQuant choose_activation_quant(float min_value, float max_value);

// NaN quantizes to 0 (comparisons with NaN are false) and +-Inf to 255 / 0, so the cast is always
// defined; the engine reports non-finite inputs itself.
inline uint8_t quantize_value(float x, const ActivationQuant& q) {
    float v = __builtin_nearbyintf(x / q.scale) + static_cast<float>(q.zero_point);
    v = v > 0.0f ? (v < 255.0f ? v : 255.0f) : 0.0f;
    return static_cast<uint8_t>(v);
}

inline float dequantize_value(uint8_t q, const ActivationQuant& a) {
    return (static_cast<float>(q) - static_cast<float>(a.zero_point)) * a.scale;
}

}  // namespace resunet
