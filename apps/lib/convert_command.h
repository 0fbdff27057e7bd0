// `resunet convert`: rewrites a model file with its F32 tensors stored as F16 or BF16 (half the bytes; a
// width-64 model 130 -> 65 MB), or back to F32. Every program loads the result as F32 (graph/safetensors.h),
// so this is how a trained model is shipped compactly; evaluate the converted file, not the original.
//
//   resunet convert --model best.safetensors --out model.safetensors --floats f16
//
// Prints what was narrowed and the largest relative change of any weight. Refuses to replace --model, and an
// existing --out without --overwrite.
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace resunet {

struct ConvertOptions {
    std::string model_path;
    std::string out_path;
    std::string floats = "f16";  // f32, f16 or bf16
    bool overwrite = false;
};

// Converts and prints the report; returns the exit status (0, or 2 for a usage error).
int convert_command(const ConvertOptions& options);

void add_convert_command(CLI::App& app);

}  // namespace resunet
