#include "apps/lib/plan_cli.h"

#include "apps/lib/cli_common.h"
#include "apps/lib/command_flags.h"

#include <fmt/format.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "apps/lib/flag_basics.h"
#include "engine/engine.h"
#include "engine/micro_batch.h"
#include "apps/lib/engine_setup.h"
#include "engine/plan_cache.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "quant/quant_engine.h"

namespace resunet {

namespace {

struct PlanOptions {
    std::string model;
    int size = 0;
    int threads = 0;
    std::string micro_batch = "1";  // a count, or auto
    int batch = 16;                 // with --micro-batch auto: the batch the candidates are timed on
    EngineTuningFlags tuning;
    bool retune = false;
    std::string save_plan;  // write the plan here
    bool overwrite = false;
    std::string precision;  // fp32 | int8; empty: int8 for an int8 file, else fp32
};

QuantOptions int8_options(const PlanOptions& o, int micro_batch) { return int8_engine_options(o.tuning, o.threads, micro_batch); }

// The plan's head lines: its id and source, and each convolution's algorithm with why; then --save-plan.
void print_and_save(const PlanOptions& o, const Plan& plan) {
    fmt::print("plan id: {} ({}; {}); convolutions: {}\n", plan.id(), plan.source, plan.cpu_class, plan.counts());
    if (!o.save_plan.empty()) {
        create_output_parent(o.save_plan, "--save-plan");
        save_plan_file(o.save_plan, plan);
        fmt::print("saved: {} (run it with --plan {})\n", o.save_plan, o.save_plan);
    }
}

// One warm-up pass (first touch of the arena, caches), then one profiled pass of `images` constant images.
template <typename AnyEngine>
std::vector<LayerProfile> profile_one_pass(AnyEngine& engine, const ResUNetConfig& config, int images) {
    std::vector<float> input(static_cast<size_t>(3) * config.height * config.width_px * images, 0.5f);
    std::vector<float> output(static_cast<size_t>(config.out_channels) * config.height * config.width_px * images);
    engine.run(input.data(), images, output.data());
    return engine.profile(input.data(), images, output.data());
}

void print_compile_line(double compile_ms, const std::string& layout, const EngineMemory& memory) {
    fmt::print("compile: {:.0f} ms; activation layout {}; engine bytes {:.1f} MB (weights {:.1f}, arena {:.1f}, "
               "scratchpad {:.1f})\n\n",
               compile_ms, layout, memory.total() / 1e6, memory.weights_bytes / 1e6, memory.arena_bytes / 1e6,
               memory.scratchpad_bytes / 1e6);
}

// The int8 plan: which layers run u8s8 and which fp32, each one's kernel and algorithm (the kept fp32
// layers' measured candidates), and the int8 engine's memory. An fp32 model is quantized here as
// `resunet quantize` would (dynamic scales); an int8 file is used as it is.
void print_int8_plan(const PlanOptions& o, SafetensorsFile& file, const Graph& graph, const ResUNetConfig& config,
                     const std::string& micro_batch_line, int micro_batch, Tuning tune) {
    const bool int8_file = is_int8_weights(file.tensors);
    QuantEngine engine(graph, file.tensors, int8_options(o, micro_batch));
    file.tensors.clear();
    fmt::print("model: {} (width {}, depth {}, {}x{}; {})\n", o.model, config.width, config.depth, config.height,
               config.width_px, int8_file ? "an int8 file" : "fp32 weights, quantized here");
    fmt::print("machine: {}\n", onednn_version());
    fmt::print("plan: int8, {} activation scales; fp32 layers' 3x3 convolutions {}\n",
               engine.mode() == ScaleMode::static_calibrated ? "static (stored in the file)" : "dynamic (computed per pass)",
               tune == Tuning::off ? "direct (--tune off)" : tuning_measures(tune) ? "measured" : "by rule");
    fmt::print("{}\n", engine.conv_summary());  // the int8 3x3 layers' algorithms, and whence (the plan cache)
    print_and_save(o, engine.plan());
    fmt::print("{}", micro_batch_line);
    print_compile_line(engine.compile_ms(), "nhwc", engine.memory_usage());
    const std::vector<LayerProfile> rows = profile_one_pass(engine, config, micro_batch);
    fmt::print("{:<22} {:<30} {:<9} {:<26} {:<12} {:>9}  {}\n", "layer", "op", "precision", "kernel", "algorithm",
               "ms/image", "candidates (* chosen)");
    for (const LayerProfile& row : rows)
        fmt::print("{:<22} {:<30} {:<9} {:<26} {:<12} {:>9.2f}  {}\n", row.name, row.op, row.precision, row.kernel,
                   row.algorithm, row.time_ms / micro_batch, row.candidates);
}

void print_plan(const PlanOptions& o) {
    SafetensorsFile file = load_safetensors(o.model);
    ResUNetConfig config = infer_resunet_config(file.tensors, file.metadata, o.size > 0 ? o.size : 224);
    if (o.size > 0) config.height = config.width_px = o.size;
    const Graph graph = build_resunet(config);
    const bool int8_file = is_int8_weights(file.tensors);
    const bool int8 = o.precision.empty() ? int8_file : o.precision == "int8";
    if (!int8 && int8_file)
        throw UsageError(fmt::format("--model '{}' is an int8 file; --precision fp32 needs fp32 weights", o.model));
    check_engine_flags(o.tuning, !int8);
    EngineOptions options;
    if (int8) {
        options.tune = tuning_from_name(o.tuning.tune);
        options.threads = o.threads;
    } else {
        options = fp32_engine_options(o.tuning, o.threads, 1);
    }
    if (o.retune) remove_cached_plans(plan_cache_folder(o.tuning.plan_cache));  // measured again below
    std::string micro_batch_line;
    if (o.micro_batch == "auto") {
        // Random images in the model's input range: the candidates' speed does not depend on the values.
        std::vector<float> images(static_cast<size_t>(3LL * config.height * config.width_px * o.batch));
        fill_uniform(images.data(), static_cast<int64_t>(images.size()), 7, -2.0f, 2.0f);
        MicroBatchSearch search;
        search.memory_budget_mb = options.memory_budget_mb > 0 ? options.memory_budget_mb : -1.0;
        const size_t out_floats = static_cast<size_t>(config.out_channels) * config.height * config.width_px;
        const MicroBatchChoice choice =
            int8 ? choose_micro_batch(
                       images.data(), o.batch, out_floats, search,
                       [&](int mb) { return std::make_unique<QuantEngine>(graph, file.tensors, int8_options(o, mb)); },
                       sqnr_at_least(kMicroBatchInt8Db))
                 : choose_micro_batch(
                       images.data(), o.batch, out_floats, search,
                       [&](int mb) {
                           EngineOptions candidate = options;
                           candidate.micro_batch = mb;
                           return std::make_unique<Engine>(graph, file.tensors, candidate);
                       },
                       logits_within(kMicroBatchFp32Bound));
        options.micro_batch = choice.micro_batch;
        micro_batch_line = fmt::format("micro-batch: {} (measured on a batch of {}: {})\n", choice.micro_batch, o.batch,
                                       choice.summary());
    } else if (!options.plan) {
        options.micro_batch = std::stoi(o.micro_batch);
        micro_batch_line = fmt::format("micro-batch: {}\n", options.micro_batch);
    } else {
        micro_batch_line = fmt::format("micro-batch: {} (from --plan)\n", options.micro_batch);
    }
    if (int8) return print_int8_plan(o, file, graph, config, micro_batch_line, options.micro_batch, options.tune);
    Engine engine(graph, file.tensors, options);
    file.tensors.clear();
    fmt::print("model: {} (width {}, depth {}, {}x{})\n", o.model, config.width, config.depth, config.height,
               config.width_px);
    fmt::print("machine: {}\n", onednn_version());
    fmt::print("plan: {}\n", engine.tuning_summary());
    print_and_save(o, engine.plan());
    fmt::print("{}", micro_batch_line);
    print_compile_line(engine.compile_ms(), engine.activation_layout(), engine.memory_usage());
    const int images = options.micro_batch;  // one pass of the plan
    const std::vector<LayerProfile> rows = profile_one_pass(engine, config, images);
    fmt::print("{:<22} {:<22} {:<34} {:<9} {:>9}  {}\n", "layer", "op", "kernel", "algorithm", "ms/image",
               "candidates measured at compile time (* chosen)");
    for (const LayerProfile& row : rows)
        fmt::print("{:<22} {:<22} {:<34} {:<9} {:>9.2f}  {}\n", row.name, row.op, row.kernel, row.algorithm,
                   row.time_ms / images, row.candidates);
}

}  // namespace

void add_plan_command(CLI::App& app) {
    auto options = std::make_shared<PlanOptions>();
    CLI::App* command = app.add_subcommand(
        "plan", "Print the plan chosen for a model on this machine: layout, precisions, kernels, algorithms, candidates");
    command->add_option("--model", options->model, "Model .safetensors (fp32, or an int8 file from resunet quantize)")
        ->required();
    command->add_option("--precision", options->precision,
                        "fp32 or int8 (static-int8 runs int8's plan); default: int8 for an int8 file, else fp32")
        ->check(precision_validator({"fp32", "int8"}));
    command->add_option("--size", options->size, "Input size in pixels (default: the file's resunet.size, else 224)")
        ->check(CLI::Range(1, 65536));
    command->add_option("--threads", options->threads, "OpenMP threads; 0 = all cores")->check(CLI::Range(0, 4096));
    command->add_option("--micro-batch", options->micro_batch,
                        "Images per pass through the plan, or auto: 1, 2, 4, ... dividing --batch, each timed on that "
                        "batch and checked against micro-batch 1 (fp32: max abs diff <= 1e-3 x max|logit|; int8: SQNR >= 20 dB), the fastest kept")
        ->capture_default_str()
        ->check(count_or_auto(4096));
    command->add_option("--batch", options->batch, "With --micro-batch auto: the batch the candidates are timed on")
        ->capture_default_str()
        ->check(CLI::Range(1, 4096));
    add_engine_tuning_flags(*command, options->tuning);
    command->add_flag("--retune", options->retune, "Remove the cached measured plans first, so --tune fast|full measures again");
    command->add_option("--save-plan", options->save_plan, "Write the plan to this file (JSON; its folder is created if missing); run it with --plan FILE");
    command->add_flag("--overwrite", options->overwrite, "Replace an existing --save-plan file");
    command->callback([options, command] {
        check_output_file(options->save_plan, "--save-plan", options->overwrite);  // before the plan is made
        if (command->count("--plan") && options->micro_batch != "1")
            throw UsageError("--plan fixes the micro-batch; drop --micro-batch");
        if (command->count("--batch") && options->micro_batch != "auto")
            throw UsageError("--batch is the batch --micro-batch auto is timed on; give --micro-batch auto too");
        print_plan(*options);
    });
}

}  // namespace resunet
