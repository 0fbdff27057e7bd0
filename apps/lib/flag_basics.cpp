// The light part of the command line: see flag_basics.h.
#include "apps/lib/flag_basics.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <vector>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "graph/input_file.h"

namespace resunet {

const char* precision_name(Precision precision) {
    switch (precision) {
        case Precision::int8: return "int8";
        case Precision::fp32: return "fp32";
        case Precision::static_int8: return "static-int8";
    }
    return "?";
}

Precision parse_precision(const std::string& text) {
    if (text == "fp32") return Precision::fp32;
    if (text == "static-int8") return Precision::static_int8;
    if (text == "int8") return Precision::int8;
    throw UsageError(fmt::format("--precision must be fp32, int8 or static-int8, got '{}'{}", text,
                                 text == "int8-static" ? "; did you mean 'static-int8'?" : ""));
}

CLI::Validator precision_validator(const std::vector<std::string>& allowed) {
    std::string names;
    for (const std::string& name : allowed) names += (names.empty() ? "" : ", ") + name;
    return CLI::Validator(
        [allowed, names](std::string& text) {
            for (const std::string& name : allowed)
                if (text == name) return std::string();
            // Words once spelled otherwise, or with the parts swapped or mis-cased.
            std::string hint;
            std::string lower = text;
            for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
            if (lower == "int8-static" || lower == "int8_static" || lower == "static_int8" || lower == "static-int8")
                hint = "static-int8";
            else if (lower == "f32" || lower == "float" || lower == "float32" || lower == "fp32") hint = "fp32";
            else if (lower == "int8-dynamic" || lower == "dynamic-int8" || lower == "u8" || lower == "int8") hint = "int8";
            if (std::find(allowed.begin(), allowed.end(), hint) == allowed.end()) hint.clear();
            return fmt::format("'{}' is not one of {}{}", text, names, hint.empty() ? "" : fmt::format("; did you mean '{}'?", hint));
        },
        "{" + names + "}");
}

void add_renamed_flag(CLI::App& app, const std::string& old_name, const std::string& new_name, bool takes_value) {
    const std::string message = fmt::format("{} was renamed; use {}", old_name, new_name);
    if (takes_value)
        app.add_option_function<std::string>(old_name, [message](const std::string&) { throw CLI::ValidationError(message); }, "")
            ->group("");
    else
        app.add_flag_callback(old_name, [message] { throw CLI::ValidationError(message); }, "")->group("");
}

// ---- flags and configuration files ----

template <typename T>
CLI::Option* bind_option(CLI::App& app, const std::string& name, T& value, const std::string& help) {
    return app.add_option(name, value, help)->default_function([&value] { return fmt::format("{}", value); })->capture_default_str();
}
template CLI::Option* bind_option<int>(CLI::App&, const std::string&, int&, const std::string&);
template CLI::Option* bind_option<double>(CLI::App&, const std::string&, double&, const std::string&);
template CLI::Option* bind_option<uint64_t>(CLI::App&, const std::string&, uint64_t&, const std::string&);
template CLI::Option* bind_option<std::string>(CLI::App&, const std::string&, std::string&, const std::string&);

CLI::Option* bind_flag(CLI::App& app, const std::string& name, bool& value, const std::string& help) {
    return app.add_flag(name, value, help)
        ->default_function([&value] { return std::string(value ? "true" : "false"); })
        ->capture_default_str();
}

namespace {
// A configuration is a few KB; anything far larger is not one.
constexpr uint64_t kMaxConfigFileBytes = uint64_t{16} << 20;
}  // namespace

void apply_config_file(CLI::App& command) {
    CLI::Option* config = command.get_config_ptr();
    if (config == nullptr || config->count() == 0) return;
    const std::string path = config->as<std::string>();
    const std::shared_ptr<CLI::Config> formatter = command.get_config_formatter();
    std::string text;
    try {
        text = read_input_file(path, "--config", kMaxConfigFileBytes);  // a FIFO is refused, not waited on
    } catch (const Error& e) {
        throw CLI::FileError(one_line(e.what()));
    }
    std::istringstream in(text);
    const std::vector<CLI::ConfigItem> items = formatter->from_config(in);
    for (const CLI::ConfigItem& item : items) {
        if (item.name == "++" || item.name == "--") continue;
        // A table is this command's own ([train] in train's file) or refused: its keys would otherwise be dropped
        // without a word while the same key at the top level is read.
        if (!item.parents.empty() && (item.parents.size() > 1 || item.parents.front() != command.get_name()))
            throw CLI::ConfigError::Extras(fmt::format("{} in {} (a [{}] table; this command reads top-level keys and "
                                                       "[{}])",
                                                       item.fullname(), path, item.parents.front(), command.get_name()));
        CLI::Option* option = command.get_option_no_throw("--" + item.name);
        if (option == nullptr) throw CLI::ConfigError::Extras(item.fullname() + " in " + path);
        if (!option->get_configurable()) throw CLI::ConfigError::NotConfigurable(item.fullname());
        if (option->count() > 0) continue;  // given on the command line
        if (option->get_expected_min() == 0) {
            // A switch takes true or false; CLI11 would read 2 (or "yes") as true.
            if (item.inputs.size() != 1 || (item.inputs[0] != "true" && item.inputs[0] != "false"))
                throw CLI::ConversionError(fmt::format("{} in {}: '{}' is not true or false", item.fullname(), path,
                                                       item.inputs.empty() ? std::string() : item.inputs[0]));
            option->add_result(option->get_flag_value(item.name, formatter->to_flag(item)));
        } else {
            option->add_result(item.inputs);
        }
        option->run_callback();  // validators, then the bound variable
    }
}

std::map<std::string, std::string> parse_config_text(const std::string& text, const std::string& what) {
    std::istringstream in(text);
    std::vector<CLI::ConfigItem> items;
    try {
        items = CLI::ConfigTOML().from_config(in);
    } catch (const CLI::Error& e) {
        throw UsageError(fmt::format("{}: cannot parse: {}", what, one_line(e.what())));
    }
    std::map<std::string, std::string> values;
    for (const CLI::ConfigItem& item : items) {
        if (item.name == "++" || item.name == "--") continue;
        std::string joined;
        for (const std::string& input : item.inputs) joined += (joined.empty() ? "" : ",") + input;
        values[item.name] = joined;
    }
    return values;
}

std::string render_config(const std::function<void(CLI::App&)>& add_flags, const std::string& description) {
    CLI::App app{description};
    add_flags(app);
    const std::string text = app.config_to_str(/*default_also=*/true, /*write_description=*/true);
    std::istringstream in(text);
    for (const CLI::ConfigItem& item : app.get_config_formatter()->from_config(in)) {
        const CLI::Option* option = app.get_option_no_throw("--" + item.name);
        if (option == nullptr) continue;
        const std::string value = option->get_default_str();
        if (item.inputs.size() != 1 || item.inputs.front() != value)
            throw UsageError(fmt::format("--{} '{}' cannot be written to config.toml and read back unchanged{}; choose "
                                         "another value",
                                         item.name, one_line(value),
                                         value.find('#') != std::string::npos ? " (CLI11 reads '#' as a comment, even in quotes)"
                                                                              : ""));
    }
    return text;
}

namespace {

CLI::Validator number_at_least(bool zero_allowed) {
    return CLI::Validator(
        [zero_allowed](std::string& text) -> std::string {
            double value = 0;
            if (!CLI::detail::lexical_cast(text, value) || std::isnan(value)) return fmt::format("'{}' is not a number", text);
            if (zero_allowed ? value >= 0 : value > 0) return std::string();
            return fmt::format("must be {}, not {}", zero_allowed ? "0 or more" : "greater than 0", text);
        },
        zero_allowed ? "NONNEGATIVE" : "POSITIVE");
}

}  // namespace

CLI::Validator positive_number() { return number_at_least(false); }
CLI::Validator non_negative_number() { return number_at_least(true); }

CLI::Validator count_or_auto(int largest, bool or_default) {
    return CLI::Validator(
        [largest, or_default](std::string& v) -> std::string {
            if (v == "auto" || (or_default && v == "default")) return "";
            size_t used = 0;
            try {
                const long n = std::stol(v, &used);
                if (used == v.size() && n > 0 && n <= largest) return "";
            } catch (const std::exception&) {
            }
            return fmt::format("must be a whole number from 1 to {}, {}auto, not {}", largest, or_default ? "default or " : "or ", v);
        },
        or_default ? "N|default|auto" : "N|auto");
}

namespace {

// "" when `text` is exactly a number of the type CLI11 calls `type` (INT, UINT, FLOAT), else why not.
std::string strict_value_problem(const std::string& type, const std::string& text) {
    const char* begin = text.data();
    const char* end = begin + text.size();
    if (type == "UINT") {
        uint64_t value = 0;
        const auto [stop, error] = std::from_chars(begin, end, value);
        if (text.empty() || error != std::errc() || stop != end)
            return fmt::format("'{}' is not a whole number from 0 to {}", text, UINT64_MAX);
    } else if (type == "INT") {
        int64_t value = 0;
        const auto [stop, error] = std::from_chars(begin, end, value);
        if (text.empty() || error != std::errc() || stop != end) return fmt::format("'{}' is not a whole number", text);
    } else if (type == "FLOAT") {
        double value = 0;
        const char* from = begin != end && *begin == '+' ? begin + 1 : begin;  // from_chars takes no '+'
        const auto [stop, error] = std::from_chars(from, end, value);
        if (text.empty() || error != std::errc() || stop != end) return fmt::format("'{}' is not a number", text);
        if (!std::isfinite(value)) return fmt::format("'{}' is not a finite number", text);
    }
    return std::string();
}

}  // namespace

void check_values_strictly(CLI::App& app) {
    for (CLI::Option* option : app.get_options()) {
        const std::string full = option->get_type_name();  // "INT", or "INT:INT in [1 - 1024]" with validators
        const std::string type = full.substr(0, full.find(':'));
        if (type != "INT" && type != "UINT" && type != "FLOAT") continue;
        option->check(CLI::Validator([type](std::string& text) { return strict_value_problem(type, text); }, ""));
    }
    for (CLI::App* command : app.get_subcommands([](CLI::App*) { return true; })) check_values_strictly(*command);
}

std::string one_line(std::string text) {
    for (char& c : text)
        if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    while (!text.empty() && text.back() == ' ') text.pop_back();
    return text;
}

}  // namespace resunet
