// The graph layer: plain data that says what the network is. Engines lower it; nothing here runs.
//
// Intended usage:
//   resunet::Graph g;
//   int x = g.input("image", {1, 3, 224, 224});
//   int y = g.conv("e1.conv_a", x, 64, /*kernel=*/3, /*stride=*/1, /*padding=*/1);
//   y = g.batch_norm("e1.bn_a", y);
//   y = g.relu("e1.relu_a", y);
//   g.set_output(y);
//   fmt::print("{}", g.summary());                // torchinfo-like table
//   for (auto& p : g.parameters()) ...            // "e1.conv_a.weight" [64, 3, 3, 3]
// Shapes are inferred as nodes are added; a bad shape throws resunet::Error naming the node.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "graph/tensor.h"

namespace resunet {

enum class OpKind { input, conv, batch_norm, relu, add, max_pool, conv_transpose, concat, sigmoid };
const char* op_name(OpKind kind);

// A value is one NCHW activation tensor produced by one node.
struct Value {
    std::string name;            // name of the producing node
    Dims dims;                   // N, C, H, W
    int producer = -1;           // node index
    std::vector<int> consumers;  // node indices, in graph order
};

// A learnable or running-statistics tensor a node owns, named as in a PyTorch state_dict.
struct ParamInfo {
    std::string name;       // "e1.conv_a.weight"
    Dims dims;              // PyTorch layout: conv [O, I, kh, kw], conv_transpose [I, O, kh, kw]
    bool learnable = true;  // false for BN running statistics (not counted as parameters)
};

struct Node {
    OpKind kind = OpKind::input;
    std::string name;         // "e1.conv_a"; parameter names are name + ".weight" etc.
    std::vector<int> inputs;  // value indices
    int output = -1;          // value index
    int out_channels = 0;     // conv, conv_transpose
    int kernel = 1;           // conv, conv_transpose, max_pool
    int stride = 1;           // conv, conv_transpose, max_pool
    int padding = 0;          // conv
    bool bias = true;         // conv, conv_transpose
    float epsilon = 1e-5f;    // batch_norm
    std::vector<ParamInfo> params;
};

class Graph {
  public:
    int input(const std::string& name, const Dims& dims);
    int conv(const std::string& name, int src, int out_channels, int kernel, int stride, int padding, bool bias = true);
    int conv_transpose(const std::string& name, int src, int out_channels, int kernel, int stride, bool bias = true);
    int batch_norm(const std::string& name, int src, float epsilon = 1e-5f);
    int relu(const std::string& name, int src);
    int add(const std::string& name, int lhs, int rhs);
    int max_pool(const std::string& name, int src, int kernel, int stride);
    int concat(const std::string& name, const std::vector<int>& srcs);  // along channels
    int sigmoid(const std::string& name, int src);
    void set_output(int value);

    const std::vector<Node>& nodes() const { return nodes_; }
    const std::vector<Value>& values() const { return values_; }
    const Node& node(int index) const { return nodes_.at(static_cast<size_t>(index)); }
    const Value& value(int index) const { return values_.at(static_cast<size_t>(index)); }
    int input_value() const { return input_; }
    int output_value() const { return output_; }
    const Node* find_node(const std::string& name) const;

    // Every parameter and running statistic, in node order, with PyTorch names and shapes.
    std::vector<ParamInfo> parameters() const;
    int64_t num_parameters() const;  // learnable only, as torch counts them
    int64_t node_macs(int node_index) const;  // multiply-accumulates of one node for the graph's batch
    int64_t total_macs() const;
    // One row per node: name, op, output shape, parameters, MACs; totals at the bottom.
    std::string summary() const;
    // Same graph with a different batch size (shapes re-inferred).
    Graph with_batch(int64_t batch) const;

  private:
    int add_node(Node node, Dims out_dims);
    const Dims& dims_of(int value, const std::string& user) const;
    std::vector<Node> nodes_;
    std::vector<Value> values_;
    int input_ = -1;
    int output_ = -1;
};

// The residual U-Net of shared/MODEL.md. depth = number of poolings, widths width * 2^i.
struct ResUNetConfig {
    int width = 64;           // channels of the first stage
    int depth = 4;            // poolings; the bottleneck has width * 2^depth channels
    int height = 224;         // input size, divisible by 2^depth
    int width_px = 224;       // input width in pixels
    int batch = 1;            // N of the graph's shapes
    int in_channels = 3;      // RGB
    int out_channels = 1;     // one logit map
    bool sigmoid = false;     // append a sigmoid so the output is a probability
};
// Deepest ResUNet build_resunet() builds (and the CLI's --depth accepts): 1..kMaxResUNetDepth poolings.
inline constexpr int kMaxResUNetDepth = 8;
Graph build_resunet(const ResUNetConfig& config);

// Adds RB(cin, cout) of MODEL.md after value `x`, as build_resunet does: conv_a, bn_a, relu_a, conv_b, bn_b;
// a 1x1 conv + bn shortcut where the channels change (else the identity); add; relu. Nodes are named
// "<stage>.conv_a" and so on; returns the block's output value.
int residual_block(Graph& g, const std::string& stage, int x, int out_channels);

}  // namespace resunet
