#include "engine/plan_cache.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "engine/engine.h"
#include "engine/onednn_util.h"
#include "engine/plan.h"
#include "graph/atomic_file.h"
#include "graph/safetensors.h"

namespace resunet {

namespace {

using json = nlohmann::json;
constexpr const char* kFormat = "resunet-plan-2";  // 2: the plan is a Plan (engine/plan.h)

uint32_t crc_of(const std::string& text) { return crc32(reinterpret_cast<const uint8_t*>(text.data()), text.size()); }

// Every node's kind, name, hyper-parameters and output shape: two graphs with the same text compile alike.
std::string graph_signature(const Graph& graph) {
    std::string text;
    for (const Node& node : graph.nodes())
        text += fmt::format("{}:{}:{}:{}:{}:{}:{};", static_cast<int>(node.kind), node.name, node.out_channels,
                            node.kernel, node.stride, node.padding, dims_to_string(graph.value(node.output).dims));
    return fmt::format("{} nodes, crc32 {:08x}", graph.nodes().size(), crc_of(text));
}

}  // namespace

PlanKey plan_key(const Graph& graph, const std::string& precision, int threads, int micro_batch,
                 const std::string& tune) {
    const dnnl_version_t* v = dnnl_version();
    const json key = {{"format", kFormat},
                      {"cpu", cpu_model_name()},
                      {"isa", effective_isa_name()},
                      {"onednn", fmt::format("{}.{}.{}", v->major, v->minor, v->patch)},
                      {"graph", graph_signature(graph)},
                      {"input", dims_to_string(graph.value(graph.input_value()).dims)},
                      {"precision", precision},
                      {"threads", threads},
                      {"micro_batch", micro_batch},
                      {"tune", tune}};
    PlanKey k;
    k.text = key.dump();
    k.filename = fmt::format("plan-{}-{:08x}.json", precision, crc_of(k.text));
    return k;
}

std::optional<CachedPlan> load_plan(const std::string& folder, const PlanKey& key, std::string* why) {
    const std::filesystem::path path = std::filesystem::path(folder) / key.filename;
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        *why = "no cached plan";
        return std::nullopt;
    }
    std::stringstream buffer;
    buffer << in.rdbuf();
    json file;
    try {
        file = json::parse(buffer.str());
        const std::string body = file.at("key").dump() + file.at("plan").dump() + file.at("summary").dump();
        if (file.at("checksum").get<std::string>() != fmt::format("{:08x}", crc_of(body))) {
            *why = "damaged: checksum mismatch";
            return std::nullopt;
        }
        if (file.at("key").dump() != key.text) {
            *why = "stale: written for another machine, library, graph or setting";
            return std::nullopt;
        }
        CachedPlan cached;
        try {
            cached.plan = plan_from_json_text(file.at("plan").dump(), "cached plan");  // the plan file's checks
        } catch (const Error& e) {
            *why = fmt::format("damaged: {}", e.what());
            return std::nullopt;
        }
        cached.summary = file.at("summary").get<std::string>();
        return cached;
    } catch (const json::exception& e) {
        *why = fmt::format("damaged: {}", e.what());
        return std::nullopt;
    }
}

void save_plan(const std::string& folder, const PlanKey& key, const CachedPlan& plan) {
    std::error_code ec;
    std::filesystem::create_directories(folder, ec);
    if (ec) throw Error(fmt::format("plan cache '{}': cannot create the folder: {}", folder, ec.message()));
    json file = {{"key", json::parse(key.text)}, {"plan", json::parse(plan_to_json_text(plan.plan))}, {"summary", plan.summary}};
    file["checksum"] = fmt::format("{:08x}", crc_of(file["key"].dump() + file["plan"].dump() + file["summary"].dump()));
    write_file_atomic((std::filesystem::path(folder) / key.filename).string(), file.dump(1) + "\n");
}

std::string default_plan_cache() {
    if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) return std::string(xdg) + "/resunet/plans";
    if (const char* home = std::getenv("HOME"); home && *home) return std::string(home) + "/.cache/resunet/plans";
    return "";
}

int remove_cached_plans(const std::string& folder) {
    int removed = 0;
    std::error_code ec;
    if (folder.empty() || !std::filesystem::is_directory(folder, ec)) return 0;
    for (const auto& entry : std::filesystem::directory_iterator(folder, ec)) {
        const std::string name = entry.path().filename().string();
        if ((name.starts_with("plan-f32-") || name.starts_with("plan-u8s8-")) && name.ends_with(".json") &&
            std::filesystem::remove(entry.path(), ec))
            ++removed;
    }
    return removed;
}

}  // namespace resunet
