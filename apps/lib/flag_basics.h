// The light part of the command line that every program's flags need (and the fuzz targets link alone,
// without the engines): the usage-error convention, the precision flag, options bound to structs with their
// defaults shown, CLI11 config files, and one_line. apps/lib/cli_common.h builds the rest on it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "graph/tensor.h"

namespace CLI {
class App;
class Option;
class Validator;
}  // namespace CLI

namespace resunet {

// A problem found before any work is done (bad flag value, missing model, unwritable --out, outputs that
// exist): the command prints its one-line message and exits with status 2.
struct UsageError : Error {
    using Error::Error;
};

// How the model runs.
enum class Precision {
    int8,         // u8 activations with dynamic scales (static if the int8 model file stores them)
    fp32,         // the fp32 engine (needs an fp32 model file)
    static_int8,  // static activation scales: the file's, else calibrated on a fixed set
};
const char* precision_name(Precision precision);  // "int8", "fp32", "static-int8"
Precision parse_precision(const std::string& text);  // the inverse; UsageError for anything else
// The --precision check of every program: `allowed` (e.g. {"fp32", "int8", "static-int8"}), and for a word
// that is not one a message naming the nearest allowed word ("did you mean 'static-int8'?"): int8-static,
// the spelling bench_resunet once had, is refused in both programs with that hint.
CLI::Validator precision_validator(const std::vector<std::string>& allowed);

// A flag that was renamed: hidden from --help, and giving it is a one-line usage error (exit 2) that names
// `new_name` ("--calibration-images was renamed; use --calibration-count"). `takes_value`: it took a value.
void add_renamed_flag(CLI::App& app, const std::string& old_name, const std::string& new_name, bool takes_value = true);

// ---- flags and configuration files ----

// An option whose default (shown by --help and written by config_to_str) is the bound value's shortest text.
// Defined for int, double, uint64_t and std::string.
template <typename T>
CLI::Option* bind_option(CLI::App& app, const std::string& name, T& value, const std::string& help);
CLI::Option* bind_flag(CLI::App& app, const std::string& name, bool& value, const std::string& help);

// Reads the file given to `command`'s --config (set_config) into the options not given on the command line, with
// CLI11's own config parser and validators. CLI11 2.1 reads config files of the top-level app only.
void apply_config_file(CLI::App& command);

// The flags `add_flags` registers, at their current values, as a CLI11 TOML file. A value that does not read back
// unchanged is refused with a UsageError (CLI11 2.3 takes '#' for a comment even inside quotes).
std::string render_config(const std::function<void(CLI::App&)>& add_flags, const std::string& description);

// Key -> value text of a CLI11 config (comments and sections dropped); UsageError naming `what` if unparsable.
std::map<std::string, std::string> parse_config_text(const std::string& text, const std::string& what);

// Number checks with a readable message ("--lr: must be greater than 0, not 0"), for numeric options of any
// type; CLI11's PositiveNumber and NonNegativeNumber print their range's upper end as a 309-digit number.
CLI::Validator positive_number();
CLI::Validator non_negative_number();
// A whole number from 1 to `largest`, or the word auto (--micro-batch); with `or_default`, also the word default.
CLI::Validator count_or_auto(int largest, bool or_default = false);

// Adds to every option of `app` and its subcommands, by the type CLI11 bound it to, a check that the text is
// exactly a value of that type: INT and UINT whole numbers in range (CLI11 2.1 wraps "-1" into an unsigned and
// saturates one past 2^64 - 1), FLOAT finite ("nan" passes every CLI::Range). Command-line values and
// --config values (apply_config_file runs the same validators) alike. Call once, after every flag is added.
void check_values_strictly(CLI::App& app);

// Exception text as one line (OpenCV's messages span several).
std::string one_line(std::string text);

}  // namespace resunet
