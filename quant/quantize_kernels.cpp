#include "quant/quantize_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace resunet {

namespace {

// Address of element (n, y, x, channel 0) of a source within its own buffer.
inline const float* source_pixel(const KernelSource& s, const KernelShape& shape, int64_t n, int64_t y, int64_t x) {
    if (!s.packed) return s.data + ((n * shape.h + y) * shape.w + x) * s.channels;
    const int64_t h2 = shape.h / 2, w2 = shape.w / 2;
    return s.data + ((n * h2 + y / 2) * w2 + x / 2) * 4 * s.channels + ((y % 2) * 2 + x % 2) * s.channels;
}

}  // namespace

Range tensor_range(const std::vector<KernelSource>& sources, const KernelShape& shape) {
    float lo = INFINITY, hi = -INFINITY, nan_probe = 0.0f;
    for (const KernelSource& s : sources) {
        const int64_t count = shape.n * shape.h * shape.w * s.channels;
        const float* p = s.data;
#pragma omp parallel for reduction(min : lo) reduction(max : hi) reduction(+ : nan_probe) schedule(static)
        for (int64_t i = 0; i < count; ++i) {
            const float v = p[i];
            lo = std::min(lo, v);
            hi = std::max(hi, v);
            nan_probe += v - v;  // 0 for finite values, NaN for NaN and +-Inf
        }
    }
    Range r;
    r.min = lo;
    r.max = hi;
    r.finite = nan_probe == 0.0f && std::isfinite(lo) && std::isfinite(hi);
    return r;
}

int64_t quantize_u8(const std::vector<KernelSource>& sources, const KernelShape& shape, const ActivationQuant& quant,
                    const std::vector<KernelTarget>& targets, bool count_clipped) {
    const float scale = quant.scale;
    const float zero = static_cast<float>(quant.zero_point);
    const uint8_t zero_u8 = static_cast<uint8_t>(quant.zero_point);
    int64_t clipped = 0;
    // Borders hold the zero point: the quantized image of 0.0, as the convolution's zero padding.
    for (const KernelTarget& t : targets) {
        if (t.padding == 0) continue;
        const int64_t pw = shape.w + 2 * t.padding, ph = shape.h + 2 * t.padding;
        for (int64_t n = 0; n < shape.n; ++n)
            for (int64_t y = 0; y < ph; ++y) {
                uint8_t* row = t.data + (n * ph + y) * pw * shape.c;
                if (y < t.padding || y >= ph - t.padding) {
                    std::memset(row, zero_u8, static_cast<size_t>(pw * shape.c));
                } else {
                    std::memset(row, zero_u8, static_cast<size_t>(t.padding * shape.c));
                    std::memset(row + (pw - t.padding) * shape.c, zero_u8, static_cast<size_t>(t.padding * shape.c));
                }
            }
    }
    const int64_t rows = shape.n * shape.h;
#pragma omp parallel for reduction(+ : clipped) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t n = row / shape.h, y = row % shape.h;
        for (int64_t x = 0; x < shape.w; ++x) {
            for (const KernelSource& s : sources) {
                const float* in = source_pixel(s, shape, n, y, x);
                uint8_t* out0 = nullptr;
                {
                    const KernelTarget& t = targets[0];
                    const int64_t pw = shape.w + 2 * t.padding, ph = shape.h + 2 * t.padding;
                    out0 = t.data + ((n * ph + y + t.padding) * pw + x + t.padding) * shape.c + s.channel_offset;
                }
                if (count_clipped) {
                    for (int64_t c = 0; c < s.channels; ++c) {
                        const float v = std::nearbyint(in[c] / scale) + zero;
                        clipped += (v < 0.0f || v > 255.0f) ? 1 : 0;
                    }
                }
                for (int64_t c = 0; c < s.channels; ++c) {
                    float v = std::nearbyint(in[c] / scale) + zero;
                    v = std::min(std::max(v, 0.0f), 255.0f);
                    out0[c] = static_cast<uint8_t>(v);
                }
                for (size_t t = 1; t < targets.size(); ++t) {
                    const int64_t pw = shape.w + 2 * targets[t].padding, ph = shape.h + 2 * targets[t].padding;
                    uint8_t* out = targets[t].data +
                                   ((n * ph + y + targets[t].padding) * pw + x + targets[t].padding) * shape.c + s.channel_offset;
                    std::memcpy(out, out0, static_cast<size_t>(s.channels));
                }
            }
        }
    }
    return clipped;
}

void gather_f32(const std::vector<KernelSource>& sources, const KernelShape& shape, float* dst) {
    const int64_t rows = shape.n * shape.h;
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        const int64_t n = row / shape.h, y = row % shape.h;
        for (int64_t x = 0; x < shape.w; ++x)
            for (const KernelSource& s : sources)
                std::memcpy(dst + ((n * shape.h + y) * shape.w + x) * shape.c + s.channel_offset,
                            source_pixel(s, shape, n, y, x), static_cast<size_t>(s.channels) * sizeof(float));
    }
}

}  // namespace resunet
