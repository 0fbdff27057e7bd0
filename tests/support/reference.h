// Plain reference implementations of every graph op: NCHW loops, double accumulation, no fusion, no
// blocking. Slow on purpose; tests compare the optimised engines against them.
//
// Intended usage:
//   resunet::Graph graph = resunet::build_resunet({.width = 8, .depth = 2, .height = 32, .width_px = 32});
//   resunet::TensorMap weights = resunet::init_weights(graph, 42);
//   resunet::reference::Tensor4 image = resunet::reference::Tensor4::zeros({2, 3, 32, 32});
//   resunet::fill_uniform(image.data.data(), image.size(), /*seed=*/1, -2.0f, 2.0f);
//   resunet::reference::Tensor4 expected = resunet::reference::run_graph(graph, weights, image);
//   engine.run(image.data.data(), 2, actual.data());
//   resunet::reference::ErrorStats e = resunet::reference::compare(actual.data(), expected);
//   EXPECT_LE(e.relative(), 1e-4) << e.to_string();   // max|actual - expected| / max|expected|
#pragma once

#include <string>
#include <vector>

#include "graph/graph.h"
#include "graph/tensor.h"

namespace resunet::reference {

// A dense NCHW float tensor (4-D activations, or a [O, I, kh, kw] / [I, O, kh, kw] weight).
struct Tensor4 {
    Dims dims;                // N, C, H, W
    std::vector<float> data;  // row-major

    static Tensor4 zeros(const Dims& dims);
    static Tensor4 from_host(const HostTensor& tensor);  // any f32 tensor of rank 4
    int64_t size() const { return static_cast<int64_t>(data.size()); }
    float& at(int64_t n, int64_t c, int64_t h, int64_t w) {
        return data[static_cast<size_t>(((n * dims[1] + c) * dims[2] + h) * dims[3] + w)];
    }
    float at(int64_t n, int64_t c, int64_t h, int64_t w) const {
        return data[static_cast<size_t>(((n * dims[1] + c) * dims[2] + h) * dims[3] + w)];
    }
};

// The elements of a 1-D f32 tensor (bias, BN statistics).
std::vector<float> to_vector(const HostTensor& tensor);

// PyTorch Conv2d: weight [O, I, k, k]; bias empty or O values; square stride and zero padding.
Tensor4 conv2d(const Tensor4& src, const Tensor4& weight, const std::vector<float>& bias, int stride, int padding);
// The weights gradient of conv2d: d W[o][i][ky][kx] = sum over n, y, x of d dst[n][o][y][x] times
// src[n][i][y * s - p + ky][x * s - p + kx] (zero outside), for a `kernel` x `kernel` weight; d bias[o] = the
// sum of d dst[n][o] into `diff_bias` when it is not nullptr. In double.
Tensor4 conv2d_backward_weights(const Tensor4& src, const Tensor4& diff_dst, int kernel, int stride, int padding,
                                std::vector<float>* diff_bias = nullptr);
// PyTorch ConvTranspose2d without padding: weight [I, O, k, k],
// out[o][y * s + ky][x * s + kx] += in[i][y][x] * W[i][o][ky][kx]; output (H - 1) * s + k.
Tensor4 conv_transpose2d(const Tensor4& src, const Tensor4& weight, const std::vector<float>& bias, int stride);
// Inference batch norm: (x - mean) / sqrt(var + eps) * gamma + beta, per channel.
Tensor4 batch_norm_inference(const Tensor4& src, const std::vector<float>& gamma, const std::vector<float>& beta,
                             const std::vector<float>& mean, const std::vector<float>& var, float epsilon);
Tensor4 relu(const Tensor4& src);
Tensor4 sigmoid(const Tensor4& src);
Tensor4 add(const Tensor4& lhs, const Tensor4& rhs);
// Max over kernel x kernel windows, no padding; output (H - kernel) / stride + 1.
Tensor4 max_pool(const Tensor4& src, int kernel, int stride);
// Concatenation along channels, in the order given.
Tensor4 concat(const std::vector<const Tensor4*>& srcs);

// Evaluates the graph node by node in graph order with the functions above: the plain meaning of the
// graph, nothing fused. The input's batch may differ from the graph's; C, H, W must match.
// Throws resunet::Error on a missing or mis-shaped parameter.
Tensor4 run_graph(const Graph& graph, const TensorMap& weights, const Tensor4& input);

// How far an engine's output is from the reference. relative() = max|actual - expected| / max|expected|;
// a NaN or infinity in actual counts as an infinite error.
struct ErrorStats {
    double max_abs_error = 0;     // max |actual - expected|
    double max_abs_expected = 0;  // max |expected|, the scale the error is measured against
    int64_t worst_index = -1;     // flat NCHW index of the largest error
    int64_t count = 0;            // elements compared
    double relative() const;
    std::string to_string() const;  // "max_abs_err 1.2e-07 / max_abs_ref 3.4 = rel 3.5e-08 at 123 of 4096"
};
ErrorStats compare(const float* actual, const Tensor4& expected);
ErrorStats compare(const float* actual, const float* expected, int64_t count);

}  // namespace resunet::reference
