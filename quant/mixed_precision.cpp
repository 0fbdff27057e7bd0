// Mixed precision (Int8ConvAlgorithm::mixed): the int8 engine's per-layer precision, chosen by measuring
// (quant/quant_engine_impl.h, QuantEngine::Impl::choose_precisions).
//
// Each 3x3 layer that would run int8 is measured twice on its real shape and weights, in the layouts this
// engine runs it in: oneDNN's u8 x s8 direct kernel (quant/int8_conv_choice.h), and the planner's fp32
// candidates (engine/conv_choice.h: direct, oneDNN's Winograd, our own F(4x4,3x3) and F(2x2,3x3), each checked
// against fp32 direct before it is timed). The layer runs fp32, with the fp32 algorithm measured fastest, where
// that is at least kMixedPrecisionMargin faster than its int8 kernel. On CPUs without VNNI our fp32 Winograd
// beats the u8 x s8 kernel on the wide, high-resolution layers; with VNNI or AMX int8 keeps them. fp32 is
// never less exact than int8, so the choice only trades memory (fp32 Winograd weights) for time.
#include <fmt/format.h>

#include "quant/quant_engine_impl.h"

namespace resunet {

void QuantEngine::Impl::choose_precisions(const TensorMap& weights) {
    fp32_forced.assign(ops.size(), "");
    precision_note.assign(ops.size(), "");
    for (size_t k = 0; k < ops.size(); ++k) {
        const FusedOp& op = ops[k];
        const Node& node = graph.node(op.node);
        if (!int8_op[k] || node.kind != OpKind::conv || node.kernel != 3 || node.stride != 1 || node.padding != 1 ||
            op.srcs[0] == graph.input_value() || op.activation == Activation::sigmoid)
            continue;
        // int8: the direct kernel as lower_conv builds it, on the quantize pass's padded u8 copy.
        const PreparedLayer int8_layer = prepare_layer(graph, op, weights, /*int8=*/true, /*from_int8_file=*/false, levels);
        const lowering::ConvSpec int8_spec = conv_spec(op, int8_layer);
        const Dims& in = dims(op.srcs[0]);
        const Dims& out = dims(op.dst);
        const WinogradInt8Shape shape{.batch = in[0], .in_channels = in[1], .out_channels = out[1], .height = out[2],
                                      .width = out[3], .sum = op.residual >= 0,
                                      .relu = op.activation == Activation::relu, .levels = levels};
        const double int8_ms = time_int8_direct(eng, strm, lowering::make_conv(eng, int8_spec), int8_layer, shape, options.tune);
        // fp32: the planner's candidates on the fp32 NHWC buffers.
        const PreparedLayer fp32_layer = prepare_layer(graph, op, weights, /*int8=*/false, /*from_int8_file=*/false, levels);
        ConvChoiceRequest request = fp32_conv_request(op, fp32_layer, conv_spec(op, fp32_layer));
        request.algorithm = ConvAlgorithm::tuned;  // every fp32 candidate competes for the layer
        if (request.tune == Tuning::rule) request.tune = Tuning::fast;  // mixed is a measured choice by definition
        const ConvChoice fp32 = choose_conv_algorithm(eng, strm, request);
        const bool to_fp32 = fp32.ms > 0 && int8_ms > 0 && fp32.ms < int8_ms * (1.0 - kMixedPrecisionMargin);
        precision_note[k] = fmt::format("precision (mixed): u8s8 direct {:.3g} ms{}, f32 {} {:.3g} ms{}", int8_ms,
                                        to_fp32 ? "" : " *", fp32.algorithm, fp32.ms, to_fp32 ? " *" : "");
        if (!to_fp32) continue;
        precision_note[k] += "; f32: " + fp32.candidates;  // what the fp32 side measured, shown for the layer
        int8_op[k] = false;
        fp32_forced[k] = fp32.algorithm;
    }
}

}  // namespace resunet
