// The AVX2 tile kernels of our own int8 Winograd F(2x2,3x3) (quant/winograd_int8.h): the input tile transform,
// the row quantization, a lane minimum (16 input channels per vector) and the output transform of 8 output
// channels. Shared by the AVX2 transforms
// (quant/winograd_int8.cpp) and the AVX-512 ones (quant/winograd_int8_avx512.cpp), which run their last 16
// input channels through them. Internal to quant/.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "quant/winograd_int8.h"

namespace resunet::winograd_int8_tiles {

// Row R (0..3) of V = B^T (d - z) B of one 4x4 tile, 16 channels as int16 lanes: positions 4R..4R+3. Row R
// of B^T d takes two rows of d (a - b, or a + b for R = 1, where the zero points do not cancel).
template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void row_v(const uint8_t* base, int64_t row_stride,
                                                                     int64_t pixel_stride, __m256i zero, __m256i* v) {
    constexpr int a = R == 2 ? 2 : (R == 0 ? 0 : 1), b = R == 0 || R == 1 ? 2 : (R == 2 ? 1 : 3);
    __m256i t[4];
    for (int c = 0; c < 4; ++c) {
        const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + a * row_stride + c * pixel_stride)));
        const __m256i y = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + b * row_stride + c * pixel_stride)));
        t[c] = R == 1 ? _mm256_sub_epi16(_mm256_add_epi16(x, y), _mm256_add_epi16(zero, zero)) : _mm256_sub_epi16(x, y);
    }
    v[0] = _mm256_sub_epi16(t[0], t[2]);
    v[1] = _mm256_add_epi16(t[1], t[2]);
    v[2] = _mm256_sub_epi16(t[2], t[1]);
    v[3] = _mm256_sub_epi16(t[1], t[3]);
}

// 16 int16 values of a row, scaled (unless lossless) and shifted by the zero point, in int16.
__attribute__((target("avx2,fma"), always_inline)) inline __m256i scaled_16(const int16_t* v, bool lossless, __m256i multiplier,
                                                                         __m256i zero) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
    return _mm256_add_epi16(lossless ? x : _mm256_mulhrs_epi16(x, multiplier), zero);
}

// A row of int16 V -> u8 = clamp(((v * multiplier + 2^14) >> 15) + zero, 0, 255) (pmulhrsw: multiplier is a
// Q15 fraction), or clamp(v + zero) when `lossless`; `channels` a multiple of 16.
__attribute__((target("avx2,fma"), always_inline)) inline void quantize_row(const int16_t* v, int64_t channels, bool lossless,
                                                                            int16_t multiplier, int16_t zero, uint8_t* out) {
    const __m256i m = _mm256_set1_epi16(multiplier), z = _mm256_set1_epi16(zero);
    int64_t k = 0;
    for (; k + 32 <= channels; k += 32) {  // packus interleaves 128-bit lanes; the permute restores the order
        const __m256i u8 = _mm256_permute4x64_epi64(
            _mm256_packus_epi16(scaled_16(v + k, lossless, m, z), scaled_16(v + k + 16, lossless, m, z)), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), u8);
    }
    if (k < channels) {
        const __m256i x = scaled_16(v + k, lossless, m, z);
        const __m256i u8 = _mm256_permute4x64_epi64(_mm256_packus_epi16(x, x), 0xD8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm256_castsi256_si128(u8));
    }
}

// The smallest of 8 int16 lanes, through phminposuw's unsigned minimum after a bias of 0x8000.
__attribute__((target("avx2,fma"), always_inline)) inline int32_t lane_min(__m128i x) {
    const __m128i bias = _mm_set1_epi16(static_cast<int16_t>(0x8000));
    return static_cast<int16_t>((_mm_cvtsi128_si32(_mm_minpos_epu16(_mm_xor_si128(x, bias))) & 0xFFFF) ^ 0x8000);
}

// Q15 multipliers of row_quant for the ranges 256..2040 (the widest: |lo|, |hi| <= 1020) and their exact
// inverses, computed at compile time: a lookup instead of two divisions per row.
struct RowQuantTable {
    static constexpr int kLargest = 2040;
    int16_t multiplier[kLargest + 1] = {};
    float scale[kLargest + 1] = {};
    constexpr RowQuantTable() {
        for (int range = 256; range <= kLargest; ++range) {
            multiplier[range] = static_cast<int16_t>(255 * 32768 / range);
            scale[range] = 32768.0f / static_cast<float>(multiplier[range]);
        }
    }
};
inline constexpr RowQuantTable kRowQuantTable{};

// A row's quantization from its int16 range [lo, hi]: scale 1 and zero point -lo (returns 0: lossless) when
// the range fits in 256 values, else a Q15 multiplier rounded down so that (hi - lo) maps to at most 255,
// its exact inverse as the scale, and the zero point round(-lo * multiplier / 2^15), halves away from zero.
// |lo|, |hi| <= 1020 and hi - lo > 255, so 4096 <= multiplier < 32640.
inline int16_t row_quant(int32_t lo, int32_t hi, float* scale, int32_t* zero) {
    const int32_t range = hi - lo;
    if (range <= 255) {
        *scale = 1.0f;
        *zero = -lo;
        return 0;
    }
    const int16_t multiplier = kRowQuantTable.multiplier[range];
    *scale = kRowQuantTable.scale[range];
    const int32_t scaled = -lo * multiplier;  // |scaled| < 2^25
    *zero = scaled >= 0 ? (scaled + 16384) >> 15 : -((16384 - scaled) >> 15);
    return multiplier;
}

// A row's quantization from the 16 int16 lanes of its running minima `mn` and maxima `mx` (row_quant) into
// `q`; returns the multiplier (0: lossless) and the integer zero point in `zero`.
__attribute__((target("avx2,fma"), always_inline)) inline int16_t finish_row(__m256i mn, __m256i mx, WinogradRowQuant* q,
                                                                            int32_t* zero) {
    const __m128i lo8 = _mm_min_epi16(_mm256_castsi256_si128(mn), _mm256_extracti128_si256(mn, 1));
    const __m128i hi8 = _mm_max_epi16(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
    const int32_t lo = lane_min(lo8);
    const int32_t hi = -lane_min(_mm_sub_epi16(_mm_setzero_si128(), hi8));  // |V| <= 1020: no overflow
    const int16_t multiplier = row_quant(lo, hi, &q->scale, zero);
    q->zero = static_cast<float>(*zero);
    return multiplier;
}

// Eight output channels of one tile: M = s_t * (acc - z_t * sum U_q) * s_x * s_u per position p (`m` at the
// tile's position-0 row, `p_stride` between positions; `u_sum`, `mul` at [0][o] of their [P][OC] tables; `row`
// the tile's position-0 quantization, `row_stride` between positions), then Y = A^T M A + bias, plus the dst
// when `sum`, ReLU when `relu`, into the tile's 2x2 pixels at `out`. Column by column of M: four live
// outputs, no spills.
__attribute__((target("avx2,fma"), always_inline)) inline void output_chunk8(const int32_t* m, int64_t p_stride,
                                                                             const float* u_sum, const float* mul,
                                                                             const float* bias, int64_t oc,
                                                                             const WinogradRowQuant* row, int64_t row_stride,
                                                                             float* out, int64_t width, bool sum, bool relu) {
    const __m256 b = _mm256_loadu_ps(bias);
    __m256 y00 = b, y01 = b, y10 = b, y11 = b;
    for (int c = 0; c < 4; ++c) {
        __m256 f[4];
        for (int r = 0; r < 4; ++r) {
            const int p = r * 4 + c;
            const WinogradRowQuant& q = row[p * row_stride];
            const __m256 acc = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + p * p_stride)));
            const __m256 centred = _mm256_fnmadd_ps(_mm256_set1_ps(q.zero), _mm256_loadu_ps(u_sum + p * oc), acc);
            f[r] = _mm256_mul_ps(centred, _mm256_mul_ps(_mm256_set1_ps(q.scale), _mm256_loadu_ps(mul + p * oc)));
        }
        const __m256 r0 = _mm256_add_ps(_mm256_add_ps(f[0], f[1]), f[2]);
        const __m256 r1 = _mm256_sub_ps(_mm256_sub_ps(f[1], f[2]), f[3]);
        if (c < 3) {
            y00 = _mm256_add_ps(y00, r0);
            y10 = _mm256_add_ps(y10, r1);
        }
        if (c == 1) {
            y01 = _mm256_add_ps(y01, r0);
            y11 = _mm256_add_ps(y11, r1);
        } else if (c > 1) {
            y01 = _mm256_sub_ps(y01, r0);
            y11 = _mm256_sub_ps(y11, r1);
        }
    }
    const __m256 y[2][2] = {{y00, y01}, {y10, y11}};
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) {
            float* at = out + (i * width + j) * oc;
            __m256 value = y[i][j];
            if (sum) value = _mm256_add_ps(value, _mm256_loadu_ps(at));
            if (relu) value = _mm256_max_ps(value, _mm256_setzero_ps());
            _mm256_storeu_ps(at, value);
        }
}

}  // namespace resunet::winograd_int8_tiles
