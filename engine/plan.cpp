// The plan object and its file format (engine/plan.h).
#include "engine/plan.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <array>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "graph/atomic_file.h"
#include "graph/graph.h"
#include "graph/safetensors.h"

namespace resunet {

namespace {

using json = nlohmann::json;
constexpr const char* kPlanFileFormat = "resunet-plan-file-1";

struct AlgoName {
    ConvAlgo algorithm;
    std::string_view name;
};
constexpr std::array<AlgoName, 5> kAlgoNames = {{{ConvAlgo::direct, "direct"},
                                                  {ConvAlgo::winograd_onednn, "winograd"},
                                                  {ConvAlgo::winograd_f43, "winograd_f43"},
                                                  {ConvAlgo::winograd_f23, "winograd_f23"},
                                                  {ConvAlgo::winograd_int8_f23, "winograd_int8_f23"}}};

// What changes the numbers, canonically (std::map keeps the layers sorted).
std::string numerics_text(const Plan& plan) {
    std::string text = plan.micro_batch_changes_numbers()
                           ? fmt::format("{}|{}|{}|", plan.precision, plan.layout, plan.micro_batch)
                           : fmt::format("{}|{}|", plan.precision, plan.layout);
    for (const auto& [name, layer] : plan.layers)
        text += fmt::format("{}:{}:{};", name, conv_algo_name(layer.algorithm), layer.precision);
    return text;
}

}  // namespace

std::string_view conv_algo_name(ConvAlgo algorithm) {
    for (const AlgoName& a : kAlgoNames)
        if (a.algorithm == algorithm) return a.name;
    return "direct";
}

ConvAlgo conv_algo_from_name(std::string_view name) {
    std::string valid;
    for (const AlgoName& a : kAlgoNames) {
        if (a.name == name) return a.algorithm;
        valid += fmt::format("{}{}", valid.empty() ? "" : ", ", a.name);
    }
    throw Error(fmt::format("'{}' is no convolution algorithm (one of {})", name, valid));
}

bool fp32_micro_batch_keeps_numbers(const std::string& cpu_class) { return cpu_class.starts_with("avx512"); }

bool Plan::micro_batch_changes_numbers() const {
    if (precision != "fp32" || !fp32_micro_batch_keeps_numbers(cpu_class)) return true;
    for (const auto& [name, layer] : layers)
        if (layer.algorithm == ConvAlgo::winograd_onednn) return true;
    return false;
}

std::string Plan::id() const {
    const std::string text = numerics_text(*this);
    return fmt::format("p{:08x}", crc32(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

std::string Plan::counts() const {
    std::map<std::string, int> n;
    for (const auto& [name, layer] : layers)
        ++n[layer.precision == "u8s8" || precision == "fp32" ? std::string(conv_algo_name(layer.algorithm))
                                                             : fmt::format("{} (f32)", conv_algo_name(layer.algorithm))];
    std::string text;
    for (const AlgoName& a : kAlgoNames)
        for (const std::string& key : {std::string(a.name), fmt::format("{} (f32)", a.name)})
            if (auto it = n.find(key); it != n.end()) text += fmt::format("{}{} {}", text.empty() ? "" : ", ", it->second, key);
    return text.empty() ? "no convolutions" : text;
}

std::string plan_to_json_text(const Plan& plan) {
    json layers = json::object();
    for (const auto& [name, layer] : plan.layers)
        layers[name] = {{"algorithm", std::string(conv_algo_name(layer.algorithm))}, {"precision", layer.precision}, {"why", layer.why}};
    const json j = {{"format", kPlanFileFormat}, {"id", plan.id()},           {"precision", plan.precision},
                    {"layout", plan.layout},     {"micro_batch", plan.micro_batch}, {"source", plan.source},
                    {"cpu_class", plan.cpu_class}, {"layers", layers}};
    return j.dump(2) + "\n";
}

Plan plan_from_json_text(const std::string& text, const std::string& what) {
    json j;
    try {
        j = json::parse(text);
    } catch (const json::exception&) {
        throw Error(fmt::format("{}: not a plan file (no valid JSON)", what));
    }
    auto field = [&](const json& object, const char* key, json::value_t type, const std::string& where) -> const json& {
        if (!object.is_object() || !object.contains(key) || object.at(key).type() != type)
            throw Error(fmt::format("{}: {}'{}' is missing or of the wrong type", what, where, key));
        return object.at(key);
    };
    if (!j.is_object() || !j.contains("format") || j.at("format") != kPlanFileFormat)
        throw Error(fmt::format("{}: not a plan file (format is not {})", what, kPlanFileFormat));
    Plan plan;
    plan.precision = field(j, "precision", json::value_t::string, "").get<std::string>();
    if (plan.precision != "fp32" && plan.precision != "int8")
        throw Error(fmt::format("{}: precision '{}' is neither fp32 nor int8", what, plan.precision));
    plan.layout = field(j, "layout", json::value_t::string, "").get<std::string>();
    if (plan.layout != "nChw16c" && plan.layout != "nChw8c" && plan.layout != "nhwc" && plan.layout != "nchw")
        throw Error(fmt::format("{}: layout '{}' is none of nChw16c, nChw8c, nhwc, nchw", what, plan.layout));
    const json& mb = j.contains("micro_batch") ? j.at("micro_batch") : json();
    if (!mb.is_number_unsigned() || mb.get<uint64_t>() < 1 || mb.get<uint64_t>() > 4096)
        throw Error(fmt::format("{}: 'micro_batch' must be an integer in [1, 4096]", what));
    plan.micro_batch = static_cast<int>(mb.get<uint64_t>());
    if (j.contains("source") && j.at("source").is_string()) plan.source = j.at("source").get<std::string>();
    if (j.contains("cpu_class") && j.at("cpu_class").is_string()) plan.cpu_class = j.at("cpu_class").get<std::string>();
    const json& layers = field(j, "layers", json::value_t::object, "");
    for (const auto& [name, layer] : layers.items()) {
        const std::string where = fmt::format("layer '{}': ", name);
        PlanLayer l;
        try {
            l.algorithm = conv_algo_from_name(field(layer, "algorithm", json::value_t::string, where).get<std::string>());
        } catch (const Error& e) {
            throw Error(fmt::format("{}: {}{}", what, where, e.what()));
        }
        l.precision = field(layer, "precision", json::value_t::string, where).get<std::string>();
        if (l.precision != "f32" && l.precision != "u8s8")
            throw Error(fmt::format("{}: {}precision '{}' is neither f32 nor u8s8", what, where, l.precision));
        if ((l.algorithm == ConvAlgo::winograd_int8_f23) != (l.precision == "u8s8" && l.algorithm != ConvAlgo::direct))
            throw Error(fmt::format("{}: {}algorithm {} does not run in {}", what, where, conv_algo_name(l.algorithm), l.precision));
        if (plan.precision == "fp32" && l.precision != "f32")
            throw Error(fmt::format("{}: {}an fp32 plan has only f32 layers", what, where));
        if (layer.contains("why") && layer.at("why").is_string()) l.why = layer.at("why").get<std::string>();
        plan.layers[name] = l;
    }
    if (j.contains("id") && j.at("id").is_string() && j.at("id").get<std::string>() != plan.id())
        throw Error(fmt::format("{}: its id {} does not match its contents ({}): edited by hand?", what,
                                j.at("id").get<std::string>(), plan.id()));
    return plan;
}

void save_plan_file(const std::string& path, const Plan& plan) { write_file_atomic(path, plan_to_json_text(plan)); }

Plan load_plan_file(const std::string& path) {
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status)) throw Error(fmt::format("plan file {}: not found", path));
    if (!std::filesystem::is_regular_file(status)) throw Error(fmt::format("plan file {}: not a regular file", path));
    if (std::filesystem::file_size(path, ec) > (1u << 20) || ec)
        throw Error(fmt::format("plan file {}: larger than 1 MB, not a plan", path));
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(fmt::format("plan file {}: cannot be read", path));
    std::stringstream buffer;
    buffer << in.rdbuf();
    return plan_from_json_text(buffer.str(), fmt::format("plan file {}", path));
}

}  // namespace resunet
