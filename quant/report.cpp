#include "quant/report.h"

#include <fmt/format.h>

#include <cmath>
#include <map>

#include "graph/fusion.h"

namespace resunet {

double sqnr_db(const std::vector<float>& reference, const std::vector<float>& test) {
    double signal = 0, noise = 0;
    for (size_t i = 0; i < reference.size(); ++i) {
        signal += static_cast<double>(reference[i]) * reference[i];
        const double d = static_cast<double>(test[i]) - reference[i];
        noise += d * d;
    }
    if (noise == 0) return INFINITY;
    return 10.0 * std::log10(signal / noise);
}

double cosine_similarity(const std::vector<float>& a, const std::vector<float>& b) {
    double dot = 0, na = 0, nb = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        dot += static_cast<double>(a[i]) * b[i];
        na += static_cast<double>(a[i]) * a[i];
        nb += static_cast<double>(b[i]) * b[i];
    }
    if (na == 0 || nb == 0) return na == nb ? 1.0 : 0.0;
    return dot / std::sqrt(na * nb);
}

std::vector<LayerQuantReport> compare_layers(const Graph& graph, const TensorMap& weights, QuantOptions options,
                                             const float* images, int batch) {
    return compare_layers(graph, weights, weights, options, images, batch);
}

std::vector<LayerQuantReport> compare_layers(const Graph& graph, const TensorMap& weights, const TensorMap& int8_weights,
                                             QuantOptions options, const float* images, int batch) {
    if (batch != options.micro_batch)
        throw Error(fmt::format("compare_layers: batch {} must equal the micro-batch {} (one pass)", batch, options.micro_batch));
    EngineOptions fp32_options;
    fp32_options.micro_batch = options.micro_batch;
    fp32_options.threads = options.threads;
    fp32_options.keep_values = true;
    Engine fp32(graph, weights, fp32_options);
    options.keep_values = true;
    options.count_saturation = true;
    QuantEngine int8(graph, int8_weights, options);
    const Dims& out = graph.value(graph.output_value()).dims;
    std::vector<float> out32(static_cast<size_t>(num_elements(out) / out[0] * batch)), out8(out32.size());
    fp32.run(images, batch, out32.data());
    std::map<std::string, double> time_ms;
    for (const LayerProfile& p : int8.profile(images, batch, out8.data())) time_ms[p.name] += p.time_ms;
    std::map<std::string, LayerQuantInfo> info;
    for (const LayerQuantInfo& i : int8.layer_info()) info[i.name] = i;
    std::vector<LayerQuantReport> rows;
    for (const FusedOp& op : fuse(graph)) {
        if (op.kind != OpKind::conv && op.kind != OpKind::conv_transpose) continue;
        LayerQuantReport row;
        row.layer = graph.node(op.node).name;
        row.name = graph.value(op.dst).name;
        const LayerQuantInfo& i = info.at(row.layer);
        row.precision = i.precision;
        row.input_scale = i.input_scale;
        row.input_zero_point = i.input_zero_point;
        row.saturated_share = i.saturated_share;
        row.time_ms = time_ms[row.layer];
        const std::vector<float> a = fp32.read_value(row.name);
        const std::vector<float> b = int8.read_value(row.name);
        row.sqnr_db = sqnr_db(a, b);
        row.cosine = cosine_similarity(a, b);
        rows.push_back(row);
    }
    return rows;
}

std::string format_layer_report(const std::vector<LayerQuantReport>& rows) {
    std::string md = "| layer | output | precision | input scale | zero point | SQNR (dB) | cosine | saturated | time (ms) |\n";
    md += "|---|---|---|---|---|---|---|---|---|\n";
    for (const LayerQuantReport& r : rows)
        md += fmt::format("| {} | {} | {} | {:.4g} | {} | {:.1f} | {:.5f} | {:.3f}% | {:.2f} |\n", r.layer, r.name, r.precision,
                          r.input_scale, r.input_zero_point, r.sqnr_db, r.cosine, 100.0 * r.saturated_share, r.time_ms);
    return md;
}

}  // namespace resunet
