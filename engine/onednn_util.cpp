#include "engine/onednn_util.h"

#include <cstring>

namespace resunet {

std::string effective_isa_name() {
    using isa = dnnl::cpu_isa;
    switch (dnnl::get_effective_cpu_isa()) {
        case isa::sse41: return "sse41";
        case isa::avx: return "avx";
        case isa::avx2: return "avx2";
        case isa::avx512_mic: return "avx512_mic";
        case isa::avx512_mic_4ops: return "avx512_mic_4ops";
        case isa::avx512_core: return "avx512_core";
        case isa::avx512_core_vnni: return "avx512_core_vnni";
        case isa::avx512_core_bf16: return "avx512_core_bf16";
        case isa::avx512_core_amx: return "avx512_core_amx";
        case isa::avx2_vnni: return "avx2_vnni";
        default: return "unknown";
    }
}

std::string probe_conv(const dnnl::engine& eng, dnnl::memory::dim channels, dnnl::memory::format_tag t,
                       dnnl::memory::desc* chosen) {
    using namespace dnnl;
    memory::desc act({1, channels, 16, 16}, memory::data_type::f32, t);
    memory::desc weights_any({channels, channels, 3, 3}, memory::data_type::f32, memory::format_tag::any);
    convolution_forward::primitive_desc pd(
        convolution_forward::desc(prop_kind::forward_inference, algorithm::convolution_direct, act, weights_any, act,
                                  {1, 1}, {1, 1}, {1, 1}),
        eng);
    if (chosen) *chosen = pd.dst_desc();
    return pd.impl_info_str();
}

dnnl::memory::desc pixel_shuffle_view(int64_t n, int64_t channels, int64_t height, int64_t width, int64_t block,
                                      bool packed) {
    dnnl_memory_desc_t md;
    std::memset(&md, 0, sizeof(md));
    md.ndims = 6;
    const int64_t dims[6] = {n, 2, 2, channels, height, width};
    for (int i = 0; i < 6; ++i) md.dims[i] = md.padded_dims[i] = dims[i];
    md.data_type = dnnl_f32;
    md.format_kind = dnnl_blocked;
    auto& blocking = md.format_desc.blocking;
    const int64_t b = block;
    const int64_t hw = height * width;
    if (packed) {  // {N, 4C, H, W}, channel (ky * 2 + kx) * C + c
        const int64_t s[6] = {4 * channels * hw, 2 * channels * hw, channels * hw, hw * b, width * b, b};
        std::memcpy(blocking.strides, s, sizeof(s));
    } else {  // {N, C, 2H, 2W}, element (c, 2h + ky, 2w + kx)
        const int64_t s[6] = {4 * channels * hw, 2 * width * b, b, 4 * hw * b, 4 * width * b, 2 * b};
        std::memcpy(blocking.strides, s, sizeof(s));
    }
    if (b > 1) {
        blocking.inner_nblks = 1;
        blocking.inner_blks[0] = b;
        blocking.inner_idxs[0] = 3;
    }
    return dnnl::memory::desc(md);
}

}  // namespace resunet
