// From logits to masks: the one place where a prediction becomes a binary mask, used by predict,
// evaluation and the benchmark alike, so their metrics agree.
//
// Intended usage:
//   cv::Mat mask = resunet::logits_to_mask(logits, 224, 224, original_width, original_height);
//   resunet::MaskMetrics m = resunet::compute_mask_metrics(mask, truth);   // data/metrics.h
#pragma once

#include <opencv2/core.hpp>

namespace resunet {

// A logit map of height x width (row-major floats) resized bilinearly to out_width x out_height, then
// thresholded at logit 0 (probability 0.5): CV_8U {0, 1}. Resizing logits rather than the binary mask
// gives smooth edges at the original resolution.
cv::Mat logits_to_mask(const float* logits, int height, int width, int out_width, int out_height);

}  // namespace resunet
