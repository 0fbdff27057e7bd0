// Training-time augmentation: random rotation and horizontal flip, applied identically to an image
// and its mask, and reproducible from (seed, epoch, sample index) alone.
//
// Intended usage:
//   resunet::AugmentOptions aug;                                 // p(rotate) = p(flip) = 0.5, +-15 deg
//   resunet::AugmentParams p = resunet::draw_augment(aug, seed, epoch, dataset_index);
//   resunet::apply_augment(p, bgr_image, mask);                  // in place, same geometry for both
//   // or let load_sample do it at model size:
//   resunet::Sample s = resunet::load_sample(dataset, dataset_index, prep, p);
//
// Each sample draws from its own generator seeded by mix_seed(seed, epoch, index), never from a
// shared RNG, so a parallel loader gives the same pixels whatever the thread count or order.
#pragma once

#include <cstdint>

#include <opencv2/core.hpp>

namespace resunet {

// Default largest rotation, in degrees either way.
inline constexpr double kDefaultMaxRotationDegrees = 15.0;

// What may happen to a training sample.
struct AugmentOptions {
    double rotate_probability = 0.5;                     // chance of a rotation
    double max_angle_degrees = kDefaultMaxRotationDegrees;  // angle uniform in [-max, +max]
    double flip_probability = 0.5;                       // chance of a horizontal (left-right) flip
};

// What does happen to one sample; the identity when both flags are false.
struct AugmentParams {
    bool rotate = false;         // rotate about the image centre
    double angle_degrees = 0.0;  // counter-clockwise, as cv::getRotationMatrix2D
    bool flip = false;           // horizontal flip, after the rotation
};

// Draws the parameters for one sample from a generator seeded by (seed, epoch, sample_index).
AugmentParams draw_augment(const AugmentOptions& options, uint64_t seed, uint64_t epoch, uint64_t sample_index);

// Applies params to image (any type, e.g. CV_8UC3) and mask (CV_8UC1) of the same size, in place.
// Rotation: image bilinear, mask nearest; both with a constant-0 border, so the uncovered corners
// are black background like the black frame Kvasir frames already have (reflection would invent
// mirrored polyp edges). Throws resunet::Error if the sizes differ.
void apply_augment(const AugmentParams& params, cv::Mat& image, cv::Mat& mask);

}  // namespace resunet
