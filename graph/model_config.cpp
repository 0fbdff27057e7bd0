#include "graph/model_config.h"

#include <fmt/format.h>

namespace resunet {

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
    ResUNetConfig config;
    config.width = static_cast<int>(first->shape[0]);
    config.in_channels = static_cast<int>(first->shape[1]);
    int depth = 0;
    while (find(fmt::format("e{}.conv_a", depth + 1))) ++depth;
    if (depth < 1 || !find("b.conv_a")) throw Error("model: no bottleneck 'b.conv_a' weights; this is not a ResUNet weights file");
    config.depth = depth;
    const HostTensor* head = find("head");
    if (!head) throw Error("model: no 'head.weight'; this is not a ResUNet weights file");
    config.out_channels = static_cast<int>(head->shape[0]);
    config.height = config.width_px = default_size;
    if (auto it = metadata.find("resunet.size"); it != metadata.end()) {
        try {
            config.height = config.width_px = std::stoi(it->second);
        } catch (const std::exception&) {
            throw Error(fmt::format("model: metadata resunet.size = '{}' is not a number", it->second));
        }
    }
    return config;
}

std::map<std::string, std::string> resunet_metadata(const ResUNetConfig& config) {
    return {{"resunet.width", std::to_string(config.width)},
            {"resunet.depth", std::to_string(config.depth)},
            {"resunet.size", std::to_string(config.height)}};
}

}  // namespace resunet
