#include "data/split.h"

#include "graph/atomic_file.h"
#include "graph/input_file.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <unordered_map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/random.h"

namespace resunet {
namespace {

constexpr const char* kSplitFormat = "resunet-split";
constexpr int kSplitVersion = 1;
// A split of the largest datasets is a few hundred KB; anything far larger is not a split file.
constexpr uint64_t kMaxSplitFileBytes = uint64_t{64} << 20;

// An id as JSON writes it, quotes included: a NUL or a newline inside it is shown escaped, never cut.
std::string shown_id(const std::string& id) {
    return nlohmann::json(id.substr(0, 200)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Union-find over positions of a sorted id list.
struct DisjointSets {
    std::vector<size_t> parent;
    explicit DisjointSets(size_t n) : parent(n) { std::iota(parent.begin(), parent.end(), size_t(0)); }
    size_t root(size_t i) {
        while (parent[i] != i) i = parent[i] = parent[parent[i]];
        return i;
    }
    void join(size_t a, size_t b) {
        a = root(a);
        b = root(b);
        if (a != b) parent[std::max(a, b)] = std::min(a, b);
    }
};

// Splits sorted, unique ids into units that must stay together, ordered by their smallest id.
std::vector<std::vector<std::string>> make_units(const std::vector<std::string>& sorted_ids,
                                                 const IdGroups& extra_groups) {
    std::unordered_map<std::string, size_t> position;
    for (size_t i = 0; i < sorted_ids.size(); ++i) position.emplace(sorted_ids[i], i);
    DisjointSets sets(sorted_ids.size());
    auto join_group = [&](const std::vector<std::string>& group) {
        std::optional<size_t> first;
        for (const std::string& id : group) {
            auto it = position.find(id);
            if (it == position.end()) continue;
            if (first)
                sets.join(*first, it->second);
            else
                first = it->second;
        }
    };
    for (const auto& group : kvasir_near_duplicate_groups()) join_group(group);
    for (const auto& group : extra_groups) join_group(group);
    std::map<size_t, std::vector<std::string>> by_root;
    for (size_t i = 0; i < sorted_ids.size(); ++i) by_root[sets.root(i)].push_back(sorted_ids[i]);
    std::vector<std::vector<std::string>> units;
    units.reserve(by_root.size());
    for (auto& [root, ids] : by_root) units.push_back(std::move(ids));
    return units;
}

std::vector<std::string> sorted_unique(std::vector<std::string> ids, const char* what) {
    std::sort(ids.begin(), ids.end());
    auto duplicate = std::adjacent_find(ids.begin(), ids.end());
    if (duplicate != ids.end()) throw Error(fmt::format("{}: id {} appears more than once", what, shown_id(*duplicate)));
    return ids;
}

}  // namespace

const IdGroups& kvasir_near_duplicate_groups() {
    // kvasir-seg/README.md, "Things to know when splitting": these frames are near-copies under
    // different names (mean abs. pixel difference 1.0-1.5, mask IoU > 0.9); keep each pair together.
    static const IdGroups groups = {
        {"cju30bmab08bi0835mvlr6e0r", "cju77k828z46w0871r0avuoo9"},
        {"cju76lsehyia10987u54vn8rb", "cju772304yw5t0818vbw8kkjf"},
        {"cju886ryxnsl50801r93jai7q", "cju8amfdtqi4x09871tygrgqe"},
    };
    return groups;
}

Split make_split(const Dataset& dataset, uint64_t seed, double test_fraction, const IdGroups& extra_groups) {
    if (!(test_fraction > 0.0 && test_fraction < 1.0))
        throw Error(fmt::format("make_split: test_fraction must be in (0, 1), got {}", test_fraction));
    if (dataset.size() < 2)
        throw Error(fmt::format("{}: make_split needs at least 2 samples, dataset has {}", dataset.root, dataset.size()));
    const std::vector<std::string> ids = sorted_unique(dataset.ids(), dataset.root.c_str());
    std::vector<std::vector<std::string>> units = make_units(ids, extra_groups);

    const size_t n = ids.size();
    size_t target = static_cast<size_t>(std::llround(test_fraction * static_cast<double>(n)));
    target = std::clamp<size_t>(target, 1, n - 1);

    SplitMix64 rng(mix_seed({kSplitStream, seed}));
    deterministic_shuffle(units, rng);
    Split split;
    split.seed = seed;
    split.test_fraction = test_fraction;
    for (const auto& unit : units) {
        auto& side = split.test_ids.size() + unit.size() <= target ? split.test_ids : split.train_ids;
        side.insert(side.end(), unit.begin(), unit.end());
    }
    if (split.test_ids.empty() || split.train_ids.empty())
        throw Error(fmt::format("{}: cannot split {} samples {}/{}: the groups are too large", dataset.root, n,
                                n - target, target));
    std::sort(split.train_ids.begin(), split.train_ids.end());
    std::sort(split.test_ids.begin(), split.test_ids.end());
    return split;
}

void save_split(const Split& split, const std::string& path) {
    nlohmann::json json = {
        {"format", kSplitFormat},     {"version", kSplitVersion}, {"seed", split.seed},
        {"test_fraction", split.test_fraction}, {"train", split.train_ids},  {"test", split.test_ids},
    };
    write_file_atomic(path, json.dump(2) + "\n");
}

Split load_split(const std::string& path, const Dataset& dataset, const IdGroups& extra_groups) {
    const std::string text = read_input_file(path, "split file", kMaxSplitFileBytes);
    nlohmann::json json;
    try {
        json = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        throw Error(fmt::format("{}: not valid JSON: {}", path, e.what()));
    }
    if (!json.is_object()) throw Error(fmt::format("{}: split file must hold a JSON object", path));
    // Compared as JSON values: get<>() would throw nlohmann's type_error for a non-string "format" and
    // narrow a "version" of 4294967297 to 1.
    if (!json.contains("format") || json["format"] != kSplitFormat)
        throw Error(fmt::format("{}: \"format\" must be \"{}\"", path, kSplitFormat));
    if (!json.contains("version") || !json["version"].is_number_integer() || json["version"] != kSplitVersion)
        throw Error(fmt::format("{}: unsupported \"version\" (expected {})", path, kSplitVersion));

    Split split;
    if (json.contains("seed")) {
        if (!json["seed"].is_number_unsigned()) throw Error(fmt::format("{}: \"seed\" must be an unsigned integer", path));
        split.seed = json["seed"].get<uint64_t>();
    }
    if (json.contains("test_fraction")) {
        if (!json["test_fraction"].is_number()) throw Error(fmt::format("{}: \"test_fraction\" must be a number", path));
        split.test_fraction = json["test_fraction"].get<double>();
    }
    auto read_ids = [&](const char* key) {
        if (!json.contains(key) || !json[key].is_array())
            throw Error(fmt::format("{}: \"{}\" must be an array of sample ids", path, key));
        std::vector<std::string> ids;
        for (const auto& item : json[key]) {
            if (!item.is_string()) throw Error(fmt::format("{}: \"{}\" holds a non-string entry", path, key));
            ids.push_back(item.get<std::string>());
        }
        std::sort(ids.begin(), ids.end());
        if (auto dup = std::adjacent_find(ids.begin(), ids.end()); dup != ids.end())
            throw Error(fmt::format("{}: id {} appears twice in \"{}\"", path, shown_id(*dup), key));
        for (const std::string& id : ids)
            if (!dataset.find(id))
                throw Error(fmt::format("{}: unknown id {} in \"{}\" (not in {})", path, shown_id(id), key, dataset.root));
        return ids;
    };
    split.train_ids = read_ids("train");
    split.test_ids = read_ids("test");
    std::vector<std::string> both;
    std::set_intersection(split.train_ids.begin(), split.train_ids.end(), split.test_ids.begin(), split.test_ids.end(),
                          std::back_inserter(both));
    if (!both.empty())
        throw Error(fmt::format("{}: id {} is in both \"train\" and \"test\" ({} overlap)", path, shown_id(both.front()),
                                both.size()));

    const std::set<std::string> test(split.test_ids.begin(), split.test_ids.end());
    const std::set<std::string> train(split.train_ids.begin(), split.train_ids.end());
    auto check_group = [&](const std::vector<std::string>& group) {
        const std::string* in_train = nullptr;
        const std::string* in_test = nullptr;
        for (const std::string& id : group) {
            if (train.count(id)) in_train = &id;
            if (test.count(id)) in_test = &id;
        }
        if (in_train && in_test)
            throw Error(fmt::format("{}: grouped ids {} (train) and {} (test) must be on the same side", path,
                                    shown_id(*in_train), shown_id(*in_test)));
    };
    for (const auto& group : kvasir_near_duplicate_groups()) check_group(group);
    for (const auto& group : extra_groups) check_group(group);
    return split;
}

std::vector<Fold> make_folds(const std::vector<std::string>& train_ids, int k, uint64_t seed,
                             const IdGroups& extra_groups) {
    if (k < 2) throw Error(fmt::format("make_folds: k must be at least 2, got {}", k));
    const std::vector<std::string> ids = sorted_unique(train_ids, "make_folds");
    std::vector<std::vector<std::string>> units = make_units(ids, extra_groups);
    if (units.size() < static_cast<size_t>(k))
        throw Error(fmt::format("make_folds: {} folds need at least {} groups of ids, got {}", k, k, units.size()));

    SplitMix64 rng(mix_seed({kFoldStream, seed}));
    deterministic_shuffle(units, rng);
    // Largest units first, then each to the currently smallest fold: sizes end within one unit.
    std::stable_sort(units.begin(), units.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
    std::vector<Fold> folds(static_cast<size_t>(k));
    for (const auto& unit : units) {
        auto smallest = std::min_element(folds.begin(), folds.end(), [](const Fold& a, const Fold& b) {
            return a.val_ids.size() < b.val_ids.size();
        });
        smallest->val_ids.insert(smallest->val_ids.end(), unit.begin(), unit.end());
    }
    for (int f = 0; f < k; ++f) {
        Fold& fold = folds[static_cast<size_t>(f)];
        fold.index = f;
        std::sort(fold.val_ids.begin(), fold.val_ids.end());
        std::set_difference(ids.begin(), ids.end(), fold.val_ids.begin(), fold.val_ids.end(),
                            std::back_inserter(fold.train_ids));
    }
    return folds;
}

std::vector<size_t> indices_of(const Dataset& dataset, const std::vector<std::string>& ids) {
    std::vector<size_t> indices;
    indices.reserve(ids.size());
    for (const std::string& id : ids) {
        auto index = dataset.find(id);
        if (!index) throw Error(fmt::format("{}: unknown sample id {}", dataset.root, shown_id(id)));
        indices.push_back(*index);
    }
    return indices;
}

}  // namespace resunet
