// libFuzzer target: an arbitrary --config file (TOML/INI) for `resunet train`, `cv` and `eval`, read by
// apply_config_file with CLI11's parser and the flags' validators. Bad input must end in a CLI::Error
// (what the command line turns into "error: ..." and exit code 2) or a resunet::Error; an accepted
// train or cv configuration must render (train_config_text / cv_config_text) to a file that reads back
// to the same configuration.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include <CLI/CLI.hpp>
#include <opencv2/core/utils/logger.hpp>

#include "apps/lib/command_flags.h"
#include "fuzz/fuzz_util.h"

namespace {

const resunet::fuzz::ScratchDir& scratch() {
    static const resunet::fuzz::ScratchDir dir("resunet_fuzz_config");
    return dir;
}

// Reads `path` as `command`'s --config into fresh options; false when it is refused.
template <typename Options, typename AddFlags>
bool read_config(const char* command_name, const std::string& path, Options& options, AddFlags add_flags) {
    CLI::App app;
    CLI::App* command = app.add_subcommand(command_name);
    add_flags(*command, options);
    resunet::check_values_strictly(app);
    try {
        app.parse(std::string(command_name) + " --config \"" + path + "\"", false);
        resunet::apply_config_file(*command);
    } catch (const CLI::Error&) {
        return false;
    } catch (const resunet::Error&) {
        return false;
    }
    return true;
}

template <typename Options, typename AddFlags, typename Render>
void check_round_trip(const char* command_name, const std::string& path, AddFlags add_flags, Render render) {
    Options options;
    if (!read_config(command_name, path, options, add_flags)) return;
    std::string text;
    try {
        text = render(options);
    } catch (const resunet::Error&) {  // a value the config file cannot hold: refused before any work
        return;
    }
    const std::string written = scratch().write("again.toml", reinterpret_cast<const uint8_t*>(text.data()), text.size());
    Options again;
    RESUNET_FUZZ_CHECK(read_config(command_name, written, again, add_flags));
    const std::string text_again = render(again);
    if (text_again != text)  // show both renderings before failing
        std::fprintf(stderr, "---- %s config rendered first:\n%s\n---- and after reading that back:\n%s\n", command_name,
                     text.c_str(), text_again.c_str());
    RESUNET_FUZZ_CHECK(text_again == text);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string path = scratch().write("config.toml", data, size);
    check_round_trip<resunet::TrainCommandOptions>("train", path, resunet::add_train_flags,
                                                   [](const auto& o) { return resunet::train_config_text(o); });
    check_round_trip<resunet::CvCommandOptions>("cv", path, resunet::add_cv_flags,
                                                [](const auto& o) { return resunet::cv_config_text(o); });
    resunet::EvalCommandOptions eval;
    read_config("eval", path, eval, resunet::add_eval_flags);
    return 0;
}
