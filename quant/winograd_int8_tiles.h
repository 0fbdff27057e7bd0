// The AVX2 tile kernels of our own int8 Winograd F(2x2,3x3) (quant/winograd_int8.h): the input tile transform,
// the row quantization, a lane minimum (16 input channels per vector) and the output transform of 8 output
// channels. Shared by the AVX2 transforms
// (quant/winograd_int8.cpp) and the AVX-512 ones (quant/winograd_int8_avx512.cpp), which run their last 16
// input channels through them. Internal to quant/.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace resunet::winograd_int8_tiles {

// V = B^T (d - z) B of one 4x4 tile, 16 channels as int16 lanes; `base` is the tile's top-left padded pixel.
// Exact: |V| <= 4 * 255.
__attribute__((target("avx2,fma"), always_inline)) inline void tile_v(const uint8_t* base, int64_t row_stride,
                                                                      int64_t pixel_stride, __m256i zero, __m256i* v) {
    __m256i d[4][4];
    for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c)
            d[r][c] = _mm256_sub_epi16(
                _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + r * row_stride + c * pixel_stride))),
                zero);
    __m256i t[4][4];
    for (int c = 0; c < 4; ++c) {
        t[0][c] = _mm256_sub_epi16(d[0][c], d[2][c]);
        t[1][c] = _mm256_add_epi16(d[1][c], d[2][c]);
        t[2][c] = _mm256_sub_epi16(d[2][c], d[1][c]);
        t[3][c] = _mm256_sub_epi16(d[1][c], d[3][c]);
    }
    for (int r = 0; r < 4; ++r) {
        v[r * 4 + 0] = _mm256_sub_epi16(t[r][0], t[r][2]);
        v[r * 4 + 1] = _mm256_add_epi16(t[r][1], t[r][2]);
        v[r * 4 + 2] = _mm256_sub_epi16(t[r][2], t[r][1]);
        v[r * 4 + 3] = _mm256_sub_epi16(t[r][1], t[r][3]);
    }
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

// A row's quantization from its int16 range [lo, hi]: scale 1 and zero point -lo (returns 0: lossless) when
// the range fits in 256 values, else a Q15 multiplier rounded down so that (hi - lo) maps to at most 255,
// its exact inverse as the scale, and the zero point. |lo|, |hi| <= 1020 and hi - lo > 255, so
// 4096 <= multiplier < 32640.
inline int16_t row_quant(int32_t lo, int32_t hi, float* scale, int32_t* zero) {
    if (hi - lo <= 255) {
        *scale = 1.0f;
        *zero = -lo;
        return 0;
    }
    const auto multiplier = static_cast<int16_t>(255 * 32768 / (hi - lo));
    *scale = 32768.0f / multiplier;
    *zero = static_cast<int32_t>(std::lround(-lo * static_cast<double>(multiplier) / 32768.0));
    return multiplier;
}

// Eight output channels of one tile: M = s_t * (acc - z_t * sum U_q) * s_x * s_u per position p (`m` at the
// tile's position-0 row, `p_stride` between positions; `u_sum`, `mul` at [0][o] of their [P][OC] tables),
// then Y = A^T M A + bias, plus the dst when `sum`, ReLU when `relu`, into the tile's 2x2 pixels at `out`.
__attribute__((target("avx2,fma"), always_inline)) inline void output_chunk8(const int32_t* m, int64_t p_stride,
                                                                             const float* u_sum, const float* mul,
                                                                             const float* bias, int64_t oc,
                                                                             const __m256* row_zero, const __m256* row_scale,
                                                                             float* out, int64_t width, bool sum, bool relu) {
    __m256 f[4][4];
    for (int p = 0; p < 16; ++p) {
        const __m256 acc = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + p * p_stride)));
        const __m256 centred = _mm256_fnmadd_ps(row_zero[p], _mm256_loadu_ps(u_sum + p * oc), acc);
        f[p / 4][p % 4] = _mm256_mul_ps(centred, _mm256_mul_ps(row_scale[p], _mm256_loadu_ps(mul + p * oc)));
    }
    __m256 r[2][4];
    for (int c = 0; c < 4; ++c) {
        r[0][c] = _mm256_add_ps(_mm256_add_ps(f[0][c], f[1][c]), f[2][c]);
        r[1][c] = _mm256_sub_ps(_mm256_sub_ps(f[1][c], f[2][c]), f[3][c]);
    }
    const __m256 b = _mm256_loadu_ps(bias);
    for (int i = 0; i < 2; ++i) {
        __m256 y[2];
        y[0] = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(r[i][0], r[i][1]), r[i][2]), b);
        y[1] = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(r[i][1], r[i][2]), r[i][3]), b);
        for (int j = 0; j < 2; ++j) {
            float* at = out + (i * width + j) * oc;
            if (sum) y[j] = _mm256_add_ps(y[j], _mm256_loadu_ps(at));
            if (relu) y[j] = _mm256_max_ps(y[j], _mm256_setzero_ps());
            _mm256_storeu_ps(at, y[j]);
        }
    }
}

}  // namespace resunet::winograd_int8_tiles
