// `resunet`: the command-line program. Each subcommand registers itself from its own add_*_command()
// (apps/lib/<command>_command.h), so new ones are one include and one call here.
//
//   resunet summary --width 64 --depth 4 --size 224       # layer table of a configuration
//   resunet summary --model model.safetensors             # ... of a weights file
//   resunet predict images/ --model m.safetensors --out pred/ [--masks masks/]
//   resunet quantize --model m.safetensors --out m.int8.safetensors --data DIR --split split.json
//   resunet convert --model best.safetensors --out model.safetensors --floats f16   # half the file size
//
// Exit status: 0 success, 1 some work failed (e.g. an image), 2 usage error (bad flags, missing files).
#include <csignal>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "apps/lib/convert_command.h"
#include "apps/lib/cv_command.h"
#include "apps/lib/eval_command.h"
#include "apps/lib/plan_cli.h"
#include "apps/lib/predict_command.h"
#include "apps/lib/quantize_cli.h"
#include "apps/lib/train_command.h"
#include "graph/graph.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"

namespace {

// `summary`: prints build_resunet(config).summary() for flags, or for the configuration of a model file.
void add_summary_command(CLI::App& app) {
    struct SummaryOptions {
        int width = 64;
        int depth = 4;
        int size = resunet::ResUNetConfig{}.height;
        std::string model;
    };
    auto options = std::make_shared<SummaryOptions>();
    CLI::App* command = app.add_subcommand("summary", "Print the layer table (shapes, parameters, MACs) of a ResUNet");
    CLI::Option* width = command->add_option("--width", options->width, "Channels of the first stage")
                             ->check(CLI::Range(1, 4096))
                             ->default_val(64);
    CLI::Option* depth = command->add_option("--depth", options->depth, "Number of poolings")
                             ->check(CLI::Range(1, resunet::kMaxResUNetDepth))
                             ->default_val(4);
    command->add_option("--size", options->size, "Input size in pixels (a model file's 'resunet.size' wins)")
        ->check(CLI::Range(1, 65536))
        ->default_val(224);
    command->add_option("--model", options->model, "Read width, depth and size from this .safetensors file")
        ->excludes(width)
        ->excludes(depth);
    command->callback([options] {
        resunet::ResUNetConfig config;
        if (!options->model.empty()) {
            const resunet::SafetensorsFile file = resunet::load_safetensors(options->model);
            config = resunet::infer_resunet_config(file.tensors, file.metadata, options->size);
        } else {
            config.width = options->width;
            config.depth = options->depth;
            config.height = config.width_px = options->size;
        }
        fmt::print("{}", resunet::build_resunet(config).summary());
    });
}

}  // namespace

int main(int argc, char** argv) {
    // Under a file-size limit (ulimit -f) a write past it fails with EFBIG, reported like a full disk, instead
    // of SIGXFSZ killing the program mid-run.
    std::signal(SIGXFSZ, SIG_IGN);
    CLI::App app{"resunet: residual U-Net polyp segmentation on oneDNN (fp32 and int8)"};
    app.require_subcommand(1);
    app.failure_message([](const CLI::App*, const CLI::Error& e) {
        return fmt::format("resunet: error: {} (see --help)\n", e.what());
    });
    add_summary_command(app);
    resunet::add_predict_command(app);
    resunet::add_train_command(app);
    resunet::add_cv_command(app);
    resunet::add_eval_command(app);
    resunet::add_quantize_command(app);
    resunet::add_plan_command(app);
    resunet::add_convert_command(app);
    resunet::check_values_strictly(app);
    try {
        app.parse(argc, argv);
    } catch (const CLI::RuntimeError& e) {  // a subcommand's own exit status
        return e.get_exit_code();
    } catch (const CLI::Success& e) {  // --help (CallForHelp derives from Success)
        return app.exit(e);
    } catch (const CLI::Error& e) {  // bad flags: CLI11 prints the one-line reason
        app.exit(e);
        return 2;
    } catch (const resunet::Error& e) {  // bad model file, impossible configuration
        fmt::print(stderr, "resunet: error: {}\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        fmt::print(stderr, "resunet: error: {}\n", e.what());
        return 1;
    }
    return 0;
}
