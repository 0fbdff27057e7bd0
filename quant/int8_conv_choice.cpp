// Measuring an int8 layer's candidates (quant/int8_conv_choice.h).
#include "quant/int8_conv_choice.h"

#include <fmt/format.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <random>
#include <vector>

#include "engine/candidate_trial.h"

namespace resunet::quant_detail {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

std::vector<char> aligned_scratch(size_t bytes, void** aligned) {
    std::vector<char> buffer(bytes + 64);
    *aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) / 64 * 64);
    return buffer;
}

// The layer's direct kernel, and the Winograd when `make` is given, measured by the tuner's protocol on the
// same data: the summary, the direct kernel's time, and the Winograd when it won.
struct Int8Trial {
    std::string summary;
    double direct_ms = -1;
    std::shared_ptr<WinogradInt8> winograd;
};

Int8Trial measure_int8(const engine& eng, stream& strm, const convolution_forward::primitive_desc& direct_pd,
                       const PreparedLayer& layer, const WinogradInt8Shape& shape, Tuning tune,
                       const std::function<std::shared_ptr<WinogradInt8>()>* make) {
    // A synthetic post-ReLU input (half-normal, zero point 0, as most int8 inputs here), the layer's
    // weights, a zero dst (so a fused residual sum adds nothing), both candidates on the same data.
    const int64_t n = shape.batch, h = shape.height, w = shape.width, ic = shape.in_channels, oc = shape.out_channels;
    const ActivationQuant input{0.02f, 0};
    std::vector<uint8_t> src(static_cast<size_t>(n * (h + 2) * (w + 2) * ic), 0);
    std::mt19937 rng(12345);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int64_t b = 0; b < n; ++b)
        for (int64_t y = 1; y <= h; ++y)
            for (int64_t x = 1; x <= w; ++x)
                for (int64_t i = 0; i < ic; ++i)
                    src[static_cast<size_t>(((b * (h + 2) + y) * (w + 2) + x) * ic + i)] =
                        static_cast<uint8_t>(std::min(255.0f, std::nearbyint(std::abs(normal(rng)) * 40.0f)));
    const size_t out_elements = static_cast<size_t>(n * h * w * oc);
    std::vector<float> direct_out(out_elements, 0.0f), winograd_out;

    memory user_weights({{oc, ic, 3, 3}, dt::s8, tag::oihw}, eng, const_cast<int8_t*>(layer.quant.q.data()));
    memory weights(direct_pd.weights_desc(), eng);
    reorder(user_weights, weights).execute(strm, user_weights, weights);
    memory multiplier({{1, oc, 1, 1}, dt::f32, tag::abcd}, eng);
    memory bias({{oc}, dt::f32, tag::x}, eng);
    float* mul = static_cast<float*>(multiplier.get_data_handle());
    float* bias_q = static_cast<float*>(bias.get_data_handle());
    for (int64_t o = 0; o < oc; ++o) {
        mul[o] = input.scale * layer.quant.scales[static_cast<size_t>(o)];
        bias_q[o] = layer.bias[static_cast<size_t>(o)] / mul[o];  // zero point 0: no sum term
    }
    void* direct_scratch = nullptr;
    std::vector<char> direct_scratch_buffer = aligned_scratch(direct_pd.scratchpad_desc().get_size(), &direct_scratch);
    const convolution_forward direct(direct_pd);
    const std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(direct_pd.src_desc(), eng, src.data())},
        {DNNL_ARG_WEIGHTS, weights},
        {DNNL_ARG_BIAS, bias},
        {DNNL_ARG_DST, memory(direct_pd.dst_desc(), eng, direct_out.data())},
        {DNNL_ARG_SCRATCHPAD, memory(direct_pd.scratchpad_desc(), eng, direct_scratch)},
        {DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, multiplier}};

    // The tuner's protocol (engine/candidate_trial.h): direct is the reference, the Winograd is checked
    // against it before it is timed, and wins only when kInt8WinogradMargin faster.
    std::shared_ptr<WinogradInt8> winograd;
    std::vector<char> scratch_buffer;
    std::vector<TrialCandidate> trial(make ? 2 : 1);
    trial[0].name = "direct";
    trial[0].prepare = [&]() -> std::optional<TrialRun> {
        return TrialRun{[&] { std::fill(direct_out.begin(), direct_out.end(), 0.0f); },
                        [&] {
                            direct.execute(strm, args);
                            strm.wait();
                        },
                        [&] { return direct_out; }};
    };
    if (make) {
        trial[1].name = "winograd_int8_f23";
        trial[1].bound = kInt8WinogradBound;
        trial[1].drop = [&] { winograd.reset(); };
        trial[1].prepare = [&]() -> std::optional<TrialRun> {
            winograd = (*make)();
            winograd_out.assign(out_elements, 0.0f);
            void* scratch = nullptr;
            scratch_buffer = aligned_scratch(winograd->scratch_bytes(), &scratch);
            return TrialRun{[&] { std::fill(winograd_out.begin(), winograd_out.end(), 0.0f); },
                            [&, scratch] { winograd->execute(strm, src.data(), input, winograd_out.data(), scratch); },
                            [&] { return winograd_out; }};
        };
    }
    // Best of 5 (fast) or 9 (full): a layer takes 1-5 ms here, and with 3 the choice flipped between starts.
    const TrialResult result = run_trial(trial, {.reps = tune == Tuning::full ? 9 : 5, .margin = kInt8WinogradMargin});
    Int8Trial out{result.summary, trial[0].ms, nullptr};
    if (result.chosen == 1) out.winograd = std::move(winograd);
    return out;
}

}  // namespace

bool winograd_int8_rule(const WinogradInt8Shape& shape, std::string* why) {
    // With fewer than 128 input or output channels the transforms (per tile, linear in the channels) cost more
    // than the multiply-adds saved (quadratic): VNNI's direct kernel runs near its peak there. This is the
    // layer set the measured choice settled on most often on VNNI CPUs (docs/plan.md).
    const int64_t narrowest = std::min(shape.in_channels, shape.out_channels);
    if (narrowest >= kInt8WinogradRuleChannels) {
        *why = fmt::format("rule: {} -> {} channels, at least {}", shape.in_channels, shape.out_channels, kInt8WinogradRuleChannels);
        return true;
    }
    *why = fmt::format("rule: direct, {} -> {} channels (our int8 Winograd from {})", shape.in_channels, shape.out_channels,
                       kInt8WinogradRuleChannels);
    return false;
}

}  // namespace resunet::quant_detail

namespace resunet {

Int8ConvAlgorithm int8_conv_from_name(const std::string& name) {
    for (Int8ConvAlgorithm a : {Int8ConvAlgorithm::automatic, Int8ConvAlgorithm::direct, Int8ConvAlgorithm::winograd_f23,
                                Int8ConvAlgorithm::mixed})
        if (name == int8_conv_name(a)) return a;
    throw Error(fmt::format("int8 convolution algorithm: '{}' is none of auto, direct, winograd, mixed", name));
}

std::string int8_conv_name(Int8ConvAlgorithm algorithm) {
    switch (algorithm) {
        case Int8ConvAlgorithm::automatic: return "auto";
        case Int8ConvAlgorithm::direct: return "direct";
        case Int8ConvAlgorithm::winograd_f23: return "winograd";
        case Int8ConvAlgorithm::mixed: return "mixed";
    }
    return "auto";
}

}  // namespace resunet

namespace resunet::quant_detail {

double time_int8_direct(const engine& eng, stream& strm, const convolution_forward::primitive_desc& direct_pd,
                        const PreparedLayer& layer, const WinogradInt8Shape& shape, Tuning tune) {
    return measure_int8(eng, strm, direct_pd, layer, shape, tune, nullptr).direct_ms;
}

Int8ConvChoice choose_int8_conv(const engine& eng, stream& strm, const convolution_forward::primitive_desc& direct_pd,
                                const PreparedLayer& layer, const WinogradInt8Shape& shape, Int8ConvAlgorithm algorithm,
                                Tuning tune) {
    Int8ConvChoice choice;
    std::string why;
    const bool offered = WinogradInt8::applies(shape, &why);
    if (algorithm == Int8ConvAlgorithm::direct || (algorithm == Int8ConvAlgorithm::automatic && tune == Tuning::off)) {
        choice.candidates = "direct (asked for)";
        return choice;
    }
    if (algorithm == Int8ConvAlgorithm::mixed) {  // its int8 layers run direct: the exact integer kernel
        choice.candidates = "direct (mixed precision: int8 layers run direct)";
        return choice;
    }
    if (!offered) {  // asked for or measured: direct where it does not apply
        choice.candidates = fmt::format("direct (our int8 Winograd does not apply: {})", why);
        return choice;
    }
    if (algorithm == Int8ConvAlgorithm::automatic && !winograd_int8_measurable(shape.levels)) {
        choice.candidates = fmt::format("direct (our int8 Winograd is chosen only with {}-level weights; this CPU runs {}: "
                                        "docs/design.md, int8 Winograd)",
                                        kStoredWeightLevels, shape.levels);
        return choice;
    }
    std::string rule_why;
    const bool by_rule = algorithm == Int8ConvAlgorithm::automatic && tune == Tuning::rule;
    if (by_rule && !winograd_int8_rule(shape, &rule_why)) {
        choice.candidates = "direct (" + rule_why + ")";
        return choice;
    }
    const std::function<std::shared_ptr<WinogradInt8>()> make = [&] {
        return std::shared_ptr<WinogradInt8>(WinogradInt8::create(eng, strm, shape, layer.quant.q.data(),
                                                                  layer.quant.scales.data(), layer.bias.data()));
    };
    if (algorithm == Int8ConvAlgorithm::winograd_f23 || by_rule) {
        choice.winograd = make();
        choice.algorithm = choice.winograd->algorithm();
        choice.candidates = by_rule ? "winograd_int8_f23 (" + rule_why + ")" : "winograd_int8_f23 (asked for)";
        return choice;
    }

    const Int8Trial trial = measure_int8(eng, strm, direct_pd, layer, shape, tune, &make);
    if (trial.winograd) {
        choice.winograd = trial.winograd;
        choice.algorithm = choice.winograd->algorithm();
    }
    choice.candidates = trial.summary;
    return choice;
}

}  // namespace resunet::quant_detail
