// libFuzzer target: load_split on an arbitrary split file, validated against a small synthetic dataset
// that holds one of Kvasir-SEG's near-duplicate groups. Bad input must end in resunet::Error; an
// accepted split must name only known ids, sorted, on one side each, with the group kept together.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "data/split.h"
#include "fuzz/fuzz_util.h"

namespace {

resunet::Dataset make_dataset() {
    resunet::Dataset dataset;
    dataset.root = "synthetic";
    std::vector<std::string> ids = {"a", "b", "c", "d", "e", "f"};
    for (const std::string& id : resunet::kvasir_near_duplicate_groups().front()) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    for (const std::string& id : ids) dataset.samples.push_back({id, id + ".png", id + ".png", 8, 8});
    return dataset;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const resunet::fuzz::ScratchDir scratch("resunet_fuzz_split");
    static const resunet::Dataset dataset = make_dataset();
    static const resunet::IdGroups extra_groups = {{"a", "b"}};
    const std::string path = scratch.write("split.json", data, size);
    resunet::Split split;
    try {
        split = resunet::load_split(path, dataset, extra_groups);
    } catch (const resunet::Error&) {
        return 0;
    }
    for (const auto* side : {&split.train_ids, &split.test_ids}) {
        RESUNET_FUZZ_CHECK(std::is_sorted(side->begin(), side->end()));
        RESUNET_FUZZ_CHECK(std::adjacent_find(side->begin(), side->end()) == side->end());
        for (const std::string& id : *side) RESUNET_FUZZ_CHECK(dataset.find(id).has_value());
    }
    for (const std::string& id : split.train_ids)
        RESUNET_FUZZ_CHECK(!std::binary_search(split.test_ids.begin(), split.test_ids.end(), id));
    auto side_of = [&](const std::string& id) {
        if (std::binary_search(split.train_ids.begin(), split.train_ids.end(), id)) return 1;
        if (std::binary_search(split.test_ids.begin(), split.test_ids.end(), id)) return 2;
        return 0;
    };
    for (const auto& group : {extra_groups.front(), resunet::kvasir_near_duplicate_groups().front()}) {
        const int first = side_of(group[0]), second = side_of(group[1]);
        RESUNET_FUZZ_CHECK(first == 0 || second == 0 || first == second);
    }
    return 0;
}
