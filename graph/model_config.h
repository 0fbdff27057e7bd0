// Recovers a ResUNet's configuration from its weights, so a model file is all a user needs to pass.
//
// Intended usage:
//   resunet::SafetensorsFile file = resunet::load_safetensors("model.safetensors");
//   resunet::ResUNetConfig config = resunet::infer_resunet_config(file.tensors, file.metadata, 224);
//   resunet::Graph graph = resunet::build_resunet(config);
#pragma once

#include <map>
#include <string>

#include "graph/graph.h"

namespace resunet {

// Width from "e1.conv_a.weight" (fp32 [w, 3, 3, 3]) or "e1.conv_a.weight_q"; depth from the number of
// encoder stages e1..eN; input size from metadata "resunet.size" when present, else `default_size`.
// Throws resunet::Error if the tensors are not a ResUNet's that the programs can run: a first layer taking
// other than 3 channels, a head with other than 1, metadata "resunet.width/depth/size" that is not a plain
// whole number or contradicts the tensors, or tensors that fail validate_model_tensors (graph/model_check.h).
ResUNetConfig infer_resunet_config(const TensorMap& tensors, const std::map<std::string, std::string>& metadata,
                                   int default_size);

// Metadata a model file carries: "resunet.width", "resunet.depth", "resunet.size".
std::map<std::string, std::string> resunet_metadata(const ResUNetConfig& config);

}  // namespace resunet
