#include "apps/lib/evaluate.h"

#include <chrono>
#include <opencv2/core.hpp>

#include "data/loader.h"
#include "data/postprocess.h"

namespace resunet {

ScoreSet score_set(const std::vector<MaskMetrics>& per_image) {
    std::vector<double> dice, iou, mean_iou;
    PooledMetrics pooled;
    for (const MaskMetrics& m : per_image) {
        dice.push_back(m.dice);
        iou.push_back(m.iou);
        mean_iou.push_back(m.mean_iou);
        pooled.add(m.counts);
    }
    return {summarize(dice), summarize(iou), summarize(mean_iou), pooled.dice(), pooled.iou()};
}

EvalResult evaluate_split(const Dataset& dataset, const std::vector<size_t>& indices, const PreprocessOptions& preprocess,
                          const LogitsRunner& run, int batch, int loader_threads) {
    const auto start = std::chrono::steady_clock::now();
    LoaderOptions options;
    options.batch_size = static_cast<size_t>(batch);
    options.num_threads = loader_threads;
    options.preprocess = preprocess;
    options.preprocess.keep_original_mask = true;
    BatchLoader loader(dataset, indices, options);
    loader.start_epoch(0);
    EvalResult result;
    const int h = preprocess.height, w = preprocess.width;
    std::vector<float> logits;
    Batch b;
    while (loader.next(b)) {
        const int n = static_cast<int>(b.ids.size());
        logits.resize(static_cast<size_t>(n) * static_cast<size_t>(h * w));
        run(b.images.f32(), n, logits.data());
        for (int i = 0; i < n; ++i) {
            const float* map = logits.data() + static_cast<size_t>(i) * static_cast<size_t>(h * w);
            const cv::Mat truth_small(h, w, CV_32F, b.masks.f32() + static_cast<size_t>(i) * static_cast<size_t>(h * w));
            result.per_image_model_size.push_back(compute_mask_metrics(logits_to_mask(map, w, h, w, h), truth_small));
            const cv::Mat& truth = b.original_masks[static_cast<size_t>(i)];
            const MaskMetrics m = compute_mask_metrics(logits_to_mask(map, w, h, truth.cols, truth.rows), truth);
            result.ids.push_back(b.ids[static_cast<size_t>(i)]);
            result.per_image.push_back(m);
        }
    }
    result.images = result.ids.size();
    result.model_size = score_set(result.per_image_model_size);
    result.original = score_set(result.per_image);
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
}

}  // namespace resunet
