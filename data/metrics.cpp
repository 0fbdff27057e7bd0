#include "data/metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>
#include <opencv2/imgproc.hpp>

#include "graph/tensor.h"

namespace resunet {
namespace {

double ratio_or_one(double numerator, double denominator) { return denominator == 0.0 ? 1.0 : numerator / denominator; }

void check_mask(const cv::Mat& mask, const char* what) {
    if (mask.channels() != 1 || (mask.depth() != CV_8U && mask.depth() != CV_32F))
        throw Error(fmt::format("{} mask must be single-channel CV_8U or CV_32F, got type {}", what, mask.type()));
}

// Row of foreground flags (0/1) for either supported depth.
void binarize_row(const cv::Mat& mask, int y, double threshold, std::vector<uint8_t>& out) {
    const int width = mask.cols;
    if (mask.depth() == CV_8U) {
        const uint8_t* row = mask.ptr<uint8_t>(y);
        for (int x = 0; x < width; ++x) out[x] = static_cast<double>(row[x]) > threshold;
    } else {
        const float* row = mask.ptr<float>(y);
        for (int x = 0; x < width; ++x) out[x] = static_cast<double>(row[x]) > threshold;
    }
}

}  // namespace

PixelCounts& PixelCounts::operator+=(const PixelCounts& other) {
    true_positive += other.true_positive;
    false_positive += other.false_positive;
    false_negative += other.false_negative;
    true_negative += other.true_negative;
    return *this;
}

double dice_from_counts(const PixelCounts& c) {
    return ratio_or_one(2.0 * double(c.true_positive),
                        2.0 * double(c.true_positive) + double(c.false_positive) + double(c.false_negative));
}

double iou_from_counts(const PixelCounts& c) {
    return ratio_or_one(double(c.true_positive),
                        double(c.true_positive) + double(c.false_positive) + double(c.false_negative));
}

double background_iou_from_counts(const PixelCounts& c) {
    return ratio_or_one(double(c.true_negative),
                        double(c.true_negative) + double(c.false_positive) + double(c.false_negative));
}

PixelCounts count_pixels(const cv::Mat& prediction, const cv::Mat& truth, double threshold) {
    check_mask(prediction, "prediction");
    check_mask(truth, "ground-truth");
    if (prediction.size() != truth.size())
        throw Error(fmt::format("prediction is {}x{} but ground truth is {}x{} (WxH); resize with resize_mask_nearest",
                                prediction.cols, prediction.rows, truth.cols, truth.rows));
    PixelCounts counts;
    std::vector<uint8_t> predicted(static_cast<size_t>(prediction.cols)), actual(static_cast<size_t>(truth.cols));
    for (int y = 0; y < prediction.rows; ++y) {
        binarize_row(prediction, y, threshold, predicted);
        binarize_row(truth, y, threshold, actual);
        for (int x = 0; x < prediction.cols; ++x) {
            if (predicted[x])
                ++(actual[x] ? counts.true_positive : counts.false_positive);
            else
                ++(actual[x] ? counts.false_negative : counts.true_negative);
        }
    }
    return counts;
}

MaskMetrics metrics_from_counts(const PixelCounts& counts) {
    MaskMetrics m;
    m.counts = counts;
    m.dice = dice_from_counts(counts);
    m.iou = iou_from_counts(counts);
    m.background_iou = background_iou_from_counts(counts);
    m.mean_iou = 0.5 * (m.background_iou + m.iou);
    return m;
}

MaskMetrics compute_mask_metrics(const cv::Mat& prediction, const cv::Mat& truth, double threshold) {
    return metrics_from_counts(count_pixels(prediction, truth, threshold));
}

void PooledMetrics::add(const cv::Mat& prediction, const cv::Mat& truth, double threshold) {
    add(count_pixels(prediction, truth, threshold));
}

MetricSummary summarize(const std::vector<double>& values) {
    MetricSummary s;
    s.count = values.size();
    if (values.empty()) {
        s.mean = s.std = s.min = s.max = std::numeric_limits<double>::quiet_NaN();
        return s;
    }
    double sum = 0.0;
    for (double v : values) sum += v;
    s.mean = sum / double(values.size());
    double squares = 0.0;
    for (double v : values) squares += (v - s.mean) * (v - s.mean);
    s.std = values.size() > 1 ? std::sqrt(squares / double(values.size() - 1)) : 0.0;
    auto [lowest, highest] = std::minmax_element(values.begin(), values.end());
    s.min = *lowest;
    s.max = *highest;
    return s;
}

cv::Mat resize_mask_nearest(const cv::Mat& mask, int width, int height) {
    check_mask(mask, "resize_mask_nearest:");
    if (width <= 0 || height <= 0)
        throw Error(fmt::format("resize_mask_nearest: target size must be positive, got {}x{}", width, height));
    cv::Mat resized;
    cv::resize(mask, resized, cv::Size(width, height), 0, 0, cv::INTER_NEAREST);
    return resized;
}

}  // namespace resunet
