// What the int8 engine's tests share (tests/support/quant_checks.h).
#include "tests/support/quant_checks.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <limits>

#include "graph/fusion.h"
#include "graph/init.h"

namespace resunet::quant_checks {

namespace {

// The largest relative error against the fake-quant reference, reported once at the end.
struct Worst {
    double relative = 0;
    std::string where;
};
Worst& worst() {
    static Worst w;
    return w;
}
void note_error(const ErrorStats& e, const std::string& where) {
    if (e.relative() > worst().relative) worst() = {e.relative(), where};
}
class WorstErrorReport : public ::testing::Environment {
  public:
    void TearDown() override {
        std::cout << fmt::format("[ fake-quant ] largest relative error over all comparisons: {:.3g} ({})\n",
                                 worst().relative, worst().where);
    }
};
[[maybe_unused]] ::testing::Environment* const kReport = ::testing::AddGlobalTestEnvironment(new WorstErrorReport);

Dims output_dims(const Graph& graph, int64_t batch) {
    Dims d = graph.value(graph.output_value()).dims;
    d[0] = batch;
    return d;
}

// Compares the engine's layer_info() with the fake-quant rows: same layers, precisions, and (for int8
// layers) exactly the same activation scale and zero point.
void expect_same_layers(const std::vector<LayerQuantInfo>& engine_rows, const std::vector<FakeQuantLayer>& reference_rows,
                        const std::string& label) {
    ASSERT_EQ(engine_rows.size(), reference_rows.size()) << label;
    for (size_t i = 0; i < engine_rows.size(); ++i) {
        const LayerQuantInfo& e = engine_rows[i];
        const FakeQuantLayer& r = reference_rows[i];
        EXPECT_EQ(e.name, r.name) << label;
        EXPECT_EQ(e.precision, r.int8 ? "u8s8" : "f32") << label << " " << e.name;
        if (!r.int8) continue;
        EXPECT_EQ(e.input_scale, r.input.scale) << label << " " << e.name << " range [" << r.input_min << ", "
                                                << r.input_max << "]";
        EXPECT_EQ(e.input_zero_point, r.input.zero_point) << label << " " << e.name;
    }
}

// Whether some int8 layer reads a value computed (through pools and concats) by another int8 layer; then
// a float-rounding difference upstream can move an input across a quantization step, and end-to-end
// agreement with the fake-quant reference is not to float precision (per-op agreement still is).
bool has_int8_chain(const Graph& graph, const std::set<std::string>& keep_fp32) {
    std::vector<bool> derived(graph.values().size(), false);
    for (const resunet::FusedOp& op : resunet::fuse(graph)) {
        const resunet::Node& node = graph.node(op.node);
        bool reads_derived = false;
        for (int src : op.srcs) reads_derived = reads_derived || derived[static_cast<size_t>(src)];
        const bool weighted = op.kind == resunet::OpKind::conv || op.kind == resunet::OpKind::conv_transpose;
        const bool int8 = weighted && graph.value(op.srcs[0]).dims[1] >= 8 && node.out_channels >= 8 && !keep_fp32.count(node.name);
        if (int8 && reads_derived) return true;
        derived[static_cast<size_t>(op.dst)] =
            int8 || reads_derived || (op.residual >= 0 && derived[static_cast<size_t>(op.residual)]);
    }
    return false;
}

}  // namespace

QuantOptions quant_options() {
    QuantOptions options;
    options.threads = kThreads;
    return options;
}

Tensor4 random_tensor(const Dims& dims, uint64_t seed, float low, float high) {
    Tensor4 t = Tensor4::zeros(dims);
    fill_uniform(t.data.data(), t.size(), seed, low, high);
    return t;
}

TensorMap model_weights(const Graph& graph, uint64_t seed) {
    TensorMap weights = resunet::init_weights(graph, seed);
    resunet::randomize_batch_norm_statistics(graph, weights, seed + 1);
    return weights;
}

std::vector<float> run_quant(QuantEngine& engine, const Graph& graph, const Tensor4& input) {
    std::vector<float> out(static_cast<size_t>(resunet::num_elements(output_dims(graph, input.dims[0]))),
                           std::numeric_limits<float>::quiet_NaN());
    engine.run(input.data.data(), static_cast<int>(input.dims[0]), out.data());
    return out;
}

bool all_finite(const std::vector<float>& v) {
    return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// A value of the engine's last pass as a Tensor4 (needs keep_values).
Tensor4 engine_value(QuantEngine& engine, const Graph& graph, const std::string& name, int64_t batch) {
    for (const resunet::Value& v : graph.values()) {
        if (v.name != name) continue;
        Tensor4 t = Tensor4::zeros({batch, v.dims[1], v.dims[2], v.dims[3]});
        t.data = engine.read_value(name);
        EXPECT_EQ(t.size(), resunet::num_elements(t.dims)) << name;
        return t;
    }
    throw Error("test: no value " + name);
}

std::map<std::string, ActivationQuant> to_static_quant(const TensorMap& scales) {
    std::map<std::string, ActivationQuant> out;
    for (const auto& [name, tensor] : scales) {
        const std::string suffix = ".input_scale";
        if (!name.ends_with(suffix)) continue;
        const std::string base = name.substr(0, name.size() - suffix.size());
        int32_t zero = 0;
        std::memcpy(&zero, scales.at(base + ".input_zero_point").bytes.data(), sizeof(zero));
        out[base] = {tensor.f32()[0], zero};
    }
    return out;
}

// Runs the int8 engine pass by pass with keep_values and checks every materialized value (and the
// output) against the fake-quant reference fed the engine's own values of that pass, so every op is
// compared on exactly the inputs it saw. Returns the largest relative error.
// With `calibration`, the engine is calibrated on it first and the reference uses its static scales.
double check_every_op(const std::string& label, const Graph& graph, const TensorMap& weights, const Tensor4& input,
                      QuantOptions options, const Tensor4* calibration) {
    options.keep_values = true;
    QuantEngine engine(graph, weights, options);
    if (calibration) {
        engine.calibrate(calibration->data.data(), static_cast<int>(calibration->dims[0]));
        EXPECT_EQ(engine.mode(), ScaleMode::static_calibrated);
    }
    const int64_t batch = input.dims[0], micro = options.micro_batch;
    const Graph pass_graph = graph.with_batch(micro);
    FakeQuantOptions fq;
    fq.micro_batch = static_cast<int>(micro);
    fq.levels = engine.weight_levels();
    fq.keep_fp32 = options.keep_fp32;
    // Mixed precision measured which layers run fp32: the reference keeps the same ones in fp32.
    for (const LayerQuantInfo& row : engine.layer_info())
        if (options.int8_algorithm == resunet::Int8ConvAlgorithm::mixed && row.precision == "f32") fq.keep_fp32.insert(row.name);
    if (engine.mode() == ScaleMode::static_calibrated) fq.static_quant = to_static_quant(engine.static_scales());
    // keep_values: no value is overwritten in place (a residual operand is copied), so every one is compared.
    const std::vector<std::string> names = engine.materialized_values();
    double largest = 0;
    for (int64_t first = 0; first < batch; first += micro) {
        Tensor4 slice = Tensor4::zeros({micro, input.dims[1], input.dims[2], input.dims[3]});
        std::copy_n(input.data.begin() + static_cast<std::ptrdiff_t>(first * slice.size()), slice.size(), slice.data.begin());
        const std::vector<float> out = run_quant(engine, graph, slice);
        fq.substitute.clear();
        for (const std::string& name : names) fq.substitute[name] = engine_value(engine, pass_graph, name, micro);
        std::vector<FakeQuantLayer> rows;
        std::map<std::string, Tensor4> computed;
        const Tensor4 expected = resunet::reference::run_fake_quant(graph, weights, slice, fq, &rows, &computed);
        const std::string where = fmt::format("{} micro_batch {} pass {}", label, micro, first / micro);
        expect_same_layers(engine.layer_info(), rows, where);
        for (const std::string& name : names) {
            const ErrorStats e = resunet::reference::compare(fq.substitute.at(name).data.data(), computed.at(name));
            note_error(e, where + " " + name);
            largest = std::max(largest, e.relative());
            EXPECT_LE(e.relative(), kFakeQuantTolerance) << where << " value " << name << ": " << e.to_string();
        }
        const ErrorStats e = resunet::reference::compare(out.data(), expected);
        note_error(e, where + " output");
        largest = std::max(largest, e.relative());
        EXPECT_LE(e.relative(), kFakeQuantTolerance) << where << " output: " << e.to_string();
    }
    return largest;
}

// One small graph: every op against fake-quant (micro-batch 2 and 1), the whole output against the
// fake-quant reference end to end, and against fp32 (SQNR). Then static scales after calibration.
void check_graph(const std::string& label, const Graph& graph, uint64_t seed, float low, float high,
                 const std::set<std::string>& keep_fp32) {
    SCOPED_TRACE(label);
    const TensorMap weights = model_weights(graph, seed);
    Dims in_dims = graph.value(graph.input_value()).dims;
    in_dims[0] = 2;
    const Tensor4 input = random_tensor(in_dims, seed + 5, low, high);
    QuantOptions options = quant_options();
    options.keep_fp32 = keep_fp32;
    double per_op = 0;
    for (int micro : {2, 1}) {
        options.micro_batch = micro;
        per_op = std::max(per_op, check_every_op(label, graph, weights, input, options));
    }
    // End to end, no substitution: exact only where no int8 layer reads another int8 layer's output.
    options.micro_batch = 1;
    QuantEngine engine(graph, weights, options);
    const std::vector<float> actual = run_quant(engine, graph, input);
    FakeQuantOptions fq;
    fq.levels = engine.weight_levels();
    fq.keep_fp32 = keep_fp32;
    const Tensor4 fake = resunet::reference::run_fake_quant(graph, weights, input, fq);
    const ErrorStats end_to_end = resunet::reference::compare(actual.data(), fake);
    const Tensor4 fp32 = resunet::reference::run_graph(graph, weights, input);
    const double sqnr = resunet::reference::sqnr_db(actual.data(), fp32.data.data(), fp32.size());
    const double fake_sqnr = resunet::reference::sqnr_db(fake.data.data(), fp32.data.data(), fp32.size());

    // Static: calibrate on four other images of the same distribution, then check every op again.
    options.micro_batch = 2;
    options.keep_values = false;
    QuantEngine calibrated(graph, weights, options);
    const Tensor4 calibration = random_tensor({4, in_dims[1], in_dims[2], in_dims[3]}, seed + 9, low, high);
    calibrated.calibrate(calibration.data.data(), 4);
    EXPECT_EQ(calibrated.mode(), ScaleMode::static_calibrated);
    // The calibration ranges are the min and max over all four images (two passes of two) of each
    // quantized value; values computed by int8 layers differ from the reference's by float rounding.
    FakeQuantOptions whole;
    whole.micro_batch = 2;
    whole.levels = calibrated.weight_levels();
    whole.keep_fp32 = keep_fp32;
    std::vector<FakeQuantLayer> calibration_rows;
    resunet::reference::run_fake_quant(graph, weights, calibration, whole, &calibration_rows);
    const auto static_quant = to_static_quant(calibrated.static_scales());
    for (const FakeQuantLayer& row : calibration_rows) {
        if (!row.int8) continue;
        const resunet::Node& node = *graph.find_node(row.name);
        const std::string value = graph.value(node.inputs[0]).name;
        ASSERT_TRUE(static_quant.count(value)) << value;
        const ActivationQuant expected = resunet::choose_activation_quant(row.input_min, row.input_max);
        EXPECT_NEAR(static_quant.at(value).scale, expected.scale, 1e-5 * expected.scale) << value;
        EXPECT_NEAR(static_quant.at(value).zero_point, expected.zero_point, 1) << value;
    }
    per_op = std::max(per_op, check_every_op(label + " static", graph, weights, input, options, &calibration));
    const bool chained = has_int8_chain(graph, keep_fp32);
    std::cout << fmt::format("  {:<44} in {:<16} per-op vs fake-quant rel {:.2e}; end-to-end rel {:.2e}{}; "
                             "SQNR vs fp32 {:.1f} dB (fake-quant itself {:.1f} dB)\n",
                             label, dims_to_string(input.dims), per_op, end_to_end.relative(),
                             chained ? " (int8 reads int8)" : "", sqnr, fake_sqnr);
    if (!chained) {
        EXPECT_LE(end_to_end.relative(), kFakeQuantTolerance) << label << ": " << end_to_end.to_string();
    }
    EXPECT_GE(sqnr, kOpSqnrDb) << label;
}

// Built once for the binary (compiling engines dominates its run time).
WholeNet& whole_net() {
    static WholeNet net = [] {
        WholeNet n;
        n.graph = resunet::build_resunet({.width = 8, .depth = 4, .height = 64, .width_px = 64});
        n.weights = model_weights(n.graph, 42);
        n.input = random_tensor({2, 3, 64, 64}, 1234, -2.0f, 2.0f);
        n.calibration = random_tensor({4, 3, 64, 64}, 5678, -2.0f, 2.0f);
        resunet::EngineOptions fp32_options;
        fp32_options.threads = kThreads;
        n.fp32_engine = std::make_unique<resunet::Engine>(n.graph, n.weights, fp32_options);
        n.fp32 = n.fp32_logits(n.input);
        return n;
    }();
    return net;
}

}  // namespace resunet::quant_checks
