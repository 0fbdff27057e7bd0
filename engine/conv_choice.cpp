// The planner's per-layer algorithm choice for an fp32 convolution (engine/conv_choice.h).
#include "engine/conv_choice.h"

#include <fmt/format.h>

#include <cstring>
#include <optional>
#include <vector>

#include "engine/conv_tuning.h"
#include "engine/onednn_util.h"

namespace resunet {

using dnnl::memory;

namespace {

// oneDNN's Winograd for the spec, or nothing where it has no kernel (none at all on AVX2 in 2.6).
std::optional<dnnl::convolution_forward::primitive_desc> onednn_winograd(const dnnl::engine& eng, lowering::ConvSpec spec) {
    spec.algorithm = dnnl::algorithm::convolution_winograd;
    try {
        return lowering::make_conv(eng, spec);
    } catch (const dnnl::error&) {
        return std::nullopt;
    }
}

}  // namespace

ConvChoice choose_conv_algorithm(const dnnl::engine& eng, dnnl::stream& strm, const ConvChoiceRequest& request) {
    lowering::ConvSpec direct_spec = request.spec;
    direct_spec.algorithm = dnnl::algorithm::convolution_direct;
    ConvChoice choice;
    choice.pd = lowering::make_conv(eng, direct_spec);
    auto offered = [&](int tile) { return request.own_offered && request.make_own && request.own_offered(tile); };
    auto make_own = [&](int tile) -> std::shared_ptr<WinogradOwn> { return offered(tile) ? request.make_own(tile) : nullptr; };
    auto use = [&](const std::string& algorithm) {
        if (algorithm == "winograd") {
            if (auto winograd = onednn_winograd(eng, direct_spec)) {
                choice.pd = *winograd;
                choice.algorithm = algorithm;
            }
        } else if (is_own_winograd(algorithm)) {
            choice.own = make_own(algorithm == "winograd_f43" ? 4 : 2);
            if (choice.own) choice.algorithm = choice.own->algorithm();
        }
    };
    if (request.forced) {
        use(*request.forced);  // the key matched this machine, so a cached choice is available here
        choice.candidates = choice.algorithm + " (from the plan cache)";
        return choice;
    }
    switch (request.algorithm) {
        case ConvAlgorithm::direct: return choice;
        case ConvAlgorithm::own_winograd_f43: use("winograd_f43"); return choice;
        case ConvAlgorithm::own_winograd_f23: use("winograd_f23"); return choice;
        case ConvAlgorithm::winograd:
            if (request.winograd_shape) use("winograd");
            return choice;
        case ConvAlgorithm::tuned: break;
    }
    if (request.tune == Tuning::off || !request.winograd_shape) return choice;
    if (request.tune == Tuning::rule) {  // engine/plan_rule.h: our F(4x4), else F(2x2), where it applies; never timed
        for (const char* algorithm : {"winograd_f43", "winograd_f23"}) {
            use(algorithm);
            if (choice.own) break;
        }
        choice.candidates = choice.own ? fmt::format("rule: {} applies", choice.algorithm) : "rule: direct (no Winograd applies)";
        return choice;
    }

    std::vector<ConvCandidate> trial = {{"direct", choice.pd}};
    if (auto winograd = onednn_winograd(eng, direct_spec)) trial.push_back({"winograd", *winograd, kWinogradRelativeBound});
    // Ours built only when measured (ConvCandidate::make_own), kept only while the fastest.
    for (int tile : {4, 2})
        if (offered(tile))
            trial.push_back({tile == 4 ? "winograd_f43" : "winograd_f23", choice.pd, kOwnWinogradRelativeBound, nullptr,
                             [&make_own, tile] { return make_own(tile); }});
    if (trial.size() == 1) return choice;
    const memory::dims& dims = direct_spec.weight_dims;
    memory user_weights({dims, memory::data_type::f32, memory::format_tag::oihw}, eng, const_cast<float*>(request.weights));
    memory bias({{dims[0]}, memory::data_type::f32, memory::format_tag::x}, eng);
    std::memcpy(bias.get_data_handle(), request.bias, static_cast<size_t>(dims[0]) * sizeof(float));
    const ConvTrial result = measure_conv(eng, strm, trial, user_weights, bias, request.tune == Tuning::full ? 7 : 3);
    const ConvCandidate& chosen = trial[result.chosen];
    choice.measurement.preferred = chosen.name;
    if (!request.measure_only) {
        if (chosen.own)
            choice.own = chosen.own;
        else
            choice.pd = chosen.pd;
        choice.algorithm = choice.measurement.preferred;
    }
    choice.candidates = result.summary;
    choice.ms = trial[request.measure_only ? 0 : result.chosen].ms;
    // Slot 1: the chosen candidate, else the fastest other one that passed (for the record).
    size_t other = result.chosen;
    for (size_t i = 1; i < trial.size() && result.chosen == 0; ++i)
        if (trial[i].passed && (other == 0 || trial[i].ms < trial[other].ms)) other = i;
    if (other == 0) return choice;
    choice.measurement.measured = true;
    // Slot 2: the leaner runner-up of a Winograd choice, for the memory budget.
    size_t leaner = 0;
    auto bytes = [&](size_t i) { return trial[i].weight_bytes + trial[i].scratch_bytes; };
    for (size_t i = 1; i < trial.size() && result.chosen != 0; ++i)
        if (i != other && trial[i].passed && trial[i].ms < trial[0].ms && bytes(i) < bytes(other) &&
            (leaner == 0 || trial[i].ms < trial[leaner].ms))
            leaner = i;
    if (leaner > 0) choice.measurement.fallback = trial[leaner].name;
    const size_t pick[3] = {0, other, leaner};
    for (int i = 0; i < (leaner > 0 ? 3 : 2); ++i) {
        const ConvCandidate& c = trial[pick[i]];
        choice.measurement.ms[i] = c.ms;
        choice.measurement.weight_bytes[i] = c.weight_bytes;
        choice.measurement.scratch[i] = c.scratch_bytes;
    }
    return choice;
}

}  // namespace resunet
