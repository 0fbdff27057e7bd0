// libFuzzer target: a model file from arbitrary bytes through the loader every program uses:
// parse_safetensors, then infer_resunet_config (strict metadata, then validate_model_tensors: fp32 files with
// their folded batch norm, int8 files with their scales, static-scale sets and extra tensors). Bad input must
// end in resunet::Error; an accepted file must describe a graph the programs can run.
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "graph/model_check.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    resunet::SafetensorsFile file;
    resunet::ResUNetConfig config;
    try {
        file = resunet::parse_safetensors(data, size, "fuzz input");
        config = resunet::infer_resunet_config(file.tensors, file.metadata, 32);
    } catch (const resunet::Error&) {
        return 0;
    }
    RESUNET_FUZZ_CHECK(config.in_channels == 3);  // the programs feed RGB
    RESUNET_FUZZ_CHECK(config.out_channels == 1);
    RESUNET_FUZZ_CHECK(config.depth >= 1 && config.depth <= resunet::kMaxResUNetDepth);
    const resunet::Graph graph = resunet::build_resunet(config);  // must not throw for an accepted file
    resunet::validate_model_tensors(graph, file.tensors, "again");  // the same answer twice
    for (const auto& [name, tensor] : file.tensors) {
        if (!name.ends_with("_scale")) continue;
        RESUNET_FUZZ_CHECK(tensor.dtype == resunet::DType::f32);
        for (int64_t i = 0; i < tensor.num_elements(); ++i) {
            const float scale = tensor.f32()[i];
            RESUNET_FUZZ_CHECK(std::isfinite(scale) && scale > 0.0f && scale <= resunet::kMaxInt8Scale);
        }
    }
    return 0;
}
