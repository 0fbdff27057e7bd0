// The default planner's rule (engine/plan_rule.h).
#include "engine/plan_rule.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace resunet {

double own_winograd_extra_bytes(int tile, int64_t in_channels, int64_t out_channels) {
    const double positions = static_cast<double>((tile + 2) * (tile + 2));
    return (positions - 9.0) * static_cast<double>(in_channels) * static_cast<double>(out_channels) * sizeof(float);
}

namespace {

double extra_of(const RuleLayer& l, int tile) {
    const double given = l.extra_bytes[tile == 4 ? 0 : 1];
    return given > 0 ? given : own_winograd_extra_bytes(tile, l.in_channels, l.out_channels);
}

}  // namespace

RuleChoice fp32_rule(const std::vector<RuleLayer>& layers, double base_bytes, double budget_bytes) {
    RuleChoice c;
    std::vector<const RuleLayer*> winograd;
    double total = base_bytes;
    for (const RuleLayer& l : layers) {
        if (l.f43_applies || l.f23_applies) {
            const int tile = l.f43_applies ? 4 : 2;
            c.algorithms[l.name] = tile == 4 ? ConvAlgo::winograd_f43 : ConvAlgo::winograd_f23;
            c.why[l.name] = fmt::format("rule: 3x3 stride 1, our Winograd F({0}x{0},3x3) applies", tile);
            total += extra_of(l, tile);
            winograd.push_back(&l);
        } else {
            c.algorithms[l.name] = ConvAlgo::direct;
            c.why[l.name] = "rule: direct (no Winograd applies)";
        }
    }
    // Multiply-adds per extra byte is H x W / (positions - 9) x const: the smallest images give up first.
    auto value = [](const RuleLayer& l) { return l.macs / std::max(1.0, extra_of(l, l.f43_applies ? 4 : 2)); };
    std::sort(winograd.begin(), winograd.end(), [&](const RuleLayer* a, const RuleLayer* b) {
        return value(*a) != value(*b) ? value(*a) < value(*b) : a->name < b->name;
    });
    int leaner = 0, dropped = 0;
    for (const RuleLayer* l : winograd) {
        if (total <= budget_bytes) break;
        ConvAlgo& a = c.algorithms[l->name];
        if (a == ConvAlgo::winograd_f43 && l->f23_applies) {
            total -= extra_of(*l, 4) - extra_of(*l, 2);
            a = ConvAlgo::winograd_f23;
            c.why[l->name] = "rule: winograd_f23 (F(4x4) over the memory budget)";
            ++leaner;
            if (total <= budget_bytes) break;
        }
        total -= extra_of(*l, a == ConvAlgo::winograd_f43 ? 4 : 2);
        if (a == ConvAlgo::winograd_f23 && c.why[l->name].find("F(4x4)") != std::string::npos) --leaner;
        a = ConvAlgo::direct;
        c.why[l->name] = "rule: direct (Winograd over the memory budget)";
        ++dropped;
    }
    int counts[3] = {0, 0, 0};
    for (const auto& [name, a] : c.algorithms) ++counts[a == ConvAlgo::winograd_f43 ? 0 : a == ConvAlgo::winograd_f23 ? 1 : 2];
    c.note = fmt::format("rule: {} winograd_f43, {} winograd_f23, {} direct", counts[0], counts[1], counts[2]);
    if (std::isfinite(budget_bytes))
        c.note += fmt::format("; memory budget {:.0f} MB over weights and arena (direct plan {:.0f} MB, this plan {:.0f} MB){}{}",
                              budget_bytes / 1e6, base_bytes / 1e6, total / 1e6,
                              leaner ? fmt::format(", {} on the leaner F(2x2)", leaner) : std::string(),
                              dropped ? fmt::format(", {} left direct", dropped) : std::string());
    return c;
}

}  // namespace resunet
