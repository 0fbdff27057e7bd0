// The tile kernels of our own fp32 Winograd F(4x4,3x3) / F(2x2,3x3), shared by the convolution
// (engine/winograd_own.cpp: input and output transforms) and its weights gradient
// (engine/winograd_own_bwd_weights.cpp: input and output-gradient transforms). AVX2+FMA, 8 channels per
// vector. Internal to engine/.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace resunet::winograd_tiles {

// G of F(m x m, 3x3) (Lavin and Gray 2016), alpha x 3; B^T and A^T are written out in the kernels below.
inline constexpr double kG43[6][3] = {{1.0 / 4, 0, 0},
                               {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                               {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                               {1.0 / 24, 1.0 / 12, 1.0 / 6},
                               {1.0 / 24, -1.0 / 12, 1.0 / 6},
                               {0, 0, 1}};
inline constexpr double kG23[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};

// Tiles per group evened out: groups of at most `group` tiles (at least 1, at most `tiles`), all equal
// but the last; with `per_thread`, as many groups as a multiple of `threads`. Returns the group size and
// puts the last group's in `rest`.
inline int64_t even_groups(int64_t tiles, int64_t group, int threads, bool per_thread, int64_t* rest) {
    group = std::clamp<int64_t>(group, 1, tiles);
    int64_t groups = (tiles + group - 1) / group;
    if (per_thread) groups = (groups + threads - 1) / threads * threads;
    group = (tiles + groups - 1) / groups;
    groups = (tiles + group - 1) / group;
    *rest = tiles - (groups - 1) * group;
    return group;
}

// One-dimensional B^T: d[0..alpha) -> r[0..alpha).
template <int Tile>
__attribute__((target("avx2,fma"), always_inline)) inline void input_1d(const __m256* d, __m256* r) {
    if constexpr (Tile == 4) {
        const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f), five = _mm256_set1_ps(5.0f);
        r[0] = _mm256_fmadd_ps(four, d[0], _mm256_fnmadd_ps(five, d[2], d[4]));
        r[1] = _mm256_fnmadd_ps(four, _mm256_add_ps(d[1], d[2]), _mm256_add_ps(d[3], d[4]));
        r[2] = _mm256_fmadd_ps(four, _mm256_sub_ps(d[1], d[2]), _mm256_sub_ps(d[4], d[3]));
        r[3] = _mm256_fmadd_ps(two, _mm256_sub_ps(d[3], d[1]), _mm256_sub_ps(d[4], d[2]));
        r[4] = _mm256_fmadd_ps(two, _mm256_sub_ps(d[1], d[3]), _mm256_sub_ps(d[4], d[2]));
        r[5] = _mm256_fmadd_ps(four, d[1], _mm256_fnmadd_ps(five, d[3], d[5]));
    } else {
        r[0] = _mm256_sub_ps(d[0], d[2]);
        r[1] = _mm256_add_ps(d[1], d[2]);
        r[2] = _mm256_sub_ps(d[2], d[1]);
        r[3] = _mm256_sub_ps(d[1], d[3]);
    }
}

// One-dimensional A^T: m[0..alpha) -> o[0..Tile).
template <int Tile>
__attribute__((target("avx2,fma"), always_inline)) inline void output_1d(const __m256* m, __m256* o) {
    if constexpr (Tile == 4) {
        const __m256 a = _mm256_add_ps(m[1], m[2]), b = _mm256_sub_ps(m[1], m[2]);
        const __m256 c = _mm256_add_ps(m[3], m[4]), e = _mm256_sub_ps(m[3], m[4]);
        o[0] = _mm256_add_ps(_mm256_add_ps(m[0], a), c);
        o[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.0f), e, b);
        o[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), c, a);
        o[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.0f), e, b), m[5]);
    } else {
        o[0] = _mm256_add_ps(_mm256_add_ps(m[0], m[1]), m[2]);
        o[1] = _mm256_sub_ps(_mm256_sub_ps(m[1], m[2]), m[3]);
    }
}

// One-dimensional A (the transpose of A^T): y[0..Tile) -> z[0..alpha).
template <int Tile>
__attribute__((target("avx2,fma"), always_inline)) inline void grad_1d(const __m256* y, __m256* z) {
    if constexpr (Tile == 4) {
        const __m256 a = _mm256_add_ps(y[0], y[2]), b = _mm256_add_ps(y[1], y[3]);
        const __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), y[2], y[0]);
        const __m256 e = _mm256_fmadd_ps(_mm256_set1_ps(8.0f), y[3], _mm256_add_ps(y[1], y[1]));
        z[0] = y[0];
        z[1] = _mm256_add_ps(a, b);
        z[2] = _mm256_sub_ps(a, b);
        z[3] = _mm256_add_ps(c, e);
        z[4] = _mm256_sub_ps(c, e);
        z[5] = y[3];
    } else {
        z[0] = y[0];
        z[1] = _mm256_add_ps(y[0], y[1]);
        z[2] = _mm256_sub_ps(y[0], y[1]);
        z[3] = _mm256_sub_ps(_mm256_setzero_ps(), y[1]);
    }
}

// Where an 8-channel group's pixels are: element (y, x, lane) at base + y * row + x * pixel + lane.
struct Plane {
    int64_t row;
    int64_t pixel;
};

// V = B^T d B of one tile and 8 channels. (y0, x0): the alpha x alpha window's top-left, padding included;
// pixels outside the image read as zero and are never loaded. Position p = i * alpha + j goes to
// v[p * p_stride].
template <int Tile>
__attribute__((target("avx2,fma"))) inline void input_tile(const float* base, Plane plane, int64_t y0, int64_t x0, int64_t height,
                                                    int64_t width, float* v, int64_t p_stride) {
    constexpr int alpha = Tile + 2;
    __m256 d[alpha][alpha];
    for (int i = 0; i < alpha; ++i) {
        const int64_t y = y0 + i;
        const bool row_inside = y >= 0 && y < height;
        for (int j = 0; j < alpha; ++j) {
            const int64_t x = x0 + j;
            d[i][j] = row_inside && x >= 0 && x < width ? _mm256_loadu_ps(base + y * plane.row + x * plane.pixel)
                                                        : _mm256_setzero_ps();
        }
    }
    __m256 t[alpha][alpha];
    for (int j = 0; j < alpha; ++j) {
        __m256 column[alpha], out[alpha];
        for (int k = 0; k < alpha; ++k) column[k] = d[k][j];
        input_1d<Tile>(column, out);
        for (int k = 0; k < alpha; ++k) t[k][j] = out[k];
    }
    for (int i = 0; i < alpha; ++i) {
        __m256 out[alpha];
        input_1d<Tile>(t[i], out);
        for (int k = 0; k < alpha; ++k) _mm256_storeu_ps(v + (i * alpha + k) * p_stride, out[k]);
    }
}

// Y = A^T M A of one tile and 8 output channels, plus bias, plus dst (sum), ReLU; only the pixels inside
// the image are read and written. (y0, x0): the output tile's top-left.
template <int Tile>
__attribute__((target("avx2,fma"))) inline void output_tile(const float* m, int64_t p_stride, const float* bias, float* base,
                                                     Plane plane, int64_t y0, int64_t x0, int64_t height, int64_t width,
                                                     bool sum, bool relu) {
    constexpr int alpha = Tile + 2;
    __m256 s[Tile][alpha];
    for (int j = 0; j < alpha; ++j) {
        __m256 column[alpha], out[Tile];
        for (int k = 0; k < alpha; ++k) column[k] = _mm256_loadu_ps(m + (k * alpha + j) * p_stride);
        output_1d<Tile>(column, out);
        for (int k = 0; k < Tile; ++k) s[k][j] = out[k];
    }
    const __m256 b = _mm256_loadu_ps(bias);
    const __m256 zero = _mm256_setzero_ps();
    const int rows = static_cast<int>(std::min<int64_t>(Tile, height - y0));
    const int columns = static_cast<int>(std::min<int64_t>(Tile, width - x0));
    for (int i = 0; i < rows; ++i) {
        __m256 out[Tile];
        output_1d<Tile>(s[i], out);
        float* row = base + (y0 + i) * plane.row + x0 * plane.pixel;
        for (int j = 0; j < columns; ++j) {
            __m256 y = _mm256_add_ps(out[j], b);
            if (sum) y = _mm256_add_ps(y, _mm256_loadu_ps(row + j * plane.pixel));
            if (relu) y = _mm256_max_ps(y, zero);
            _mm256_storeu_ps(row + j * plane.pixel, y);
        }
    }
}

// Z = A dY A^T of one Tile x Tile tile of the output gradient and 8 channels (the transpose of the
// output transform, for the weights gradient); pixels outside the image read as zero and are never
// loaded. (y0, x0): the tile's top-left. Position p = i * alpha + j goes to z[p * p_stride]. Adds the
// tile's values to `sum` (the bias gradient).
template <int Tile>
__attribute__((target("avx2,fma"))) inline void grad_tile(const float* base, Plane plane, int64_t y0, int64_t x0,
                                                          int64_t height, int64_t width, float* z, int64_t p_stride,
                                                          __m256& sum) {
    constexpr int alpha = Tile + 2;
    __m256 d[Tile][Tile];
    const int rows = static_cast<int>(std::min<int64_t>(Tile, height - y0));
    const int columns = static_cast<int>(std::min<int64_t>(Tile, width - x0));
    for (int i = 0; i < Tile; ++i)
        for (int j = 0; j < Tile; ++j) {
            d[i][j] = i < rows && j < columns ? _mm256_loadu_ps(base + (y0 + i) * plane.row + (x0 + j) * plane.pixel)
                                              : _mm256_setzero_ps();
            sum = _mm256_add_ps(sum, d[i][j]);
        }
    __m256 t[alpha][Tile];
    for (int j = 0; j < Tile; ++j) {
        __m256 column[Tile], out[alpha];
        for (int k = 0; k < Tile; ++k) column[k] = d[k][j];
        grad_1d<Tile>(column, out);
        for (int k = 0; k < alpha; ++k) t[k][j] = out[k];
    }
    for (int i = 0; i < alpha; ++i) {
        __m256 out[alpha];
        grad_1d<Tile>(t[i], out);
        for (int k = 0; k < alpha; ++k) _mm256_storeu_ps(z + (i * alpha + k) * p_stride, out[k]);
    }
}

}  // namespace resunet::winograd_tiles
