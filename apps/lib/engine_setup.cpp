// Engine flags to engine options, in one place (apps/lib/engine_setup.h).
#include "apps/lib/engine_setup.h"

#include <fmt/format.h>

#include <map>
#include <mutex>

#include "apps/lib/flag_basics.h"
#include "engine/plan_cache.h"

namespace resunet {

std::string plan_cache_folder(const std::string& flag) {
    if (flag == "none") return std::string();
    return flag.empty() ? default_plan_cache() : flag;
}

std::shared_ptr<const Plan> plan_flag(const EngineTuningFlags& flags) {
    if (flags.plan_file.empty()) return nullptr;
    // One file is read once per process, however many engines are built from it (eval's ranks, bench rows).
    static std::mutex mutex;
    static std::map<std::string, std::shared_ptr<const Plan>> loaded;
    const std::lock_guard<std::mutex> lock(mutex);
    if (auto it = loaded.find(flags.plan_file); it != loaded.end()) return it->second;
    try {
        auto plan = std::make_shared<const Plan>(load_plan_file(flags.plan_file));
        loaded[flags.plan_file] = plan;
        return plan;
    } catch (const Error& e) {
        throw UsageError(fmt::format("--plan: {}", e.what()));
    }
}

void check_engine_flags(const EngineTuningFlags& flags, bool fp32) {
    if (std::shared_ptr<const Plan> plan = plan_flag(flags)) {
        if ((plan->precision == "fp32") != fp32)
            throw UsageError(fmt::format("--plan {} is an {} plan; this run's precision is {}", flags.plan_file, plan->precision,
                                         fp32 ? "fp32" : "int8"));
        if (!flags.int8_conv.empty() || flags.tune != "rule" || flags.memory_budget_mb != 0)
            throw UsageError("--plan fixes every choice; drop --tune, --int8-conv and --memory-budget");
    }
    if (fp32) {
        if (!flags.int8_conv.empty())
            throw UsageError("--int8-conv chooses the int8 engine's convolutions; with --precision fp32 drop it");
        return;
    }
    const bool measured_int8 = flags.int8_conv_or_default() == "auto" && flags.tune != "rule" && flags.tune != "off";
    const bool cache_given = !flags.plan_cache.empty() && flags.plan_cache != "none";
    if (flags.memory_budget_mb != 0 || (cache_given && !measured_int8))
        throw UsageError("--memory-budget and --plan-cache plan the fp32 engine (and --plan-cache the int8 engine's "
                         "measured choices, --tune fast or full); pass --precision fp32 or drop them");
}

int fp32_micro_batch_for(int batch) {
    if (!fp32_micro_batch_keeps_numbers_here()) return 1;  // one image per pass, as resunet predict runs
    for (int mb : {4, 2})
        if (batch % mb == 0) return mb;
    return 1;
}

EngineOptions fp32_engine_options(const EngineTuningFlags& flags, int threads, int micro_batch) {
    check_engine_flags(flags, true);
    EngineOptions options;
    options.threads = threads;
    options.micro_batch = micro_batch;
    options.tune = tuning_from_name(flags.tune);
    options.plan_cache = tuning_measures(options.tune) ? plan_cache_folder(flags.plan_cache) : std::string();
    options.memory_budget_mb = flags.memory_budget_mb;
    if ((options.plan = plan_flag(flags)) && options.plan->micro_batch_changes_numbers())
        options.micro_batch = options.plan->micro_batch;
    return options;
}

QuantOptions int8_engine_options(const EngineTuningFlags& flags, int threads, int micro_batch) {
    check_engine_flags(flags, false);
    QuantOptions options;
    options.threads = threads;
    options.micro_batch = micro_batch;
    options.tune = tuning_from_name(flags.tune);
    options.int8_algorithm = int8_conv_from_name(flags.int8_conv_or_default());
    // Only measured choices are worth caching; the rule's are the same at every start.
    if (options.int8_algorithm == Int8ConvAlgorithm::automatic && tuning_measures(options.tune))
        options.plan_cache = plan_cache_folder(flags.plan_cache);
    if ((options.plan = plan_flag(flags))) options.micro_batch = options.plan->micro_batch;
    return options;
}

std::string plan_label(const Plan& plan) { return fmt::format("plan {} ({})", plan.id(), plan.source); }

}  // namespace resunet
