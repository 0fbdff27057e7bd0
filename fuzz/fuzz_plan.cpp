// libFuzzer target: load_plan_file on an arbitrary plan file (`--plan FILE`). Bad input must end in
// resunet::Error; an accepted plan must write back to a file that loads to the same plan (same id, same text).
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/plan.h"
#include "fuzz/fuzz_util.h"
#include "graph/graph.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const resunet::fuzz::ScratchDir scratch("resunet_fuzz_plan");
    const std::string path = scratch.write("plan.json", data, size);
    resunet::Plan plan;
    try {
        plan = resunet::load_plan_file(path);
    } catch (const resunet::Error&) {
        return 0;
    }
    RESUNET_FUZZ_CHECK(plan.precision == "fp32" || plan.precision == "int8");
    RESUNET_FUZZ_CHECK(plan.id().size() == 9 && plan.id()[0] == 'p');
    const std::string text = resunet::plan_to_json_text(plan);
    const resunet::Plan again = resunet::plan_from_json_text(text, "round trip");
    RESUNET_FUZZ_CHECK(again.id() == plan.id());
    RESUNET_FUZZ_CHECK(resunet::plan_to_json_text(again) == text);
    return 0;
}
