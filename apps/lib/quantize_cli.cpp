#include "apps/lib/engine_setup.h"
#include "apps/lib/quantize_cli.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <opencv2/imgproc.hpp>

#include "apps/lib/cli_common.h"
#include "apps/lib/image_inputs.h"
#include "apps/lib/version.h"
#include "data/split.h"
#include "graph/atomic_file.h"
#include "graph/graph.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace fs = std::filesystem;

namespace resunet {

namespace {

std::string join(const std::vector<std::string>& items, const char* separator) {
    std::string out;
    for (const std::string& item : items) out += (out.empty() ? "" : separator) + item;
    return out;
}

// "dir/int8.safetensors" -> "dir/int8" + suffix.
std::string beside(const std::string& out_path, const std::string& suffix) {
    const std::string ext = ".safetensors";
    std::string stem = out_path;
    if (stem.size() > ext.size() && stem.compare(stem.size() - ext.size(), ext.size(), ext) == 0) stem.resize(stem.size() - ext.size());
    return stem + suffix;
}

// splitmix64: a fixed, portable stream for the synthetic set and the seeded draw.
uint64_t splitmix64(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// Model inputs of image files as predict reads them (full decode, INTER_AREA to size, ImageNet normalisation).
std::vector<float> load_image_files(const std::vector<std::string>& paths, int size) {
    const size_t floats = static_cast<size_t>(3) * size * size;
    std::vector<float> images(floats * paths.size());
    for (size_t i = 0; i < paths.size(); ++i) {
        cv::Mat resized;
        cv::resize(read_image(paths[i]), resized, cv::Size(size, size), 0, 0, cv::INTER_AREA);
        const HostTensor t = image_to_tensor(resized, kImageNetMean, kImageNetStd);
        std::copy(t.f32(), t.f32() + floats, images.begin() + static_cast<std::ptrdiff_t>(i * floats));
    }
    return images;
}

}  // namespace

std::vector<std::string> calibration_ids(const std::vector<std::string>& train_ids, int count, std::optional<uint64_t> seed) {
    std::vector<std::string> ids = train_ids;
    std::sort(ids.begin(), ids.end());
    const size_t wanted = std::min(ids.size(), static_cast<size_t>(std::max(count, 0)));
    if (seed) {  // Fisher-Yates with splitmix64 (std::shuffle's use of the engine is library-specific)
        uint64_t state = *seed;
        for (size_t i = 0; i < wanted; ++i) {
            const size_t j = i + static_cast<size_t>(splitmix64(state) % (ids.size() - i));
            std::swap(ids[i], ids[j]);
        }
        ids.resize(wanted);
        std::sort(ids.begin(), ids.end());
        return ids;
    }
    ids.resize(wanted);
    return ids;
}

std::vector<float> load_calibration_images(const Dataset& dataset, const std::vector<std::string>& ids, int size) {
    PreprocessOptions preprocess;
    preprocess.width = preprocess.height = size;
    preprocess.keep_original_mask = false;
    const std::vector<size_t> indices = indices_of(dataset, ids);
    const size_t floats = static_cast<size_t>(3) * size * size;
    std::vector<float> images(floats * indices.size());
    for (size_t i = 0; i < indices.size(); ++i) {
        const Sample sample = load_sample(dataset, indices[i], preprocess);
        std::copy(sample.image.f32(), sample.image.f32() + floats, images.begin() + static_cast<std::ptrdiff_t>(i * floats));
    }
    return images;
}

std::vector<float> synthetic_calibration_images(int count, int size) {
    // Endoscopy-like frames: a reddish mucosa background darkening towards a black circular border, a few
    // pink to yellow polyp-like blobs (cones), one small specular highlight, and mild noise.
    const size_t floats = static_cast<size_t>(3) * size * size;
    std::vector<float> images(floats * static_cast<size_t>(std::max(count, 0)));
    const auto draw = [](uint64_t& state, int low, int high) { return low + static_cast<int>(splitmix64(state) % static_cast<uint64_t>(high - low + 1)); };
    for (int n = 0; n < count; ++n) {
        uint64_t state = 0x5245534E4554ULL + static_cast<uint64_t>(n);  // "RESNET" + image index
        const int base[3] = {draw(state, 50, 110), draw(state, 70, 140), draw(state, 150, 230)};  // B, G, R
        struct Blob {
            int64_t x, y, radius;
            int color[3];
        };
        std::vector<Blob> blobs(5);
        for (size_t i = 0; i < blobs.size(); ++i) {
            Blob& b = blobs[i];
            b.x = draw(state, 0, size - 1);
            b.y = draw(state, 0, size - 1);
            const bool highlight = i + 1 == blobs.size();
            b.radius = highlight ? 1 + draw(state, 0, std::max(1, size / 24)) : 1 + draw(state, size / 12, std::max(size / 12, size / 4));
            if (highlight) {
                b.color[0] = b.color[1] = b.color[2] = 255;
            } else {
                b.color[0] = draw(state, 80, 180);
                b.color[1] = draw(state, 100, 200);
                b.color[2] = draw(state, 180, 255);
            }
        }
        const int64_t center = size / 2, field2 = static_cast<int64_t>(size) * size * 36 / 100;  // radius 0.6 size
        cv::Mat bgr(size, size, CV_8UC3);
        for (int y = 0; y < size; ++y)
            for (int x = 0; x < size; ++x) {
                const int64_t r2 = (x - center) * (x - center) + (y - center) * (y - center);
                if (r2 >= field2) {
                    bgr.at<cv::Vec3b>(y, x) = cv::Vec3b(0, 0, 0);
                    continue;
                }
                int64_t value[3];
                for (int c = 0; c < 3; ++c) value[c] = base[c] * (2 * field2 - r2) / (2 * field2);  // vignette
                for (const Blob& b : blobs) {
                    const int64_t d2 = (x - b.x) * (x - b.x) + (y - b.y) * (y - b.y), b2 = b.radius * b.radius;
                    if (d2 >= b2) continue;
                    for (int c = 0; c < 3; ++c) value[c] += (b.color[c] - value[c]) * (b2 - d2) / b2;
                }
                const int noise = draw(state, -8, 8);
                for (int c = 0; c < 3; ++c)
                    bgr.at<cv::Vec3b>(y, x)[c] = static_cast<uint8_t>(std::clamp<int64_t>(value[c] + noise, 0, 255));
            }
        const HostTensor t = image_to_tensor(bgr, kImageNetMean, kImageNetStd);
        std::copy(t.f32(), t.f32() + floats, images.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(n) * floats));
    }
    return images;
}

QuantizeReport run_quantize(const QuantizeCommandOptions& options) {
    // ---- everything that can be checked before any work ----
    if (options.model_path.empty()) throw UsageError("--model is required");
    if (options.out_path.empty()) throw UsageError("--out is required");
    if (options.calibration_count < 1) throw UsageError(fmt::format("--calibration-count must be at least 1, got {}", options.calibration_count));
    if (options.threads < 0 || options.size < 0) throw UsageError("--threads and --size must be >= 0");
    if (!options.data_dir.empty() && !options.calibration.empty())
        throw UsageError("give either --data/--split or --calibration, not both");
    if (options.data_dir.empty() != options.split_path.empty())
        throw UsageError("--data and --split go together (calibration on the split's train side)");
    check_model_path(options.model_path);
    QuantizeReport report;
    report.out_path = options.out_path;
    report.report_md_path = beside(options.out_path, ".report.md");
    report.report_json_path = beside(options.out_path, ".report.json");
    std::error_code ec;
    if (fs::equivalent(options.model_path, options.out_path, ec))
        throw UsageError(fmt::format("--out '{}' is the --model file itself", options.out_path));
    for (const std::string& path : {report.out_path, report.report_md_path, report.report_json_path})
        check_output_file(path, "--out", options.overwrite);
    {
        const fs::path parent = fs::path(options.out_path).parent_path();
        if (!parent.empty() && fs::is_directory(parent, ec))
            remove_stale_temp_files(parent.string());  // of runs killed before their commit
        else if (parent.empty())
            remove_stale_temp_files(".");
    }

    ModelFile model = load_model_file(options.model_path, options.size, [&](const SafetensorsFile& file) {
        if (is_int8_weights(file.tensors))
            throw UsageError(fmt::format("--model '{}' is already an int8 file; quantize needs the fp32 model", options.model_path));
    });
    SafetensorsFile& file = model.file;
    const ResUNetConfig& config = model.config;
    const Graph& graph = model.graph;
    for (const std::string& name : options.keep_fp32) {
        const Node* node = graph.find_node(name);
        if (!node || (node->kind != OpKind::conv && node->kind != OpKind::conv_transpose))
            throw UsageError(fmt::format("--keep-fp32 '{}' is not a convolution of this model (e.g. e1.conv_a; see `resunet summary --model`)", name));
    }
    const int size = config.height;

    // ---- the calibration set ----
    std::vector<float> calibration;
    if (!options.data_dir.empty()) {
        Dataset dataset;
        Split split;
        try {
            dataset = scan_dataset(options.data_dir);
            split = load_split(options.split_path, dataset);
        } catch (const Error& e) {
            throw UsageError(one_line(e.what()));
        }
        if (split.train_ids.empty()) throw UsageError(fmt::format("--split '{}' has no train side", options.split_path));
        report.calibration_ids = calibration_ids(split.train_ids, options.calibration_count, options.seed);
        report.calibration_source =
            options.seed ? fmt::format("{} ids drawn with seed {} from the train side of {}", report.calibration_ids.size(), *options.seed, options.split_path)
                         : fmt::format("the first {} ids (sorted) of the train side of {}", report.calibration_ids.size(), options.split_path);
        calibration = load_calibration_images(dataset, report.calibration_ids, size);
    } else if (!options.calibration.empty()) {
        std::vector<std::string> paths = collect_input_images(options.calibration);
        if (paths.empty()) throw UsageError("--calibration names no image");
        std::vector<std::string> chosen = calibration_ids(paths, options.calibration_count, options.seed);
        try {
            calibration = load_image_files(chosen, size);
        } catch (const std::exception& e) {
            throw UsageError(fmt::format("--calibration: {}", one_line(e.what())));
        }
        report.calibration_ids = chosen;
        report.calibration_source = fmt::format("{} of the {} images given by --calibration{}", chosen.size(), paths.size(),
                                                options.seed ? fmt::format(", drawn with seed {}", *options.seed) : std::string(" (the first, by path)"));
    } else {
        const int count = options.calibration_count;
        calibration = synthetic_calibration_images(count, size);
        for (int i = 0; i < count; ++i) report.calibration_ids.push_back(fmt::format("synthetic-{}", i));
        report.calibration_source = fmt::format("the fixed synthetic set of {} images (no --data or --calibration given)", count);
    }
    const int count = static_cast<int>(report.calibration_ids.size());
    if (count == 0) throw UsageError("no calibration image");

    // ---- quantize, calibrate, write ----
    // Calibrated on the plan the programs run by default (apps/lib/engine_setup.h), so its scales are the ones
    // `eval --precision static-int8` computes from the fp32 file.
    QuantOptions quant_options = int8_engine_options(EngineTuningFlags{}, options.threads, 1);
    quant_options.keep_fp32 = std::set<std::string>(options.keep_fp32.begin(), options.keep_fp32.end());
    TensorMap int8;
    try {
        QuantEngine engine(graph, file.tensors, quant_options);
        engine.calibrate(calibration.data(), count);
        int8 = quantize_model_weights(graph, file.tensors, quant_options);
        for (auto& [name, tensor] : engine.static_scales()) int8[name] = tensor;
        report.weight_levels_here = engine.weight_levels();
    } catch (const Error& e) {
        throw UsageError(fmt::format("--model '{}': {}", options.model_path, one_line(e.what())));
    }
    report.weight_levels_stored = kStoredWeightLevels;
    std::map<std::string, std::string> metadata = resunet_metadata(config);
    metadata[kInt8WeightLevelsKey] = std::to_string(kStoredWeightLevels);
    metadata[kInt8CalibrationSourceKey] = report.calibration_source;
    metadata[kInt8CalibrationCountKey] = std::to_string(count);
    metadata[kInt8CalibrationIdsKey] = join(report.calibration_ids, ",");
    metadata[kInt8KeepFp32Key] = join(options.keep_fp32, ",");
    metadata[kInt8ToolVersionKey] = tool_version("resunet");
    metadata[kInt8SourceModelKey] = fs::path(options.model_path).filename().string();
    const auto checksum = file.metadata.find(kSafetensorsChecksumKey);
    metadata[kInt8SourceChecksumKey] = checksum != file.metadata.end() ? checksum->second : "none";
    // The model and its two reports appear together at the end (the model last), or not at all.
    create_output_parent(options.out_path, "--out");
    AtomicFileSet outputs;
    const std::string md_temp = outputs.add(report.report_md_path);
    const std::string json_temp = outputs.add(report.report_json_path);
    const std::string model_temp = outputs.add(options.out_path);
    save_safetensors(model_temp, int8, metadata);

    // ---- per-layer report: the file's int8 network (stored scales) against fp32, on calibration images ----
    const int report_images = std::min(count, 4);
    const size_t floats = static_cast<size_t>(3) * size * size;
    std::vector<LayerQuantReport> sum;
    {
        const TensorMap stored = load_safetensors(model_temp).tensors;  // exactly what was written
        for (int i = 0; i < report_images; ++i) {
            std::vector<LayerQuantReport> rows =
                compare_layers(graph, file.tensors, stored, quant_options, calibration.data() + static_cast<size_t>(i) * floats, 1);
            if (sum.empty()) {
                sum = rows;
                continue;
            }
            for (size_t r = 0; r < rows.size(); ++r) {
                sum[r].sqnr_db += rows[r].sqnr_db;
                sum[r].cosine += rows[r].cosine;
                sum[r].saturated_share += rows[r].saturated_share;
                sum[r].time_ms += rows[r].time_ms;
            }
        }
        for (LayerQuantReport& row : sum) {
            row.sqnr_db /= report_images;
            row.cosine /= report_images;
            row.saturated_share /= report_images;
            row.time_ms /= report_images;
        }
    }
    report.layers = sum;
    std::string md = fmt::format("# int8 model {}\n\n", fs::path(options.out_path).filename().string());
    md += fmt::format("- Source: {} (checksum {}), width {}, depth {}, size {}\n", options.model_path, metadata[kInt8SourceChecksumKey],
                      config.width, config.depth, size);
    md += fmt::format("- Weights: s8 per output channel, stored with +-{} levels; this CPU runs them with +-{}\n",
                      kStoredWeightLevels, report.weight_levels_here);
    md += fmt::format("- Static activation scales calibrated on {}\n", report.calibration_source);
    md += fmt::format("- Layers kept fp32 by request: {}\n", options.keep_fp32.empty() ? "none" : join(options.keep_fp32, ", "));
    md += fmt::format("- Tool: {}\n\n", tool_version("resunet"));
    md += fmt::format("Per layer, the file's int8 network (its stored scales) against the fp32 model, mean over the first {} "
                      "calibration images (one image per pass; errors accumulate along the network):\n\n",
                      report_images);
    md += format_layer_report(report.layers);
    nlohmann::json json;
    json["model"] = options.out_path;
    json["source_model"] = options.model_path;
    json["source_checksum"] = metadata[kInt8SourceChecksumKey];
    json["weight_levels_stored"] = kStoredWeightLevels;
    json["weight_levels_this_cpu"] = report.weight_levels_here;
    json["calibration_source"] = report.calibration_source;
    json["calibration_count"] = count;
    json["calibration_ids"] = report.calibration_ids;
    json["keep_fp32"] = options.keep_fp32;
    json["tool_version"] = tool_version("resunet");
    json["report_images"] = report_images;
    for (const LayerQuantReport& r : report.layers)
        json["layers"].push_back({{"layer", r.layer}, {"output", r.name}, {"precision", r.precision}, {"input_scale", r.input_scale},
                                  {"input_zero_point", r.input_zero_point}, {"sqnr_db", std::isfinite(r.sqnr_db) ? r.sqnr_db : 1e9},
                                  {"cosine", r.cosine}, {"saturated_share", r.saturated_share}, {"time_ms", r.time_ms}});
    write_file_atomic(md_temp, md);
    write_file_atomic(json_temp, json.dump(2) + "\n");
    outputs.commit();
    if (options.log) {
        fmt::print(options.log, "resunet quantize: {} -> {} (weights +-{}, static scales from {})\n", options.model_path,
                   options.out_path, kStoredWeightLevels, report.calibration_source);
        fmt::print(options.log, "Written: {}, {}, {}\n", report.out_path, report.report_md_path, report.report_json_path);
    }
    return report;
}

void add_quantize_command(CLI::App& app) {
    auto options = std::make_shared<QuantizeCommandOptions>();
    auto seed = std::make_shared<uint64_t>(0);
    CLI::App* command = app.add_subcommand(
        "quantize",
        "Make an int8 model file with static activation scales stored in it, and a per-layer SQNR report beside it");
    command->add_option("--model", options->model_path, "fp32 model .safetensors")->required();
    command->add_option("--out", options->out_path,
                        "int8 .safetensors to write (its folder is created if missing); the report goes beside it "
                        "(<out>.report.md, <out>.report.json)")
        ->required();
    CLI::Option* data = command->add_option("--data", options->data_dir,
                                            "Kvasir-SEG folder: calibrate on the train side of --split");
    command->add_option("--split", options->split_path, "split.json whose train side holds the calibration images");
    command->add_option("--calibration", options->calibration,
                        "Or calibrate on these image files, folders or @list.txt (sorted by path)")
        ->excludes(data);
    command->add_option("--calibration-count", options->calibration_count,
                        "Calibration images: the first N (sorted ids or paths), or N drawn with --seed. Without --data or "
                        "--calibration: a fixed synthetic set of N images")
        ->check(CLI::Range(1, 4096))
        ->default_val(kDefaultCalibrationImages);
    add_renamed_flag(*command, "--calibration-images", "--calibration-count");
    CLI::Option* seed_option = command->add_option("--seed", *seed, "Draw the calibration images at random with this seed");
    command->add_option("--keep-fp32", options->keep_fp32, "Layers kept fp32 (head node names, e.g. e1.conv_a)")
        ->type_name("LAYER");
    command->add_option("--size", options->size, "Input size for files without 'resunet.size' metadata (default 224)")
        ->check(CLI::Range(1, 65536));
    command->add_option("--threads", options->threads, "oneDNN threads; 0 = all cores")->check(CLI::Range(0, 4096))->default_val(0);
    command->add_flag("--overwrite", options->overwrite, "Replace an existing --out and its reports (default: refuse)");
    command->callback([options, seed, seed_option] {
        QuantizeCommandOptions run_options = *options;
        if (seed_option->count() > 0) run_options.seed = *seed;
        const int code = run_command("quantize", [&] {
            run_quantize(run_options);
            return 0;
        });
        if (code != 0) throw CLI::RuntimeError(code);
    });
}

}  // namespace resunet
