// The quantize kernels for CPUs with AVX2 and FMA (compiled with -mavx2 -mfma; see CMakeLists.txt).
#define RESUNET_KERNEL_NAMESPACE avx2
#include "quant/quantize_kernels.inc"
