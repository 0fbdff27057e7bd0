// The measured fp32 planner (--tune fast|full): each convolution's candidates timed, the memory budget, and the
// layout contest (oneDNN's layout against the blocked one, a timed pass of each). engine/engine_run.cpp calls
// it where the options ask for measuring; the rule (engine/plan_rule.h) and a given plan need none of it.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "engine/engine_impl.h"

namespace resunet {

namespace {

// A plan for one layout with the choice fixed (no measuring).
struct Choice {
    tag layout = tag::undef;
    std::map<std::string, std::string> algorithms, candidates;
    std::string budget_note;
};

std::unique_ptr<Engine::Impl> lower_fixed(const Graph& graph, const TensorMap& weights, const Choice& choice,
                                      const EngineOptions& o) {
    auto plan = std::make_unique<Engine::Impl>();
    plan->compile(graph, weights, o, FixedChoices{choice.layout, choice.algorithms});
    for (Step& step : plan->steps)
        if (auto it = choice.candidates.find(step.name); it != choice.candidates.end() && step.op.starts_with("conv"))
            step.candidates = it->second;
    return plan;
}

// A tuned plan for one layout: the candidates measured with every convolution lowered direct, the memory budget
// applied to the faster choices, then the plan lowered again with the choice fixed. Returns the plan; `choice`
// gets its layout and algorithms (to rebuild it without measuring).
std::unique_ptr<Engine::Impl> tuned_plan(const Graph& graph, const TensorMap& weights, const EngineOptions& o, Choice* choice) {
    auto measured = std::make_unique<Engine::Impl>();
    measured->measure_only = true;
    measured->compile(graph, weights, o);
    const std::vector<Step>& steps = measured->steps;
    std::vector<size_t> winograd_steps;
    for (size_t i = 0; i < steps.size(); ++i)
        if (steps[i].tuned.measured && !steps[i].tuned.preferred.empty() && steps[i].tuned.preferred != "direct")
            winograd_steps.push_back(i);
    choice->layout = measured->act_tag;
    for (const Step& step : steps)
        if (step.op.starts_with("conv")) {
            choice->algorithms[step.name] = "direct";
            choice->candidates[step.name] = step.candidates;
        }
    if (winograd_steps.empty()) return measured;  // already the plan: every convolution direct
    // The budget: Winograd layers (oneDNN's or ours) that save the least time per extra byte fall
    // back to their leaner runner-up (F(2x2) for F(4x4)) or stay direct until it fits.
    std::vector<int> slot(steps.size(), 0);  // per step: 0 direct, 1 preferred, 2 fallback
    auto scratch = [&] {
        size_t most = 0;
        for (size_t k = 0; k < steps.size(); ++k)
            most = std::max(most, slot[k] > 0 ? steps[k].tuned.scratch[slot[k]] : steps[k].scratch_bytes);
        return most;
    };
    size_t weights_now = measured->weight_store.bytes();  // every convolution direct
    const double direct_total = static_cast<double>(weights_now + measured->arena.bytes() + scratch());
    const double budget = o.memory_budget_mb > 0    ? std::max(o.memory_budget_mb * 1e6, direct_total)
                          : o.memory_budget_mb == 0 ? kDefaultMemoryBudgetFactor * direct_total
                                                    : INFINITY;
    auto extra = [&](size_t i, int which = 1) {
        return static_cast<double>(steps[i].tuned.weight_bytes[which]) - static_cast<double>(steps[i].tuned.weight_bytes[0]);
    };
    auto value = [&](size_t i) {  // ms saved per extra byte (weights and scratchpad)
        const double more = extra(i) + std::max(0.0, static_cast<double>(steps[i].tuned.scratch[1]) -
                                                         static_cast<double>(steps[i].tuned.scratch[0]));
        return (steps[i].tuned.ms[0] - steps[i].tuned.ms[1]) / std::max(1.0, more);
    };
    std::sort(winograd_steps.begin(), winograd_steps.end(), [&](size_t a, size_t b) { return value(a) > value(b); });
    int kept = 0, dropped = 0;
    double total = direct_total;
    int fell_back = 0;
    for (size_t i : winograd_steps) {
        bool fits = false;
        for (int which : {1, 2}) {
            if (which == 2 && steps[i].tuned.fallback.empty()) break;
            slot[i] = which;
            const double with = static_cast<double>(weights_now) + extra(i, which) +
                                static_cast<double>(measured->arena.bytes()) + static_cast<double>(scratch());
            if (with > budget) continue;
            weights_now = static_cast<size_t>(static_cast<double>(weights_now) + extra(i, which));
            total = with;
            fits = true;
            // oneDNN's Winograd or ours; the runner-up said so in the candidates column
            choice->algorithms[steps[i].name] = which == 1 ? steps[i].tuned.preferred : steps[i].tuned.fallback;
            if (which == 2) {
                ++fell_back;
                choice->candidates[steps[i].name] += " -> " + steps[i].tuned.fallback + " (memory budget)";
            }
            break;
        }
        if (!fits) {
            slot[i] = 0;
            ++dropped;
            choice->candidates[steps[i].name] += " -> direct (memory budget)";
            continue;
        }
        ++kept;
    }
    if (std::isfinite(budget))
        choice->budget_note = fmt::format("; memory budget {:.0f} MB (direct plan {:.0f} MB): {} winograd kept{}{}",
                                          budget / 1e6, direct_total / 1e6, kept,
                                          fell_back ? fmt::format(" ({} on a leaner tile)", fell_back) : std::string(),
                                          dropped ? fmt::format(", {} left direct", dropped) : std::string());
    (void)total;
    measured.reset();  // freed before the fixed plan is lowered: the two never coexist
    return_freed_memory();
    return lower_fixed(graph, weights, *choice, o);
}

}  // namespace

std::unique_ptr<Engine::Impl> compile_measured(const Graph& graph, const TensorMap& weights, const EngineOptions& options,
                                           std::string* layouts, std::string* budget_note) {
    Choice choice;
    std::unique_ptr<Engine::Impl> impl = tuned_plan(graph, weights, options, &choice);
    *budget_note = choice.budget_note;
    if (options.layout == EngineLayout::automatic) {
        // oneDNN's own layout against the blocked one (in-place concats, pixel-shuffle deconvolutions,
        // and Winograd, which oneDNN 2.6 has for blocked layouts only): a timed pass of each plan.
        // One plan is alive at a time, so the peak memory is that of the larger plan.
        EngineOptions blocked_options = options;
        blocked_options.layout = EngineLayout::blocked;
        const tag blocked = blocked_layout_here(graph, options);
        if (blocked != tag::undef && blocked != impl->act_tag) {
            const int reps = options.tune == Tuning::full ? 3 : 1;
            const double automatic_ms = impl->time_pass(reps);
            impl.reset();
            return_freed_memory();
            Choice blocked_choice;
            impl = tuned_plan(graph, weights, blocked_options, &blocked_choice);
            const double blocked_ms = impl->time_pass(reps);
            const bool take_blocked = blocked_ms < automatic_ms;
            *layouts = fmt::format("layout {} {:.3g} ms{} vs {} {:.3g} ms{}; ", layout_name(choice.layout),
                                  automatic_ms, take_blocked ? "" : " *", layout_name(impl->act_tag), blocked_ms,
                                  take_blocked ? " *" : "");
            if (take_blocked) {
                *budget_note = blocked_choice.budget_note;
            } else {
                impl.reset();
                return_freed_memory();
                impl = lower_fixed(graph, weights, choice, options);
            }
        }
    }
    return impl;
}

}  // namespace resunet
