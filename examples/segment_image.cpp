// A program outside the project that uses the installed library (find_package(resunet)): segments one
// image with a model file and prints the polyp's share of the pixels; with a mask, the Dice against it.
//   segment_image models/resunet-w64-s224/model.safetensors image.jpg [mask.jpg]
#include <cstdio>
#include <exception>
#include <vector>

#include <opencv2/imgproc.hpp>

#include "data/dataset.h"
#include "data/metrics.h"
#include "data/postprocess.h"
#include "engine/engine.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"

int main(int argc, char** argv) {
    if (argc != 3 && argc != 4) {
        std::fprintf(stderr, "usage: %s MODEL.safetensors IMAGE [MASK]\n", argv[0]);
        return 2;
    }
    try {
        const resunet::SafetensorsFile file = resunet::load_safetensors(argv[1]);
        const resunet::ResUNetConfig config = resunet::infer_resunet_config(file.tensors, file.metadata, 224);
        resunet::EngineOptions options;
        options.tune = resunet::Tuning::off;  // oneDNN's direct kernels: no measuring at start
        resunet::Engine engine(resunet::build_resunet(config), file.tensors, options);

        const cv::Mat image = resunet::read_image(argv[2]);
        cv::Mat resized;
        cv::resize(image, resized, cv::Size(config.width_px, config.height), 0, 0, cv::INTER_AREA);
        const resunet::HostTensor input = resunet::image_to_tensor(resized, resunet::kImageNetMean, resunet::kImageNetStd);
        std::vector<float> logits(static_cast<size_t>(config.height) * config.width_px);
        engine.run(input.f32(), 1, logits.data());
        const cv::Mat mask = resunet::logits_to_mask(logits.data(), config.width_px, config.height, image.cols, image.rows);

        std::printf("polyp: %.2f%% of %dx%d pixels\n", 100.0 * cv::countNonZero(mask) / mask.total(), image.cols, image.rows);
        if (argc == 4) std::printf("dice: %.4f\n", resunet::compute_mask_metrics(mask, resunet::read_mask(argv[3])).dice);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "segment_image: error: %s\n", e.what());
        return 1;
    }
    return 0;
}
