#include "apps/lib/convert_command.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "apps/lib/cli_common.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace resunet {

namespace fs = std::filesystem;

int convert_command(const ConvertOptions& o) {
    return run_command("convert", [&] {
        const std::optional<FloatStorage> floats = parse_float_storage(o.floats);
        if (!floats) throw UsageError(fmt::format("--floats {}: expected f32, f16 or bf16", o.floats));
        std::error_code ec;
        if (!fs::is_regular_file(o.model_path, ec)) throw UsageError(fmt::format("--model {}: no such file", o.model_path));
        if (fs::exists(o.out_path, ec) && fs::equivalent(o.out_path, o.model_path, ec))
            throw UsageError(fmt::format("--out {} is the --model file; write the converted model elsewhere", o.out_path));
        check_output_file(o.out_path, "--out", o.overwrite);
        SafetensorsFile file;
        try {
            file = load_safetensors(o.model_path);
        } catch (const Error& e) {
            throw UsageError(e.what());
        }
        // An int8 file's weights are 8-bit already, and its scales (static activation scales, weight scales) must stay
        // exact: F16 or BF16 would change its masks. It stays as it is.
        if (is_int8_weights(file.tensors) && *floats != FloatStorage::f32)
            throw UsageError(fmt::format("--model {} is an int8 file: its weights are 8-bit already and its scales must stay "
                                         "exact, so it is not converted to {} (copy it as it is)", o.model_path, o.floats));
        create_output_parent(o.out_path, "--out");
        save_safetensors(o.out_path, file.tensors, file.metadata, {.floats = *floats});
        const SafetensorsFile converted = load_safetensors(o.out_path);
        double worst = 0;
        std::string worst_name;
        for (const auto& [name, tensor] : file.tensors) {
            if (tensor.dtype != DType::f32) continue;
            const float* a = tensor.f32();
            const float* b = converted.tensors.at(name).f32();
            const float range = *std::max_element(a, a + tensor.bytes.size() / 4, [](float x, float y) {
                return std::fabs(x) < std::fabs(y);
            });
            for (size_t i = 0; i < tensor.bytes.size() / 4; ++i) {
                const double change = std::fabs(double{a[i]} - b[i]) / std::max(1e-30, std::fabs(double{range}));
                if (change > worst) {
                    worst = change;
                    worst_name = name;
                }
            }
        }
        size_t narrowed = converted.stored_as.size(), floats_total = 0;
        for (const auto& [name, tensor] : file.tensors) floats_total += tensor.dtype == DType::f32;
        fmt::print("{} -> {}: {} of {} F32 tensors stored as {}; {:.2f} MB -> {:.2f} MB; largest change {:.2e} of its "
                   "tensor's largest magnitude{}\n",
                   o.model_path, o.out_path, narrowed, floats_total, o.floats == "f32" ? "F32" : (o.floats == "f16" ? "F16" : "BF16"),
                   fs::file_size(o.model_path) / 1e6, fs::file_size(o.out_path) / 1e6, worst,
                   worst_name.empty() ? "" : fmt::format(" ({})", worst_name));
        if (*floats == FloatStorage::f16 && narrowed < floats_total)
            fmt::print("note: {} tensor(s) hold values beyond F16's +-65504 and stay F32\n", floats_total - narrowed);
        return 0;
    });
}

void add_convert_command(CLI::App& app) {
    auto options = std::make_shared<ConvertOptions>();
    CLI::App* command = app.add_subcommand(
        "convert", "Rewrite an fp32 model file with its tensors stored as F16 or BF16 (half the size), or as F32");
    command->add_option("--model", options->model_path, "Model .safetensors to read")->required();
    command->add_option("--out", options->out_path, "Model .safetensors to write (its folder is created if missing)")->required();
    command->add_option("--floats", options->floats,
                        "f16 (11 significant bits, values within +-65504; a tensor beyond stays F32), bf16 (8 bits, "
                        "any float) or f32")
        ->check(CLI::IsMember({"f32", "f16", "bf16"}))
        ->capture_default_str();
    command->add_flag("--overwrite", options->overwrite, "Replace an existing --out");
    command->callback([options] {
        const int status = convert_command(*options);
        if (status != 0) throw CLI::RuntimeError(status);
    });
}

}  // namespace resunet
