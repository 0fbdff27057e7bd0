// libFuzzer target: an arbitrary file used as both image and mask of a one-pair dataset, through the
// same paths as real data: scan_dataset (header sizes), then load_sample (cv::imread via read_image and
// read_mask, resize, normalisation); read_image and read_mask directly when the scan refuses the pair.
// Bad input must end in resunet::Error; accepted data must have the documented types and values.
#include <cstddef>
#include <cstdint>
#include <string>

#include <opencv2/core.hpp>
#include <opencv2/core/utils/logger.hpp>

#include "data/dataset.h"
#include "fuzz/fuzz_util.h"

namespace {

void check_image(const cv::Mat& image) {
    RESUNET_FUZZ_CHECK(!image.empty());
    RESUNET_FUZZ_CHECK(image.type() == CV_8UC3);
}

void check_mask(const cv::Mat& mask) {
    RESUNET_FUZZ_CHECK(!mask.empty());
    RESUNET_FUZZ_CHECK(mask.type() == CV_8UC1);
    double low = 0, high = 0;
    cv::minMaxLoc(mask, &low, &high);
    RESUNET_FUZZ_CHECK(low >= 0 && high <= 1);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);  // OpenCV warns on every bad file
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const resunet::fuzz::ScratchDir scratch("resunet_fuzz_image");
    const std::string image_path = scratch.write("images/x.png", data, size);
    const std::string mask_path = scratch.write("masks/x.png", data, size);

    resunet::Dataset dataset;
    try {
        dataset = resunet::scan_dataset(scratch.path().string());
    } catch (const resunet::Error&) {
        dataset.samples.clear();
    }
    if (!dataset.samples.empty()) {
        RESUNET_FUZZ_CHECK(dataset.size() == 1);
        RESUNET_FUZZ_CHECK(dataset.samples[0].width > 0 && dataset.samples[0].height > 0);
        resunet::PreprocessOptions options;
        options.width = 16;
        options.height = 12;
        try {
            const resunet::Sample sample = resunet::load_sample(dataset, 0, options);
            RESUNET_FUZZ_CHECK(sample.image.shape == (resunet::Dims{3, 12, 16}));
            RESUNET_FUZZ_CHECK(sample.mask.shape == (resunet::Dims{12, 16}));
            for (int64_t i = 0; i < sample.mask.num_elements(); ++i)
                RESUNET_FUZZ_CHECK(sample.mask.f32()[i] == 0.0f || sample.mask.f32()[i] == 1.0f);
            check_mask(sample.original_mask);
        } catch (const resunet::Error&) {
        }
        return 0;
    }
    try {
        check_image(resunet::read_image(image_path));
    } catch (const resunet::Error&) {
    }
    try {
        check_mask(resunet::read_mask(mask_path));
    } catch (const resunet::Error&) {
    }
    return 0;
}
