// The int8 engine's construction (checks, then the lowering of quant/quant_engine.cpp, then the scales an
// int8 file stores) and its run time: one pass, run, profile, calibrate and the accessors.
#include "quant/quant_engine_impl.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "engine/plan_cache.h"
#include "engine/run_guards.h"
#include "graph/safetensors.h"

namespace resunet {

QuantEngine::QuantEngine(const Graph& graph, const TensorMap& weights, const QuantOptions& options)
    : impl_(std::make_unique<Impl>()) {
    const auto start = Clock::now();
    if (options.micro_batch <= 0) throw Error(fmt::format("int8 engine: micro_batch must be positive, got {}", options.micro_batch));
    if (options.threads < 0) throw Error(fmt::format("int8 engine: threads must be >= 0, got {}", options.threads));
    Impl& m = *impl_;
    m.options = options;
    m.graph = graph.with_batch(options.micro_batch);
    m.ops = fuse(m.graph);
    m.levels = resunet::weight_levels();
    for (const std::string& name : options.keep_fp32)
        if (!graph.find_node(name)) throw Error(fmt::format("int8 engine: --keep-fp32 names '{}', which is not a layer", name));
    const bool from_int8_file = is_int8_weights(weights);
    if (!from_int8_file) {
        std::vector<std::pair<std::string, Dims>> expected;
        for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
        check_tensors(weights, expected, "weights");
    }
    const Plan* asked = options.plan.get();
    if (asked && asked->precision != "int8") throw Error(fmt::format("plan {}: an {} plan, not an int8 one", asked->id(), asked->precision));
    if (asked && asked->micro_batch != options.micro_batch)
        throw Error(fmt::format("plan {}: made for micro-batch {}, not {}", asked->id(), asked->micro_batch, options.micro_batch));
    std::map<std::string, ConvAlgo> asked_int8;  // a given plan's int8 layers: name -> algorithm
    if (asked) m.fp32_forced.assign(m.ops.size(), std::string());
    for (const FusedOp& op : m.ops) {
        bool int8 = runs_int8(m.graph, op, options);
        const std::string& name = m.graph.node(op.node).name;
        // An int8 file decides by itself which layers are int8.
        if (from_int8_file && is_weighted(op)) int8 = weights.count(name + ".weight_q") > 0;
        if (asked && op.kind == OpKind::conv) {
            const auto it = asked->layers.find(name);
            if (it == asked->layers.end()) throw Error(fmt::format("plan {}: has no entry for the model's convolution '{}'", asked->id(), name));
            const bool plan_int8 = it->second.precision == "u8s8";
            if (from_int8_file && plan_int8 != int8)
                throw Error(fmt::format("plan {}: runs '{}' in {}, but the int8 file stores it in {}", asked->id(), name,
                                        it->second.precision, int8 ? "u8s8" : "f32"));
            int8 = plan_int8;
            if (int8)
                asked_int8[name] = it->second.algorithm;
            else
                m.fp32_forced[m.int8_op.size()] = std::string(conv_algo_name(it->second.algorithm));
        }
        m.int8_op.push_back(int8);
    }
    const ThreadSetting thread_setting(options.threads);
    try {
        // Mixed precision measures each int8 3x3 layer in both precisions; an int8 file decides its own layers.
        if (!asked && options.int8_algorithm == Int8ConvAlgorithm::mixed && options.tune != Tuning::off && !from_int8_file)
            m.choose_precisions(weights);
        m.plan_values(weights);
        m.allocate();
        // The measured int8 3x3 choices, from the plan cache when it has them for this machine and graph.
        const bool cached = !asked && options.int8_algorithm == Int8ConvAlgorithm::automatic && tuning_measures(options.tune) &&
                            !options.plan_cache.empty();
        PlanKey key;
        std::optional<CachedPlan> plan;
        std::string cache_note;
        if (cached) {
            key = plan_key(m.graph, "u8s8", omp_get_max_threads(), options.micro_batch,
                           fmt::format("int8 3x3 {}: direct/winograd_int8_f23 r{}, weight levels {}, margin {}, bound {}",
                                       options.tune == Tuning::full ? "full" : "fast", kInt8WinogradRevision, m.levels,
                                       kInt8WinogradMargin, kInt8WinogradBound));
            plan = load_plan(options.plan_cache, key, &cache_note);
            if (plan && plan->plan.precision != "int8") {
                cache_note = "damaged: not an int8 plan";
                plan.reset();
            }
        }
        std::optional<std::map<std::string, ConvAlgo>> chosen;
        if (asked) {
            chosen = asked_int8;
        } else if (plan) {
            chosen.emplace();
            for (const auto& [name, layer] : plan->plan.layers)
                if (layer.precision == "u8s8") (*chosen)[name] = layer.algorithm;
        }
        m.lower(weights, from_int8_file, std::move(chosen));
        m.engine_plan = m.plan_of_steps(asked                                                        ? (asked->source.empty() ? "file" : asked->source)
                                 : cached && plan                                             ? "measured (plan cache)"
                                 : (tuning_measures(options.tune) && options.int8_algorithm == Int8ConvAlgorithm::automatic) ||
                                           (options.tune != Tuning::off && options.int8_algorithm == Int8ConvAlgorithm::mixed) ? "measured"
                                 : options.tune == Tuning::rule && options.int8_algorithm == Int8ConvAlgorithm::automatic ? "rule"
                                                                                              : "asked");
        if (asked) {
            for (const auto& [name, layer] : asked->layers)
                if (!m.engine_plan.layers.count(name))
                    throw Error(fmt::format("plan {}: names '{}', which is no convolution of this model", asked->id(), name));
            for (const auto& [name, layer] : m.engine_plan.layers)
                if (asked->layers.at(name).algorithm != layer.algorithm)
                    throw Error(fmt::format("plan {}: '{}' asks for {}, which does not apply to it on this CPU ({} levels)", asked->id(),
                                            name, conv_algo_name(asked->layers.at(name).algorithm), m.levels));
            m.engine_plan.cpu_class = asked->cpu_class;
        }
        if (cached && plan) {
            m.plan_note = fmt::format("from the plan cache ({})", key.filename);
        } else if (cached) {
            try {
                save_plan(options.plan_cache, key, CachedPlan{m.engine_plan, m.conv_summary_text()});
                m.plan_note = fmt::format("measured: {}; saved as {}", cache_note, key.filename);
            } catch (const Error& e) {
                m.plan_note = fmt::format("measured: {}; not saved: {}", cache_note, e.what());
            }
        }
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("int8 engine: oneDNN could not compile the graph: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
    if (from_int8_file) {  // static scales stored with the model switch the engine to static mode
        for (QuantGroup& g : m.groups) {
            const std::string base = m.graph.value(g.value).name;
            const bool has_scale = weights.count(base + ".input_scale") > 0;
            const bool has_zero = weights.count(base + ".input_zero_point") > 0;
            if (has_scale != has_zero)
                throw Error(fmt::format("int8 weights: '{}.input_scale' and '{}.input_zero_point' must come together", base, base));
            if (!has_scale) continue;
            const float scale = int8_tensor(weights, base + ".input_scale", DType::f32, {1}).f32()[0];
            int32_t zero = 0;
            std::memcpy(&zero, int8_tensor(weights, base + ".input_zero_point", DType::s32, {1}).bytes.data(), sizeof(zero));
            if (!(scale >= kMinActivationScale) || !std::isfinite(scale) || zero < 0 || zero > 255)
                throw Error(fmt::format("int8 weights: '{}.input_scale' = {} / zero point {} is invalid (the scale must "
                                        "be finite and at least {:g})",
                                        base, scale, zero, kMinActivationScale));
            g.static_quant = {scale, zero};
            g.have_static = true;
        }
    }
    // Static scales need one per quantized input: from the file (which then implies static mode), or
    // from calibrate() later; until then the engine runs dynamic.
    const bool all_static = !m.groups.empty() &&
                            std::all_of(m.groups.begin(), m.groups.end(), [](const QuantGroup& g) { return g.have_static; });
    m.options.mode = all_static ? ScaleMode::static_calibrated : ScaleMode::dynamic;
    m.compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

QuantEngine::~QuantEngine() = default;

void QuantEngine::run(const float* src, int batch, float* dst) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "int8 engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_run_batch(src, batch, dst, m.options.micro_batch, "int8 engine");
    // The first layers run in fp32 and ReLU turns NaN into 0, so bad input is caught here, before it
    // can turn silently into a plausible mask.
    check_finite_input(src, batch * num_elements(m.input_dims), "int8 engine");
    m.run_batch(src, batch, dst, m.options.micro_batch, nullptr);
}

std::vector<LayerProfile> QuantEngine::profile(const float* src, int batch, float* dst) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "int8 engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_run_batch(src, batch, dst, m.options.micro_batch, "int8 engine");
    check_finite_input(src, batch * num_elements(m.input_dims), "int8 engine");
    std::vector<double> ms(m.steps.size(), 0.0);
    m.run_batch(src, batch, dst, m.options.micro_batch, &ms);
    return m.profile_rows(ms, static_cast<double>(batch / m.options.micro_batch));
}

void QuantEngine::calibrate(const float* src, int batch) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "int8 engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_run_batch(src, batch, src, m.options.micro_batch, "int8 engine");
    check_finite_input(src, batch * num_elements(m.input_dims), "int8 engine");
    std::vector<float> scratch(static_cast<size_t>(num_elements(m.output_dims) * m.options.micro_batch));
    for (QuantGroup& g : m.groups) {
        g.calibrated_min = INFINITY;
        g.calibrated_max = -INFINITY;
        g.have_static = false;
    }
    m.calibrating = true;
    try {
        m.run_batch(src, batch, scratch.data(), m.options.micro_batch, nullptr, /*dst_stride=*/false);
    } catch (...) {
        m.calibrating = false;
        throw;
    }
    m.calibrating = false;
    for (QuantGroup& g : m.groups) {
        g.static_quant = choose_activation_quant(g.calibrated_min, g.calibrated_max);
        g.have_static = true;
    }
    m.options.mode = ScaleMode::static_calibrated;
}

ScaleMode QuantEngine::mode() const { return impl_->options.mode; }

std::vector<LayerQuantInfo> QuantEngine::layer_info() const {
    const Impl& m = *impl_;
    std::vector<LayerQuantInfo> rows;
    for (size_t k = 0; k < m.ops.size(); ++k) {
        if (!is_weighted(m.ops[k])) continue;
        LayerQuantInfo info;
        info.name = m.graph.node(m.ops[k].node).name;
        info.precision = m.int8_op[k] ? "u8s8" : "f32";
        if (m.int8_op[k]) {
            const QuantGroup& g = m.groups[static_cast<size_t>(m.group_of[static_cast<size_t>(m.ops[k].srcs[0])])];
            info.input_scale = g.current.scale;
            info.input_zero_point = g.current.zero_point;
            info.saturated_share = g.counted > 0 ? static_cast<double>(g.saturated) / static_cast<double>(g.counted) : 0.0;
        }
        rows.push_back(info);
    }
    return rows;
}

std::vector<std::string> QuantEngine::materialized_values() const {
    std::vector<std::string> names;
    for (const FusedOp& op : impl_->ops)
        if (is_weighted(op) || op.kind == OpKind::max_pool) names.push_back(impl_->graph.value(op.dst).name);
    return names;
}

std::vector<float> QuantEngine::read_value(const std::string& name) {
    Impl& m = *impl_;
    if (!m.options.keep_values) throw Error("int8 engine: read_value() needs QuantOptions::keep_values");
    for (size_t v = 0; v < m.graph.values().size(); ++v) {
        if (m.graph.value(static_cast<int>(v)).name != name) continue;
        if (m.raw_buffer[v] < 0 && !m.virtual_concat[v])
            throw Error(fmt::format("int8 engine: value '{}' is fused inside an op and never stored", name));
        const Dims& d = m.graph.value(static_cast<int>(v)).dims;
        std::vector<KernelSource> sources;
        m.collect_sources(static_cast<int>(v), 0, sources);
        std::vector<float> nhwc(static_cast<size_t>(num_elements(d)));
        gather_f32(sources, {d[0], d[1], d[2], d[3]}, nhwc.data());
        std::vector<float> nchw(nhwc.size());
        for (int64_t n = 0; n < d[0]; ++n)
            for (int64_t c = 0; c < d[1]; ++c)
                for (int64_t i = 0; i < d[2] * d[3]; ++i)
                    nchw[static_cast<size_t>((n * d[1] + c) * d[2] * d[3] + i)] = nhwc[static_cast<size_t>((n * d[2] * d[3] + i) * d[1] + c)];
        return nchw;
    }
    throw Error(fmt::format("int8 engine: no value named '{}'", name));
}

TensorMap QuantEngine::static_scales() const {
    TensorMap out;
    for (const QuantGroup& g : impl_->groups) {
        if (!g.have_static) continue;
        const std::string base = impl_->graph.value(g.value).name;
        HostTensor s = HostTensor::zeros({1});
        s.f32()[0] = g.static_quant.scale;
        HostTensor z = HostTensor::zeros({1}, DType::s32);
        std::memcpy(z.bytes.data(), &g.static_quant.zero_point, sizeof(int32_t));
        out[base + ".input_scale"] = std::move(s);
        out[base + ".input_zero_point"] = std::move(z);
    }
    return out;
}

EngineMemory QuantEngine::memory_usage() const {
    return impl_->memory_usage();
}
double QuantEngine::compile_ms() const { return impl_->compile_ms; }
int QuantEngine::num_primitives() const { return static_cast<int>(impl_->steps.size()); }
int QuantEngine::weight_levels() const { return impl_->levels; }

const Plan& QuantEngine::plan() const { return impl_->engine_plan; }

Plan QuantEngine::Impl::plan_of_steps(const std::string& source) const {
    Plan p;
    p.precision = "int8";
    p.layout = "nhwc";
    p.micro_batch = options.micro_batch;
    p.source = source;
    p.cpu_class = fmt::format("{}, {}-level int8 weights", effective_isa_name(), levels);
    for (const Step& step : steps) {
        if (!step.op.starts_with("conv") || step.algorithm.empty()) continue;
        PlanLayer layer;
        layer.algorithm = conv_algo_from_name(step.algorithm);
        layer.precision = step.precision;
        layer.why = step.candidates;
        p.layers[step.name] = layer;
    }
    return p;
}

std::string QuantEngine::conv_summary(bool with_source) const {
    std::string text = impl_->conv_summary_text();
    if (with_source && !impl_->plan_note.empty()) text += " (" + impl_->plan_note + ")";
    return text;
}

std::string QuantEngine::Impl::conv_summary_text() const {
    std::vector<std::string> winograd, fp32;
    for (size_t k = 0; k < fp32_forced.size(); ++k)  // layers mixed precision moved to fp32
        if (!fp32_forced[k].empty()) fp32.push_back(graph.node(ops[k].node).name);
    int direct = 0;
    for (const Step& step : steps) {
        if (step.precision != "u8s8" || step.candidates.empty()) continue;  // the int8 3x3 convolutions carry candidates
        if (step.algorithm == "direct")
            ++direct;
        else
            winograd.push_back(step.name);
    }
    std::string text = fmt::format("int8 3x3 convolutions: {} winograd_int8_f23", winograd.size());
    if (!winograd.empty()) text += " (" + fmt::format("{}", fmt::join(winograd, ", ")) + ")";
    text += fmt::format(", {} direct", direct);
    if (!fp32.empty())
        text += fmt::format("; {} run fp32, measured faster here ({})", fp32.size(), fmt::format("{}", fmt::join(fp32, ", ")));
    return text;
}

}  // namespace resunet
