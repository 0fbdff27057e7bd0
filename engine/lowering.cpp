// The planner's shared lowering (engine/lowering.h): convolution specs into primitive descriptors, their
// attributes, labels and weight uploads.
#include "engine/lowering.h"

#include <cstring>

#include "engine/onednn_compat.h"

namespace resunet::lowering {

using dnnl::memory;
using dt = memory::data_type;
using tag = memory::format_tag;

ConvSpec ConvSpec::of(const FusedOp& op, const memory::desc& src, const memory::desc& dst, const memory::dims& weight_dims,
                      int64_t stride, int64_t padding) {
    ConvSpec spec;
    spec.src = src;
    spec.dst = dst;
    spec.weight_dims = weight_dims;
    spec.strides = {stride, stride};
    spec.padding_l = spec.padding_r = {padding, padding};
    spec.sum = op.residual >= 0;
    spec.activation = op.activation;
    return spec;
}

memory::desc ConvSpec::weights_any() const {
    return memory::desc(weight_dims, precision == Precision::u8s8 ? dt::s8 : dt::f32, tag::any);
}

memory::desc ConvSpec::bias_desc() const {
    return bias ? memory::desc({weight_dims[0]}, dt::f32, tag::x) : memory::desc();  // oneDNN: empty = no bias
}

dnnl::primitive_attr conv_attr(const ConvSpec& spec) {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::post_ops post;
    if (spec.dequantizes())
        post.append_binary(dnnl::algorithm::binary_mul, memory::desc({1, spec.weight_dims[0], 1, 1}, dt::f32, tag::abcd));
    if (spec.sum) post.append_sum(1.0f);
    if (spec.activation == Activation::relu) onednn::append_eltwise(post, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
    if (spec.activation == Activation::sigmoid) onednn::append_eltwise(post, dnnl::algorithm::eltwise_logistic, 0.0f, 0.0f);
    attr.set_post_ops(post);
    return attr;
}

dnnl::convolution_forward::primitive_desc make_conv(const dnnl::engine& eng, const ConvSpec& spec) {
    return onednn::conv_forward(eng, spec.prop, spec.algorithm, spec.src, spec.weights_any(), spec.bias_desc(), spec.dst,
                                spec.strides, spec.padding_l, spec.padding_r, conv_attr(spec));
}

dnnl::deconvolution_forward::primitive_desc make_deconv(const dnnl::engine& eng, const ConvSpec& spec) {
    return onednn::deconv_forward(eng, spec.prop, dnnl::algorithm::deconvolution_direct, spec.src, spec.weights_any(),
                                  spec.bias_desc(), spec.dst, spec.strides, spec.padding_l, spec.padding_r, conv_attr(spec));
}

std::string fused_op_label(const FusedOp& op, const std::string& base) {
    std::string label = base;
    if (op.batch_norm >= 0) label += "+bn";
    if (op.residual >= 0) label += "+add";
    if (op.activation == Activation::relu) label += "+relu";
    if (op.activation == Activation::sigmoid) label += "+sigmoid";
    return label;
}

memory WeightStore::upload(const dnnl::engine& eng, dnnl::stream& strm, const void* data, dt type, const memory::dims& dims,
                           const memory::desc& layout) {
    memory plain({dims, type, tag::oihw}, eng, const_cast<void*>(data));
    memory prepared(layout, eng);
    dnnl::reorder(plain, prepared).execute(strm, plain, prepared);
    strm.wait();
    return keep(prepared);
}

memory WeightStore::floats(const dnnl::engine& eng, const float* data, int64_t count) {
    memory b({{count}, dt::f32, tag::x}, eng);
    std::memcpy(b.get_data_handle(), data, static_cast<size_t>(count) * sizeof(float));
    return keep(b);
}

memory WeightStore::keep(memory m, size_t bytes) {
    bytes_ += bytes ? bytes : m.get_desc().get_size();
    kept_.push_back(m);
    return m;
}

}  // namespace resunet::lowering
