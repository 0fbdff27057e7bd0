// Kvasir-SEG style datasets: images/<id>.<ext> paired with masks/<id>.<ext>, read and preprocessed
// into model-ready planar float tensors.
//
// Intended usage:
//   resunet::ScanOptions scan;
//   scan.verify_manifest = true;                       // check root/manifest.sha256
//   resunet::Dataset data = resunet::scan_dataset("/data/kvasir-seg", scan);   // throws resunet::Error
//   resunet::PreprocessOptions prep;                   // 224x224, ImageNet mean/std
//   resunet::Sample s = resunet::load_sample(data, 0, prep);
//   const float* chw = s.image.f32();                  // [3, 224, 224], RGB, normalised
//   const float* mask = s.mask.f32();                  // [224, 224], {0, 1}
//   cv::Mat full = s.original_mask;                    // CV_8U {0, 1} at s.original_height x s.original_width
//
// Format notes: JPEG, PNG, TIFF and BMP are accepted (extension match, case-insensitive); other
// files and hidden files in images/ and masks/ are ignored. A mask pixel is foreground when its
// grey value is >= 128 (Kvasir masks are JPEGs, binary up to compression noise).
//
// Untrusted files: before any pixel is decoded, the header must show one of the four formats (by its
// signature, whatever the extension) and declare a non-empty size of at most kMaxImagePixels; a JPEG
// must end with its end-of-image marker (libjpeg would silently fill a truncated file with grey). An
// empty, unknown, oversized or truncated file is a resunet::Error naming the file, never a decode.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

#include "graph/tensor.h"

namespace resunet {

// Per-channel RGB statistics of ImageNet on [0, 1] values (torchvision's constants); the encoder
// weights were trained with them, so inputs are normalised as (value / 255 - mean) / stddev.
inline constexpr std::array<float, 3> kImageNetMean = {0.485f, 0.456f, 0.406f};
inline constexpr std::array<float, 3> kImageNetStd = {0.229f, 0.224f, 0.225f};

// Model input size used unless a PreprocessOptions says otherwise.
inline constexpr int kDefaultModelSize = 224;

// Largest image, in pixels (width x height), read by default: 10000 x 10000, 48 times a Kvasir-SEG
// frame (1.2 GB as floats at full size). A 600-byte JPEG may declare 65500 x 65500 pixels and libjpeg
// would allocate and fill all of them, so declared sizes are checked against this before decoding.
inline constexpr int64_t kMaxImagePixels = 100'000'000;

// One image/mask pair found by scan_dataset.
struct SampleInfo {
    std::string id;          // file stem shared by image and mask ("cju0qkwl35piu0993l0dewei2")
    std::string image_path;  // full path of the image file
    std::string mask_path;   // full path of the mask file
    int width = 0;           // original image width in pixels (equal to the mask's)
    int height = 0;          // original image height in pixels
};

// A file scan_dataset left out under ScanOptions::skip_bad, and why.
struct SkippedFile {
    std::string file;    // full path of the offending file (or of the manifest entry)
    std::string reason;  // one line: "no mask with the same stem", "cannot decode", ...
};

// The result of scan_dataset: pairs sorted by id, plus what was skipped.
struct Dataset {
    std::string root;                  // directory holding images/ and masks/
    std::vector<SampleInfo> samples;   // sorted by id (byte order), ids unique
    std::vector<SkippedFile> skipped;  // empty unless ScanOptions::skip_bad found problems

    // Number of pairs.
    size_t size() const { return samples.size(); }
    // Index of the sample with this id, or nullopt (binary search over the sorted ids).
    std::optional<size_t> find(const std::string& id) const;
    // All ids in sample order.
    std::vector<std::string> ids() const;
};

// How scan_dataset checks the files.
struct ScanOptions {
    bool skip_bad = false;         // false: first problem throws resunet::Error; true: skip and list it
    bool full_decode = false;      // false: sizes from the headers (fast); true: decode every image and
                                   // mask as load_sample will (catches truncated data)
    bool verify_manifest = false;  // check each file's SHA-256 against a sha256sum-format manifest
    std::string manifest_path;     // default: <root>/manifest.sha256
    int64_t max_pixels = kMaxImagePixels;  // larger declared sizes are a problem of that pair
};

// Scans root/images and root/masks, pairs files by stem and checks them. Orphans, unreadable files,
// image/mask size mismatches, duplicate stems and manifest failures throw resunet::Error naming the
// file (or, with skip_bad, drop the pair and are listed in Dataset::skipped). Throws if no pair is left.
Dataset scan_dataset(const std::string& root, const ScanOptions& options = {});

// How load_sample turns files into model inputs.
struct PreprocessOptions {
    int width = kDefaultModelSize;             // model input width
    int height = kDefaultModelSize;            // model input height
    std::array<float, 3> mean = kImageNetMean;  // RGB mean on [0, 1] values
    std::array<float, 3> stddev = kImageNetStd; // RGB standard deviation on [0, 1] values
    bool keep_original_mask = true;            // fill Sample::original_mask (for metrics at full size)
};

struct AugmentParams;  // data/augment.h

// One preprocessed pair.
struct Sample {
    size_t index = 0;          // position in Dataset::samples
    std::string id;            // sample id
    int original_width = 0;    // width of the file as decoded
    int original_height = 0;   // height of the file as decoded
    HostTensor image;          // [3, height, width] f32, RGB planes, (value / 255 - mean) / stddev
    HostTensor mask;           // [height, width] f32, exactly 0 or 1
    cv::Mat original_mask;     // CV_8UC1 {0, 1} at original size, not augmented; empty if not kept
};

// Decodes an image with cv::IMREAD_COLOR (BGR) after the header checks of the format notes; throws
// resunet::Error naming the file and the reason if it fails.
cv::Mat read_image(const std::string& path, int64_t max_pixels = kMaxImagePixels);
// read_image at 1/2, 1/4 or 1/8 scale when the file is a JPEG whose smaller side, so divided, stays at least
// `min_side` (libjpeg's DCT-domain scaling: several times faster than a full decode followed by a resize);
// otherwise a full decode. `original` receives the file's full size. Same checks and errors as read_image.
cv::Mat read_image_reduced(const std::string& path, int min_side, cv::Size& original, int64_t max_pixels = kMaxImagePixels);
// Decodes a mask with cv::IMREAD_GRAYSCALE (same checks) and thresholds it at 128 to CV_8U {0, 1}:
// grey values 128..255 are 1, whatever else the mask holds; throws on failure.
cv::Mat read_mask(const std::string& path, int64_t max_pixels = kMaxImagePixels);

// Reads sample `index`, resizes (INTER_AREA for the image, INTER_NEAREST for the mask), converts
// BGR to RGB and normalises. Throws resunet::Error naming the file on decode or size problems.
Sample load_sample(const Dataset& dataset, size_t index, const PreprocessOptions& options);
// Same, with a training augmentation applied at model size to image and mask alike.
Sample load_sample(const Dataset& dataset, size_t index, const PreprocessOptions& options,
                   const AugmentParams& augment);

// Converts an 8-bit BGR image of any size to a [3, H, W] f32 RGB tensor normalised with mean/stddev.
HostTensor image_to_tensor(const cv::Mat& bgr, const std::array<float, 3>& mean,
                           const std::array<float, 3>& stddev);

}  // namespace resunet
