// The batched GEMMs of our own Winograd kernels (engine/winograd_own.h, quant/winograd_int8.h) over one group
// of tiles: [P, rows, K] x [P, K, N] -> [P, rows, N], one oneDNN matmul for the full groups and one for the
// shorter last group, both on one weights layout (oneDNN's choice where both take it, else plain). Internal
// to engine/ and quant/ (oneDNN types).
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

namespace resunet {

struct TileGroupMatmul {
    dnnl::matmul full, rest;  // rest: only when the last group has fewer rows
    dnnl::memory::desc full_src, full_dst, rest_src, rest_dst;
    dnnl::memory::desc weights;    // the layout both primitives take
    bool weights_plain = false;    // weights is plain {P, K, N} (abc): callers may write it directly
    size_t scratch_bytes = 0;      // the larger scratchpad of the two (user scratchpad mode)
    int64_t group = 0;             // rows of a full group
    std::string impl;              // the full group's oneDNN implementation, e.g. "gemm:jit"
    // One position (batch 1) of a full / the last group, each on one thread: run_positions() runs a group's
    // positions side by side, so a group that all threads share gets the same sums on any thread count (a
    // GEMM that oneDNN threads may split its K sum by the thread count). Only with plain weights and no
    // scratchpad (where a position's weights are a plain slice).
    dnnl::matmul one_full, one_rest;
    bool per_position = false;
    int64_t positions = 0, k = 0, n = 0;
    size_t src_bytes = 0, weight_bytes = 0, dst_bytes = 0;  // per element
    dnnl::memory::data_type src_type{}, weights_type{}, dst_type{};

    // `rest` rows in the last group (== group: all groups full).
    static TileGroupMatmul create(const dnnl::engine& eng, int64_t positions, int64_t group, int64_t rest, int64_t k,
                                  int64_t n, dnnl::memory::data_type src_type, dnnl::memory::data_type weights_type,
                                  dnnl::memory::data_type dst_type);

    // The group of `rows` rows (group, or the last one's) on `s`, waited for.
    void run(const dnnl::engine& eng, dnnl::stream& s, int64_t rows, void* src, const dnnl::memory& weights_memory, void* dst,
             void* scratch) const;
    // The same result as run() on one thread, the positions spread over the threads (needs per_position).
    void run_positions(const dnnl::engine& eng, int64_t rows, void* src, const dnnl::memory& weights_memory, void* dst) const;
};

}  // namespace resunet
