#include <gtest/gtest.h>

#include <set>

#include "graph/graph.h"

using namespace resunet;

TEST(Graph, ResUNetWidth64HasModelMdParameterCountAndMacs) {
    Graph g = build_resunet({});
    EXPECT_EQ(g.num_parameters(), 32445185);
    const double gmac = static_cast<double>(g.total_macs()) / 1e9;
    EXPECT_NEAR(gmac, 38.94, 0.005);
    EXPECT_EQ(g.value(g.output_value()).dims, (Dims{1, 1, 224, 224}));
}

TEST(Graph, Width16IsAboutTwoMillionParameters) {
    ResUNetConfig c;
    c.width = 16;
    Graph g = build_resunet(c);
    EXPECT_NEAR(static_cast<double>(g.num_parameters()) / 1e6, 2.03, 0.01);
}

TEST(Graph, StageShapesFollowModelMd) {
    Graph g = build_resunet({});
    auto shape = [&](const char* name) { return g.value(g.find_node(name)->output).dims; };
    EXPECT_EQ(shape("e1.relu"), (Dims{1, 64, 224, 224}));
    EXPECT_EQ(shape("e4.relu"), (Dims{1, 512, 28, 28}));
    EXPECT_EQ(shape("b.relu"), (Dims{1, 1024, 14, 14}));
    EXPECT_EQ(shape("d4.concat"), (Dims{1, 1024, 28, 28}));
    EXPECT_EQ(shape("d1.relu"), (Dims{1, 64, 224, 224}));
}

// Weight names are a file format: changing them breaks every saved model. This pins them.
TEST(Graph, ParameterNamesAreStable) {
    ResUNetConfig c;
    c.width = 8;
    c.depth = 2;
    c.height = c.width_px = 32;
    Graph g = build_resunet(c);
    std::vector<std::string> names;
    for (const ParamInfo& p : g.parameters()) names.push_back(p.name);
    const std::vector<std::string> expected_prefix = {
        "e1.conv_a.weight", "e1.conv_a.bias", "e1.bn_a.weight", "e1.bn_a.bias", "e1.bn_a.running_mean",
        "e1.bn_a.running_var", "e1.conv_b.weight", "e1.conv_b.bias", "e1.bn_b.weight", "e1.bn_b.bias",
        "e1.bn_b.running_mean", "e1.bn_b.running_var", "e1.shortcut.conv.weight", "e1.shortcut.conv.bias",
        "e1.shortcut.bn.weight", "e1.shortcut.bn.bias", "e1.shortcut.bn.running_mean", "e1.shortcut.bn.running_var"};
    ASSERT_GE(names.size(), expected_prefix.size());
    EXPECT_EQ(std::vector<std::string>(names.begin(), names.begin() + static_cast<long>(expected_prefix.size())),
              expected_prefix);
    std::set<std::string> all(names.begin(), names.end());
    EXPECT_EQ(all.size(), names.size());
    for (const char* n : {"e2.conv_a.weight", "b.conv_b.weight", "d2.up.weight", "d2.up.bias", "d1.conv_a.weight",
                          "d1.shortcut.bn.running_var", "head.weight", "head.bias"})
        EXPECT_TRUE(all.count(n)) << n;
    EXPECT_EQ(names.back(), "head.bias");
    // PyTorch layouts: conv [O, I, kh, kw]; ConvTranspose2d [I, O, kh, kw].
    for (const ParamInfo& p : g.parameters()) {
        if (p.name == "d2.up.weight") {
            EXPECT_EQ(p.dims, (Dims{32, 16, 2, 2}));
        }
        if (p.name == "d1.conv_a.weight") {
            EXPECT_EQ(p.dims, (Dims{8, 16, 3, 3}));
        }
    }
}

TEST(Graph, BadSizesGiveClearErrors) {
    ResUNetConfig c;
    c.height = 100;
    try {
        build_resunet(c);
        FAIL() << "expected an error";
    } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("divisible by 16"), std::string::npos) << e.what();
    }
    c = {};
    c.width = 0;
    EXPECT_THROW(build_resunet(c), Error);
    Graph g;
    int a = g.input("x", {1, 3, 8, 8});
    int b = g.conv("c", a, 4, 3, 1, 1);
    EXPECT_THROW(g.add("bad_add", a, b), Error);
    EXPECT_THROW(g.concat("bad_cat", {a, g.max_pool("p", a, 2, 2)}), Error);
    EXPECT_THROW(g.conv("c", a, 4, 3, 1, 1), Error);  // duplicate name
    EXPECT_THROW(g.input("second", {1, 3, 8, 8}), Error);
    EXPECT_THROW(g.conv("huge_kernel", a, 4, 11, 1, 0), Error);
}

TEST(Graph, SummaryListsEveryNodeAndTotals) {
    Graph g = build_resunet({});
    const std::string s = g.summary();
    EXPECT_NE(s.find("Total parameters: 32445185"), std::string::npos);
    EXPECT_NE(s.find("38.94 GMAC per image"), std::string::npos);
    EXPECT_NE(s.find("d1.up"), std::string::npos);
}

TEST(Graph, WithBatchScalesMacs) {
    Graph g = build_resunet({});
    Graph g16 = g.with_batch(16);
    EXPECT_EQ(g16.total_macs(), 16 * g.total_macs());
    EXPECT_EQ(g16.value(g16.output_value()).dims[0], 16);
}
