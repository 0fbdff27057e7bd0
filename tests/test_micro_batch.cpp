// The planner's micro-batch candidate (engine/micro_batch.h): the candidates, the measured choice for the
// fp32 and int8 engines against the plain reference, a wrong candidate that must never win on speed, and
// the memory budget.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/micro_batch.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "quant/quant_engine.h"
#include "support/reference.h"

namespace {

using resunet::Engine;
using resunet::EngineOptions;
using resunet::Graph;
using resunet::MicroBatchChoice;
using resunet::MicroBatchSearch;
using resunet::MicroBatchTrial;
using resunet::TensorMap;
using resunet::reference::Tensor4;

constexpr double kTolerance = 1e-4;      // fp32 engine against the plain reference, relative (test_engine.cpp)
constexpr double kFp32Check = resunet::kMicroBatchFp32Bound;  // the programs' checks (engine/micro_batch.h)
constexpr double kInt8CheckDb = resunet::kMicroBatchInt8Db;
constexpr int kBatch = 4;

struct Net {
    Graph graph;
    TensorMap weights;
    Tensor4 input;
    size_t out_floats = 0;  // per image
};

Net small_net(int width, int size, uint64_t seed) {
    resunet::ResUNetConfig config;
    config.width = width;
    config.depth = 2;
    config.height = config.width_px = size;
    Net n{resunet::build_resunet(config), {}, {}, 0};
    n.weights = resunet::init_weights(n.graph, seed);
    resunet::randomize_batch_norm_statistics(n.graph, n.weights, seed + 1);
    resunet::Dims dims = n.graph.value(n.graph.input_value()).dims;
    dims[0] = kBatch;
    n.input = Tensor4::zeros(dims);
    resunet::fill_uniform(n.input.data.data(), n.input.size(), seed + 2, -2.0f, 2.0f);
    n.out_floats = static_cast<size_t>(size) * size;
    return n;
}

EngineOptions fp32_options(int micro_batch) {
    EngineOptions options;
    options.micro_batch = micro_batch;
    options.threads = 1;
    options.tune = resunet::Tuning::off;  // the micro-batch is the candidate here; conv tuning has its tests
    return options;
}

const MicroBatchTrial* trial_of(const MicroBatchChoice& c, int mb) {
    for (const MicroBatchTrial& t : c.trials)
        if (t.micro_batch == mb) return &t;
    return nullptr;
}

// The chosen candidate is the fastest of those that passed their check, and micro-batch 1 always stands.
void expect_fastest_passing(const MicroBatchChoice& c) {
    ASSERT_FALSE(c.trials.empty());
    EXPECT_EQ(c.trials.front().micro_batch, 1);
    EXPECT_EQ(c.trials.front().verdict, "ok");
    const MicroBatchTrial* chosen = trial_of(c, c.micro_batch);
    ASSERT_NE(chosen, nullptr) << c.summary();
    EXPECT_EQ(chosen->verdict, "ok") << c.summary();
    for (const MicroBatchTrial& t : c.trials) {
        if (t.verdict != "ok") continue;
        EXPECT_LE(chosen->median_ms, t.median_ms) << c.summary();
    }
    EXPECT_NE(c.summary().find(std::to_string(c.micro_batch) + " "), std::string::npos);
}

TEST(MicroBatch, CandidatesArePowersOfTwoDividingTheBatch) {
    EXPECT_EQ(resunet::micro_batch_candidates(16), (std::vector<int>{1, 2, 4, 8, 16}));
    EXPECT_EQ(resunet::micro_batch_candidates(12), (std::vector<int>{1, 2, 4}));
    EXPECT_EQ(resunet::micro_batch_candidates(16, 4), (std::vector<int>{1, 2, 4}));
    EXPECT_EQ(resunet::micro_batch_candidates(6, 100), (std::vector<int>{1, 2}));
    EXPECT_EQ(resunet::micro_batch_candidates(1), (std::vector<int>{1}));
}

TEST(MicroBatch, ChecksRefuseWhatIsOutsideTheirBound) {
    const std::vector<float> ref = {1.0f, -2.0f, 4.0f, 0.5f};
    std::vector<float> near = ref, far = ref;
    near[2] += 1e-4f;
    far[2] += 1.0f;
    EXPECT_EQ(resunet::logits_within(1e-3)(ref.data(), near.data(), ref.size()), "");
    EXPECT_NE(resunet::logits_within(1e-3)(ref.data(), far.data(), ref.size()), "");
    EXPECT_EQ(resunet::sqnr_at_least(20)(ref.data(), near.data(), ref.size()), "");
    EXPECT_NE(resunet::sqnr_at_least(20)(ref.data(), far.data(), ref.size()), "");  // 10 log10(21.25 / 1) = 13.3 dB
}

// fp32: whichever micro-batch wins, the engine it names matches the plain reference.
TEST(MicroBatch, Fp32ChoiceMatchesTheReference) {
    const Net n = small_net(8, 32, 3);
    MicroBatchSearch search;
    search.runs = 2;
    search.stop_when_slower = 1e9;  // try every candidate
    const MicroBatchChoice c = resunet::choose_micro_batch(
        n.input.data.data(), kBatch, n.out_floats, search,
        [&](int mb) { return std::make_unique<Engine>(n.graph, n.weights, fp32_options(mb)); },
        resunet::logits_within(kFp32Check));
    ASSERT_EQ(c.trials.size(), 3u) << c.summary();
    for (const MicroBatchTrial& t : c.trials) {
        EXPECT_EQ(t.verdict, "ok") << c.summary();
        EXPECT_GT(t.median_ms, 0);
        EXPECT_GT(t.engine_mb, 0);
    }
    expect_fastest_passing(c);

    const Tensor4 expected = resunet::reference::run_graph(n.graph, n.weights, n.input);
    for (int mb : {1, 2, 4}) {
        Engine engine(n.graph, n.weights, fp32_options(mb));
        std::vector<float> out(expected.data.size());
        engine.run(n.input.data.data(), kBatch, out.data());
        const auto e = resunet::reference::compare(out.data(), expected);
        EXPECT_LE(e.relative(), kTolerance) << "micro-batch " << mb << ": " << e.to_string();
    }
}

// A candidate whose output is wrong is never chosen, however fast: here a check that refuses every
// micro-batch above 1 stands for a wrong kernel.
TEST(MicroBatch, AWrongCandidateNeverWins) {
    const Net n = small_net(8, 32, 5);
    MicroBatchSearch search;
    search.runs = 1;
    const MicroBatchChoice c = resunet::choose_micro_batch(
        n.input.data.data(), kBatch, n.out_floats, search,
        [&](int mb) { return std::make_unique<Engine>(n.graph, n.weights, fp32_options(mb)); },
        [](const float*, const float*, size_t) { return std::string("refused by the test"); });
    EXPECT_EQ(c.micro_batch, 1) << c.summary();
    ASSERT_EQ(c.trials.size(), 3u) << c.summary();  // refused candidates do not end the search
    EXPECT_EQ(c.trials[1].verdict, "refused by the test");
    EXPECT_EQ(c.trials[2].verdict, "refused by the test");
    EXPECT_NE(c.summary().find("1 "), std::string::npos);
    EXPECT_NE(c.summary().find("(refused by the test)"), std::string::npos) << c.summary();
}

// A larger micro-batch has a larger arena; over the budget it is not taken and the search ends there.
TEST(MicroBatch, MemoryBudgetStopsTheSearch) {
    const Net n = small_net(8, 32, 7);
    const double one_mb = static_cast<double>(Engine(n.graph, n.weights, fp32_options(1)).memory_usage().total()) / 1e6;
    const double two_mb = static_cast<double>(Engine(n.graph, n.weights, fp32_options(2)).memory_usage().total()) / 1e6;
    ASSERT_GT(two_mb, one_mb);
    MicroBatchSearch search;
    search.runs = 1;
    search.memory_budget_mb = (one_mb + two_mb) / 2;
    const MicroBatchChoice c = resunet::choose_micro_batch(
        n.input.data.data(), kBatch, n.out_floats, search,
        [&](int mb) { return std::make_unique<Engine>(n.graph, n.weights, fp32_options(mb)); },
        resunet::logits_within(kFp32Check));
    EXPECT_EQ(c.micro_batch, 1) << c.summary();
    ASSERT_EQ(c.trials.size(), 2u) << c.summary();
    EXPECT_EQ(c.trials[1].verdict, "over the memory budget");
}

// int8 dynamic: the scales are computed per pass, so micro-batches differ a little; every candidate
// stays within the stated SQNR of micro-batch 1, and the chosen one within it of the fp32 reference.
TEST(MicroBatch, Int8DynamicChoiceStaysWithinItsBound) {
    const Net n = small_net(16, 32, 9);
    MicroBatchSearch search;
    search.runs = 1;
    search.stop_when_slower = 1e9;
    auto make = [&](int mb) {
        resunet::QuantOptions options;
        options.micro_batch = mb;
        options.threads = 1;
        return std::make_unique<resunet::QuantEngine>(n.graph, n.weights, options);
    };
    const MicroBatchChoice c = resunet::choose_micro_batch(n.input.data.data(), kBatch, n.out_floats, search, make,
                                                           resunet::sqnr_at_least(kInt8CheckDb));
    ASSERT_EQ(c.trials.size(), 3u) << c.summary();
    for (const MicroBatchTrial& t : c.trials) EXPECT_EQ(t.verdict, "ok") << c.summary();
    expect_fastest_passing(c);

    const Tensor4 expected = resunet::reference::run_graph(n.graph, n.weights, n.input);
    auto engine = make(c.micro_batch);
    std::vector<float> out(expected.data.size());
    engine->run(n.input.data.data(), kBatch, out.data());
    EXPECT_EQ(resunet::sqnr_at_least(kInt8CheckDb)(expected.data.data(), out.data(), out.size()), "") << c.summary();
}

}  // namespace
