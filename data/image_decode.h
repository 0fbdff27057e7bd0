// The one image decoder of the programs: every image and mask is read through the file opener (regular
// files only) and decoded from those bytes here, with EXIF orientation applied the same way whatever the scale.
//
// Intended usage:
//   resunet::DecodedImage image = resunet::decode_image_bytes(bytes, {.grey = false, .reduction = 4}, "a.jpg");
//   image.pixels;        // CV_8UC3 BGR (CV_8UC1 with grey), at 1/4 scale, EXIF orientation applied
//   image.full_size;     // the full-scale size, oriented as image.pixels is
//
// JPEG: decoded by libjpeg here, not through OpenCV, so that libjpeg's own word on the data decides: a stream
// that ends early or hits a marker inside its entropy-coded data (truncated, even with an end-of-image marker
// appended) is an error, where OpenCV fills the rest with grey. Bytes after the end-of-image marker (phones'
// "motion photos") are not image data and are ignored. Reductions 2, 4 and 8 use libjpeg's DCT scaling.
// PNG: decoded by libpng here with the transformations OpenCV asks for (the same pixels), its messages
// kept for the one-line error instead of printed to stderr; eXIf orientation applied.
// TIFF and BMP: OpenCV's decoders (from memory), reduction ignored, EXIF orientation as OpenCV applies it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <opencv2/core.hpp>

namespace resunet {

struct DecodeOptions {
    bool grey = false;  // CV_8UC1 (masks) instead of CV_8UC3 BGR
    int reduction = 1;  // 1, 2, 4 or 8: JPEG only, libjpeg's DCT-domain scaling
};

struct DecodedImage {
    cv::Mat pixels;      // oriented
    cv::Size full_size;  // the image's size at reduction 1, oriented
};

// The EXIF orientation (1 to 8; 1 when absent or unreadable) of a JPEG APP1 segment's payload ("Exif\0\0"
// and a TIFF structure); 5 to 8 swap width and height.
int exif_orientation(const uint8_t* data, size_t size);

// Throws resunet::Error "<what>: <reason>" when the bytes are not a decodable image.
DecodedImage decode_image_bytes(std::string_view bytes, const DecodeOptions& options, const std::string& what);

}  // namespace resunet
