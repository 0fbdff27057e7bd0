#include "data/postprocess.h"

#include <fmt/format.h>

#include <opencv2/imgproc.hpp>

#include "graph/tensor.h"

namespace resunet {

cv::Mat logits_to_mask(const float* logits, int model_width, int model_height, int out_width, int out_height) {
    if (!logits || model_width <= 0 || model_height <= 0 || out_width <= 0 || out_height <= 0)
        throw Error(fmt::format("logits_to_mask: bad sizes {}x{} -> {}x{}", model_width, model_height, out_width, out_height));
    const cv::Mat map(model_height, model_width, CV_32F, const_cast<float*>(logits));
    cv::Mat resized;
    if (out_width == model_width && out_height == model_height)
        resized = map;
    else
        cv::resize(map, resized, cv::Size(out_width, out_height), 0, 0, cv::INTER_LINEAR);
    cv::Mat mask;
    cv::threshold(resized, mask, 0.0, 1.0, cv::THRESH_BINARY);
    mask.convertTo(mask, CV_8U);
    return mask;
}

}  // namespace resunet
