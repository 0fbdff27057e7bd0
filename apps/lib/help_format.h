// --help text of at most kHelpWidth characters a line: CLI11's own layout (the option names in a column, the
// description beside it), with every longer line wrapped at word boundaries under its description column.
//
// Intended usage (before any subcommand is added, so that they inherit it):
//   CLI::App app{"resunet: ..."};
//   app.formatter(std::make_shared<resunet::WrappingHelpFormatter>());
#pragma once

#include <string>

#include <CLI/CLI.hpp>

namespace resunet {

inline constexpr size_t kHelpWidth = 100;

// `text` with each line longer than `width` wrapped at spaces; the continuation lines are indented to
// where the line's description starts (the option-name column, else the line's own indentation). A word
// longer than the room is left whole on its own line.
std::string wrap_help_text(const std::string& text, size_t width = kHelpWidth);

class WrappingHelpFormatter : public CLI::Formatter {
  public:
    std::string make_help(const CLI::App* app, std::string name, CLI::AppFormatMode mode) const override {
        return wrap_help_text(CLI::Formatter::make_help(app, std::move(name), mode));
    }
};

}  // namespace resunet
