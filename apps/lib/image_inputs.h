// The images a command reads: files, folders and "@list" files expanded in a fixed order, the extensions that
// count as images, and image sizes read from headers without decoding (so oversized images are refused before
// their pixels are allocated). Used by `predict` (inputs, --masks) and `quantize` (--calibration).
//
// Intended usage:
//   std::vector<std::string> paths = resunet::collect_input_images({"/data/images", "@more.txt", "one.png"});
//   cv::Size size = resunet::probe_image_size(paths[0]);       // empty when the header is not understood
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

namespace resunet {

// Image paths from files, folders and "@list" files, in order (folder contents sorted by name, hidden
// files and unsupported extensions skipped). List entries are paths relative to the working directory,
// one a line; blank lines and lines starting with '#' are skipped; a missing listed file stays in the
// list (it fails as an unreadable image). Throws UsageError for a missing command-line path or list.
std::vector<std::string> collect_input_images(const std::vector<std::string>& inputs);

// Supported, non-hidden regular files of one folder, sorted by name; UsageError if it cannot be listed.
std::vector<std::filesystem::path> list_image_folder(const std::filesystem::path& folder);

// True for .jpg .jpeg .png .tif .tiff .bmp, any case.
bool is_supported_image(const std::string& path);

// Width and height from a JPEG, PNG, BMP or TIFF header without decoding, so oversized images are
// refused before their pixels are allocated; an empty size when the header is not understood.
cv::Size probe_image_size(const std::string& path);

}  // namespace resunet
