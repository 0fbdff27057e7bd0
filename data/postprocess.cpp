#include "data/postprocess.h"

#include <opencv2/imgproc.hpp>

namespace resunet {

cv::Mat logits_to_mask(const float* logits, int height, int width, int out_width, int out_height) {
    const cv::Mat map(height, width, CV_32F, const_cast<float*>(logits));
    cv::Mat resized;
    if (out_width == width && out_height == height)
        resized = map;
    else
        cv::resize(map, resized, cv::Size(out_width, out_height), 0, 0, cv::INTER_LINEAR);
    cv::Mat mask;
    cv::threshold(resized, mask, 0.0, 1.0, cv::THRESH_BINARY);
    mask.convertTo(mask, CV_8U);
    return mask;
}

}  // namespace resunet
