#include "graph/graph.h"

#include <fmt/format.h>

#include <algorithm>
#include <set>

namespace resunet {

const char* op_name(OpKind kind) {
    switch (kind) {
        case OpKind::input: return "Input";
        case OpKind::conv: return "Conv2d";
        case OpKind::batch_norm: return "BatchNorm2d";
        case OpKind::relu: return "ReLU";
        case OpKind::add: return "Add";
        case OpKind::max_pool: return "MaxPool2d";
        case OpKind::conv_transpose: return "ConvTranspose2d";
        case OpKind::concat: return "Concat";
        case OpKind::sigmoid: return "Sigmoid";
    }
    return "?";
}

const Dims& Graph::dims_of(int value, const std::string& user) const {
    if (value < 0 || value >= static_cast<int>(values_.size()))
        throw Error(fmt::format("node '{}': input value {} does not exist", user, value));
    return values_[static_cast<size_t>(value)].dims;
}

int Graph::add_node(Node node, Dims out_dims) {
    if (node.name.empty()) throw Error("graph: a node needs a name");
    if (find_node(node.name)) throw Error(fmt::format("graph: node name '{}' used twice", node.name));
    for (int64_t d : out_dims)
        if (d <= 0)
            throw Error(fmt::format("node '{}' ({}): output shape {} has a non-positive dimension", node.name,
                                    op_name(node.kind), dims_to_string(out_dims)));
    int node_index = static_cast<int>(nodes_.size());
    int value_index = static_cast<int>(values_.size());
    for (int in : node.inputs) values_[static_cast<size_t>(in)].consumers.push_back(node_index);
    node.output = value_index;
    values_.push_back(Value{node.name, std::move(out_dims), node_index, {}});
    nodes_.push_back(std::move(node));
    return value_index;
}

int Graph::input(const std::string& name, const Dims& dims) {
    if (input_ >= 0) throw Error(fmt::format("graph: second input '{}'; only one is supported", name));
    if (dims.size() != 4) throw Error(fmt::format("input '{}': expected 4 dims NCHW, got {}", name, dims_to_string(dims)));
    Node node;
    node.kind = OpKind::input;
    node.name = name;
    input_ = add_node(std::move(node), dims);
    return input_;
}

int Graph::conv(const std::string& name, int src, int out_channels, int kernel, int stride, int padding, bool bias) {
    const Dims in = dims_of(src, name);
    if (out_channels <= 0 || kernel <= 0 || stride <= 0 || padding < 0)
        throw Error(fmt::format("conv '{}': bad attributes out_channels={} kernel={} stride={} padding={}", name,
                                out_channels, kernel, stride, padding));
    int64_t oh = (in[2] + 2 * padding - kernel) / stride + 1;
    int64_t ow = (in[3] + 2 * padding - kernel) / stride + 1;
    if (in[2] + 2 * padding < kernel || in[3] + 2 * padding < kernel)
        throw Error(fmt::format("conv '{}': kernel {} larger than padded input {}", name, kernel, dims_to_string(in)));
    Node node;
    node.kind = OpKind::conv;
    node.name = name;
    node.inputs = {src};
    node.out_channels = out_channels;
    node.kernel = kernel;
    node.stride = stride;
    node.padding = padding;
    node.bias = bias;
    node.params.push_back({name + ".weight", {out_channels, in[1], kernel, kernel}, true});
    if (bias) node.params.push_back({name + ".bias", {out_channels}, true});
    return add_node(std::move(node), {in[0], out_channels, oh, ow});
}

int Graph::conv_transpose(const std::string& name, int src, int out_channels, int kernel, int stride, bool bias) {
    const Dims in = dims_of(src, name);
    if (out_channels <= 0 || kernel <= 0 || stride <= 0)
        throw Error(fmt::format("conv_transpose '{}': bad attributes out_channels={} kernel={} stride={}", name,
                                out_channels, kernel, stride));
    Node node;
    node.kind = OpKind::conv_transpose;
    node.name = name;
    node.inputs = {src};
    node.out_channels = out_channels;
    node.kernel = kernel;
    node.stride = stride;
    node.bias = bias;
    node.params.push_back({name + ".weight", {in[1], out_channels, kernel, kernel}, true});
    if (bias) node.params.push_back({name + ".bias", {out_channels}, true});
    return add_node(std::move(node), {in[0], out_channels, (in[2] - 1) * stride + kernel, (in[3] - 1) * stride + kernel});
}

int Graph::batch_norm(const std::string& name, int src, float epsilon) {
    const Dims in = dims_of(src, name);
    Node node;
    node.kind = OpKind::batch_norm;
    node.name = name;
    node.inputs = {src};
    node.epsilon = epsilon;
    node.params = {{name + ".weight", {in[1]}, true},
                   {name + ".bias", {in[1]}, true},
                   {name + ".running_mean", {in[1]}, false},
                   {name + ".running_var", {in[1]}, false}};
    return add_node(std::move(node), in);
}

int Graph::relu(const std::string& name, int src) {
    const Dims in = dims_of(src, name);
    Node node;
    node.kind = OpKind::relu;
    node.name = name;
    node.inputs = {src};
    return add_node(std::move(node), in);
}

int Graph::sigmoid(const std::string& name, int src) {
    const Dims in = dims_of(src, name);
    Node node;
    node.kind = OpKind::sigmoid;
    node.name = name;
    node.inputs = {src};
    return add_node(std::move(node), in);
}

int Graph::add(const std::string& name, int lhs, int rhs) {
    const Dims a = dims_of(lhs, name);
    const Dims b = dims_of(rhs, name);
    if (a != b)
        throw Error(fmt::format("add '{}': operand shapes differ: {} vs {}", name, dims_to_string(a), dims_to_string(b)));
    Node node;
    node.kind = OpKind::add;
    node.name = name;
    node.inputs = {lhs, rhs};
    return add_node(std::move(node), a);
}

int Graph::max_pool(const std::string& name, int src, int kernel, int stride) {
    const Dims in = dims_of(src, name);
    if (kernel <= 0 || stride <= 0) throw Error(fmt::format("max_pool '{}': bad kernel {} stride {}", name, kernel, stride));
    if (in[2] % stride != 0 || in[3] % stride != 0 || in[2] < kernel || in[3] < kernel)
        throw Error(fmt::format("max_pool '{}': input {} not divisible by stride {}", name, dims_to_string(in), stride));
    Node node;
    node.kind = OpKind::max_pool;
    node.name = name;
    node.inputs = {src};
    node.kernel = kernel;
    node.stride = stride;
    return add_node(std::move(node), {in[0], in[1], (in[2] - kernel) / stride + 1, (in[3] - kernel) / stride + 1});
}

int Graph::concat(const std::string& name, const std::vector<int>& srcs) {
    if (srcs.size() < 2) throw Error(fmt::format("concat '{}': needs at least two inputs", name));
    Dims out = dims_of(srcs[0], name);
    for (size_t i = 1; i < srcs.size(); ++i) {
        const Dims d = dims_of(srcs[i], name);
        if (d[0] != out[0] || d[2] != out[2] || d[3] != out[3])
            throw Error(fmt::format("concat '{}': input {} has shape {}, expected N, H, W of {}", name, i,
                                    dims_to_string(d), dims_to_string(out)));
        out[1] += d[1];
    }
    Node node;
    node.kind = OpKind::concat;
    node.name = name;
    node.inputs = srcs;
    return add_node(std::move(node), out);
}

void Graph::set_output(int value) {
    dims_of(value, "output");
    output_ = value;
}

const Node* Graph::find_node(const std::string& name) const {
    for (const Node& n : nodes_)
        if (n.name == name) return &n;
    return nullptr;
}

std::vector<ParamInfo> Graph::parameters() const {
    std::vector<ParamInfo> params;
    for (const Node& n : nodes_) params.insert(params.end(), n.params.begin(), n.params.end());
    return params;
}

int64_t Graph::num_parameters() const {
    int64_t count = 0;
    for (const ParamInfo& p : parameters())
        if (p.learnable) count += num_elements(p.dims);
    return count;
}

int64_t Graph::node_macs(int node_index) const {
    const Node& n = node(node_index);
    const Dims& out = value(n.output).dims;
    switch (n.kind) {
        case OpKind::conv: {
            const Dims& in = value(n.inputs[0]).dims;
            return num_elements(out) * in[1] * n.kernel * n.kernel;
        }
        case OpKind::conv_transpose: {
            const Dims& in = value(n.inputs[0]).dims;
            return num_elements(in) * n.out_channels * n.kernel * n.kernel;
        }
        default: return 0;
    }
}

int64_t Graph::total_macs() const {
    int64_t macs = 0;
    for (int i = 0; i < static_cast<int>(nodes_.size()); ++i) macs += node_macs(i);
    return macs;
}

std::string Graph::summary() const {
    std::string out = fmt::format("{:<22} {:<16} {:<22} {:>12} {:>16}\n", "Layer", "Op", "Output shape", "Params", "MACs");
    out += std::string(92, '-') + "\n";
    for (int i = 0; i < static_cast<int>(nodes_.size()); ++i) {
        const Node& n = nodes_[static_cast<size_t>(i)];
        int64_t params = 0;
        for (const ParamInfo& p : n.params)
            if (p.learnable) params += num_elements(p.dims);
        out += fmt::format("{:<22} {:<16} {:<22} {:>12} {:>16}\n", n.name, op_name(n.kind),
                           dims_to_string(value(n.output).dims), params, node_macs(i));
    }
    out += std::string(92, '-') + "\n";
    const int64_t batch = input_ >= 0 ? value(input_).dims[0] : 1;
    out += fmt::format("Total parameters: {}\n", num_parameters());
    out += fmt::format("Total MACs: {} ({:.2f} GMAC per image, batch {})\n", total_macs(),
                       static_cast<double>(total_macs()) / static_cast<double>(batch) / 1e9, batch);
    return out;
}

Graph Graph::with_batch(int64_t batch) const {
    if (batch <= 0) throw Error(fmt::format("graph: batch must be positive, got {}", batch));
    Graph g = *this;
    for (Value& v : g.values_) v.dims[0] = batch;
    return g;
}

// RB(cin, cout) of MODEL.md: y = ReLU(BN2(conv_b(ReLU(BN1(conv_a(x))))) + S(x)).
int residual_block(Graph& g, const std::string& stage, int x, int out_channels) {
    const int64_t in_channels = g.value(x).dims[1];
    int y = g.conv(stage + ".conv_a", x, out_channels, 3, 1, 1);
    y = g.batch_norm(stage + ".bn_a", y);
    y = g.relu(stage + ".relu_a", y);
    y = g.conv(stage + ".conv_b", y, out_channels, 3, 1, 1);
    y = g.batch_norm(stage + ".bn_b", y);
    int shortcut = x;
    if (in_channels != out_channels) {
        shortcut = g.conv(stage + ".shortcut.conv", x, out_channels, 1, 1, 0);
        shortcut = g.batch_norm(stage + ".shortcut.bn", shortcut);
    }
    y = g.add(stage + ".add", y, shortcut);
    return g.relu(stage + ".relu", y);
}

Graph build_resunet(const ResUNetConfig& config) {
    if (config.width <= 0) throw Error(fmt::format("model: width must be positive, got {}", config.width));
    if (config.depth < 1 || config.depth > kMaxResUNetDepth)
        throw Error(fmt::format("model: depth must be 1..{}, got {}", kMaxResUNetDepth, config.depth));
    if (config.batch <= 0) throw Error(fmt::format("model: batch must be positive, got {}", config.batch));
    const int multiple = 1 << config.depth;
    if (config.height <= 0 || config.width_px <= 0 || config.height % multiple != 0 || config.width_px % multiple != 0)
        throw Error(fmt::format("model: input size {}x{} must be positive and divisible by {} (2^depth, depth {})",
                                config.height, config.width_px, multiple, config.depth));
    Graph g;
    int x = g.input("input", {config.batch, config.in_channels, config.height, config.width_px});
    std::vector<int> skips;
    for (int level = 0; level < config.depth; ++level) {
        const std::string stage = fmt::format("e{}", level + 1);
        if (level > 0) x = g.max_pool(stage + ".pool", x, 2, 2);
        x = residual_block(g, stage, x, config.width << level);
        skips.push_back(x);
    }
    x = g.max_pool("b.pool", x, 2, 2);
    x = residual_block(g, "b", x, config.width << config.depth);
    for (int level = config.depth - 1; level >= 0; --level) {
        const std::string stage = fmt::format("d{}", level + 1);
        int up = g.conv_transpose(stage + ".up", x, config.width << level, 2, 2);
        int cat = g.concat(stage + ".concat", {up, skips[static_cast<size_t>(level)]});
        x = residual_block(g, stage, cat, config.width << level);
    }
    x = g.conv("head", x, config.out_channels, 1, 1, 0);
    if (config.sigmoid) x = g.sigmoid("head.sigmoid", x);
    g.set_output(x);
    return g;
}

}  // namespace resunet
