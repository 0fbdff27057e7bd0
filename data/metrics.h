// Segmentation metrics: per-image foreground Dice and IoU, two-class mean IoU, a pixel-pooled
// accumulator over a dataset, and mean/std summaries over images or folds.
//
// Intended usage:
//   resunet::PooledMetrics pooled;
//   std::vector<double> dice_per_image;
//   for (...) {
//       cv::Mat prob(224, 224, CV_32F, output_ptr);                    // model probabilities
//       cv::Mat full = resunet::resize_mask_nearest(prob, sample.original_width, sample.original_height);
//       resunet::MaskMetrics m = resunet::compute_mask_metrics(full, sample.original_mask);
//       dice_per_image.push_back(m.dice);
//       pooled.add(m.counts);
//   }
//   resunet::MetricSummary dice = resunet::summarize(dice_per_image);  // mean, sample std
//   double pooled_dice = pooled.dice();
//
// Binarisation: a pixel is foreground when its value is > threshold (default 0.5), for predictions
// and ground truth alike, so float probabilities, float {0, 1} and uint8 {0, 1} or {0, 255} all work.
// Empty-mask conventions: a ratio whose denominator is 0 is 1. So when prediction and truth are both
// empty, foreground Dice = IoU = 1 (nothing to find, nothing found); when both are all foreground,
// background IoU = 1. An empty prediction against a non-empty truth scores 0, and vice versa.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <opencv2/core.hpp>

namespace resunet {

// Default probability threshold: foreground when value > 0.5.
inline constexpr double kDefaultMaskThreshold = 0.5;

// Confusion counts of foreground (polyp) pixels.
struct PixelCounts {
    uint64_t true_positive = 0;   // predicted polyp, truly polyp
    uint64_t false_positive = 0;  // predicted polyp, truly background
    uint64_t false_negative = 0;  // predicted background, truly polyp
    uint64_t true_negative = 0;   // predicted background, truly background

    PixelCounts& operator+=(const PixelCounts& other);
    // All pixels counted.
    uint64_t total() const { return true_positive + false_positive + false_negative + true_negative; }
};

// Foreground Dice 2TP / (2TP + FP + FN); 1 when the denominator is 0.
double dice_from_counts(const PixelCounts& counts);
// Foreground IoU TP / (TP + FP + FN); 1 when the denominator is 0.
double iou_from_counts(const PixelCounts& counts);
// Background IoU TN / (TN + FP + FN); 1 when the denominator is 0.
double background_iou_from_counts(const PixelCounts& counts);

// Per-image scores.
struct MaskMetrics {
    PixelCounts counts;           // the confusion counts the scores come from
    double dice = 0.0;            // foreground (polyp) Dice
    double iou = 0.0;             // foreground (polyp) IoU
    double background_iou = 0.0;  // background IoU
    double mean_iou = 0.0;        // two-class mean IoU: (background_iou + iou) / 2
};

// Counts pixels of a prediction against ground truth: single-channel CV_8U or CV_32F, same size;
// throws resunet::Error on other types or a size mismatch.
PixelCounts count_pixels(const cv::Mat& prediction, const cv::Mat& truth, double threshold = kDefaultMaskThreshold);
// Dice, IoU, background IoU and mean IoU of one image (see count_pixels for the inputs).
MaskMetrics compute_mask_metrics(const cv::Mat& prediction, const cv::Mat& truth,
                                 double threshold = kDefaultMaskThreshold);
// Scores from counts already made.
MaskMetrics metrics_from_counts(const PixelCounts& counts);

// Pixel-pooled scores over a dataset: counts summed over all images, ratios taken once at the end
// (large polyps weigh more than in the per-image mean).
class PooledMetrics {
public:
    // Adds one image's counts.
    void add(const PixelCounts& counts) { totals_ += counts; ++num_images_; }
    // Counts a prediction/truth pair and adds it.
    void add(const cv::Mat& prediction, const cv::Mat& truth, double threshold = kDefaultMaskThreshold);
    // Pooled foreground Dice (1 when no foreground was seen or predicted).
    double dice() const { return dice_from_counts(totals_); }
    // Pooled foreground IoU.
    double iou() const { return iou_from_counts(totals_); }
    // Pooled two-class mean IoU.
    double mean_iou() const { return metrics_from_counts(totals_).mean_iou; }
    // Summed counts.
    const PixelCounts& totals() const { return totals_; }
    // Number of images added.
    size_t num_images() const { return num_images_; }

private:
    PixelCounts totals_;
    size_t num_images_ = 0;
};

// Mean and spread of one metric over images or folds.
struct MetricSummary {
    size_t count = 0;   // number of values
    double mean = 0.0;  // arithmetic mean (NaN when count is 0)
    double std = 0.0;   // sample standard deviation, n - 1 denominator (0 when count is 1, NaN when 0)
    double min = 0.0;   // smallest value (NaN when count is 0)
    double max = 0.0;   // largest value (NaN when count is 0)
};

// Summarises values; see MetricSummary for the conventions.
MetricSummary summarize(const std::vector<double>& values);

// Resizes a predicted mask (CV_8U or CV_32F, one channel) to width x height with nearest neighbour,
// so metrics can be taken at the original resolution against Sample::original_mask.
cv::Mat resize_mask_nearest(const cv::Mat& mask, int width, int height);

}  // namespace resunet
