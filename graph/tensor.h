// Host tensors: a shape, a dtype and owned bytes. The currency between weight files and engines.
//
// Intended usage:
//   resunet::HostTensor w = resunet::HostTensor::zeros({64, 3, 3, 3});   // f32
//   w.f32()[0] = 1.0f;
//   resunet::TensorMap weights;                                         // name -> tensor
//   weights["e1.conv_a.weight"] = std::move(w);
//   size_t bytes = weights.at("e1.conv_a.weight").byte_size();
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace resunet {

// Every error a user can cause (bad file, bad shape, bad flag) is a resunet::Error with a one-line message.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

enum class DType { f32, s8, u8, s32, i64 };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);  // safetensors spelling: "F32", "I8", "U8", "I32", "I64"

using Dims = std::vector<int64_t>;
std::string dims_to_string(const Dims& dims);  // "[1, 64, 224, 224]"
int64_t num_elements(const Dims& dims);

struct HostTensor {
    Dims shape;                  // row-major (PyTorch) order
    DType dtype = DType::f32;    // element type
    std::vector<uint8_t> bytes;  // num_elements(shape) * dtype_size(dtype) bytes

    static HostTensor zeros(const Dims& shape, DType dtype = DType::f32);
    int64_t num_elements() const { return resunet::num_elements(shape); }
    size_t byte_size() const { return bytes.size(); }
    float* f32();
    const float* f32() const;
    int8_t* s8();
    const int8_t* s8() const;
};

// Weight files map PyTorch-style names ("e1.conv_a.weight") to tensors; std::map keeps file order stable.
using TensorMap = std::map<std::string, HostTensor>;

}  // namespace resunet
