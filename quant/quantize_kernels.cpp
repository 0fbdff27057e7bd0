#include "quant/quantize_kernels.h"

namespace resunet {

#define RESUNET_DECLARE_KERNELS(ns)                                                                                  \
    namespace ns {                                                                                                   \
    Range tensor_range(const std::vector<KernelSource>&, const KernelShape&);                                        \
    int64_t quantize_u8(const std::vector<KernelSource>&, const KernelShape&, const ActivationQuant&,                \
                        const std::vector<KernelTarget>&, bool, bool*);                                              \
    void gather_f32(const std::vector<KernelSource>&, const KernelShape&, float*);                                   \
    }
RESUNET_DECLARE_KERNELS(avx2)
RESUNET_DECLARE_KERNELS(generic)
#undef RESUNET_DECLARE_KERNELS

namespace {
const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

Range tensor_range(const std::vector<KernelSource>& sources, const KernelShape& shape) {
    return has_avx2 ? avx2::tensor_range(sources, shape) : generic::tensor_range(sources, shape);
}

int64_t quantize_u8(const std::vector<KernelSource>& sources, const KernelShape& shape, const ActivationQuant& quant,
                    const std::vector<KernelTarget>& targets, bool count_clipped, bool* finite) {
    return has_avx2 ? avx2::quantize_u8(sources, shape, quant, targets, count_clipped, finite)
                    : generic::quantize_u8(sources, shape, quant, targets, count_clipped, finite);
}

void gather_f32(const std::vector<KernelSource>& sources, const KernelShape& shape, float* dst) {
    has_avx2 ? avx2::gather_f32(sources, shape, dst) : generic::gather_f32(sources, shape, dst);
}

}  // namespace resunet
