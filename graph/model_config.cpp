#include "graph/model_config.h"

#include <fmt/format.h>

#include <charconv>

#include "graph/model_check.h"

namespace resunet {

namespace {

// Widest first stage and bottleneck accepted (width * 2^depth): far above any real model, low enough that
// every channel count and shape product stays in range.
constexpr int64_t kMaxBottleneckChannels = int64_t{1} << 20;

// A metadata value that must be a whole positive number: decimal digits only, nothing around them.
int metadata_int(const std::map<std::string, std::string>& metadata, const std::string& key, int64_t max_value) {
    const std::string& text = metadata.at(key);
    int64_t value = 0;
    const char* end = text.data() + text.size();
    const auto [stop, error] = std::from_chars(text.data(), end, value);
    const bool digits_only = !text.empty() && text[0] != '-' && text[0] != '+';
    if (!digits_only || error != std::errc() || stop != end || value < 1 || value > max_value)
        throw Error(fmt::format("model: metadata {} = '{}' is not a whole number in 1..{}", key, text.substr(0, 40),
                                max_value));
    return static_cast<int>(value);
}

}  // namespace

ResUNetConfig infer_resunet_config(const TensorMap& tensors, const std::map<std::string, std::string>& metadata,
                                   int default_size) {
    auto find = [&](const std::string& stem) -> const HostTensor* {
        for (const char* suffix : {".weight", ".weight_q"}) {
            auto it = tensors.find(stem + suffix);
            if (it != tensors.end()) return &it->second;
        }
        return nullptr;
    };
    const HostTensor* first = find("e1.conv_a");
    if (!first || first->shape.size() != 4)
        throw Error("model: no 'e1.conv_a.weight' of shape [width, 3, 3, 3]; this is not a ResUNet weights file");
    // The programs feed 3-channel RGB images: any other count would read past each image (or into the next).
    if (first->shape[1] != 3)
        throw Error(fmt::format("model: 'e1.conv_a' takes {} input channels; the programs feed 3-channel RGB images",
                                first->shape[1]));
    if (first->shape[0] < 1 || first->shape[0] > kMaxBottleneckChannels)
        throw Error(fmt::format("model: 'e1.conv_a' has {} output channels", first->shape[0]));
    ResUNetConfig config;
    config.width = static_cast<int>(first->shape[0]);
    config.in_channels = 3;
    int depth = 0;
    while (depth <= kMaxResUNetDepth && find(fmt::format("e{}.conv_a", depth + 1))) ++depth;
    if (depth > kMaxResUNetDepth) throw Error(fmt::format("model: more than {} encoder stages", kMaxResUNetDepth));
    if (depth < 1 || !find("b.conv_a")) throw Error("model: no bottleneck 'b.conv_a' weights; this is not a ResUNet weights file");
    config.depth = depth;
    if ((static_cast<int64_t>(config.width) << depth) > kMaxBottleneckChannels)
        throw Error(fmt::format("model: width {} at depth {} gives a bottleneck over {} channels", config.width, depth,
                                kMaxBottleneckChannels));
    const HostTensor* head = find("head");
    if (!head) throw Error("model: no 'head.weight'; this is not a ResUNet weights file");
    // The programs read one logit map per image.
    if (head->shape.empty() || head->shape[0] != 1)
        throw Error(fmt::format("model: 'head' has shape {}; the programs read one output channel (a logit map)",
                                dims_to_string(head->shape)));
    config.out_channels = 1;
    if (metadata.count("resunet.width") && metadata_int(metadata, "resunet.width", kMaxBottleneckChannels) != config.width)
        throw Error(fmt::format("model: metadata resunet.width = {} but 'e1.conv_a' has {} output channels",
                                metadata.at("resunet.width"), config.width));
    if (metadata.count("resunet.depth") && metadata_int(metadata, "resunet.depth", kMaxResUNetDepth) != config.depth)
        throw Error(fmt::format("model: metadata resunet.depth = {} but the file has {} encoder stages",
                                metadata.at("resunet.depth"), config.depth));
    config.height = config.width_px = default_size;
    if (metadata.count("resunet.size")) config.height = config.width_px = metadata_int(metadata, "resunet.size", 65536);
    validate_model_tensors(build_resunet(config), tensors, "model");
    return config;
}

std::map<std::string, std::string> resunet_metadata(const ResUNetConfig& config) {
    return {{"resunet.width", std::to_string(config.width)},
            {"resunet.depth", std::to_string(config.depth)},
            {"resunet.size", std::to_string(config.height)}};
}

}  // namespace resunet
