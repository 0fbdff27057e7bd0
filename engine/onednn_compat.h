// The one place that knows which oneDNN major version the project is built against (2.x: Debian 12's
// 2.6; 3.x: Debian 13, Ubuntu 24.04, the PyPI wheels). oneDNN 3.0 dropped the operation descriptors
// (primitive descriptors are made directly, taking the engine first), gave eltwise, batch normalization
// and pooling explicit dst/diff descriptors, dropped the scale argument of post_ops::append_eltwise and
// renamed memory::desc's queries. Every primitive descriptor the lowering makes is made here, with
// the same arguments on both versions, so no #if appears anywhere else.
//
// Intended usage (the arguments are those of oneDNN 3.x's primitive_desc constructors, without the
// engine's position mattering):
//   auto pd = onednn::conv_forward(eng, prop_kind::forward_inference, algorithm::convolution_direct,
//                                  src, weights_any, bias, dst, strides, padding_l, padding_r, attr);
//   dnnl::post_ops post;
//   onednn::append_eltwise(post, algorithm::eltwise_relu, 0.0f, 0.0f);
//   memory::dims d = onednn::dims_of(pd.dst_desc());
//
// Internal to engine/, quant/, train/ (and the tests and benchmarks of those): public headers speak in our
// own types.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <string>
#include <vector>

namespace resunet::onednn {

using dnnl::memory;

// "2.6.3", the library's own version (not the headers').
std::string version();
// The ISA oneDNN dispatches to on this CPU, as ONEDNN_VERBOSE prints it ("avx512_core_vnni").
std::string effective_isa_name();
// Whether the dispatched ISA has an int8 dot product (VNNI: AVX-512 VNNI and later, or AVX2-VNNI), so that
// u8 x s8 products of 127-level weights cannot saturate oneDNN's int16 intermediate.
bool effective_isa_has_vnni();

// ---------------------------------------------------------------------------------------- descriptors
memory::dims dims_of(const memory::desc& desc);
memory::data_type data_type_of(const memory::desc& desc);

// ---------------------------------------------------------------------------------------- arguments
// Whether a batch normalization backward made with use_shift takes DNNL_ARG_SHIFT at execution: 2.x
// fails without it, 3.x fails with it (it does not read it).
bool batch_norm_backward_takes_shift();

// ---------------------------------------------------------------------------------------- post-ops
// dst = alg(alpha, beta; dst), after the previous post-ops (2.x's scale argument is 1).
void append_eltwise(dnnl::post_ops& post, dnnl::algorithm alg, float alpha, float beta);

// ---------------------------------------------------------------------------------------- primitives
// An empty `bias` (memory::desc()) means no bias. A dnnl::error when oneDNN has no kernel for it.
dnnl::convolution_forward::primitive_desc conv_forward(const dnnl::engine& eng, dnnl::prop_kind prop, dnnl::algorithm alg,
                                                       const memory::desc& src, const memory::desc& weights,
                                                       const memory::desc& bias, const memory::desc& dst,
                                                       const memory::dims& strides, const memory::dims& padding_l,
                                                       const memory::dims& padding_r, const dnnl::primitive_attr& attr);
dnnl::convolution_backward_data::primitive_desc conv_backward_data(
    const dnnl::engine& eng, dnnl::algorithm alg, const memory::desc& diff_src, const memory::desc& weights,
    const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l, const memory::dims& padding_r,
    const dnnl::convolution_forward::primitive_desc& hint, const dnnl::primitive_attr& attr);
dnnl::convolution_backward_weights::primitive_desc conv_backward_weights(
    const dnnl::engine& eng, dnnl::algorithm alg, const memory::desc& src, const memory::desc& diff_weights,
    const memory::desc& diff_bias, const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l,
    const memory::dims& padding_r, const dnnl::convolution_forward::primitive_desc& hint, const dnnl::primitive_attr& attr);

dnnl::deconvolution_forward::primitive_desc deconv_forward(const dnnl::engine& eng, dnnl::prop_kind prop,
                                                           dnnl::algorithm alg, const memory::desc& src,
                                                           const memory::desc& weights, const memory::desc& bias,
                                                           const memory::desc& dst, const memory::dims& strides,
                                                           const memory::dims& padding_l, const memory::dims& padding_r,
                                                           const dnnl::primitive_attr& attr);
dnnl::deconvolution_backward_data::primitive_desc deconv_backward_data(
    const dnnl::engine& eng, dnnl::algorithm alg, const memory::desc& diff_src, const memory::desc& weights,
    const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l, const memory::dims& padding_r,
    const dnnl::deconvolution_forward::primitive_desc& hint, const dnnl::primitive_attr& attr);
dnnl::deconvolution_backward_weights::primitive_desc deconv_backward_weights(
    const dnnl::engine& eng, dnnl::algorithm alg, const memory::desc& src, const memory::desc& diff_weights,
    const memory::desc& diff_bias, const memory::desc& diff_dst, const memory::dims& strides, const memory::dims& padding_l,
    const memory::dims& padding_r, const dnnl::deconvolution_forward::primitive_desc& hint, const dnnl::primitive_attr& attr);

// dst = src x weights (batched when 3-D), no bias.
dnnl::matmul::primitive_desc matmul(const dnnl::engine& eng, const memory::desc& src, const memory::desc& weights,
                                    const memory::desc& dst, const dnnl::primitive_attr& attr);

// Max pooling without dilation.
dnnl::pooling_forward::primitive_desc max_pool_forward(const dnnl::engine& eng, dnnl::prop_kind prop,
                                                       const memory::desc& src, const memory::desc& dst,
                                                       const memory::dims& strides, const memory::dims& kernel,
                                                       const memory::dims& padding_l, const memory::dims& padding_r,
                                                       const dnnl::primitive_attr& attr);
dnnl::pooling_backward::primitive_desc max_pool_backward(const dnnl::engine& eng, const memory::desc& diff_src,
                                                         const memory::desc& diff_dst, const memory::dims& strides,
                                                         const memory::dims& kernel, const memory::dims& padding_l,
                                                         const memory::dims& padding_r,
                                                         const dnnl::pooling_forward::primitive_desc& hint,
                                                         const dnnl::primitive_attr& attr);

// Element-wise, dst in src's layout.
dnnl::eltwise_forward::primitive_desc eltwise_forward(const dnnl::engine& eng, dnnl::prop_kind prop, dnnl::algorithm alg,
                                                      const memory::desc& src, float alpha, float beta,
                                                      const dnnl::primitive_attr& attr);
// `data`: the forward's src, or its dst for the *_use_dst_for_bwd algorithms; diff_src in diff_dst's layout.
dnnl::eltwise_backward::primitive_desc eltwise_backward(const dnnl::engine& eng, dnnl::algorithm alg,
                                                        const memory::desc& diff_dst, const memory::desc& data, float alpha,
                                                        float beta, const dnnl::eltwise_forward::primitive_desc& hint,
                                                        const dnnl::primitive_attr& attr);

dnnl::binary::primitive_desc binary(const dnnl::engine& eng, dnnl::algorithm alg, const memory::desc& src0,
                                    const memory::desc& src1, const memory::desc& dst, const dnnl::primitive_attr& attr);

// Batch normalization, dst (and diff_src) in src's layout.
dnnl::batch_normalization_forward::primitive_desc batch_norm_forward(const dnnl::engine& eng, dnnl::prop_kind prop,
                                                                     const memory::desc& src, float epsilon,
                                                                     dnnl::normalization_flags flags,
                                                                     const dnnl::primitive_attr& attr);
dnnl::batch_normalization_backward::primitive_desc batch_norm_backward(
    const dnnl::engine& eng, dnnl::prop_kind prop, const memory::desc& diff_dst, const memory::desc& src, float epsilon,
    dnnl::normalization_flags flags, const dnnl::batch_normalization_forward::primitive_desc& hint,
    const dnnl::primitive_attr& attr);

dnnl::concat::primitive_desc concat(const dnnl::engine& eng, const memory::desc& dst, int axis,
                                    const std::vector<memory::desc>& srcs, const dnnl::primitive_attr& attr);

}  // namespace resunet::onednn
