#include "apps/lib/help_format.h"

#include <sstream>
#include <vector>

namespace resunet {

namespace {

// Where a help line's description starts: CLI11 writes option and subcommand lines as the names padded to
// the formatter's column width, then the description; other lines keep their own indentation.
size_t description_column(const std::string& line, size_t name_column) {
    const size_t indent = line.find_first_not_of(' ');
    if (indent == std::string::npos) return 0;
    if (line.size() > name_column && line[name_column - 1] == ' ' && line[name_column] != ' ' && indent < name_column)
        return name_column;
    return indent;
}

void wrap_line(const std::string& line, size_t width, size_t name_column, std::string& out) {
    if (line.size() <= width) {
        out += line + "\n";
        return;
    }
    const size_t column = description_column(line, name_column);
    const std::string indent(column, ' ');
    std::string current = line.substr(0, column);
    bool empty = true;  // no word on `current` yet
    std::istringstream words(line.substr(column));
    std::string word;
    while (words >> word) {
        if (!empty && current.size() + 1 + word.size() > width) {
            out += current + "\n";
            current = indent;
            empty = true;
        }
        current += (empty ? "" : " ") + word;
        empty = false;
    }
    out += current + "\n";
}

}  // namespace

std::string wrap_help_text(const std::string& text, size_t width) {
    const size_t name_column = CLI::Formatter().get_column_width();
    std::string out;
    size_t start = 0;
    while (start < text.size()) {
        size_t end = text.find('\n', start);
        const bool newline = end != std::string::npos;
        if (!newline) end = text.size();
        std::string wrapped;
        wrap_line(text.substr(start, end - start), width, name_column, wrapped);
        if (!newline) wrapped.pop_back();
        out += wrapped;
        start = end + 1;
    }
    return out;
}

}  // namespace resunet
