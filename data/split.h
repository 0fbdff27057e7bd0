// Train/test splits and k-fold cross-validation that keep near-duplicate frames together.
//
// Intended usage:
//   resunet::Split split = resunet::make_split(dataset, /*seed=*/42);          // 80/20 by default
//   resunet::save_split(split, "out/split.json");
//   resunet::Split again = resunet::load_split("out/split.json", dataset);    // validated
//   std::vector<resunet::Fold> folds = resunet::make_folds(split.train_ids, 5, 42);
//   for (const resunet::Fold& fold : folds) { /* train on fold.train_ids, validate on fold.val_ids */ }
//   std::vector<size_t> rows = resunet::indices_of(dataset, split.test_ids); // for BatchLoader
//
// Groups: the ids of a group always land on the same side (and in the same fold). The built-in
// groups are the near-copies listed in Kvasir-SEG's README; callers may add more. Groups that share
// an id are merged; ids of a group that are not in the dataset are ignored.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/dataset.h"

namespace resunet {

// Sets of ids that must stay on the same side of any split.
using IdGroups = std::vector<std::vector<std::string>>;

// Near-duplicate pairs listed in kvasir-seg/README.md ("Things to know when splitting").
const IdGroups& kvasir_near_duplicate_groups();

// A train/test partition of a dataset's ids.
struct Split {
    uint64_t seed = 0;                   // seed it was made with
    double test_fraction = 0.2;          // requested share of the test side
    std::vector<std::string> train_ids;  // sorted
    std::vector<std::string> test_ids;   // sorted
};

// One fold of k-fold cross-validation over the training ids.
struct Fold {
    int index = 0;                       // 0..k-1
    std::vector<std::string> train_ids;  // every training id not in val_ids, sorted
    std::vector<std::string> val_ids;    // this fold's held-out ids, sorted
};

// Seeded split: round(test_fraction * n) ids (or as close as the groups allow) go to test. Same
// (dataset ids, seed, fraction, groups) -> same split on every platform. Throws resunet::Error if
// test_fraction is not in (0, 1) or the dataset has fewer than 2 samples.
Split make_split(const Dataset& dataset, uint64_t seed, double test_fraction = 0.2,
                 const IdGroups& extra_groups = {});

// Writes {"format": "resunet-split", "version": 1, "seed", "test_fraction", "train", "test"} as JSON;
// throws resunet::Error naming the file if it cannot be written.
void save_split(const Split& split, const std::string& path);

// Reads and validates a split file against the dataset: malformed JSON, unknown ids, duplicate ids,
// an id on both sides, or a group (built-in or extra) split across sides throw resunet::Error naming
// the file. Dataset ids the split does not name are allowed (they are simply unused).
Split load_split(const std::string& path, const Dataset& dataset, const IdGroups& extra_groups = {});

// k folds over train_ids, groups kept in one fold, sizes balanced (differ by at most the largest
// group size). Throws resunet::Error if k < 2, k exceeds the number of groups, or ids repeat.
std::vector<Fold> make_folds(const std::vector<std::string>& train_ids, int k = 5, uint64_t seed = 0,
                             const IdGroups& extra_groups = {});

// Dataset indices of ids, in the given order; throws resunet::Error naming an unknown id.
std::vector<size_t> indices_of(const Dataset& dataset, const std::vector<std::string>& ids);

}  // namespace resunet
