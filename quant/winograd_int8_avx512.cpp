// The AVX-512 input and output transforms of our own int8 Winograd F(2x2,3x3) (quant/winograd_int8.h): the
// same arithmetic as the AVX2 ones in quant/winograd_int8.cpp, 32 input channels (int16 lanes) and 16 output
// channels (float lanes) per vector; a last 16 input or 8 output channels go through the AVX2 tile kernels
// (quant/winograd_int8_tiles.h). Compiled with target attributes, called only where the CPU has AVX-512 BW.
#include <immintrin.h>

#include <cstdint>

#include "quant/winograd_int8.h"
#include "quant/winograd_int8_tiles.h"

#define RESUNET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

namespace resunet {

using namespace winograd_int8_tiles;

namespace {

constexpr int P = WinogradInt8::kPositions;

// V = B^T (d - z) B of one 4x4 tile, 32 channels as int16 lanes (exact: |V| <= 4 * 255).
RESUNET_AVX512 inline __attribute__((always_inline)) void tile_v32(const uint8_t* base, int64_t row_stride,
                                                                   int64_t pixel_stride, __m512i zero, __m512i* v) {
    __m512i d[4][4];
    for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c)
            d[r][c] = _mm512_sub_epi16(
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + r * row_stride + c * pixel_stride))),
                zero);
    __m512i t[4][4];
    for (int c = 0; c < 4; ++c) {
        t[0][c] = _mm512_sub_epi16(d[0][c], d[2][c]);
        t[1][c] = _mm512_add_epi16(d[1][c], d[2][c]);
        t[2][c] = _mm512_sub_epi16(d[2][c], d[1][c]);
        t[3][c] = _mm512_sub_epi16(d[1][c], d[3][c]);
    }
    for (int r = 0; r < 4; ++r) {
        v[r * 4 + 0] = _mm512_sub_epi16(t[r][0], t[r][2]);
        v[r * 4 + 1] = _mm512_add_epi16(t[r][1], t[r][2]);
        v[r * 4 + 2] = _mm512_sub_epi16(t[r][2], t[r][1]);
        v[r * 4 + 3] = _mm512_sub_epi16(t[r][1], t[r][3]);
    }
}

// quantize_row (quant/winograd_int8_tiles.h) 32 values at a time: clamp(mulhrs(v) + zero, 0, 255) as u8.
RESUNET_AVX512 inline void quantize_row32(const int16_t* v, int64_t channels, bool lossless, int16_t multiplier,
                                          int16_t zero, uint8_t* out) {
    const __m512i m = _mm512_set1_epi16(multiplier), z = _mm512_set1_epi16(zero), floor = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 32 <= channels; k += 32) {
        __m512i x = _mm512_loadu_si512(v + k);
        if (!lossless) x = _mm512_mulhrs_epi16(x, m);
        x = _mm512_max_epi16(_mm512_add_epi16(x, z), floor);  // then vpmovuswb saturates at 255
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtusepi16_epi8(x));
    }
    if (k < channels) quantize_row(v + k, channels - k, lossless, multiplier, zero, out + k);
}

}  // namespace

RESUNET_AVX512 void WinogradInt8::input_transform_avx512(const uint8_t* src, int32_t zero, uint8_t* v, RowQuant* row,
                                                         int16_t* exact, int64_t first_tile, int64_t count, int64_t stride) const {
    const int64_t ic = shape_.in_channels;
    const int64_t wide = ic / 32 * 32;  // the rest (0 or 16) through the AVX2 tile
    const int64_t row_stride = (shape_.width + 2) * ic;
    const int64_t image_stride = (shape_.height + 2) * row_stride;
    const int64_t per_image = tiles_y_ * tiles_x_;
    const int64_t p_stride = stride * ic;
    const __m512i z = _mm512_set1_epi16(static_cast<int16_t>(zero));
    const __m256i z16 = _mm256_set1_epi16(static_cast<int16_t>(zero));
    for (int64_t t = 0; t < count; ++t) {
        const int64_t index = first_tile + t;
        const int64_t n = index / per_image, ty = (index % per_image) / tiles_x_, tx = index % tiles_x_;
        const uint8_t* base = src + n * image_stride + 2 * ty * row_stride + 2 * tx * ic;
        __m256i mn[P], mx[P];  // each position's running min and max, folded to 16 lanes
        if (wide > 0) {
            __m512i mn32[P], mx32[P];
            for (int64_t k = 0; k < wide; k += 32) {
                __m512i tv[P];
                tile_v32(base + k, row_stride, ic, z, tv);
                for (int p = 0; p < P; ++p) {
                    _mm512_storeu_si512(exact + p * ic + k, tv[p]);
                    mn32[p] = k == 0 ? tv[p] : _mm512_min_epi16(mn32[p], tv[p]);
                    mx32[p] = k == 0 ? tv[p] : _mm512_max_epi16(mx32[p], tv[p]);
                }
            }
            for (int p = 0; p < P; ++p) {
                mn[p] = _mm256_min_epi16(_mm512_castsi512_si256(mn32[p]), _mm512_extracti64x4_epi64(mn32[p], 1));
                mx[p] = _mm256_max_epi16(_mm512_castsi512_si256(mx32[p]), _mm512_extracti64x4_epi64(mx32[p], 1));
            }
        }
        if (wide < ic) {
            __m256i tv[P];
            tile_v(base + wide, row_stride, ic, z16, tv);
            for (int p = 0; p < P; ++p) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(exact + p * ic + wide), tv[p]);
                mn[p] = wide == 0 ? tv[p] : _mm256_min_epi16(mn[p], tv[p]);
                mx[p] = wide == 0 ? tv[p] : _mm256_max_epi16(mx[p], tv[p]);
            }
        }
        for (int p = 0; p < P; ++p) {
            const __m128i lo8 = _mm_min_epi16(_mm256_castsi256_si128(mn[p]), _mm256_extracti128_si256(mn[p], 1));
            const __m128i hi8 = _mm_max_epi16(_mm256_castsi256_si128(mx[p]), _mm256_extracti128_si256(mx[p], 1));
            RowQuant& q = row[p * stride + t];
            const int16_t multiplier = row_quant(lane_min(lo8), -lane_min(_mm_sub_epi16(_mm_setzero_si128(), hi8)), &q.scale, &q.zero);
            quantize_row32(exact + p * ic, ic, multiplier == 0, multiplier, static_cast<int16_t>(q.zero),
                           v + p * p_stride + t * ic);
        }
    }
}

RESUNET_AVX512 void WinogradInt8::output_transform_avx512(const int32_t* m, const RowQuant* row, float* dst,
                                                          int64_t first_tile, int64_t count, int64_t stride) const {
    const int64_t oc = shape_.out_channels;
    const int64_t wide = oc / 16 * 16;  // the rest (0 or 8) through the AVX2 chunk
    const int64_t width = shape_.width;
    const int64_t per_image = tiles_y_ * tiles_x_;
    const int64_t p_stride = stride * oc;
    const bool sum = shape_.sum, relu = shape_.relu;
    const float* u_sum = u_sum_.data();
    const float* mul = mul_.data();
    for (int64_t t = 0; t < count; ++t) {
        const int64_t index = first_tile + t;
        const int64_t n = index / per_image, ty = (index % per_image) / tiles_x_, tx = index % tiles_x_;
        float* out = dst + ((n * shape_.height + 2 * ty) * width + 2 * tx) * oc;
        const int32_t* tile = m + t * oc;
        __m512 row_zero[P], row_scale[P];
        for (int p = 0; p < P; ++p) {
            row_zero[p] = _mm512_set1_ps(static_cast<float>(row[p * stride + t].zero));
            row_scale[p] = _mm512_set1_ps(row[p * stride + t].scale);
        }
        for (int64_t o = 0; o < wide; o += 16) {
            // M = s_t * (acc - z_t * sum U_q) * s_x * s_u, per (position, tile) and output channel.
            __m512 f[4][4];
            for (int p = 0; p < P; ++p) {
                const __m512 acc = _mm512_cvtepi32_ps(_mm512_loadu_si512(tile + p * p_stride + o));
                const __m512 centred = _mm512_fnmadd_ps(row_zero[p], _mm512_loadu_ps(u_sum + p * oc + o), acc);
                f[p / 4][p % 4] = _mm512_mul_ps(centred, _mm512_mul_ps(row_scale[p], _mm512_loadu_ps(mul + p * oc + o)));
            }
            __m512 r[2][4];
            for (int c = 0; c < 4; ++c) {
                r[0][c] = _mm512_add_ps(_mm512_add_ps(f[0][c], f[1][c]), f[2][c]);
                r[1][c] = _mm512_sub_ps(_mm512_sub_ps(f[1][c], f[2][c]), f[3][c]);
            }
            const __m512 b = _mm512_loadu_ps(bias_.data() + o);
            for (int i = 0; i < 2; ++i) {
                __m512 y[2];
                y[0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(r[i][0], r[i][1]), r[i][2]), b);
                y[1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(r[i][1], r[i][2]), r[i][3]), b);
                for (int j = 0; j < 2; ++j) {
                    float* at = out + (i * width + j) * oc + o;
                    if (sum) y[j] = _mm512_add_ps(y[j], _mm512_loadu_ps(at));
                    if (relu) y[j] = _mm512_max_ps(y[j], _mm512_setzero_ps());
                    _mm512_storeu_ps(at, y[j]);
                }
            }
        }
        if (wide < oc) {
            __m256 zero8[P], scale8[P];
            for (int p = 0; p < P; ++p) {
                zero8[p] = _mm512_castps512_ps256(row_zero[p]);
                scale8[p] = _mm512_castps512_ps256(row_scale[p]);
            }
            output_chunk8(tile + wide, p_stride, u_sum + wide, mul + wide, bias_.data() + wide, oc, zero8, scale8,
                          out + wide, width, sum, relu);
        }
    }
}

}  // namespace resunet
