// Prints the CPU model and the instruction set oneDNN dispatches to (honouring ONEDNN_MAX_CPU_ISA), one
// "key: value" line each. Built and run by tests/run_all.sh before anything else, so every CI log says
// which kernels its tests exercised:
//   g++ -O1 tests/cpu_isa.cpp -ldnnl -o build-logs/cpu_isa && build-logs/cpu_isa
// (against another oneDNN: -I<prefix>/include -L<prefix>/lib -Wl,-rpath,<prefix>/lib before -ldnnl).
#include <oneapi/dnnl/dnnl.h>
#include <oneapi/dnnl/dnnl_version.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

namespace {

const char* isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
        case dnnl_cpu_isa_sse41: return "sse41";
        case dnnl_cpu_isa_avx: return "avx";
        case dnnl_cpu_isa_avx2: return "avx2";
        case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
        case dnnl_cpu_isa_avx512_core: return "avx512_core";
        case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
        case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
        case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
#if DNNL_VERSION_MAJOR >= 3  // added in 3.0 (and 2.x's avx512_mic gone)
        case dnnl_cpu_isa_avx2_vnni_2: return "avx2_vnni_2";
        case dnnl_cpu_isa_avx512_core_fp16: return "avx512_core_fp16";
        case dnnl_cpu_isa_avx512_core_amx_fp16: return "avx512_core_amx_fp16";
#else
        case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
        case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
#endif
        default: return "unknown";
    }
}

// "model name (family F model M)" of the first processor: the name alone does not tell Zen 2 from Zen 3.
std::string cpu_model() {
    std::ifstream in("/proc/cpuinfo");
    std::string name = "unknown", family, model;
    for (std::string line; std::getline(in, line) && !line.empty();) {
        const size_t colon = line.find(':');
        if (colon == std::string::npos) continue;
        const std::string key = line.substr(0, line.find_last_not_of(" \t", colon - 1) + 1);
        const std::string value = colon + 2 <= line.size() ? line.substr(colon + 2) : std::string();
        if (key == "model name") name = value;
        if (key == "cpu family") family = value;
        if (key == "model") model = value;
    }
    return family.empty() || model.empty() ? name : name + " (family " + family + " model " + model + ")";
}

}  // namespace

int main() {
    const dnnl_version_t* v = dnnl_version();
    std::printf("cpu: %s\n", cpu_model().c_str());
    std::printf("onednn: %d.%d.%d\n", v->major, v->minor, v->patch);
    std::printf("isa: %s\n", isa_name(dnnl_get_effective_cpu_isa()));
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    std::printf("max_cpu_isa: %s\n", cap && *cap ? cap : "(not set)");
    return 0;
}
