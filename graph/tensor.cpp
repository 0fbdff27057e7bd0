#include "graph/tensor.h"

#include <fmt/format.h>

namespace resunet {

size_t dtype_size(DType dtype) {
    switch (dtype) {
        case DType::f32: return 4;
        case DType::s8: return 1;
        case DType::u8: return 1;
        case DType::s32: return 4;
        case DType::i64: return 8;
    }
    return 0;
}

const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::f32: return "F32";
        case DType::s8: return "I8";
        case DType::u8: return "U8";
        case DType::s32: return "I32";
        case DType::i64: return "I64";
    }
    return "?";
}

std::string dims_to_string(const Dims& dims) { return fmt::format("[{}]", fmt::join(dims, ", ")); }

int64_t num_elements(const Dims& dims) {
    int64_t count = 1;
    for (int64_t d : dims) count *= d;
    return count;
}

HostTensor HostTensor::zeros(const Dims& shape, DType dtype) {
    HostTensor t;
    t.shape = shape;
    t.dtype = dtype;
    t.bytes.assign(static_cast<size_t>(resunet::num_elements(shape)) * dtype_size(dtype), 0);
    return t;
}

static void expect_dtype(const HostTensor& t, DType dtype) {
    if (t.dtype != dtype)
        throw Error(fmt::format("tensor of dtype {} accessed as {}", dtype_name(t.dtype), dtype_name(dtype)));
}

float* HostTensor::f32() { expect_dtype(*this, DType::f32); return reinterpret_cast<float*>(bytes.data()); }
const float* HostTensor::f32() const { expect_dtype(*this, DType::f32); return reinterpret_cast<const float*>(bytes.data()); }
int8_t* HostTensor::s8() { expect_dtype(*this, DType::s8); return reinterpret_cast<int8_t*>(bytes.data()); }
const int8_t* HostTensor::s8() const { expect_dtype(*this, DType::s8); return reinterpret_cast<const int8_t*>(bytes.data()); }

}  // namespace resunet
