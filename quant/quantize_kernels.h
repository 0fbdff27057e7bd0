// The int8 engine's own passes over activations: range (min/max), quantize to u8 (into one or more
// spatially padded NHWC buffers, concat and pixel shuffle folded in), and gather to fp32 NHWC.
// OpenMP-parallel over rows; memory-bound by design: each reads its fp32 input once.
#pragma once

#include <cstdint>
#include <vector>

#include "quant/quantize.h"

namespace resunet {

// A channel range of a (possibly concatenated) NHWC activation.
struct KernelSource {
    const float* data = nullptr;
    int64_t channels = 0;        // channels of this source
    int64_t channel_offset = 0;  // first channel in the whole tensor
    // The output of a 2x2 stride-2 transposed convolution still in its 1x1-convolution form
    // {N, 4C, H/2, W/2} NHWC with channel (ky * 2 + kx) * C + c; read through a pixel shuffle.
    bool packed = false;
};

// A u8 NHWC destination with `padding` pixels of zero point around each image.
struct KernelTarget {
    uint8_t* data = nullptr;
    int padding = 0;
};

struct KernelShape {
    int64_t n, c, h, w;  // the whole tensor
};

struct Range {
    float min = 0;
    float max = 0;
    bool finite = true;  // false if any value is NaN or infinite
};

Range tensor_range(const std::vector<KernelSource>& sources, const KernelShape& shape);
// The sources cover every channel of `shape`; the first target is written from them and each further one is
// a copy of it, row by row. Returns the number of values clipped to 0 or 255 when count_clipped is set (else 0). NaN quantizes
// to 0 and +-Inf to 255 / 0 (never an undefined float-to-integer cast); `finite`, when given, is set
// to whether every source value was finite (static scales skip tensor_range, so this is their check).
int64_t quantize_u8(const std::vector<KernelSource>& sources, const KernelShape& shape, const ActivationQuant& quant,
                    const std::vector<KernelTarget>& targets, bool count_clipped, bool* finite = nullptr);
void gather_f32(const std::vector<KernelSource>& sources, const KernelShape& shape, float* dst);

}  // namespace resunet
