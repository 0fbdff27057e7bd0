// IEEE half (F16) and bfloat16 (BF16) conversions to and from float, bit-exact and portable (no F16C or
// AVX-512 BF16 needed): the 2-byte storage types of weight files (PyTorch exports use both).
//
// Intended usage:
//   uint16_t h = resunet::f32_to_f16_bits(0.1f);      // round to nearest even; nullopt-free: see below
//   float back = resunet::f16_bits_to_f32(h);         // exact (every F16 value is a float)
//   uint16_t b = resunet::f32_to_bf16_bits(0.1f);     // round to nearest even
//   float back16 = resunet::bf16_bits_to_f32(b);      // exact
//
// Rounding: to nearest, ties to even, as numpy's astype(float16) and torch's .to(bfloat16). A float beyond
// the F16 range (|x| >= 65520 rounds past 65504) becomes +-Inf; f16_fits() tells beforehand. NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace resunet {

inline uint32_t float_bits(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
}

inline float bits_float(uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    return value;
}

inline float bf16_bits_to_f32(uint16_t bits) { return bits_float(uint32_t{bits} << 16); }

inline uint16_t f32_to_bf16_bits(float value) {
    const uint32_t bits = float_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
    const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t{h & 0x8000u} << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // Inf, NaN
    if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
    if (mantissa == 0) return bits_float(sign);  // +-0
    // Subnormal: mantissa x 2^-24, exactly representable as a normal float.
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        ++shift;
    }
    return bits_float(sign | (static_cast<uint32_t>(113 - shift) << 23) | ((mantissa & 0x3ffu) << 13));
}

inline uint16_t f32_to_f16_bits(float value) {
    const uint32_t bits = float_bits(value);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
    if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: Inf
    if (magnitude >= 0x38800000u) {  // normal F16 (>= 2^-14)
        const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
        return static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13));
    }
    if (magnitude < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25): +-0
    // Subnormal F16: value x 2^24 rounded to an integer (ties to even).
    const uint32_t exponent = magnitude >> 23;
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // 14..24
    const uint32_t half_ulp = 1u << (shift - 1);
    uint32_t result = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    if (rest > half_ulp || (rest == half_ulp && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
}

// True when `value` is finite and stays finite in F16 (|value| rounds to at most 65504).
inline bool f16_fits(float value) { return (float_bits(value) & 0x7fffffffu) < 0x477ff000u; }

}  // namespace resunet
