// Scores a model on a dataset split: per-image and pooled Dice/IoU at the model's size and at each
// image's original size. Engine-agnostic: any function that maps images to logits will do.
//
// Intended usage:
//   resunet::Engine engine(graph, weights, {});
//   resunet::EvalResult r = resunet::evaluate_split(dataset, test_indices, prep,
//       [&](const float* x, int n, float* y) { engine.run(x, n, y); }, /*batch=*/16, /*threads=*/2);
//   fmt::print("Dice {:.4f} ± {:.4f}\n", r.original.dice.mean, r.original.dice.std);
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/metrics.h"

namespace resunet {

// Maps `batch` NCHW images to `batch` 1xHxW logit maps.
using LogitsRunner = std::function<void(const float* images, int batch, float* logits)>;

// Metrics of one resolution, each labelled by what it averages.
struct ScoreSet {
    MetricSummary dice;      // per-image foreground Dice, mean ± sample std over images
    MetricSummary iou;       // per-image foreground IoU
    MetricSummary mean_iou;  // per-image two-class mean IoU (background and polyp): likely the paper's "IoU"
    double pooled_dice = 0;  // Dice of all pixels of all images pooled
    double pooled_iou = 0;
};

struct EvalResult {
    size_t images = 0;
    ScoreSet model_size;  // prediction vs mask at the model's input size
    ScoreSet original;    // logits resized back (bilinear, threshold 0) vs the original mask
    std::vector<std::string> ids;
    std::vector<MaskMetrics> per_image;  // at original size, in `ids` order
    std::vector<MaskMetrics> per_image_model_size;  // at the model's size, in `ids` order
    double seconds = 0;
};

// The scores of a list of per-image metrics: what evaluate_split reports for them (so results of parts of a
// split, concatenated in order, score exactly as the whole).
ScoreSet score_set(const std::vector<MaskMetrics>& per_image);

EvalResult evaluate_split(const Dataset& dataset, const std::vector<size_t>& indices, const PreprocessOptions& preprocess,
                          const LogitsRunner& run, int batch, int loader_threads);

}  // namespace resunet
