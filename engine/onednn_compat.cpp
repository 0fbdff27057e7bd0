// oneDNN 2.x and 3.x behind one interface (engine/onednn_compat.h): the only #if on the version.
#include "engine/onednn_compat.h"

#include <fmt/format.h>

// CMakeLists.txt reads the version from the dnnl_version.h it found: a mismatch means the compiler sees
// another oneDNN's headers (Debian's in /usr/include) than the library it links.
#if defined(RESUNET_DNNL_VERSION_MAJOR) && RESUNET_DNNL_VERSION_MAJOR != DNNL_VERSION_MAJOR
#error "oneDNN headers and library differ in major version: check CMAKE_PREFIX_PATH (docs/onednn3.md)"
#endif

namespace resunet::onednn {

using namespace dnnl;

#if DNNL_VERSION_MAJOR >= 3
#define RESUNET_ONEDNN_3 1
#else
#define RESUNET_ONEDNN_3 0
#endif

std::string version() {
    const dnnl_version_t* v = dnnl_version();
    return fmt::format("{}.{}.{}", v->major, v->minor, v->patch);
}

std::string effective_isa_name() {
    switch (get_effective_cpu_isa()) {
        case cpu_isa::sse41: return "sse41";
        case cpu_isa::avx: return "avx";
        case cpu_isa::avx2: return "avx2";
        case cpu_isa::avx2_vnni: return "avx2_vnni";
        case cpu_isa::avx512_core: return "avx512_core";
        case cpu_isa::avx512_core_vnni: return "avx512_core_vnni";
        case cpu_isa::avx512_core_bf16: return "avx512_core_bf16";
        case cpu_isa::avx512_core_amx: return "avx512_core_amx";
#if RESUNET_ONEDNN_3
        case cpu_isa::avx2_vnni_2: return "avx2_vnni_2";
        case cpu_isa::avx512_core_fp16: return "avx512_core_fp16";
        case cpu_isa::avx512_core_amx_fp16: return "avx512_core_amx_fp16";
#else
        case cpu_isa::avx512_mic: return "avx512_mic";
        case cpu_isa::avx512_mic_4ops: return "avx512_mic_4ops";
#endif
        default: return "unknown";
    }
}

bool effective_isa_has_vnni() {
    switch (get_effective_cpu_isa()) {
        case cpu_isa::avx512_core_vnni:
        case cpu_isa::avx512_core_bf16:
        case cpu_isa::avx512_core_amx:
        case cpu_isa::avx2_vnni:
#if RESUNET_ONEDNN_3
        case cpu_isa::avx2_vnni_2:
        case cpu_isa::avx512_core_fp16:
        case cpu_isa::avx512_core_amx_fp16:
#endif
            return true;
        default: return false;
    }
}

bool batch_norm_backward_takes_shift() { return !RESUNET_ONEDNN_3; }

#if RESUNET_ONEDNN_3

memory::dims dims_of(const memory::desc& desc) { return desc.get_dims(); }
memory::data_type data_type_of(const memory::desc& desc) { return desc.get_data_type(); }

void append_eltwise(post_ops& post, algorithm alg, float alpha, float beta) { post.append_eltwise(alg, alpha, beta); }

convolution_forward::primitive_desc conv_forward(const engine& eng, prop_kind prop, algorithm alg, const memory::desc& src,
                                                 const memory::desc& weights, const memory::desc& bias, const memory::desc& dst,
                                                 const memory::dims& strides, const memory::dims& padding_l,
                                                 const memory::dims& padding_r, const primitive_attr& attr) {
    return {eng, prop, alg, src, weights, bias, dst, strides, padding_l, padding_r, attr};
}

convolution_backward_data::primitive_desc conv_backward_data(const engine& eng, algorithm alg, const memory::desc& diff_src,
                                                             const memory::desc& weights, const memory::desc& diff_dst,
                                                             const memory::dims& strides, const memory::dims& padding_l,
                                                             const memory::dims& padding_r,
                                                             const convolution_forward::primitive_desc& hint,
                                                             const primitive_attr& attr) {
    return {eng, alg, diff_src, weights, diff_dst, strides, padding_l, padding_r, hint, attr};
}

convolution_backward_weights::primitive_desc conv_backward_weights(
    const engine& eng, algorithm alg, const memory::desc& src, const memory::desc& diff_weights, const memory::desc& diff_bias,
    const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l, const memory::dims& padding_r,
    const convolution_forward::primitive_desc& hint, const primitive_attr& attr) {
    return {eng, alg, src, diff_weights, diff_bias, diff_dst, strides, padding_l, padding_r, hint, attr};
}

deconvolution_forward::primitive_desc deconv_forward(const engine& eng, prop_kind prop, algorithm alg, const memory::desc& src,
                                                     const memory::desc& weights, const memory::desc& bias,
                                                     const memory::desc& dst, const memory::dims& strides,
                                                     const memory::dims& padding_l, const memory::dims& padding_r,
                                                     const primitive_attr& attr) {
    return {eng, prop, alg, src, weights, bias, dst, strides, padding_l, padding_r, attr};
}

deconvolution_backward_data::primitive_desc deconv_backward_data(const engine& eng, algorithm alg,
                                                                 const memory::desc& diff_src, const memory::desc& weights,
                                                                 const memory::desc& diff_dst, const memory::dims& strides,
                                                                 const memory::dims& padding_l, const memory::dims& padding_r,
                                                                 const deconvolution_forward::primitive_desc& hint,
                                                                 const primitive_attr& attr) {
    return {eng, alg, diff_src, weights, diff_dst, strides, padding_l, padding_r, hint, attr};
}

deconvolution_backward_weights::primitive_desc deconv_backward_weights(
    const engine& eng, algorithm alg, const memory::desc& src, const memory::desc& diff_weights, const memory::desc& diff_bias,
    const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l, const memory::dims& padding_r,
    const deconvolution_forward::primitive_desc& hint, const primitive_attr& attr) {
    return {eng, alg, src, diff_weights, diff_bias, diff_dst, strides, padding_l, padding_r, hint, attr};
}

dnnl::matmul::primitive_desc matmul(const engine& eng, const memory::desc& src, const memory::desc& weights, const memory::desc& dst,
                              const primitive_attr& attr) {
    return {eng, src, weights, dst, attr};
}

pooling_forward::primitive_desc max_pool_forward(const engine& eng, prop_kind prop, const memory::desc& src,
                                                 const memory::desc& dst, const memory::dims& strides,
                                                 const memory::dims& kernel, const memory::dims& padding_l,
                                                 const memory::dims& padding_r, const primitive_attr& attr) {
    const memory::dims no_dilation(kernel.size(), 0);
    return {eng, prop, algorithm::pooling_max, src, dst, strides, kernel, no_dilation, padding_l, padding_r, attr};
}

pooling_backward::primitive_desc max_pool_backward(const engine& eng, const memory::desc& diff_src, const memory::desc& diff_dst,
                                                   const memory::dims& strides, const memory::dims& kernel,
                                                   const memory::dims& padding_l, const memory::dims& padding_r,
                                                   const pooling_forward::primitive_desc& hint, const primitive_attr& attr) {
    const memory::dims no_dilation(kernel.size(), 0);
    return {eng, algorithm::pooling_max, diff_src, diff_dst, strides, kernel, no_dilation, padding_l, padding_r, hint, attr};
}

dnnl::eltwise_forward::primitive_desc eltwise_forward(const engine& eng, prop_kind prop, algorithm alg, const memory::desc& src,
                                                float alpha, float beta, const primitive_attr& attr) {
    return {eng, prop, alg, src, src, alpha, beta, attr};
}

dnnl::eltwise_backward::primitive_desc eltwise_backward(const engine& eng, algorithm alg, const memory::desc& diff_dst,
                                                  const memory::desc& data, float alpha, float beta,
                                                  const dnnl::eltwise_forward::primitive_desc& hint, const primitive_attr& attr) {
    return {eng, alg, diff_dst, diff_dst, data, alpha, beta, hint, attr};
}

dnnl::binary::primitive_desc binary(const engine& eng, algorithm alg, const memory::desc& src0, const memory::desc& src1,
                              const memory::desc& dst, const primitive_attr& attr) {
    return {eng, alg, src0, src1, dst, attr};
}

batch_normalization_forward::primitive_desc batch_norm_forward(const engine& eng, prop_kind prop, const memory::desc& src,
                                                               float epsilon, normalization_flags flags,
                                                               const primitive_attr& attr) {
    return {eng, prop, src, src, epsilon, flags, attr};
}

batch_normalization_backward::primitive_desc batch_norm_backward(const engine& eng, prop_kind prop,
                                                                 const memory::desc& diff_dst, const memory::desc& src,
                                                                 float epsilon, normalization_flags flags,
                                                                 const batch_normalization_forward::primitive_desc& hint,
                                                                 const primitive_attr& attr) {
    return {eng, prop, diff_dst, diff_dst, src, epsilon, flags, hint, attr};
}

dnnl::concat::primitive_desc concat(const engine& eng, const memory::desc& dst, int axis, const std::vector<memory::desc>& srcs,
                              const primitive_attr& attr) {
    return {eng, dst, axis, srcs, attr};
}

#else  // oneDNN 2.x: an operation descriptor, then its primitive descriptor

memory::dims dims_of(const memory::desc& desc) { return desc.dims(); }
memory::data_type data_type_of(const memory::desc& desc) { return desc.data_type(); }

void append_eltwise(post_ops& post, algorithm alg, float alpha, float beta) { post.append_eltwise(1.0f, alg, alpha, beta); }

convolution_forward::primitive_desc conv_forward(const engine& eng, prop_kind prop, algorithm alg, const memory::desc& src,
                                                 const memory::desc& weights, const memory::desc& bias, const memory::desc& dst,
                                                 const memory::dims& strides, const memory::dims& padding_l,
                                                 const memory::dims& padding_r, const primitive_attr& attr) {
    return {convolution_forward::desc(prop, alg, src, weights, bias, dst, strides, padding_l, padding_r), attr, eng};
}

convolution_backward_data::primitive_desc conv_backward_data(const engine& eng, algorithm alg, const memory::desc& diff_src,
                                                             const memory::desc& weights, const memory::desc& diff_dst,
                                                             const memory::dims& strides, const memory::dims& padding_l,
                                                             const memory::dims& padding_r,
                                                             const convolution_forward::primitive_desc& hint,
                                                             const primitive_attr& attr) {
    return {convolution_backward_data::desc(alg, diff_src, weights, diff_dst, strides, padding_l, padding_r), attr, eng, hint};
}

convolution_backward_weights::primitive_desc conv_backward_weights(
    const engine& eng, algorithm alg, const memory::desc& src, const memory::desc& diff_weights, const memory::desc& diff_bias,
    const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l, const memory::dims& padding_r,
    const convolution_forward::primitive_desc& hint, const primitive_attr& attr) {
    return {convolution_backward_weights::desc(alg, src, diff_weights, diff_bias, diff_dst, strides, padding_l, padding_r),
            attr, eng, hint};
}

deconvolution_forward::primitive_desc deconv_forward(const engine& eng, prop_kind prop, algorithm alg, const memory::desc& src,
                                                     const memory::desc& weights, const memory::desc& bias,
                                                     const memory::desc& dst, const memory::dims& strides,
                                                     const memory::dims& padding_l, const memory::dims& padding_r,
                                                     const primitive_attr& attr) {
    return {deconvolution_forward::desc(prop, alg, src, weights, bias, dst, strides, padding_l, padding_r), attr, eng};
}

deconvolution_backward_data::primitive_desc deconv_backward_data(const engine& eng, algorithm alg,
                                                                 const memory::desc& diff_src, const memory::desc& weights,
                                                                 const memory::desc& diff_dst, const memory::dims& strides,
                                                                 const memory::dims& padding_l, const memory::dims& padding_r,
                                                                 const deconvolution_forward::primitive_desc& hint,
                                                                 const primitive_attr& attr) {
    return {deconvolution_backward_data::desc(alg, diff_src, weights, diff_dst, strides, padding_l, padding_r), attr, eng, hint};
}

deconvolution_backward_weights::primitive_desc deconv_backward_weights(
    const engine& eng, algorithm alg, const memory::desc& src, const memory::desc& diff_weights, const memory::desc& diff_bias,
    const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l, const memory::dims& padding_r,
    const deconvolution_forward::primitive_desc& hint, const primitive_attr& attr) {
    return {deconvolution_backward_weights::desc(alg, src, diff_weights, diff_bias, diff_dst, strides, padding_l, padding_r),
            attr, eng, hint};
}

dnnl::matmul::primitive_desc matmul(const engine& eng, const memory::desc& src, const memory::desc& weights, const memory::desc& dst,
                              const primitive_attr& attr) {
    return {dnnl::matmul::desc(src, weights, dst), attr, eng};
}

pooling_forward::primitive_desc max_pool_forward(const engine& eng, prop_kind prop, const memory::desc& src,
                                                 const memory::desc& dst, const memory::dims& strides,
                                                 const memory::dims& kernel, const memory::dims& padding_l,
                                                 const memory::dims& padding_r, const primitive_attr& attr) {
    return {pooling_forward::desc(prop, algorithm::pooling_max, src, dst, strides, kernel, padding_l, padding_r), attr, eng};
}

pooling_backward::primitive_desc max_pool_backward(const engine& eng, const memory::desc& diff_src, const memory::desc& diff_dst,
                                                   const memory::dims& strides, const memory::dims& kernel,
                                                   const memory::dims& padding_l, const memory::dims& padding_r,
                                                   const pooling_forward::primitive_desc& hint, const primitive_attr& attr) {
    return {pooling_backward::desc(algorithm::pooling_max, diff_src, diff_dst, strides, kernel, padding_l, padding_r), attr, eng,
            hint};
}

dnnl::eltwise_forward::primitive_desc eltwise_forward(const engine& eng, prop_kind prop, algorithm alg, const memory::desc& src,
                                                float alpha, float beta, const primitive_attr& attr) {
    return {dnnl::eltwise_forward::desc(prop, alg, src, alpha, beta), attr, eng};
}

dnnl::eltwise_backward::primitive_desc eltwise_backward(const engine& eng, algorithm alg, const memory::desc& diff_dst,
                                                  const memory::desc& data, float alpha, float beta,
                                                  const dnnl::eltwise_forward::primitive_desc& hint, const primitive_attr& attr) {
    return {dnnl::eltwise_backward::desc(alg, diff_dst, data, alpha, beta), attr, eng, hint};
}

dnnl::binary::primitive_desc binary(const engine& eng, algorithm alg, const memory::desc& src0, const memory::desc& src1,
                              const memory::desc& dst, const primitive_attr& attr) {
    return {dnnl::binary::desc(alg, src0, src1, dst), attr, eng};
}

batch_normalization_forward::primitive_desc batch_norm_forward(const engine& eng, prop_kind prop, const memory::desc& src,
                                                               float epsilon, normalization_flags flags,
                                                               const primitive_attr& attr) {
    return {batch_normalization_forward::desc(prop, src, epsilon, flags), attr, eng};
}

batch_normalization_backward::primitive_desc batch_norm_backward(const engine& eng, prop_kind prop,
                                                                 const memory::desc& diff_dst, const memory::desc& src,
                                                                 float epsilon, normalization_flags flags,
                                                                 const batch_normalization_forward::primitive_desc& hint,
                                                                 const primitive_attr& attr) {
    return {batch_normalization_backward::desc(prop, diff_dst, src, epsilon, flags), attr, eng, hint};
}

dnnl::concat::primitive_desc concat(const engine& eng, const memory::desc& dst, int axis, const std::vector<memory::desc>& srcs,
                              const primitive_attr& attr) {
    return {dst, axis, srcs, eng, attr};
}

#endif

}  // namespace resunet::onednn
