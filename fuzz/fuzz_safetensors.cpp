// libFuzzer target: parse_safetensors on arbitrary bytes (the in-memory core of load_safetensors).
// Bad input must end in resunet::Error; an accepted file must be self-consistent.
#include <cstddef>
#include <cstdint>

#include "fuzz/fuzz_util.h"
#include "graph/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    resunet::SafetensorsFile file;
    try {
        file = resunet::parse_safetensors(data, size, "fuzz input");
    } catch (const resunet::Error&) {
        return 0;
    }
    size_t total_bytes = 0;
    for (const auto& [name, tensor] : file.tensors) {
        RESUNET_FUZZ_CHECK(tensor.num_elements() >= 0);
        RESUNET_FUZZ_CHECK(tensor.byte_size() ==
                           static_cast<size_t>(tensor.num_elements()) * resunet::dtype_size(tensor.dtype));
        total_bytes += tensor.byte_size();
    }
    RESUNET_FUZZ_CHECK(total_bytes <= size);  // tensors may not overlap, so their bytes fit in the file
    return 0;
}
