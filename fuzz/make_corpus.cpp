// Writes the fuzz targets' seed corpora: a few small, valid (or nearly valid) files per target, made
// with the project's own writers and OpenCV's encoders so they match what real inputs look like.
// Deterministic; the output is committed under fuzz/corpus/<target>/.
//
// Usage: build-fuzz/fuzz/fuzz_make_corpus fuzz/corpus
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "apps/lib/command_flags.h"
#include "data/split.h"
#include "graph/fusion.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"

namespace fs = std::filesystem;
using namespace resunet;

namespace {

void write_text(const fs::path& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary);
    out << text;
    if (!out) throw Error(fmt::format("{}: cannot write", path.string()));
}

HostTensor filled(const Dims& shape, DType dtype) {
    HostTensor tensor = HostTensor::zeros(shape, dtype);
    for (size_t i = 0; i < tensor.bytes.size(); ++i) tensor.bytes[i] = static_cast<uint8_t>(i * 37 + 11);
    return tensor;
}

// A file without the resunet checksum, laid out by hand as other writers do.
std::string unchecked_safetensors() {
    const std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    std::string bytes;
    for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
    bytes += header;
    for (float value : {1.5f, -2.0f}) bytes.append(reinterpret_cast<const char*>(&value), sizeof(value));
    return bytes;
}

void safetensors_corpus(const fs::path& dir) {
    save_safetensors((dir / "two_tensors.safetensors").string(),
                     {{"e1.conv_a.weight", filled({2, 1, 3, 3}, DType::f32)}, {"e1.conv_a.bias", filled({2}, DType::f32)}},
                     {{"arch", "resunet"}});
    save_safetensors((dir / "every_dtype.safetensors").string(),
                     {{"f", filled({1, 2}, DType::f32)},
                      {"i8", filled({3}, DType::s8)},
                      {"u8", filled({2, 2}, DType::u8)},
                      {"i32", filled({1}, DType::s32)},
                      {"i64", filled({1}, DType::i64)},
                      {"empty", filled({0, 4}, DType::f32)},
                      {"scalar", filled({}, DType::f32)}});
    write_text(dir / "unchecked.safetensors", unchecked_safetensors());
    write_text(dir / "empty_header.safetensors", std::string("\x02\0\0\0\0\0\0\0{}", 10));
}

// Small valid model files (width 1, depth 1, size 8) as the loaders see them: fp32, F16, and int8 files laid
// out as `resunet quantize` writes them (made by hand here: the fuzz build has no quantizer), with static
// scales, without (dynamic), and with the head kept fp32.
TensorMap int8_layout(const Graph& graph, bool static_scales, bool head_fp32) {
    TensorMap out;
    for (const FusedOp& op : fuse(graph)) {
        if (op.kind != OpKind::conv && op.kind != OpKind::conv_transpose) continue;
        const Node& node = graph.node(op.node);
        const int64_t in_channels = graph.value(node.inputs[0]).dims[1];
        const Dims dims = op.kind == OpKind::conv_transpose ? Dims{4 * int64_t{node.out_channels}, in_channels, 1, 1}
                                                            : Dims{node.out_channels, in_channels, node.kernel, node.kernel};
        HostTensor bias = HostTensor::zeros({dims[0]});
        for (int64_t i = 0; i < dims[0]; ++i) bias.f32()[i] = 0.125f * static_cast<float>(i);
        out[node.name + ".bias"] = std::move(bias);
        if (head_fp32 && node.name == "head") {
            out[node.name + ".weight"] = HostTensor::zeros(dims);
            continue;
        }
        HostTensor q = HostTensor::zeros(dims, DType::s8);
        for (int64_t i = 0; i < q.num_elements(); ++i) q.s8()[i] = static_cast<int8_t>(i * 37 % 255 - 127);
        HostTensor scale = HostTensor::zeros({dims[0]});
        for (int64_t i = 0; i < dims[0]; ++i) scale.f32()[i] = 0.01f;
        out[node.name + ".weight_q"] = std::move(q);
        out[node.name + ".weight_scale"] = std::move(scale);
        if (!static_scales) continue;
        const std::string value = graph.value(node.inputs[0]).name;
        HostTensor input_scale = HostTensor::zeros({1});
        input_scale.f32()[0] = 0.05f;
        HostTensor zero = HostTensor::zeros({1}, DType::s32);
        out[value + ".input_scale"] = std::move(input_scale);
        out[value + ".input_zero_point"] = std::move(zero);
    }
    return out;
}

void model_corpus(const fs::path& dir) {
    ResUNetConfig config;
    config.width = 1;
    config.depth = 1;
    config.height = config.width_px = 8;
    const Graph graph = build_resunet(config);
    const std::map<std::string, std::string> metadata = resunet_metadata(config);
    const TensorMap fp32 = init_weights(graph, 1);
    save_safetensors((dir / "fp32.safetensors").string(), fp32, metadata);
    save_safetensors((dir / "f16.safetensors").string(), fp32, {{"resunet.size", "16"}}, SaveOptions{FloatStorage::f16});
    save_safetensors((dir / "int8_static.safetensors").string(), int8_layout(graph, true, false), metadata);
    save_safetensors((dir / "int8_dynamic.safetensors").string(), int8_layout(graph, false, false), metadata);
    save_safetensors((dir / "int8_head_fp32.safetensors").string(), int8_layout(graph, true, true), {});
    // Each must load: a seed the loader refuses would only teach the fuzzer the error path.
    for (const char* name : {"fp32", "f16", "int8_static", "int8_dynamic", "int8_head_fp32"}) {
        const SafetensorsFile file = load_safetensors((dir / (std::string(name) + ".safetensors")).string());
        (void)infer_resunet_config(file.tensors, file.metadata, 8);
    }
}

cv::Mat noise(int width, int height, int type, int seed) {
    cv::Mat image(height, width, type);
    cv::RNG rng(static_cast<uint64_t>(seed));
    rng.fill(image, cv::RNG::UNIFORM, 0, 256);
    return image;
}

void write_image(const fs::path& path, const cv::Mat& image, const std::vector<int>& params = {}) {
    if (!cv::imwrite(path.string(), image, params)) throw Error(fmt::format("{}: cannot encode", path.string()));
}

void image_corpus(const fs::path& dir) {
    cv::Mat mask(6, 8, CV_8UC1, cv::Scalar(0));
    cv::circle(mask, {4, 3}, 2, cv::Scalar(255), cv::FILLED);
    write_image(dir / "color.png", noise(8, 6, CV_8UC3, 1));
    write_image(dir / "mask.png", mask);
    write_image(dir / "mask_grey_levels.png", noise(5, 4, CV_8UC1, 2));  // values other than 0 and 255
    write_image(dir / "rgba.png", noise(3, 3, CV_8UC4, 3));
    cv::Mat deep(3, 4, CV_16UC1);
    cv::randu(deep, 0, 65536);
    write_image(dir / "deep16.png", deep);
    write_image(dir / "color.jpg", noise(16, 16, CV_8UC3, 4), {cv::IMWRITE_JPEG_QUALITY, 50});
    write_image(dir / "mask.jpg", mask, {cv::IMWRITE_JPEG_QUALITY, 90});
    write_image(dir / "progressive.jpg", noise(9, 7, CV_8UC3, 5), {cv::IMWRITE_JPEG_PROGRESSIVE, 1});
    write_image(dir / "odd_width.bmp", noise(5, 3, CV_8UC3, 6));
    write_image(dir / "grey.bmp", noise(3, 2, CV_8UC1, 7));
    write_image(dir / "color.tif", noise(4, 3, CV_8UC3, 8));
}

Dataset split_dataset() {
    // Same ids as fuzz_split.cpp's synthetic dataset.
    Dataset dataset;
    dataset.root = "synthetic";
    std::vector<std::string> ids = {"a", "b", "c", "d", "e", "f"};
    for (const std::string& id : kvasir_near_duplicate_groups().front()) ids.push_back(id);
    std::sort(ids.begin(), ids.end());
    for (const std::string& id : ids) dataset.samples.push_back({id, id + ".png", id + ".png", 8, 8});
    return dataset;
}

void split_corpus(const fs::path& dir) {
    const Dataset dataset = split_dataset();
    save_split(make_split(dataset, 42, 0.25, {{"a", "b"}}), (dir / "made.json").string());
    write_text(dir / "minimal.json", R"({"format":"resunet-split","version":1,"train":["a"],"test":["c"]})");
    const auto& group = kvasir_near_duplicate_groups().front();
    write_text(dir / "group_split.json",
               fmt::format(R"({{"format":"resunet-split","version":1,"seed":7,"test_fraction":0.5,)"
                           R"("train":["{}","d"],"test":["{}","e"]}})",
                           group[0], group[1]));
}

void config_corpus(const fs::path& dir) {
    TrainCommandOptions train;
    train.data_dir = "/data/kvasir-seg";
    train.out_dir = "runs/w16";
    write_text(dir / "train_effective.toml", train_config_text(train));
    CvCommandOptions cv;
    cv.train = train;
    write_text(dir / "cv_effective.toml", cv_config_text(cv));
    write_text(dir / "sections.toml",
               "# comment\nwidth = 8\nlr = 2.5e-4\nskip-bad = true\ndata = \"/some data\"\n[train]\ndepth = 3\n");
    write_text(dir / "eval.ini", "[eval]\nmodel=best.safetensors\ndata=/data\nthreads=2\n");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s <corpus folder, e.g. fuzz/corpus>\n", argv[0]);
        return 2;
    }
    try {
        const fs::path root(argv[1]);
        const std::pair<const char*, void (*)(const fs::path&)> targets[] = {
            {"fuzz_safetensors", safetensors_corpus},
            {"fuzz_model", model_corpus},
            {"fuzz_image", image_corpus},
            {"fuzz_split", split_corpus},
            {"fuzz_config", config_corpus}};
        for (const auto& [name, make] : targets) {
            fs::remove_all(root / name);
            fs::create_directories(root / name);
            make(root / name);
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "fuzz_make_corpus: %s\n", e.what());
        return 1;
    }
    return 0;
}
