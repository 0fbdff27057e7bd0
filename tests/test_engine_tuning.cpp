// The fp32 engine's measured choices (engine/conv_tuning.h, EngineOptions::tune): every algorithm the
// engine may choose against the plain reference, per op and for the whole network; plan against plan;
// the candidates a tuned plan records; a wrong candidate that must never win on speed; and the tuner's
// protocol itself (engine/candidate_trial.h), which the int8 engine and the trainer measure with too.
//
// Where oneDNN has no Winograd kernel (AVX2, or ONEDNN_MAX_CPU_ISA=AVX2), the Winograd plans fall back to
// direct convolutions; the tests then check that fallback instead, so they hold on every CPU class.
#include <gtest/gtest.h>

#include <fmt/format.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/candidate_trial.h"
#include "engine/conv_tuning.h"
#include "engine/engine.h"
#include "engine/onednn_compat.h"
#include "graph/graph.h"
#include "engine/plan_cache.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "support/reference.h"

namespace {

using resunet::ConvAlgorithm;
using resunet::Engine;
using resunet::EngineLayout;
using resunet::EngineOptions;
using resunet::Graph;
using resunet::TensorMap;
using resunet::Tuning;
using resunet::reference::ErrorStats;
using resunet::reference::Tensor4;

constexpr double kTolerance = 1e-4;  // relative to max|reference|, as test_engine.cpp

TensorMap weights_for(const Graph& graph, uint64_t seed) {
    TensorMap weights = resunet::init_weights(graph, seed);
    resunet::randomize_batch_norm_statistics(graph, weights, seed + 1);
    return weights;
}

Tensor4 input_for(const Graph& graph, int batch, uint64_t seed) {
    resunet::Dims dims = graph.value(graph.input_value()).dims;
    dims[0] = batch;
    Tensor4 input = Tensor4::zeros(dims);
    resunet::fill_uniform(input.data.data(), input.size(), seed, -2.0f, 2.0f);
    return input;
}

struct Outcome {
    std::vector<float> out;
    std::vector<resunet::LayerProfile> rows;
    std::string layout;
    std::string summary;
    int winograd_steps = 0;
};

// A layer the memory budget moved to its leaner runner-up ("... -> winograd_f23 (memory budget)") runs it.
void expect_budget_fallback_runs(const resunet::LayerProfile& row) {
    const size_t arrow = row.candidates.find(" -> winograd");
    if (arrow == std::string::npos) return;
    const size_t start = arrow + 4;
    const std::string named = row.candidates.substr(start, row.candidates.find(' ', start) - start);
    EXPECT_EQ(row.algorithm, named) << row.name << ": " << row.candidates;
    EXPECT_NE(row.candidates.find("(memory budget)", start), std::string::npos) << row.candidates;
}

Outcome run_plan(const Graph& graph, const TensorMap& weights, const Tensor4& input, const EngineOptions& options) {
    Engine engine(graph, weights, options);
    Outcome o;
    const Tensor4 shape = resunet::reference::run_graph(graph, weights, input);  // output dims
    o.out.assign(shape.data.size(), std::nanf(""));
    o.rows = engine.profile(input.data.data(), static_cast<int>(input.dims[0]), o.out.data());
    o.layout = engine.activation_layout();
    o.summary = engine.tuning_summary();
    for (const resunet::LayerProfile& row : o.rows) {
        if (row.algorithm == "winograd") {
            ++o.winograd_steps;
            EXPECT_NE(row.kernel.find("wino"), std::string::npos) << row.name << " says winograd but runs " << row.kernel;
        } else {
            EXPECT_EQ(row.kernel.find("wino"), std::string::npos) << row.name << " runs " << row.kernel;
        }
    }
    return o;
}

// Winograd where oneDNN has it, in the blocked layout it needs; the plain reference decides.
TEST(EngineTuning, WinogradConvolutionsMatchTheReferencePerOp) {
    struct Case {
        int cin, cout, size;
        bool bn_relu, residual;
    };
    const Case cases[] = {{16, 16, 14, false, false}, {32, 32, 28, true, false}, {64, 64, 14, true, true},
                          {32, 64, 16, true, false},  {64, 32, 12, false, true}};
    int winograd_layers = 0;
    uint64_t seed = 10;
    for (const Case& c : cases) {
        Graph g;
        int x = g.relu("pre.relu", g.input("input", {1, c.cin, c.size, c.size}));
        int y = g.conv("conv", x, c.cout, 3, 1, 1);
        if (c.bn_relu) y = g.relu("conv.relu", g.batch_norm("conv.bn", y));
        if (c.residual) {
            const int shortcut = g.conv("shortcut", x, c.cout, 1, 1, 0);
            y = g.relu("out.relu", g.add("add", g.conv("conv2", y, c.cout, 3, 1, 1), shortcut));
        }
        g.set_output(y);
        const TensorMap weights = weights_for(g, ++seed);
        const Tensor4 input = input_for(g, 2, seed + 100);
        const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
        for (ConvAlgorithm algorithm : {ConvAlgorithm::direct, ConvAlgorithm::winograd}) {
            EngineOptions options;
            options.layout = EngineLayout::blocked;
            options.tune = Tuning::off;
            options.conv_algorithm = algorithm;
            const Outcome o = run_plan(g, weights, input, options);
            const ErrorStats e = resunet::reference::compare(o.out.data(), expected);
            const std::string label = fmt::format("conv3x3 {}->{} at {}{}{} {} ({})", c.cin, c.cout, c.size,
                                                  c.bn_relu ? " +bn+relu" : "", c.residual ? " +residual" : "",
                                                  algorithm == ConvAlgorithm::winograd ? "winograd" : "direct", o.layout);
            std::cout << fmt::format("  {:<58} {} Winograd steps; {}\n", label, o.winograd_steps, e.to_string());
            EXPECT_LE(e.relative(), kTolerance) << label << ": " << e.to_string();
            if (algorithm == ConvAlgorithm::direct) {
                EXPECT_EQ(o.winograd_steps, 0) << label;
            } else {
                winograd_layers += o.winograd_steps;
            }
        }
    }
    std::cout << fmt::format("  {} Winograd layers ran on this CPU ({}); 0 means oneDNN has no Winograd kernel here\n",
                             winograd_layers, resunet::onednn_version());
}

// The whole network under every plan the engine may pick: each against the reference and against the
// untuned plan (plan against plan).
TEST(EngineTuning, WholeNetworkPlanAgainstPlan) {
    for (const auto& [width, depth, size] : {std::tuple{16, 3, 32}, std::tuple{32, 2, 32}}) {
        resunet::ResUNetConfig config;
        config.width = width;
        config.depth = depth;
        config.height = config.width_px = size;
        const Graph g = resunet::build_resunet(config);
        const TensorMap weights = weights_for(g, static_cast<uint64_t>(width * 10 + depth));
        const Tensor4 input = input_for(g, 2, 77);
        const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
        EngineOptions untuned;
        untuned.tune = Tuning::off;
        const Outcome base = run_plan(g, weights, input, untuned);
        EXPECT_EQ(base.winograd_steps, 0);
        struct Plan {
            const char* label;
            EngineOptions options;
        };
        std::vector<Plan> plans;
        for (Tuning tune : {Tuning::fast, Tuning::full}) {
            EngineOptions o;
            o.tune = tune;
            plans.push_back({tune == Tuning::fast ? "tuned fast" : "tuned full", o});
        }
        EngineOptions winograd;
        winograd.tune = Tuning::off;
        winograd.layout = EngineLayout::blocked;
        winograd.conv_algorithm = ConvAlgorithm::winograd;
        plans.push_back({"winograd everywhere (blocked)", winograd});
        EngineOptions tuned_blocked;
        tuned_blocked.layout = EngineLayout::blocked;
        tuned_blocked.micro_batch = 2;
        tuned_blocked.tune = Tuning::fast;
        plans.push_back({"tuned, blocked, micro-batch 2", tuned_blocked});
        for (const Plan& plan : plans) {
            const Outcome o = run_plan(g, weights, input, plan.options);
            const ErrorStats vs_reference = resunet::reference::compare(o.out.data(), expected);
            const ErrorStats vs_base =
                resunet::reference::compare(o.out.data(), base.out.data(), static_cast<int64_t>(base.out.size()));
            std::cout << fmt::format("  w{} d{} {}: {:<32} {} | vs reference {} | vs untuned {}\n", width, depth, size,
                                     plan.label, o.summary, vs_reference.to_string(), vs_base.to_string());
            EXPECT_LE(vs_reference.relative(), kTolerance) << plan.label << ": " << vs_reference.to_string();
            EXPECT_LE(vs_base.relative(), kTolerance) << plan.label << ": " << vs_base.to_string();
            EXPECT_NE(o.summary.find(fmt::format("{} winograd", o.winograd_steps)), std::string::npos) << o.summary;
        }
    }
}

// A tuned plan says what it tried: every measured convolution lists direct first, marks exactly one
// choice, and a chosen Winograd passed its check against direct.
TEST(EngineTuning, TunedPlanRecordsItsCandidates) {
    resunet::ResUNetConfig config;
    config.width = 16;
    config.depth = 3;
    config.height = config.width_px = 32;
    const Graph g = resunet::build_resunet(config);
    const TensorMap weights = weights_for(g, 5);
    const Tensor4 input = input_for(g, 1, 6);
    EngineOptions options;
    options.layout = EngineLayout::blocked;
    options.tune = Tuning::fast;  // measured (the default rule times nothing)
    const Outcome o = run_plan(g, weights, input, options);
    int measured = 0;
    for (const resunet::LayerProfile& row : o.rows) {
        if (!row.op.starts_with("conv")) {
            EXPECT_TRUE(row.candidates.empty()) << row.name;
            continue;
        }
        // "winograd" is oneDNN's; "winograd_f43" / "winograd_f23" ours (engine/winograd_own.h).
        EXPECT_TRUE(row.algorithm == "direct" || row.algorithm.starts_with("winograd")) << row.name << ": " << row.algorithm;
        if (row.candidates.empty()) {
            EXPECT_EQ(row.algorithm, "direct") << row.name;  // nothing else to try for this layer on this CPU
            continue;
        }
        ++measured;
        std::cout << fmt::format("  {:<14} {:<26} {}\n", row.name, row.kernel, row.candidates);
        EXPECT_TRUE(row.candidates.starts_with("direct ")) << row.candidates;
        EXPECT_EQ(std::count(row.candidates.begin(), row.candidates.end(), '*'), 1) << row.candidates;
        const bool winograd_chosen = row.candidates.find("*") > row.candidates.find("winograd");
        // The memory budget may leave a faster Winograd layer direct, or on its leaner runner-up; it says so.
        const bool left_direct = row.candidates.find("-> direct (memory budget)") != std::string::npos;
        EXPECT_EQ(winograd_chosen && !left_direct, row.algorithm != "direct") << row.candidates;
        expect_budget_fallback_runs(row);
        EXPECT_EQ(row.candidates.find("REJECTED"), std::string::npos) << row.candidates;
    }
    std::cout << fmt::format("  {} convolutions measured; plan: {}\n", measured, o.summary);
    if (o.winograd_steps > 0) {
        EXPECT_GT(measured, 0);
    }
}

// measure_conv itself: a candidate that computes something else (here the same convolution with a 1%
// output scale, standing in for a wrong kernel) is rejected before it is timed, so it cannot win however
// fast it is; a candidate identical to direct passes with error 0.
TEST(EngineTuning, AWrongCandidateNeverWins) {
    using namespace dnnl;
    using tag = memory::format_tag;
    using dt = memory::data_type;
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    const memory::dim c = 16, hw = 12;
    memory::desc act({1, c, hw, hw}, dt::f32, tag::nchw);
    memory::desc weights_any({c, c, 3, 3}, dt::f32, tag::any);
    memory::desc bias_desc({c}, dt::f32, tag::x);
    auto make = [&](float output_scale) {
        primitive_attr attr;
        attr.set_scratchpad_mode(scratchpad_mode::user);
        if (output_scale != 1.0f) {
            post_ops post;
            resunet::onednn::append_eltwise(post, algorithm::eltwise_linear, output_scale, 0.0f);
            attr.set_post_ops(post);
        }
        return resunet::onednn::conv_forward(eng, prop_kind::forward_inference, algorithm::convolution_direct, act,
                                             weights_any, bias_desc, act, {1, 1}, {1, 1}, {1, 1}, attr);
    };
    std::vector<float> w(static_cast<size_t>(c * c * 9)), b(static_cast<size_t>(c));
    resunet::fill_uniform(w.data(), static_cast<int64_t>(w.size()), 1, -0.3f, 0.3f);
    resunet::fill_uniform(b.data(), static_cast<int64_t>(b.size()), 2, -0.5f, 0.5f);
    memory weights({{c, c, 3, 3}, dt::f32, tag::oihw}, eng, w.data());
    memory bias(bias_desc, eng, b.data());
    std::vector<resunet::ConvCandidate> candidates = {
        {"direct", make(1.0f)}, {"wrong", make(1.01f), resunet::kWinogradRelativeBound}, {"same", make(1.0f), 1e-6}};
    const resunet::ConvTrial trial = resunet::measure_conv(eng, strm, candidates, weights, bias, 2, /*margin=*/-1e9);
    std::cout << "  " << trial.summary << "\n";
    EXPECT_FALSE(candidates[1].passed);
    EXPECT_NEAR(candidates[1].error, 0.01, 0.002);  // the 1% scale, measured
    EXPECT_EQ(candidates[1].ms, -1) << "a rejected candidate is never timed";
    EXPECT_TRUE(candidates[2].passed);
    EXPECT_EQ(candidates[2].error, 0);
    // A margin of -1e9: any passed candidate after direct wins, so the choice shows that only passed ones compete.
    EXPECT_EQ(trial.chosen, 2u);
    EXPECT_NE(trial.summary.find("wrong (REJECTED"), std::string::npos);
}

// The tuner's one protocol (engine/candidate_trial.h), which the fp32 engine, the int8 engine and the trainer
// all measure with, on synthetic candidates whose outputs and run counts are known: a wrong or NaN candidate
// is never timed and never chosen even when any passed one would win; the margin, the forced candidate, the
// number of runs, an unavailable candidate, and that only the winner keeps its kernel.
TEST(EngineTuning, TrialProtocol) {
    using resunet::TrialCandidate;
    using resunet::TrialRun;
    const std::vector<float> truth = {1.0f, -2.0f, 4.0f};
    struct Probe {
        std::vector<float> out;
        int runs = 0, resets = 0;
        bool alive = false;  // its "kernel", built by prepare, released by drop
    };
    auto make = [&](std::vector<Probe>& probes, const std::vector<std::vector<float>>& outputs,
                    const std::vector<double>& bounds) {
        probes.assign(outputs.size(), Probe{});
        std::vector<TrialCandidate> c(outputs.size());
        for (size_t i = 0; i < outputs.size(); ++i) {
            probes[i].out = outputs[i];
            c[i].name = fmt::format("c{}", i);
            c[i].bound = bounds[i];
            c[i].drop = [&probes, i] { probes[i].alive = false; };
            c[i].prepare = [&probes, i]() -> std::optional<TrialRun> {
                Probe& p = probes[i];
                if (p.out.empty()) return std::nullopt;  // unavailable here
                p.alive = true;
                return TrialRun{[&p] { ++p.resets; }, [&p] { ++p.runs; }, [&p] { return p.out; }};
            };
        }
        return c;
    };
    const std::vector<float> off = {1.0f, -2.0f, 4.04f};  // 1% of the range off
    const std::vector<float> nan = {1.0f, std::nanf(""), 4.0f};
    std::vector<Probe> p;

    // Any passed candidate after the reference wins with a margin of -1e9, so the choice is the last passed one.
    auto c = make(p, {truth, truth, off, nan}, {0, 1e-6, 1e-3, 1.0});
    resunet::TrialResult r = resunet::run_trial(c, {.reps = 3, .margin = -1e9});
    std::cout << "  " << r.summary << "\n";
    EXPECT_EQ(r.chosen, 1u);
    EXPECT_TRUE(c[1].passed);
    EXPECT_EQ(c[1].error, 0);
    EXPECT_FALSE(c[2].passed);
    EXPECT_NEAR(c[2].error, 0.01, 1e-6);
    EXPECT_EQ(c[2].ms, -1) << "a rejected candidate is never timed";
    EXPECT_FALSE(c[3].passed) << "NaN passes no bound";
    EXPECT_EQ(p[2].runs, 1);  // the check run only
    EXPECT_EQ(p[0].runs, 4);  // the check run and 3 timed runs, each after a reset
    EXPECT_EQ(p[0].resets, 4);
    EXPECT_TRUE(p[1].alive);
    EXPECT_FALSE(p[2].alive);
    EXPECT_FALSE(p[3].alive);
    EXPECT_NE(r.summary.find("c2 (REJECTED: err 1.0e-02)"), std::string::npos) << r.summary;
    EXPECT_NE(r.summary.find("(err 0.0e+00) *"), std::string::npos) << r.summary;

    // Later winners supersede earlier ones, whose kernels are dropped; an unavailable one is skipped.
    c = make(p, {truth, truth, {}, truth}, {0, 1e-6, 1e-6, 1e-6});
    r = resunet::run_trial(c, {.reps = 1, .margin = -1e9});
    EXPECT_EQ(r.chosen, 3u);
    EXPECT_FALSE(p[1].alive) << "superseded";
    EXPECT_TRUE(p[3].alive);
    EXPECT_FALSE(c[2].available);
    EXPECT_NE(r.summary.find("c2 (unavailable)"), std::string::npos) << r.summary;

    // A margin of 100%: nothing can be that much faster, so the reference stays, unless a candidate is forced.
    c = make(p, {truth, truth, truth}, {0, 1e-6, 1e-6});
    EXPECT_EQ(resunet::run_trial(c, {.reps = 2, .margin = 1.0}).chosen, 0u);
    EXPECT_FALSE(p[1].alive);
    EXPECT_FALSE(p[2].alive);
    c = make(p, {truth, truth, truth}, {0, 1e-6, 1e-6});
    EXPECT_EQ(resunet::run_trial(c, {.reps = 2, .margin = 1.0, .forced = 2}).chosen, 2u);
    EXPECT_FALSE(p[1].alive) << "not the forced one";
    c = make(p, {truth, off}, {0, 1e-6});
    EXPECT_EQ(resunet::run_trial(c, {.reps = 2, .margin = 1.0, .forced = 1}).chosen, 0u) << "a forced wrong kernel";

    // reps 0: the check run's own time; slow_ms: one timed run after a check run slower than it.
    c = make(p, {truth, truth}, {0, 1e-6});
    r = resunet::run_trial(c, {.reps = 0});
    EXPECT_EQ(p[0].runs, 1);
    EXPECT_GE(c[0].ms, 0);
    c = make(p, {truth, truth}, {0, 1e-6});
    resunet::run_trial(c, {.reps = 5, .slow_ms = 1e-12});
    EXPECT_EQ(p[0].runs, 2);

    // The reference must exist; the error measure itself.
    c = make(p, {{}, truth}, {0, 1e-6});
    EXPECT_THROW(resunet::run_trial(c, {}), resunet::Error);
    EXPECT_TRUE(std::isinf(resunet::trial_relative_error({1.0f}, truth)));
    EXPECT_FLOAT_EQ(resunet::trial_relative_error({0.5f, 0.0f}, {0.0f, 0.0f}), 0.5f);
}

// The memory budget: a plan never exceeds it (unless the all-direct plan alone does, which is the floor),
// a tighter budget keeps fewer Winograd layers, and every budgeted plan still matches the reference.
TEST(EngineTuning, MemoryBudgetBoundsThePlan) {
    resunet::ResUNetConfig config;
    config.width = 32;
    config.depth = 2;
    config.height = config.width_px = 32;
    const Graph g = resunet::build_resunet(config);
    const TensorMap weights = weights_for(g, 12);
    const Tensor4 input = input_for(g, 1, 13);
    const Tensor4 expected = resunet::reference::run_graph(g, weights, input);
    EngineOptions direct_options;
    direct_options.tune = Tuning::off;
    direct_options.layout = EngineLayout::blocked;
    // Measured plans count every engine byte; the rule counts weights and arena (the scratchpad grows with the
    // thread count, and the rule's choice must not).
    const resunet::EngineMemory direct_memory = Engine(g, weights, direct_options).memory_usage();
    int fell_back = 0;
    for (Tuning tune : {Tuning::fast, Tuning::rule}) {
    auto counted = [&](const resunet::EngineMemory& m) { return tune == Tuning::rule ? m.weights_bytes + m.arena_bytes : m.total(); };
    const size_t direct_bytes = counted(direct_memory);
    // 1.05x and 1.2x of the direct plan: tight enough that F(4x4) layers may fall back to F(2x2) (where
    // F(2x2) measures faster than direct) or stay direct.
    for (double budget_mb : {-1.0, 0.0, 1.2 * static_cast<double>(direct_bytes) / 1e6,
                             1.05 * static_cast<double>(direct_bytes) / 1e6, 1e-3}) {
        EngineOptions options;
        options.layout = EngineLayout::blocked;
        options.memory_budget_mb = budget_mb;
        options.tune = tune;
        Engine engine(g, weights, options);
        const Outcome o = run_plan(g, weights, input, options);
        const size_t bytes = counted(engine.memory_usage());
        const double limit = budget_mb < 0 ? INFINITY
                             : budget_mb == 0 ? resunet::kDefaultMemoryBudgetFactor * static_cast<double>(direct_bytes)
                                              : std::max(budget_mb * 1e6, static_cast<double>(direct_bytes));
        std::cout << fmt::format("  {} budget {:>8.3f} MB: {:.2f} MB (direct plan {:.2f} MB), {}\n", resunet::tuning_name(tune),
                                 budget_mb, bytes / 1e6, direct_bytes / 1e6, engine.tuning_summary());
        // The tuner estimates from the measured figures; allow 1% for the bias and alignment it does not see.
        EXPECT_LE(static_cast<double>(bytes), limit * 1.01) << engine.tuning_summary();
        const ErrorStats e = resunet::reference::compare(o.out.data(), expected);
        EXPECT_LE(e.relative(), kTolerance) << budget_mb << " MB: " << e.to_string();
        for (const resunet::LayerProfile& row : o.rows) {
            expect_budget_fallback_runs(row);
            fell_back += row.candidates.find(" -> winograd") != std::string::npos;
        }
        if (budget_mb > 0 && budget_mb < 1) {
            EXPECT_EQ(o.winograd_steps, 0) << "a budget below the direct plan keeps none";
            EXPECT_EQ(bytes, direct_bytes);
        }
    }
    }
    std::cout << fmt::format("  {} layer plans fell back to a leaner Winograd tile under a budget\n", fell_back);
}

// The plan cache: a second engine reuses the first one's measured plan (same layout and algorithms, same
// output); a damaged, truncated or stale file is measured again and replaced; another micro-batch is
// another key; a cache that cannot be written leaves a working engine.
TEST(EnginePlanCache, ReusedDamagedTruncatedStaleAndUnwritable) {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / fmt::format("resunet_test_plan_cache_{}", ::getpid());
    fs::remove_all(dir);
    resunet::ResUNetConfig config;
    config.width = 16;
    config.depth = 3;
    config.height = config.width_px = 32;
    const Graph g = resunet::build_resunet(config);
    const TensorMap weights = weights_for(g, 9);
    const Tensor4 input = input_for(g, 2, 10);
    EngineOptions options;
    options.tune = Tuning::fast;  // measured: the default rule caches nothing
    options.plan_cache = dir.string();

    const Outcome first = run_plan(g, weights, input, options);
    std::cout << "  first:  " << first.summary << "\n";
    EXPECT_NE(first.summary.find("measured: no cached plan; saved as plan-f32-"), std::string::npos) << first.summary;
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(dir)) files.push_back(entry.path());
    ASSERT_EQ(files.size(), 1u);
    const fs::path file = files[0];

    auto expect_same_plan = [&](const Outcome& o, const std::string& label) {
        EXPECT_EQ(o.layout, first.layout) << label;
        ASSERT_EQ(o.rows.size(), first.rows.size()) << label;
        for (size_t i = 0; i < o.rows.size(); ++i) EXPECT_EQ(o.rows[i].algorithm, first.rows[i].algorithm) << label << " " << o.rows[i].name;
        const ErrorStats e = resunet::reference::compare(o.out.data(), first.out.data(), static_cast<int64_t>(first.out.size()));
        EXPECT_LE(e.relative(), 1e-6) << label << ": " << e.to_string();
    };
    const Outcome second = run_plan(g, weights, input, options);
    std::cout << "  second: " << second.summary << "\n";
    EXPECT_TRUE(second.summary.starts_with("from the plan cache (" + file.filename().string() + ")")) << second.summary;
    expect_same_plan(second, "from the cache");

    auto read = [&] {
        std::ifstream in(file, std::ios::binary);
        return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    };
    auto write = [&](const std::string& text) {
        std::ofstream out(file, std::ios::binary | std::ios::trunc);
        out << text;
    };
    const std::string good = read();
    auto expect_retuned = [&](const std::string& text, const std::string& reason) {
        write(text);
        const Outcome o = run_plan(g, weights, input, options);
        std::cout << "  " << reason << ": " << o.summary << "\n";
        EXPECT_NE(o.summary.find("measured: " + reason), std::string::npos) << o.summary;
        const ErrorStats e = resunet::reference::compare(o.out.data(), resunet::reference::run_graph(g, weights, input));
        EXPECT_LE(e.relative(), kTolerance) << reason << ": " << e.to_string();
        // Replaced by a good file: the next engine takes it from the cache.
        EXPECT_TRUE(run_plan(g, weights, input, options).summary.starts_with("from the plan cache")) << reason;
    };
    std::string flipped = good;
    flipped[flipped.find("\"layout\"") + 12] ^= 0x01;  // inside the layout's value
    expect_retuned(flipped, "damaged: checksum mismatch");
    expect_retuned(good.substr(0, good.size() / 2), "damaged");
    expect_retuned("", "damaged");
    // Another machine's plan under this name, with a valid checksum: stale.
    nlohmann::json stale = nlohmann::json::parse(good);
    stale["key"]["cpu"] = "Some Other CPU";
    const std::string body = stale["key"].dump() + stale["plan"].dump() + stale["summary"].dump();
    stale["checksum"] = fmt::format("{:08x}", resunet::crc32(reinterpret_cast<const uint8_t*>(body.data()), body.size()));
    expect_retuned(stale.dump(), "stale");

    // Another micro-batch is another key: measured, and a second file.
    EngineOptions micro2 = options;
    micro2.micro_batch = 2;
    EXPECT_NE(run_plan(g, weights, input, micro2).summary.find("measured: no cached plan"), std::string::npos);
    EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 2);

    // A cache folder that cannot be made (below a regular file): the engine works and says so.
    EngineOptions unwritable = options;
    unwritable.plan_cache = (file / "sub").string();
    const Outcome o = run_plan(g, weights, input, unwritable);
    EXPECT_NE(o.summary.find("not saved"), std::string::npos) << o.summary;
    fs::remove_all(dir);
}

// `resunet plan`: prints the plan and its candidates, measures once and then reads the cache, and gives
// one-line errors for bad input.
TEST(PlanCommand, PrintsThePlanAndUsesTheCache) {
    namespace fs = std::filesystem;
    const fs::path binary = fs::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet";
    if (!fs::exists(binary)) GTEST_SKIP() << binary << " is not built";
    const fs::path dir = fs::temp_directory_path() / fmt::format("resunet_test_plan_command_{}", ::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    auto run = [&](const std::string& arguments, std::string* out, std::string* err) {
        const std::string command = binary.string() + " " + arguments + " >" + (dir / "stdout").string() + " 2>" +
                                    (dir / "stderr").string();
        const int status = std::system(command.c_str());
        auto read = [](const fs::path& path) {
            std::ifstream in(path);
            return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        };
        *out = read(dir / "stdout");
        *err = read(dir / "stderr");
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    };
    resunet::ResUNetConfig config;
    config.width = 16;
    config.depth = 2;
    config.height = config.width_px = 32;
    const Graph g = resunet::build_resunet(config);
    const fs::path model = dir / "m.safetensors";
    resunet::save_safetensors(model.string(), weights_for(g, 3), resunet::resunet_metadata(config));
    const std::string cache = (dir / "plans").string();
    std::string out, err;
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --tune fast --plan-cache " + cache, &out, &err), 0) << err;
    std::cout << out;
    EXPECT_NE(out.find("measured: no cached plan"), std::string::npos) << out;
    EXPECT_NE(out.find("e1.conv_a"), std::string::npos) << out;
    EXPECT_NE(out.find("candidates measured at compile time"), std::string::npos) << out;
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --tune fast --plan-cache " + cache, &out, &err), 0) << err;
    EXPECT_NE(out.find("plan: from the plan cache"), std::string::npos) << out;
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --tune fast --retune --plan-cache " + cache, &out, &err), 0) << err;
    EXPECT_NE(out.find("measured: no cached plan"), std::string::npos) << out;
    // The default plan (rule): nothing measured, saved with --save-plan and run again with --plan on another
    // thread count: the same plan id.
    const std::string saved = (dir / "p.json").string();
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --save-plan " + saved, &out, &err), 0) << err;
    const size_t id_at = out.find("plan id: p");
    ASSERT_NE(id_at, std::string::npos) << out;
    const std::string id = out.substr(id_at + 9, 9);
    EXPECT_NE(out.find("(rule;"), std::string::npos) << out;
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 2 --plan " + saved, &out, &err), 0) << err;
    EXPECT_NE(out.find("plan id: " + id), std::string::npos) << out;
    EXPECT_EQ(run("plan --model " + model.string() + " --save-plan " + saved, &out, &err), 2) << "exists, no --overwrite";
    EXPECT_EQ(run("plan --model " + model.string() + " --precision int8 --plan " + saved, &out, &err), 2) << "an fp32 plan";
    EXPECT_NE(err.find("fp32 plan"), std::string::npos) << err;
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --tune off --plan-cache none", &out, &err), 0) << err;
    EXPECT_NE(out.find("convolutions: 0 winograd"), std::string::npos) << out;
    // --micro-batch auto: the candidates dividing --batch, each timed and checked; the plan runs the choice.
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --tune fast --plan-cache " + cache + " --micro-batch auto --batch 4",
                  &out, &err), 0) << err;
    const size_t line = out.find("micro-batch: ");
    ASSERT_NE(line, std::string::npos) << out;
    const int chosen = std::atoi(out.c_str() + line + 13);
    EXPECT_TRUE(chosen == 1 || chosen == 2 || chosen == 4) << out;
    EXPECT_NE(out.find("(measured on a batch of 4: micro-batch 1 "), std::string::npos) << out;
    EXPECT_NE(out.find(fmt::format("{} ", chosen), line + 13), std::string::npos) << out;
    EXPECT_NE(out.find(" *"), std::string::npos) << out;
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --plan-cache none --micro-batch 2", &out, &err), 0) << err;
    EXPECT_NE(out.find("micro-batch: 2\n"), std::string::npos) << out;
    // The int8 plan: every layer's precision; an fp32 model is quantized with dynamic scales.
    ASSERT_EQ(run("plan --model " + model.string() + " --threads 1 --precision int8", &out, &err), 0) << err;
    EXPECT_NE(out.find("plan: int8, dynamic (computed per pass) activation scales"), std::string::npos) << out;
    EXPECT_NE(out.find("u8s8"), std::string::npos) << out;
    for (const std::string& bad : {"plan --model " + model.string() + " --precision int4",
                                   "plan --model " + (dir / "missing.safetensors").string(), std::string("plan"),
                                   "plan --model " + model.string() + " --tune fastest",
                                   "plan --model " + model.string() + " --micro-batch 0",
                                   "plan --model " + model.string() + " --micro-batch some",
                                   "plan --model " + model.string() + " --batch 4"}) {
        EXPECT_EQ(run(bad, &out, &err), 2) << bad;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << bad << ": " << err;
    }
    fs::remove_all(dir);
}

}  // namespace
