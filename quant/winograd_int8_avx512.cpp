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

// Row R (0..3) of V = B^T (d - z) B of one 4x4 tile, 32 channels as int16 lanes (row_v's arithmetic).
template <int R>
RESUNET_AVX512 inline __attribute__((always_inline)) void row_v32(const uint8_t* base, int64_t row_stride,
                                                                  int64_t pixel_stride, __m512i zero, __m512i* v) {
    constexpr int a = R == 2 ? 2 : (R == 0 ? 0 : 1), b = R == 0 || R == 1 ? 2 : (R == 2 ? 1 : 3);
    __m512i t[4];
    for (int c = 0; c < 4; ++c) {
        const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + a * row_stride + c * pixel_stride)));
        const __m512i y = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + b * row_stride + c * pixel_stride)));
        t[c] = R == 1 ? _mm512_sub_epi16(_mm512_add_epi16(x, y), _mm512_add_epi16(zero, zero)) : _mm512_sub_epi16(x, y);
    }
    v[0] = _mm512_sub_epi16(t[0], t[2]);
    v[1] = _mm512_add_epi16(t[1], t[2]);
    v[2] = _mm512_sub_epi16(t[2], t[1]);
    v[3] = _mm512_sub_epi16(t[1], t[3]);
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

// input_row (quant/winograd_int8.cpp) 32 channels at a time: row R of one tile's V into `exact` ([4][IC]
// int16), each position quantized into v with its quantization in `row`; the last 16 channels through row_v.
template <int R>
RESUNET_AVX512 inline void input_row32(const uint8_t* base, int64_t row_stride, int64_t ic, __m512i z, __m256i z16,
                                       int16_t* exact, uint8_t* v, int64_t p_stride, WinogradRowQuant* row,
                                       int64_t quant_stride) {
    const int64_t wide = ic / 32 * 32;
    __m256i mn[4], mx[4];  // each position's running min and max, folded to 16 lanes
    if (wide > 0) {
        __m512i mn32[4], mx32[4];
        for (int64_t k = 0; k < wide; k += 32) {
            __m512i tv[4];
            row_v32<R>(base + k, row_stride, ic, z, tv);
            for (int j = 0; j < 4; ++j) {
                _mm512_storeu_si512(exact + j * ic + k, tv[j]);
                mn32[j] = k == 0 ? tv[j] : _mm512_min_epi16(mn32[j], tv[j]);
                mx32[j] = k == 0 ? tv[j] : _mm512_max_epi16(mx32[j], tv[j]);
            }
        }
        for (int j = 0; j < 4; ++j) {
            mn[j] = _mm256_min_epi16(_mm512_castsi512_si256(mn32[j]), _mm512_extracti64x4_epi64(mn32[j], 1));
            mx[j] = _mm256_max_epi16(_mm512_castsi512_si256(mx32[j]), _mm512_extracti64x4_epi64(mx32[j], 1));
        }
    }
    if (wide < ic) {
        __m256i tv[4];
        row_v<R>(base + wide, row_stride, ic, z16, tv);
        for (int j = 0; j < 4; ++j) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(exact + j * ic + wide), tv[j]);
            mn[j] = wide == 0 ? tv[j] : _mm256_min_epi16(mn[j], tv[j]);
            mx[j] = wide == 0 ? tv[j] : _mm256_max_epi16(mx[j], tv[j]);
        }
    }
    for (int j = 0; j < 4; ++j) {
        int32_t zero = 0;
        const int16_t multiplier = finish_row(mn[j], mx[j], row + j * quant_stride, &zero);
        quantize_row32(exact + j * ic, ic, multiplier == 0, multiplier, static_cast<int16_t>(zero), v + j * p_stride);
    }
}

}  // namespace

RESUNET_AVX512 void WinogradInt8::input_transform_avx512(const uint8_t* src, int32_t zero, uint8_t* v, RowQuant* row,
                                                         int16_t* exact, int64_t first_tile, int64_t count, int64_t stride) const {
    const int64_t ic = shape_.in_channels;
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
        uint8_t* out = v + t * ic;
        input_row32<0>(base, row_stride, ic, z, z16, exact, out, p_stride, row + t, stride);
        input_row32<1>(base, row_stride, ic, z, z16, exact, out + 4 * p_stride, p_stride, row + 4 * stride + t, stride);
        input_row32<2>(base, row_stride, ic, z, z16, exact, out + 8 * p_stride, p_stride, row + 8 * stride + t, stride);
        input_row32<3>(base, row_stride, ic, z, z16, exact, out + 12 * p_stride, p_stride, row + 12 * stride + t, stride);
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
        const RowQuant* rows = row + t;
        for (int64_t o = 0; o < wide; o += 16) {
            // M = s_t * (acc - z_t * sum U_q) * s_x * s_u per (position, tile) and output channel, column by
            // column of the tile; Y = A^T M A accumulated in four outputs.
            const __m512 b = _mm512_loadu_ps(bias_.data() + o);
            __m512 y00 = b, y01 = b, y10 = b, y11 = b;
            for (int c = 0; c < 4; ++c) {
                __m512 f[4];
                for (int r = 0; r < 4; ++r) {
                    const int p = r * 4 + c;
                    const RowQuant& q = rows[p * stride];
                    const __m512 acc = _mm512_cvtepi32_ps(_mm512_loadu_si512(tile + p * p_stride + o));
                    const __m512 centred = _mm512_fnmadd_ps(_mm512_set1_ps(q.zero), _mm512_loadu_ps(u_sum + p * oc + o), acc);
                    f[r] = _mm512_mul_ps(centred, _mm512_mul_ps(_mm512_set1_ps(q.scale), _mm512_loadu_ps(mul + p * oc + o)));
                }
                const __m512 r0 = _mm512_add_ps(_mm512_add_ps(f[0], f[1]), f[2]);
                const __m512 r1 = _mm512_sub_ps(_mm512_sub_ps(f[1], f[2]), f[3]);
                if (c < 3) {
                    y00 = _mm512_add_ps(y00, r0);
                    y10 = _mm512_add_ps(y10, r1);
                }
                if (c == 1) {
                    y01 = _mm512_add_ps(y01, r0);
                    y11 = _mm512_add_ps(y11, r1);
                } else if (c > 1) {
                    y01 = _mm512_sub_ps(y01, r0);
                    y11 = _mm512_sub_ps(y11, r1);
                }
            }
            const __m512 y[2][2] = {{y00, y01}, {y10, y11}};
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) {
                    float* at = out + (i * width + j) * oc + o;
                    __m512 value = y[i][j];
                    if (sum) value = _mm512_add_ps(value, _mm512_loadu_ps(at));
                    if (relu) value = _mm512_max_ps(value, _mm512_setzero_ps());
                    _mm512_storeu_ps(at, value);
                }
        }
        if (wide < oc)
            output_chunk8(tile + wide, p_stride, u_sum + wide, mul + wide, bias_.data() + wide, oc, rows, stride,
                          out + wide, width, sum, relu);
    }
}

}  // namespace resunet
