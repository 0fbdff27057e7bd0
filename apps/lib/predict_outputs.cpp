// summary.json rows and the removal of an earlier run's files: see predict_outputs.h.
#include "apps/lib/predict_outputs.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace resunet {
namespace {

constexpr uintmax_t kMaxSummaryBytes = uintmax_t{1} << 30;

std::string canonical_text(const fs::path& path) {
    std::error_code ec;
    fs::path result = fs::weakly_canonical(path, ec);
    if (ec) result = fs::absolute(path, ec);
    return result.lexically_normal().string();
}

// A plain file name (no folder part, not . or ..), as summary.json records outputs.
bool plain_name(const std::string& name) {
    return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

}  // namespace

size_t remove_earlier_run(const Run& run) {
    const fs::path summary = run.out_dir / "summary.json";
    std::error_code ec;
    if (!fs::is_regular_file(fs::symlink_status(summary, ec)) || fs::file_size(summary, ec) > kMaxSummaryBytes) return 0;
    nlohmann::json json;
    try {
        std::ifstream in(summary);
        json = nlohmann::json::parse(in);
    } catch (const std::exception&) {
        return 0;  // not one of ours: leave the folder as it is (the new summary.json replaces it)
    }
    if (!json.is_object() || json.value("format", std::string()) != kPredictSummaryFormat) return 0;
    std::set<std::string> names;
    auto take = [&](const nlohmann::json& list) {
        if (!list.is_array()) return;
        for (const nlohmann::json& name : list)
            if (name.is_string() && plain_name(name.get<std::string>())) names.insert(name.get<std::string>());
    };
    take(json.value("files", nlohmann::json()));
    if (const auto rows = json.find("rows"); rows != json.end() && rows->is_array())
        for (const nlohmann::json& row : *rows)
            if (row.is_object()) take(row.value("outputs", nlohmann::json()));
    std::set<std::string> protected_paths;
    for (const std::string& path : run.paths) protected_paths.insert(canonical_text(path));
    for (const std::string& path : run.truth_paths)
        if (!path.empty()) protected_paths.insert(canonical_text(path));
    size_t removed = 0;
    for (const std::string& name : names) {
        const fs::path path = run.out_dir / name;
        if (!fs::is_regular_file(fs::symlink_status(path, ec)) || protected_paths.count(canonical_text(path))) continue;
        if (::unlink(path.c_str()) == 0) ++removed;
    }
    return removed;
}

std::string summary_row(const Run& run, const Item& item) {
    nlohmann::json row = {{"input", run.paths[item.index]}, {"id", run.stems[item.index]}};
    if (!item.error.empty()) {
        row["error"] = item.error;
        return row.dump();
    }
    row["width"] = item.width;
    row["height"] = item.height;
    row["outputs"] = output_file_names(run.options, run.stems[item.index]);
    if (item.scored) {
        auto number = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
        row["dice"] = number(item.metrics.dice);
        row["iou"] = number(item.metrics.iou);
        row["mean_iou"] = number(item.metrics.mean_iou);
    }
    return row.dump();
}

nlohmann::json rows_json(const std::string& rows) {
    nlohmann::json array = nlohmann::json::array();
    std::istringstream lines(rows);
    std::string line;
    while (std::getline(lines, line))
        if (!line.empty()) array.push_back(nlohmann::json::parse(line));
    return array;
}

}  // namespace resunet
