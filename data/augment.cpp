#include "data/augment.h"

#include <fmt/format.h>
#include <opencv2/imgproc.hpp>

#include "data/random.h"
#include "graph/tensor.h"

namespace resunet {

AugmentParams draw_augment(const AugmentOptions& options, uint64_t seed, uint64_t epoch, uint64_t sample_index) {
    SplitMix64 rng(mix_seed({kAugmentStream, seed, epoch, sample_index}));
    // Always draw all three numbers so one option's value never shifts another's draws.
    const double rotate_draw = rng.uniform();
    const double angle_draw = rng.uniform();
    const double flip_draw = rng.uniform();
    AugmentParams params;
    params.rotate = rotate_draw < options.rotate_probability;
    params.angle_degrees = params.rotate ? (2.0 * angle_draw - 1.0) * options.max_angle_degrees : 0.0;
    params.flip = flip_draw < options.flip_probability;
    return params;
}

void apply_augment(const AugmentParams& params, cv::Mat& image, cv::Mat& mask) {
    if (image.size() != mask.size())
        throw Error(fmt::format("apply_augment: image is {}x{} but mask is {}x{} (WxH)", image.cols, image.rows,
                                mask.cols, mask.rows));
    if (params.rotate && params.angle_degrees != 0.0) {
        const cv::Point2f centre(static_cast<float>(image.cols - 1) * 0.5f,
                                 static_cast<float>(image.rows - 1) * 0.5f);
        const cv::Mat rotation = cv::getRotationMatrix2D(centre, params.angle_degrees, 1.0);
        cv::Mat rotated_image, rotated_mask;
        cv::warpAffine(image, rotated_image, rotation, image.size(), cv::INTER_LINEAR, cv::BORDER_CONSTANT,
                       cv::Scalar::all(0));
        cv::warpAffine(mask, rotated_mask, rotation, mask.size(), cv::INTER_NEAREST, cv::BORDER_CONSTANT,
                       cv::Scalar::all(0));
        image = rotated_image;
        mask = rotated_mask;
    }
    if (params.flip) {
        cv::Mat flipped_image, flipped_mask;
        cv::flip(image, flipped_image, 1);
        cv::flip(mask, flipped_mask, 1);
        image = flipped_image;
        mask = flipped_mask;
    }
}

}  // namespace resunet
