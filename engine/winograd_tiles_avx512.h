// The AVX-512 twins of the forward tile kernels of engine/winograd_tiles.h: the same operations in the same
// order on 16 channels per vector, so each lane's result is bit for bit the AVX2 kernel's (an fp32 plan's
// numbers do not depend on which of the two runs). Called only where the CPU has AVX-512 F and oneDNN
// dispatches an AVX-512 ISA (WinogradOwn). Internal to engine/.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "engine/winograd_tiles.h"

namespace resunet::winograd_tiles {

// One-dimensional B^T: d[0..alpha) -> r[0..alpha).
template <int Tile>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void input_1d16(const __m512* d, __m512* r) {
    if constexpr (Tile == 4) {
        const __m512 two = _mm512_set1_ps(2.0f), four = _mm512_set1_ps(4.0f), five = _mm512_set1_ps(5.0f);
        r[0] = _mm512_fmadd_ps(four, d[0], _mm512_fnmadd_ps(five, d[2], d[4]));
        r[1] = _mm512_fnmadd_ps(four, _mm512_add_ps(d[1], d[2]), _mm512_add_ps(d[3], d[4]));
        r[2] = _mm512_fmadd_ps(four, _mm512_sub_ps(d[1], d[2]), _mm512_sub_ps(d[4], d[3]));
        r[3] = _mm512_fmadd_ps(two, _mm512_sub_ps(d[3], d[1]), _mm512_sub_ps(d[4], d[2]));
        r[4] = _mm512_fmadd_ps(two, _mm512_sub_ps(d[1], d[3]), _mm512_sub_ps(d[4], d[2]));
        r[5] = _mm512_fmadd_ps(four, d[1], _mm512_fnmadd_ps(five, d[3], d[5]));
    } else {
        r[0] = _mm512_sub_ps(d[0], d[2]);
        r[1] = _mm512_add_ps(d[1], d[2]);
        r[2] = _mm512_sub_ps(d[2], d[1]);
        r[3] = _mm512_sub_ps(d[1], d[3]);
    }
}

// One-dimensional A^T: m[0..alpha) -> o[0..Tile).
template <int Tile>
__attribute__((target("avx512f,avx2,fma"), always_inline)) inline void output_1d16(const __m512* m, __m512* o) {
    if constexpr (Tile == 4) {
        const __m512 a = _mm512_add_ps(m[1], m[2]), b = _mm512_sub_ps(m[1], m[2]);
        const __m512 c = _mm512_add_ps(m[3], m[4]), e = _mm512_sub_ps(m[3], m[4]);
        o[0] = _mm512_add_ps(_mm512_add_ps(m[0], a), c);
        o[1] = _mm512_fmadd_ps(_mm512_set1_ps(2.0f), e, b);
        o[2] = _mm512_fmadd_ps(_mm512_set1_ps(4.0f), c, a);
        o[3] = _mm512_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(8.0f), e, b), m[5]);
    } else {
        o[0] = _mm512_add_ps(_mm512_add_ps(m[0], m[1]), m[2]);
        o[1] = _mm512_sub_ps(_mm512_sub_ps(m[1], m[2]), m[3]);
    }
}

// V = B^T d B of one tile and 16 channels. (y0, x0): the alpha x alpha window's top-left, padding included;
// pixels outside the image read as zero and are never loaded. Position p = i * alpha + j goes to
// v[p * p_stride].
template <int Tile>
__attribute__((target("avx512f,avx2,fma"))) inline void input_tile16(const float* base, Plane plane, int64_t y0, int64_t x0, int64_t height,
                                                    int64_t width, float* v, int64_t p_stride) {
    constexpr int alpha = Tile + 2;
    __m512 d[alpha][alpha];
    for (int i = 0; i < alpha; ++i) {
        const int64_t y = y0 + i;
        const bool row_inside = y >= 0 && y < height;
        for (int j = 0; j < alpha; ++j) {
            const int64_t x = x0 + j;
            d[i][j] = row_inside && x >= 0 && x < width ? _mm512_loadu_ps(base + y * plane.row + x * plane.pixel)
                                                        : _mm512_setzero_ps();
        }
    }
    __m512 t[alpha][alpha];
    for (int j = 0; j < alpha; ++j) {
        __m512 column[alpha], out[alpha];
        for (int k = 0; k < alpha; ++k) column[k] = d[k][j];
        input_1d16<Tile>(column, out);
        for (int k = 0; k < alpha; ++k) t[k][j] = out[k];
    }
    for (int i = 0; i < alpha; ++i) {
        __m512 out[alpha];
        input_1d16<Tile>(t[i], out);
        for (int k = 0; k < alpha; ++k) _mm512_storeu_ps(v + (i * alpha + k) * p_stride, out[k]);
    }
}

// Y = A^T M A of one tile and 16 output channels, plus bias, plus dst (sum), ReLU; only the pixels inside
// the image are read and written. (y0, x0): the output tile's top-left.
template <int Tile>
__attribute__((target("avx512f,avx2,fma"))) inline void output_tile16(const float* m, int64_t p_stride, const float* bias, float* base,
                                                     Plane plane, int64_t y0, int64_t x0, int64_t height, int64_t width,
                                                     bool sum, bool relu) {
    constexpr int alpha = Tile + 2;
    __m512 s[Tile][alpha];
    for (int j = 0; j < alpha; ++j) {
        __m512 column[alpha], out[Tile];
        for (int k = 0; k < alpha; ++k) column[k] = _mm512_loadu_ps(m + (k * alpha + j) * p_stride);
        output_1d16<Tile>(column, out);
        for (int k = 0; k < Tile; ++k) s[k][j] = out[k];
    }
    const __m512 b = _mm512_loadu_ps(bias);
    const __m512 zero = _mm512_setzero_ps();
    const int rows = static_cast<int>(std::min<int64_t>(Tile, height - y0));
    const int columns = static_cast<int>(std::min<int64_t>(Tile, width - x0));
    for (int i = 0; i < rows; ++i) {
        __m512 out[Tile];
        output_1d16<Tile>(s[i], out);
        float* row = base + (y0 + i) * plane.row + x0 * plane.pixel;
        for (int j = 0; j < columns; ++j) {
            __m512 y = _mm512_add_ps(out[j], b);
            if (sum) y = _mm512_add_ps(y, _mm512_loadu_ps(row + j * plane.pixel));
            if (relu) y = _mm512_max_ps(y, zero);
            _mm512_storeu_ps(row + j * plane.pixel, y);
        }
    }
}

}  // namespace resunet::winograd_tiles
