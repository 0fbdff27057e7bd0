// The fp32 engine's construction (a given plan, the rule, the plan cache or engine/plan_measured.cpp), run,
// profile and accessors. The lowering itself is engine/engine.cpp.
#include "engine/engine.h"

#include <fmt/format.h>
#include <omp.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>

#include "engine/arena.h"
#include "engine/conv_tuning.h"
#include "engine/engine_impl.h"
#include "engine/onednn_util.h"
#include "engine/plan_cache.h"
#include "engine/plan_rule.h"
#include "engine/run_guards.h"
#include "graph/safetensors.h"

namespace resunet {

// glibc keeps freed blocks of up to 32 MB in the heap once a block that large was freed (its adaptive mmap
// threshold), so without this each plan measured and dropped while tuning stays resident and the peak RSS of a
// first (uncached) compile is the sum of the stages, not the largest of them.
void return_freed_memory() {
#if defined(__GLIBC__)
    malloc_trim(0);
#endif
}

// The blocked layout's tag where one runs without reference kernels at the graph's widths, else undef.
tag blocked_layout_here(const Graph& graph, const EngineOptions& options) {
    EngineOptions blocked_options = options;
    blocked_options.layout = EngineLayout::blocked;
    Engine::Impl probe;
    probe.options = blocked_options;
    probe.graph = graph.with_batch(options.micro_batch);
    probe.ops = fuse(probe.graph);
    try {
        probe.choose_layout();
    } catch (const Error&) {
        return tag::undef;  // no blocked layout without reference kernels at these widths (5, 6)
    }
    return probe.act_tag;
}

double Engine::Impl::time_pass(int reps) {
    std::vector<float> src(static_cast<size_t>(num_elements(input_dims) * options.micro_batch));
    std::vector<float> dst(static_cast<size_t>(num_elements(output_dims) * options.micro_batch));
    uint32_t x = 12345;
    for (float& v : src) {
        x = x * 1664525u + 1013904223u;
        v = static_cast<float>(x >> 8) * (2.0f / 16777216.0f) - 1.0f;
    }
    run_pass(src.data(), dst.data(), nullptr);  // warm-up: first touch of the arena, kernel caches
    double best = INFINITY;
    for (int r = 0; r < reps; ++r) {
        const auto start = Clock::now();
        run_pass(src.data(), dst.data(), nullptr);
        best = std::min(best, std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    }
    return best;
}

std::string layout_name(memory::format_tag t) {
    switch (t) {
        case tag::nChw16c: return "nChw16c";
        case tag::nChw8c: return "nChw8c";
        case tag::nhwc: return "nhwc";
        default: return "nchw";
    }
}

namespace {

tag tag_of_layout(const std::string& layout) {
    const std::map<std::string, tag> tags = {{"nChw16c", tag::nChw16c}, {"nChw8c", tag::nChw8c}, {"nhwc", tag::nhwc}, {"nchw", tag::nchw}};
    const auto it = tags.find(layout);
    if (it == tags.end()) throw Error(fmt::format("engine: no activation layout '{}'", layout));
    return it->second;
}

// The plan the compiled steps run, with `why` per convolution.
Plan plan_of(const Engine::Impl& m, const std::string& source, const std::map<std::string, std::string>& why) {
    Plan plan;
    plan.precision = "fp32";
    plan.layout = layout_name(m.act_tag);
    plan.micro_batch = m.options.micro_batch;
    plan.source = source;
    plan.cpu_class = effective_isa_name();
    for (const Step& step : m.steps) {
        if (!step.op.starts_with("conv") || step.algorithm.empty()) continue;
        PlanLayer layer;
        layer.algorithm = conv_algo_from_name(step.algorithm);
        const auto w = why.find(step.name);
        layer.why = w != why.end() ? w->second : step.candidates;
        plan.layers[step.name] = layer;
    }
    return plan;
}

// A plan given to run must name exactly the graph's convolutions, and each must run what it says here.
void check_plan_ran(const Plan& asked, const Plan& ran) {
    for (const auto& [name, layer] : asked.layers)
        if (!ran.layers.count(name)) throw Error(fmt::format("plan {}: names '{}', which is no convolution of this model", asked.id(), name));
    for (const auto& [name, layer] : ran.layers) {
        const auto it = asked.layers.find(name);
        if (it == asked.layers.end()) throw Error(fmt::format("plan {}: has no entry for the model's convolution '{}'", asked.id(), name));
        if (it->second.algorithm != layer.algorithm)
            throw Error(fmt::format("plan {}: '{}' asks for {}, which does not apply to it on this CPU ({})", asked.id(), name,
                                    conv_algo_name(it->second.algorithm), effective_isa_name()));
    }
    if (asked.layout != ran.layout)
        throw Error(fmt::format("plan {}: layout {} cannot run here (got {})", asked.id(), asked.layout, ran.layout));
}

// Exactly `asked` (a plan file, or the plan cache's), checked to fit; `source` names where it came from.
std::unique_ptr<Engine::Impl> compile_exactly(const Graph& graph, const TensorMap& weights, const EngineOptions& options,
                                              const Plan& asked, const std::string& source) {
    auto impl = std::make_unique<Engine::Impl>();
    if (asked.precision != "fp32") throw Error(fmt::format("plan {}: an {} plan, not an fp32 one", asked.id(), asked.precision));
    if (asked.micro_batch != options.micro_batch && (asked.micro_batch_changes_numbers() || !fp32_micro_batch_keeps_numbers_here()))
        throw Error(fmt::format("plan {}: made for micro-batch {}, not {} (another micro-batch gives other numbers with "
                                "this plan on this CPU)", asked.id(), asked.micro_batch, options.micro_batch));
    std::map<std::string, std::string> algorithms;
    for (const auto& [name, layer] : asked.layers) algorithms[name] = std::string(conv_algo_name(layer.algorithm));
    impl->compile(graph, weights, options, FixedChoices{tag_of_layout(asked.layout), algorithms});
    std::map<std::string, std::string> why;
    for (const auto& [name, layer] : asked.layers) why[name] = layer.why.empty() ? "plan file" : layer.why;
    for (Step& step : impl->steps)
        if (step.op.starts_with("conv") && asked.layers.count(step.name))
            step.candidates = fmt::format("{} (plan {})", step.algorithm, asked.id());
    impl->plan = plan_of(*impl, source, why);
    check_plan_ran(asked, impl->plan);
    impl->plan.cpu_class = asked.cpu_class;
    return impl;
}

// Tuning::rule: the plan from shapes and the CPU class alone (engine/plan_rule.h). The all-direct plan is lowered
// once for its bytes and shapes, then the plan with the rule's algorithms.
std::unique_ptr<Engine::Impl> compile_by_rule(const Graph& graph, const TensorMap& weights, const EngineOptions& options) {
    tag layout = tag::undef;
    std::string layout_why;
    if (options.layout == EngineLayout::automatic) {
        // The blocked layout where one runs: concats in place, pixel-shuffle deconvolutions, and our Winograd.
        layout = blocked_layout_here(graph, options);
        layout_why = layout != tag::undef ? " (rule: blocked)" : " (rule: oneDNN's, no blocked layout runs here)";
    }
    // The rule sees the plan at micro-batch 1 whatever the run's: fp32 has no per-pass scales, so the algorithms
    // (all that changes the numbers) then depend on the model and the CPU class alone, and every micro-batch
    // gives the same bits (tests/test_plan.cpp). The memory budget bounds the plan at micro-batch 1.
    EngineOptions rule_options = options;
    rule_options.micro_batch = 1;
    auto direct = std::make_unique<Engine::Impl>();
    direct->measure_only_for_rule = true;
    direct->compile(graph, weights, rule_options, FixedChoices{layout, std::map<std::string, std::string>{}});  // all direct
    std::vector<RuleLayer> layers;
    for (const Step& step : direct->steps)
        if (step.op.starts_with("conv") && !step.algorithm.empty())
            layers.push_back({.name = step.name, .in_channels = step.channels[0], .out_channels = step.channels[1],
                              .height = step.out_hw[0], .width = step.out_hw[1], .macs = step.macs,
                              .f43_applies = step.own_applies[0], .f23_applies = step.own_applies[1],
                              .extra_bytes = {step.own_extra_bytes[0], step.own_extra_bytes[1]}});
    const double base = static_cast<double>(direct->weight_store.bytes() + direct->arena.bytes());
    const double budget = options.memory_budget_mb > 0    ? std::max(options.memory_budget_mb * 1e6, base)
                          : options.memory_budget_mb == 0 ? kDefaultMemoryBudgetFactor * base
                                                          : INFINITY;
    const RuleChoice choice = fp32_rule(layers, base, budget);
    std::map<std::string, std::string> algorithms;
    bool all_direct = true;
    for (const auto& [name, a] : choice.algorithms) {
        algorithms[name] = std::string(conv_algo_name(a));
        all_direct = all_direct && a == ConvAlgo::direct;
    }
    std::unique_ptr<Engine::Impl> impl;
    if (all_direct && options.micro_batch == 1) {
        impl = std::move(direct);
    } else {
        const tag chosen = direct->act_tag;
        direct.reset();
        return_freed_memory();
        impl = std::make_unique<Engine::Impl>();
        impl->compile(graph, weights, options, FixedChoices{chosen, algorithms});
    }
    for (Step& step : impl->steps)
        if (auto it = choice.why.find(step.name); it != choice.why.end() && step.op.starts_with("conv")) step.candidates = it->second;
    impl->plan = plan_of(*impl, "rule", choice.why);
    Plan asked = impl->plan;
    for (const auto& [name, a] : choice.algorithms) asked.layers[name].algorithm = a;
    check_plan_ran(asked, impl->plan);  // a rule's choice that did not apply is a bug, not a silent direct
    impl->tuning_summary = fmt::format("layout {}{}; {}", layout_name(impl->act_tag), layout_why, choice.note);
    return impl;
}

}  // namespace

Engine::Engine(const Graph& graph, const TensorMap& weights, const EngineOptions& options)
    : impl_(std::make_unique<Impl>()) {
    const auto start = Clock::now();
    if (options.micro_batch <= 0) throw Error(fmt::format("engine: micro_batch must be positive, got {}", options.micro_batch));
    if (options.threads < 0) throw Error(fmt::format("engine: threads must be >= 0, got {}", options.threads));
    if (graph.input_value() < 0 || graph.output_value() < 0) throw Error("engine: graph has no input or no output");
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(weights, expected, "weights");
    const ThreadSetting thread_setting(options.threads);
    if (options.plan) {
        impl_ = compile_exactly(graph, weights, options, *options.plan, options.plan->source.empty() ? "file" : options.plan->source);
        impl_->compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        impl_->tuning_summary = fmt::format("plan {} as given: layout {}; convolutions: {}", options.plan->id(),
                                            options.plan->layout, options.plan->counts());
        return;
    }
    if (options.tune == Tuning::rule && options.conv_algorithm == ConvAlgorithm::tuned) {
        impl_ = compile_by_rule(graph, weights, options);
        impl_->compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        return;
    }
    const bool tuning = tuning_measures(options.tune) && options.conv_algorithm == ConvAlgorithm::tuned;
    const bool cached = tuning && !options.plan_cache.empty() && options.layout == EngineLayout::automatic;
    PlanKey key;
    std::string cache_note;
    if (cached) {
        key = plan_key(graph.with_batch(options.micro_batch), "f32", omp_get_max_threads(), options.micro_batch,
                       // The candidate list is part of the key: a plan measured before our own Winograd
                       // existed is stale.
                       // The default budget's factor too: a plan saved under another default is stale.
                       fmt::format("{}, memory budget {} MB{}, candidates direct/winograd/winograd_f43/winograd_f23",
                                   options.tune == Tuning::full ? "full" : "fast", options.memory_budget_mb,
                                   options.memory_budget_mb == 0
                                       ? fmt::format(" ({}x the direct plan)", kDefaultMemoryBudgetFactor)
                                       : std::string()));
        if (std::optional<CachedPlan> cached_plan = load_plan(options.plan_cache, key, &cache_note)) {
            try {
                impl_ = compile_exactly(graph, weights, options, cached_plan->plan, "measured (plan cache)");
                impl_->compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
                impl_->tuning_summary = fmt::format("from the plan cache ({}): {}", key.filename, cached_plan->summary);
                return;
            } catch (const Error& e) {  // the engine's own file, not the user's: measure again and replace it
                cache_note = fmt::format("stale: {}", e.what());
                impl_ = std::make_unique<Impl>();
            }
        }
    }
    std::string layouts, budget_note;
    if (!tuning)
        impl_->compile(graph, weights, options);
    else
        impl_ = compile_measured(graph, weights, options, &layouts, &budget_note);
    if (layouts.empty()) layouts = fmt::format("layout {}; ", layout_name(impl_->act_tag));
    int winograd = 0, direct = 0, own_f43 = 0, own_f23 = 0;
    for (const Step& step : impl_->steps) {
        if (!step.op.starts_with("conv")) continue;
        if (step.algorithm == "winograd")
            ++winograd;
        else if (step.algorithm == "winograd_f43")
            ++own_f43;
        else if (step.algorithm == "winograd_f23")
            ++own_f23;
        else
            ++direct;
    }
    // Ours only where it runs, so that a plan without it reads as before.
    std::string own_counts;
    if (own_f43) own_counts += fmt::format(", {} winograd_f43", own_f43);
    if (own_f23) own_counts += fmt::format(", {} winograd_f23", own_f23);
    impl_->tuning_summary =
        fmt::format("{}convolutions: {} winograd, {} direct{}{}", layouts, winograd, direct, own_counts, budget_note);
    impl_->plan = plan_of(*impl_, tuning ? "measured" : options.tune == Tuning::off ? "tune off" : "asked", {});
    if (cached) {
        try {
            save_plan(options.plan_cache, key, CachedPlan{impl_->plan, impl_->tuning_summary});
            impl_->tuning_summary += fmt::format(" (measured: {}; saved as {})", cache_note, key.filename);
        } catch (const Error& e) {
            impl_->tuning_summary += fmt::format(" (measured: {}; not saved: {})", cache_note, e.what());
        }
    }
    impl_->compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

Engine::~Engine() = default;

void Engine::run(const float* src, int batch, float* dst) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_run_batch(src, batch, dst, m.options.micro_batch, "engine");
    check_finite_input(src, batch * num_elements(m.input_dims), "engine");
    m.run_batch(src, batch, dst, m.options.micro_batch, nullptr);
}

std::vector<LayerProfile> Engine::profile(const float* src, int batch, float* dst) {
    Impl& m = *impl_;
    const ConcurrentRunCheck busy(m.running, "engine");
    const ThreadSetting thread_setting(m.options.threads);
    check_run_batch(src, batch, dst, m.options.micro_batch, "engine");
    check_finite_input(src, batch * num_elements(m.input_dims), "engine");
    std::vector<double> step_ms(m.steps.size(), 0.0);
    m.run_batch(src, batch, dst, m.options.micro_batch, &step_ms);
    return m.profile_rows(step_ms, static_cast<double>(batch / m.options.micro_batch));
}

EngineMemory Engine::memory_usage() const {
    return impl_->memory_usage();
}
double Engine::compile_ms() const { return impl_->compile_ms; }
const Dims& Engine::input_dims() const { return impl_->input_dims; }
const Dims& Engine::output_dims() const { return impl_->output_dims; }
int Engine::num_primitives() const { return static_cast<int>(impl_->steps.size()); }
int Engine::num_concat_copies() const { return impl_->concat_copies; }
std::string Engine::isa() const { return effective_isa_name(); }

std::vector<std::string> Engine::materialized_values() const {
    std::vector<std::string> names;
    for (const FusedOp& op : impl_->ops)
        if (impl_->value_storage[static_cast<size_t>(op.dst)] >= 0) names.push_back(impl_->graph.value(op.dst).name);
    return names;
}

std::vector<float> Engine::read_value(const std::string& name) {
    Impl& m = *impl_;
    if (!m.options.keep_values) throw Error("engine: read_value() needs EngineOptions::keep_values");
    for (size_t v = 0; v < m.graph.values().size(); ++v) {
        if (m.graph.value(static_cast<int>(v)).name != name) continue;
        if (m.value_storage[v] < 0 || m.value_desc[v].is_zero())
            throw Error(fmt::format("engine: value '{}' is fused inside an op and never stored", name));
        const Dims& dims = m.graph.value(static_cast<int>(v)).dims;
        std::vector<float> out(static_cast<size_t>(num_elements(dims)));
        memory from = m.value_memory(static_cast<int>(v));
        memory to({to_dnnl_dims(dims), dt::f32, tag::nchw}, m.eng, out.data());
        reorder(from, to).execute(m.strm, from, to);
        m.strm.wait();
        return out;
    }
    throw Error(fmt::format("engine: no value named '{}'", name));
}

std::string Engine::tuning_summary() const { return impl_->tuning_summary; }

const Plan& Engine::plan() const { return impl_->plan; }

std::string Engine::activation_layout() const { return layout_name(impl_->act_tag); }

std::string cpu_model_name() {
    // The first processor's fields: the name alone does not tell apart CPUs that share it ("AMD EPYC" is
    // Zen 2 as family 23, Zen 3 and Zen 4 as family 25), and their best kernels differ.
    std::ifstream info("/proc/cpuinfo");
    std::string name, family, model;
    for (std::string line; std::getline(info, line) && !line.empty();) {
        const size_t colon = line.find(':');
        if (colon == std::string::npos) continue;
        const std::string key = line.substr(0, line.find_last_not_of(" \t", colon - 1) + 1);
        const std::string value = colon + 2 <= line.size() ? line.substr(colon + 2) : std::string();
        if (key == "model name") name = value;
        if (key == "cpu family") family = value;
        if (key == "model") model = value;
    }
    if (name.empty()) return "unknown";
    return family.empty() || model.empty() ? name : fmt::format("{} (family {} model {})", name, family, model);
}

bool fp32_micro_batch_keeps_numbers_here() { return fp32_micro_batch_keeps_numbers(effective_isa_name()); }

std::string onednn_version() {
    const dnnl_version_t* v = dnnl_version();
    return fmt::format("oneDNN {}.{}.{} ({})", v->major, v->minor, v->patch, effective_isa_name());
}

Tuning tuning_from_name(const std::string& name) {
    for (Tuning t : {Tuning::rule, Tuning::off, Tuning::fast, Tuning::full})
        if (name == tuning_name(t)) return t;
    throw Error(fmt::format("tuning: '{}' is none of rule, off, fast, full", name));
}

std::string tuning_name(Tuning tuning) {
    switch (tuning) {
        case Tuning::rule: return "rule";
        case Tuning::off: return "off";
        case Tuning::fast: return "fast";
        case Tuning::full: return "full";
    }
    return "rule";
}

}  // namespace resunet
