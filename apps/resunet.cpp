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
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "apps/lib/convert_command.h"
#include "apps/lib/cv_command.h"
#include "apps/lib/eval_command.h"
#include "apps/lib/help_format.h"
#include "apps/lib/plan_cli.h"
#include "apps/lib/predict_command.h"
#include "apps/lib/quantize_cli.h"
#include "apps/lib/train_command.h"
#include "apps/lib/version.h"
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
    CLI::Option* width = command->add_option("--width", options->width, "Channels of the first stage (64: the paper's network, as train's default)")
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

// Letters to insert, delete or substitute to turn `a` into `b` (Levenshtein distance).
size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
        size_t diagonal = row[0];
        row[0] = i;
        for (size_t j = 1; j <= b.size(); ++j) {
            const size_t above = row[j];
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
            diagonal = above;
        }
    }
    return row[b.size()];
}

// A first argument that is no flag and no subcommand (a typo such as `predcit`): the one-line usage error
// names it and the nearest subcommand, instead of CLI11's "A subcommand is required". Empty: no such word.
std::string unknown_subcommand_message(const CLI::App& app, int argc, char** argv) {
    if (argc < 2 || argv[1][0] == '-') return "";
    const std::string word = argv[1];
    std::string names, nearest;
    size_t nearest_distance = word.size();
    for (const CLI::App* command : app.get_subcommands([](const CLI::App*) { return true; })) {
        if (command->get_name() == word) return "";
        names += (names.empty() ? "" : ", ") + command->get_name();
        const size_t distance = edit_distance(word, command->get_name());
        if (distance < nearest_distance) nearest_distance = distance, nearest = command->get_name();
    }
    const std::string hint = nearest_distance <= 2 ? fmt::format("; did you mean '{}'?", nearest) : "";
    return fmt::format("resunet: error: unknown subcommand '{}'{} (subcommands: {}; see --help)\n", word, hint, names);
}

}  // namespace

int main(int argc, char** argv) {
    // Under a file-size limit (ulimit -f) a write past it fails with EFBIG, reported like a full disk, instead
    // of SIGXFSZ killing the program mid-run.
    std::signal(SIGXFSZ, SIG_IGN);
    CLI::App app{"resunet: residual U-Net polyp segmentation on oneDNN (fp32 and int8)"};
    app.formatter(std::make_shared<resunet::WrappingHelpFormatter>());  // before the subcommands, which inherit it
    app.require_subcommand(1);
    app.set_version_flag("--version", resunet::tool_version("resunet"), "Print the version and the git commit, then exit");
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
    if (const std::string message = unknown_subcommand_message(app, argc, argv); !message.empty()) {
        fmt::print(stderr, "{}", message);
        return 2;
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::RuntimeError& e) {  // a subcommand's own exit status
        return e.get_exit_code();
    } catch (const CLI::Success& e) {  // --help, --version (CallForHelp and CallForVersion derive from Success)
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
