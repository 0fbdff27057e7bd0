#include "engine/onednn_util.h"

namespace resunet {

std::string probe_conv(const dnnl::engine& eng, dnnl::memory::dim channels, dnnl::memory::format_tag t,
                       dnnl::memory::desc* chosen) {
    using namespace dnnl;
    memory::desc act({1, channels, 16, 16}, memory::data_type::f32, t);
    memory::desc weights_any({channels, channels, 3, 3}, memory::data_type::f32, memory::format_tag::any);
    const convolution_forward::primitive_desc pd =
        onednn::conv_forward(eng, prop_kind::forward_inference, algorithm::convolution_direct, act, weights_any,
                             memory::desc(), act, {1, 1}, {1, 1}, {1, 1}, primitive_attr());
    if (chosen) *chosen = pd.dst_desc();
    return pd.impl_info_str();
}

dnnl::memory::desc pixel_shuffle_view(int64_t n, int64_t channels, int64_t height, int64_t width, int64_t block,
                                      bool packed) {
    // Plain strides, the channel block as an axis of its own: oneDNN cannot split a blocked axis (reshape
    // refuses it), and 3.x has no public blocked descriptor to fill in.
    const int64_t b = block;
    const int64_t hw = height * width;
    const dnnl::memory::dims dims = {n, 2, 2, channels / b, height, width, b};
    const dnnl::memory::dims strides = packed ? dnnl::memory::dims{4 * channels * hw, 2 * channels * hw, channels * hw, hw * b,
                                                                   width * b, b, 1}
                                              : dnnl::memory::dims{4 * channels * hw, 2 * width * b, b, 4 * hw * b,
                                                                   4 * width * b, 2 * b, 1};
    return dnnl::memory::desc(dims, dnnl::memory::data_type::f32, strides);
}

}  // namespace resunet
