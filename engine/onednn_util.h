// Small conversions between our types and oneDNN's, shared by engine/, quant/ and train/ (never by others).
#pragma once

#include <oneapi/dnnl/dnnl.hpp>
#include <string>

#include "engine/onednn_compat.h"
#include "graph/tensor.h"

namespace resunet {

inline dnnl::memory::dims to_dnnl_dims(const Dims& dims) { return dnnl::memory::dims(dims.begin(), dims.end()); }

// The ISA oneDNN dispatches to on this CPU, as ONEDNN_VERBOSE prints it.
using onednn::effective_isa_name;

// The kernel oneDNN picks for a 3x3 convolution, `channels` to `channels`, on a 16x16 image whose
// activations are in layout `t` (format_tag::any: oneDNN's own choice, returned in `chosen`).
std::string probe_conv(const dnnl::engine& eng, dnnl::memory::dim channels, dnnl::memory::format_tag t,
                       dnnl::memory::desc* chosen = nullptr);

// A 7-D view {N, 2 (ky), 2 (kx), C / block, H, W, block} of a 2x2 pixel shuffle, in the channel-blocked
// layout with `block` channels per block (1 = plain NCHW; `channels` a multiple of it). `packed` describes
// the 1x1-convolution output {N, 4C, H, W} whose channel is (ky * 2 + kx) * C + c; otherwise the
// {N, C, 2H, 2W} image.
dnnl::memory::desc pixel_shuffle_view(int64_t n, int64_t channels, int64_t height, int64_t width, int64_t block,
                                      bool packed);

}  // namespace resunet
