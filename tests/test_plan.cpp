// The plan as an object (engine/plan.h) and numerics fixed before timing (engine/plan_rule.h): a plan file
// round-trips and refuses what is not a plan; the default plan (Tuning::rule) is the same, and gives the same
// bits, on any thread count, with a busy thread beside, and with a cold or warm plan cache; a saved plan,
// measured or not, runs the same numbers on another thread count.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/plan.h"
#include "engine/plan_rule.h"
#include "engine/winograd_own.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "quant/quant_engine.h"
#include "tests/support/engine_checks.h"

namespace fs = std::filesystem;
using resunet::ConvAlgo;
using resunet::Engine;
using resunet::EngineOptions;
using resunet::Error;
using resunet::Graph;
using resunet::Plan;
using resunet::PlanLayer;
using resunet::QuantEngine;
using resunet::QuantOptions;
using resunet::TensorMap;
using resunet::Tuning;

namespace {

Graph net(int width, int depth, int size) {
    resunet::ResUNetConfig config;
    config.width = width;
    config.depth = depth;
    config.height = config.width_px = size;
    return resunet::build_resunet(config);
}
// A ResUNet whose 3x3 layers our Winograds take (channels multiples of 16), small enough for a test.
Graph small_net() { return net(16, 2, 48); }
// Deeper and wider: our fp32 Winograd runs both ways here, groups per thread (48x48 at 32 channels) and one
// group shared by the threads (the 6x6 bottleneck at 256 channels).
Graph wide_net() { return net(32, 3, 48); }
// Wide enough for the int8 rule (kInt8WinogradRuleChannels: 128 channels in and out) in its deeper layers.
Graph int8_net() { return net(64, 2, 32); }

std::vector<float> input_of(const Graph& graph, int batch) {
    const resunet::Dims& d = graph.value(graph.input_value()).dims;
    std::vector<float> x(static_cast<size_t>(batch * d[1] * d[2] * d[3]));
    resunet::fill_uniform(x.data(), static_cast<int64_t>(x.size()), 11, -2.0f, 2.0f);
    return x;
}

template <typename AnyEngine>
std::vector<float> run(AnyEngine& engine, const Graph& graph, const std::vector<float>& x, int batch) {
    const resunet::Dims& d = graph.value(graph.output_value()).dims;
    std::vector<float> y(static_cast<size_t>(batch * d[1] * d[2] * d[3]), NAN);
    engine.run(x.data(), batch, y.data());
    return y;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Keeps one core busy while alive (a process beside the engine, as on a loaded machine).
struct BusyThread {
    std::atomic<bool> stop{false};
    std::thread thread{[this] {
        volatile double x = 1;
        while (!stop.load(std::memory_order_relaxed)) x = x * 1.0000001 + 1e-9;
    }};
    ~BusyThread() {
        stop = true;
        thread.join();
    }
};

fs::path temp_dir(const std::string& name) {
    const fs::path dir = fs::temp_directory_path() / fmt::format("resunet_test_plan_{}_{}", name, ::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    return dir;
}

}  // namespace

TEST(PlanFile, EveryAlgorithmHasOneName) {
    for (ConvAlgo a : {ConvAlgo::direct, ConvAlgo::winograd_onednn, ConvAlgo::winograd_f43, ConvAlgo::winograd_f23,
                       ConvAlgo::winograd_int8_f23})
        EXPECT_EQ(resunet::conv_algo_from_name(resunet::conv_algo_name(a)), a) << resunet::conv_algo_name(a);
    EXPECT_THROW(resunet::conv_algo_from_name("measured"), Error);
    EXPECT_EQ(resunet::tuning_from_name(resunet::tuning_name(Tuning::rule)), Tuning::rule);
    for (auto a : {resunet::Int8ConvAlgorithm::automatic, resunet::Int8ConvAlgorithm::direct,
                   resunet::Int8ConvAlgorithm::winograd_f23, resunet::Int8ConvAlgorithm::mixed})
        EXPECT_EQ(resunet::int8_conv_from_name(resunet::int8_conv_name(a)), a);
    EXPECT_THROW(resunet::int8_conv_from_name("measured"), Error);
}

TEST(PlanFile, RoundTripsAndRefusesWhatIsNotAPlan) {
    Plan plan;
    plan.precision = "int8";
    plan.layout = "nhwc";
    plan.micro_batch = 2;
    plan.source = "rule";
    plan.layers["e2.conv_a"] = PlanLayer{ConvAlgo::winograd_int8_f23, "u8s8", "rule"};
    plan.layers["e1.conv_b"] = PlanLayer{ConvAlgo::winograd_f43, "f32", "asked"};
    plan.layers["head"] = PlanLayer{ConvAlgo::direct, "f32", ""};
    const std::string text = resunet::plan_to_json_text(plan);
    const Plan back = resunet::plan_from_json_text(text);
    EXPECT_EQ(back.id(), plan.id());
    EXPECT_EQ(back.layers.size(), 3u);
    EXPECT_EQ(back.layers.at("e2.conv_a").algorithm, ConvAlgo::winograd_int8_f23);
    EXPECT_EQ(back.micro_batch, 2);
    // The id covers what changes the numbers, not the notes.
    Plan other = plan;
    other.layers["head"].why = "another note";
    other.source = "file";
    EXPECT_EQ(other.id(), plan.id());
    other.layers["e1.conv_b"].algorithm = ConvAlgo::winograd_f23;
    EXPECT_NE(other.id(), plan.id());
    other = plan;
    other.micro_batch = 1;
    EXPECT_NE(other.id(), plan.id());

    auto refused = [&](std::string edited, const std::string& word) {
        try {
            resunet::plan_from_json_text(edited, "p.json");
            ADD_FAILURE() << "accepted: " << edited;
        } catch (const Error& e) {
            const std::string what = e.what();
            EXPECT_NE(what.find(word), std::string::npos) << what;
            EXPECT_EQ(what.find('\n'), std::string::npos) << what;
        }
    };
    auto replaced = [&](const std::string& from, const std::string& to) {
        std::string t = text;
        const size_t at = t.find(from);
        EXPECT_NE(at, std::string::npos) << from;
        return at == std::string::npos ? t : t.replace(at, from.size(), to);
    };
    refused("{}", "not a plan file");
    refused("not json", "not a plan file");
    refused(replaced("\"winograd_f43\"", "\"winograd_f99\""), "winograd_f99");
    refused(replaced("\"winograd_f43\"", "\"winograd_f23\""), "does not match its contents");
    refused(replaced("\"micro_batch\": 2", "\"micro_batch\": 0"), "micro_batch");
    refused(replaced("\"micro_batch\": 2", "\"micro_batch\": -3"), "micro_batch");
    refused(replaced("\"layout\": \"nhwc\"", "\"layout\": \"nchw16\""), "layout");
    refused(replaced("\"precision\": \"u8s8\"", "\"precision\": \"f32\""), "does not run in f32");

    const fs::path dir = temp_dir("file");
    resunet::save_plan_file((dir / "p.json").string(), plan);
    EXPECT_EQ(resunet::load_plan_file((dir / "p.json").string()).id(), plan.id());
    EXPECT_THROW(resunet::load_plan_file((dir / "missing.json").string()), Error);
    EXPECT_THROW(resunet::load_plan_file(dir.string()), Error);  // a folder
    fs::remove_all(dir);
}

TEST(PlanRule, BudgetGivesUpTheSmallestImagesFirstAndIsDeterministic) {
    std::vector<resunet::RuleLayer> layers = {
        {.name = "big", .in_channels = 64, .out_channels = 64, .height = 56, .width = 56, .macs = 9.0 * 64 * 64 * 56 * 56,
         .f43_applies = true, .f23_applies = true},
        {.name = "deep", .in_channels = 512, .out_channels = 512, .height = 7, .width = 7, .macs = 9.0 * 512 * 512 * 49,
         .f43_applies = true, .f23_applies = true},
        {.name = "stem", .in_channels = 3, .out_channels = 64, .height = 56, .width = 56, .macs = 1},
    };
    const auto all = resunet::fp32_rule(layers, 1e6, INFINITY);
    EXPECT_EQ(all.algorithms.at("big"), ConvAlgo::winograd_f43);
    EXPECT_EQ(all.algorithms.at("deep"), ConvAlgo::winograd_f43);
    EXPECT_EQ(all.algorithms.at("stem"), ConvAlgo::direct);
    // Room for F(4x4) on the big layer and F(2x2) on the deep one.
    const double base = 1e6;
    const double budget = base + resunet::own_winograd_extra_bytes(4, 64, 64) + resunet::own_winograd_extra_bytes(2, 512, 512);
    const auto fitted = resunet::fp32_rule(layers, base, budget);
    EXPECT_EQ(fitted.algorithms.at("big"), ConvAlgo::winograd_f43);
    EXPECT_EQ(fitted.algorithms.at("deep"), ConvAlgo::winograd_f23);
    const auto tight = resunet::fp32_rule(layers, base, base);
    EXPECT_EQ(tight.algorithms.at("big"), ConvAlgo::direct);
    EXPECT_EQ(tight.algorithms.at("deep"), ConvAlgo::direct);
    EXPECT_EQ(resunet::fp32_rule(layers, base, budget).note, fitted.note);
}

// The default fp32 plan: the same plan and the same bits at 1 and 2 threads, with a busy thread beside, with
// a plan cache cold or warm.
TEST(PlanRule, Fp32DefaultIsTheSameOnEveryThreadCountLoadAndCache) {
    const Graph graph = wide_net();
    const TensorMap weights = resunet::engine_checks::random_weights(graph, 3);
    const std::vector<float> x = input_of(graph, 2);
    const fs::path cache = temp_dir("fp32_cache");
    std::vector<float> first;
    std::string first_id;
    for (int threads : {1, 2, 3}) {
        for (int variant = 0; variant < 3; ++variant) {  // 0: plain, 1: busy thread beside, 2: cache folder (cold, warm)
            EngineOptions options;
            options.threads = threads;
            if (variant == 2) options.plan_cache = cache.string();
            std::unique_ptr<BusyThread> busy = variant == 1 ? std::make_unique<BusyThread>() : nullptr;
            Engine engine(graph, weights, options);
            const std::vector<float> y = run(engine, graph, x, 2);
            SCOPED_TRACE(fmt::format("threads {}, variant {}: {}", threads, variant, engine.tuning_summary()));
            EXPECT_EQ(engine.plan().source, "rule");
            if (first.empty()) {
                first = y;
                first_id = engine.plan().id();
                // The rule took our Winograd somewhere (else this test would hold trivially).
                EXPECT_NE(engine.plan().counts().find("winograd_f43"), std::string::npos) << engine.plan().counts();
                continue;
            }
            EXPECT_EQ(engine.plan().id(), first_id);
            EXPECT_TRUE(same_bits(y, first));
        }
    }
    fs::remove_all(cache);
}

// The default int8 engine (--int8-conv auto, the programs' default): the same plan and bits at 1 and 2 threads
// and with a busy thread beside.
TEST(PlanRule, Int8DefaultIsTheSameOnEveryThreadCountAndLoad) {
    const Graph graph = int8_net();
    const TensorMap weights = resunet::engine_checks::random_weights(graph, 5);
    const std::vector<float> x = input_of(graph, 2);
    std::vector<float> first;
    std::string first_id;
    for (int threads : {1, 2, 3}) {
        for (bool busy_beside : {false, true}) {
            QuantOptions options;
            options.threads = threads;
            options.int8_algorithm = resunet::Int8ConvAlgorithm::automatic;
            std::unique_ptr<BusyThread> busy = busy_beside ? std::make_unique<BusyThread>() : nullptr;
            QuantEngine engine(graph, weights, options);
            const std::vector<float> y = run(engine, graph, x, 2);
            SCOPED_TRACE(fmt::format("threads {}, busy {}: {}", threads, busy_beside, engine.conv_summary()));
            EXPECT_EQ(engine.plan().source, "rule");
            if (first.empty()) {
                first = y;
                first_id = engine.plan().id();
                // With 127-level weights (VNNI) the rule takes our int8 Winograd on the 128-channel layers; with 63
                // none (quant/int8_conv_choice.h).
                const bool winograd = engine.plan().counts().find("winograd_int8_f23") != std::string::npos;
                EXPECT_EQ(winograd, engine.weight_levels() == resunet::kStoredWeightLevels) << engine.plan().counts();
                continue;
            }
            EXPECT_EQ(engine.plan().id(), first_id);
            EXPECT_TRUE(same_bits(y, first));
        }
    }
}

// A plan measured at 2 threads, saved and loaded, runs the same numbers at 1 thread (fp32 and int8).
TEST(PlanFile, ASavedMeasuredPlanRunsTheSameNumbersElsewhere) {
    const Graph graph = small_net();
    const TensorMap weights = resunet::engine_checks::random_weights(graph, 9);
    const std::vector<float> x = input_of(graph, 1);
    const fs::path dir = temp_dir("saved");
    {
        EngineOptions measured;
        measured.threads = 2;
        measured.tune = Tuning::fast;
        Engine engine(graph, weights, measured);
        const std::vector<float> y = run(engine, graph, x, 1);
        EXPECT_EQ(engine.plan().source, "measured");
        resunet::save_plan_file((dir / "fp32.json").string(), engine.plan());
        EngineOptions again;
        again.threads = 1;
        again.plan = std::make_shared<Plan>(resunet::load_plan_file((dir / "fp32.json").string()));
        Engine pinned(graph, weights, again);
        EXPECT_EQ(pinned.plan().id(), engine.plan().id());
        EXPECT_TRUE(same_bits(run(pinned, graph, x, 1), y)) << engine.tuning_summary();
        // An fp32 plan of our kernels and oneDNN's direct ones runs at any micro-batch on AVX-512 classes, with
        // the same numbers and id; one with oneDNN's Winograd, or any below AVX-512, is refused at another.
        const std::vector<float> x2 = input_of(graph, 2);
        Plan ours = engine.plan();
        for (auto& [name, layer] : ours.layers)
            if (layer.algorithm == ConvAlgo::winograd_onednn) layer.algorithm = ConvAlgo::direct;
        again.plan = std::make_shared<Plan>(ours);
        Engine single(graph, weights, again);
        again.micro_batch = 2;
        if (resunet::fp32_micro_batch_keeps_numbers_here()) {
            Engine pairs(graph, weights, again);
            EXPECT_EQ(pairs.plan().id(), ours.id());
            EXPECT_TRUE(same_bits(run(pairs, graph, x2, 2), run(single, graph, x2, 2))) << pairs.tuning_summary();
        } else {
            EXPECT_THROW(Engine(graph, weights, again), Error);  // below AVX-512 another micro-batch is other numbers
        }
        if (engine.plan().micro_batch_changes_numbers()) {
            again.plan = std::make_shared<Plan>(engine.plan());
            EXPECT_THROW(Engine(graph, weights, again), Error);
        }
    }
    {
        QuantOptions measured;
        measured.threads = 2;
        measured.tune = Tuning::fast;
        measured.int8_algorithm = resunet::Int8ConvAlgorithm::winograd_f23;
        QuantEngine engine(graph, weights, measured);
        const std::vector<float> y = run(engine, graph, x, 1);
        resunet::save_plan_file((dir / "int8.json").string(), engine.plan());
        QuantOptions again;
        again.threads = 1;
        again.plan = std::make_shared<Plan>(resunet::load_plan_file((dir / "int8.json").string()));
        QuantEngine pinned(graph, weights, again);
        EXPECT_EQ(pinned.plan().id(), engine.plan().id());
        EXPECT_NE(pinned.plan().counts().find("winograd_int8_f23"), std::string::npos) << pinned.plan().counts();
        EXPECT_TRUE(same_bits(run(pinned, graph, x, 1), y)) << engine.conv_summary();
    }
    fs::remove_all(dir);
}

// A plan that does not fit the model or engine is refused with one line, never run partly.
TEST(PlanFile, APlanThatDoesNotFitIsRefused) {
    const Graph graph = small_net();
    const TensorMap weights = resunet::engine_checks::random_weights(graph, 1);
    EngineOptions options;
    Engine engine(graph, weights, options);
    const Plan good = engine.plan();
    auto refused = [&](const Plan& bad, const std::string& word, bool int8 = false) {
        try {
            if (int8) {
                QuantOptions q;
                q.plan = std::make_shared<Plan>(bad);
                QuantEngine e(graph, weights, q);
            } else {
                EngineOptions o;
                o.plan = std::make_shared<Plan>(bad);
                Engine e(graph, weights, o);
            }
            ADD_FAILURE() << "accepted a plan that should be refused: " << word;
        } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
        }
    };
    Plan bad = good;
    bad.layers["no.such.layer"] = PlanLayer{};
    refused(bad, "no.such.layer");
    bad = good;
    bad.layers.erase(bad.layers.begin());
    refused(bad, "has no entry");
    refused(good, "not an int8 one", /*int8=*/true);
    Plan int8_plan = QuantEngine(graph, weights, QuantOptions{}).plan();
    int8_plan.micro_batch = 2;  // int8's dynamic scales are per pass: another micro-batch is other numbers
    refused(int8_plan, "micro-batch", /*int8=*/true);
    bad = good;
    bad.layers.at("head").algorithm = ConvAlgo::winograd_f43;  // 1 output channel: our Winograd never applies
    refused(bad, "does not apply");
}


// Our fp32 Winograd (both tiles) on a larger network, where per-thread groups and the shared group both run
// at 1, 2 and 3 threads: the same bits. (oneDNN 2.6's own AVX-512 Winograd is no such kernel: at 112x112,
// width 64 its output at 3 threads differs from 1 thread's, so the rule never takes it; docs/plan.md.)
TEST(PlanRule, OurFp32WinogradGivesTheSameBitsOnEveryThreadCount) {
    if (!resunet::winograd_own_supported()) GTEST_SKIP() << "no AVX2 and FMA";
    const Graph graph = net(64, 3, 112);
    const TensorMap weights = resunet::engine_checks::random_weights(graph, 3);
    const std::vector<float> x = input_of(graph, 1);
    for (auto algorithm : {resunet::ConvAlgorithm::own_winograd_f43, resunet::ConvAlgorithm::own_winograd_f23}) {
        std::vector<float> first;
        for (int threads : {1, 2, 3}) {
            EngineOptions o;
            o.threads = threads;
            o.conv_algorithm = algorithm;
            o.tune = Tuning::off;
            Engine engine(graph, weights, o);
            const std::vector<float> y = run(engine, graph, x, 1);
            if (first.empty()) {
                first = y;
                EXPECT_NE(engine.tuning_summary().find("winograd_f"), std::string::npos) << engine.tuning_summary();
                continue;
            }
            EXPECT_TRUE(same_bits(y, first)) << "threads " << threads << ": " << engine.tuning_summary();
        }
    }
}

// fp32 has no per-pass scales, and the rule chooses the algorithms at micro-batch 1 whatever the run's (its
// memory budget included): the same algorithms at every micro-batch. On AVX-512 classes the micro-batch
// (images per pass) changes the tiles per GEMM and the blocking, never a sum's order, so the default plan gives
// the same bits and id at every micro-batch; below AVX-512 our Winograd's GEMM kernel (oneDNN's gemm:jit)
// follows the tile count, so the micro-batch is part of the plan's id there. RESUNET_TEST_W64=1 runs it on the
// full network (width 64, 224x224).
TEST(PlanRule, Fp32MicroBatchNeverChangesTheBits) {
    const char* big = std::getenv("RESUNET_TEST_W64");
    const Graph graph = big ? net(64, 4, 224) : wide_net();
    const TensorMap weights = resunet::engine_checks::random_weights(graph, 5);
    const int batch = 4;
    const std::vector<float> x = input_of(graph, batch);
    std::vector<float> first;
    std::map<std::string, ConvAlgo> first_algorithms;
    std::string first_id;
    for (int mb : {1, 2, 4}) {
        EngineOptions options;
        options.threads = 2;
        options.micro_batch = mb;
        Engine engine(graph, weights, options);
        const std::vector<float> y = run(engine, graph, x, batch);
        SCOPED_TRACE(fmt::format("micro-batch {}: {}", mb, engine.tuning_summary()));
        std::map<std::string, ConvAlgo> algorithms;
        for (const auto& [name, layer] : engine.plan().layers) algorithms[name] = layer.algorithm;
        if (first.empty()) {
            first = y;
            first_algorithms = algorithms;
            first_id = engine.plan().id();
            EXPECT_NE(engine.plan().counts().find("winograd_f43"), std::string::npos) << engine.plan().counts();
            continue;
        }
        EXPECT_TRUE(algorithms == first_algorithms) << engine.plan().counts();
        if (!resunet::fp32_micro_batch_keeps_numbers_here()) {
            EXPECT_TRUE(engine.plan().micro_batch_changes_numbers());
            EXPECT_NE(engine.plan().id(), first_id);  // the micro-batch is part of the id here
            continue;
        }
        EXPECT_FALSE(engine.plan().micro_batch_changes_numbers());
        EXPECT_EQ(engine.plan().id(), first_id);  // the micro-batch is no part of an fp32 plan's id
        double worst = 0;
        for (size_t i = 0; i < y.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(y[i] - first[i])));
        EXPECT_TRUE(same_bits(y, first)) << "max |diff| " << worst;
    }
}
