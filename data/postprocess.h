// From logits to masks: the one place where a prediction becomes a binary mask, used by predict,
// evaluation and the benchmark alike, so their metrics agree.
//
// Intended usage:
//   cv::Mat mask = resunet::logits_to_mask(logits, 224, 224, original_width, original_height);  // {0, 1}
//   resunet::MaskMetrics m = resunet::compute_mask_metrics(mask, truth);   // data/metrics.h
#pragma once

#include <opencv2/core.hpp>

namespace resunet {

// A model_width x model_height logit map (row-major floats) resized bilinearly (cv::INTER_LINEAR) to
// out_width x out_height, then thresholded at logit > 0 (probability > 0.5): CV_8UC1 {0, 1}. Resizing
// logits rather than the binary mask gives smooth edges at the original resolution. Throws
// resunet::Error on a null map or a non-positive size.
cv::Mat logits_to_mask(const float* logits, int model_width, int model_height, int out_width, int out_height);

}  // namespace resunet
