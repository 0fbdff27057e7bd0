// The quantize kernels for any x86-64 CPU.
#define RESUNET_KERNEL_NAMESPACE generic
#include "quant/quantize_kernels.inc"
