// One group of tiles' batched GEMMs on oneDNN matmul (engine/tile_group_matmul.h).
#include "engine/tile_group_matmul.h"

#include <algorithm>
#include <exception>

#include "engine/onednn_compat.h"

namespace resunet {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

TileGroupMatmul TileGroupMatmul::create(const engine& eng, int64_t positions, int64_t group, int64_t rest, int64_t k,
                                        int64_t n, dt src_type, dt weights_type, dt dst_type) {
    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    auto make = [&](int64_t rows, const memory::desc& weights_desc) {
        const memory::desc src({positions, rows, k}, src_type, tag::abc);
        const memory::desc dst({positions, rows, n}, dst_type, tag::abc);
        return onednn::matmul(eng, src, weights_desc, dst, attr);
    };
    const memory::desc plain({positions, k, n}, weights_type, tag::abc);
    matmul::primitive_desc full_pd, rest_pd;
    try {
        full_pd = make(group, memory::desc({positions, k, n}, weights_type, tag::any));
        if (rest != group) rest_pd = make(rest, full_pd.weights_desc());
    } catch (const dnnl::error&) {
        // the remainder refused the packed weights: both on plain ones
        full_pd = make(group, plain);
        if (rest != group) rest_pd = make(rest, plain);
    }
    TileGroupMatmul m;
    m.group = group;
    m.impl = full_pd.impl_info_str();
    m.full = matmul(full_pd);
    m.full_src = full_pd.src_desc();
    m.full_dst = full_pd.dst_desc();
    m.weights = full_pd.weights_desc();
    m.weights_plain = m.weights == plain;
    m.positions = positions;
    m.k = k;
    m.n = n;
    m.src_type = src_type;
    m.weights_type = weights_type;
    m.dst_type = dst_type;
    m.src_bytes = memory::data_type_size(src_type);
    m.weight_bytes = memory::data_type_size(weights_type);
    m.dst_bytes = memory::data_type_size(dst_type);
    if (m.weights_plain) {
        try {
            auto one = [&](int64_t rows) {
                return onednn::matmul(eng, memory::desc({1, rows, k}, src_type, tag::abc), memory::desc({1, k, n}, weights_type, tag::abc),
                                      memory::desc({1, rows, n}, dst_type, tag::abc), attr);
            };
            const matmul::primitive_desc one_full = one(group);
            const matmul::primitive_desc one_rest = rest != group ? one(rest) : one_full;
            if (one_full.scratchpad_desc().get_size() == 0 && one_rest.scratchpad_desc().get_size() == 0) {
                m.one_full = matmul(one_full);
                m.one_rest = matmul(one_rest);
                m.per_position = true;
            }
        } catch (const dnnl::error&) {
            // no single-position kernel: run() alone
        }
    }
    m.scratch_bytes = full_pd.scratchpad_desc().get_size();
    if (rest != group) {
        m.rest = matmul(rest_pd);
        m.rest_src = rest_pd.src_desc();
        m.rest_dst = rest_pd.dst_desc();
        m.scratch_bytes = std::max(m.scratch_bytes, rest_pd.scratchpad_desc().get_size());
    }
    return m;
}

void TileGroupMatmul::run(const engine& eng, stream& s, int64_t rows, void* src, const memory& weights_memory, void* dst,
                          void* scratch) const {
    const bool is_full = rows == group;
    const memory::desc scratch_desc({static_cast<memory::dim>(std::max<size_t>(scratch_bytes, 1))}, dt::u8, tag::x);
    (is_full ? full : rest)
        .execute(s, {{DNNL_ARG_SRC, memory(is_full ? full_src : rest_src, eng, src)},
                     {DNNL_ARG_WEIGHTS, weights_memory},
                     {DNNL_ARG_DST, memory(is_full ? full_dst : rest_dst, eng, dst)},
                     {DNNL_ARG_SCRATCHPAD, memory(scratch_desc, eng, scratch)}});
    s.wait();
}

void TileGroupMatmul::run_positions(const engine& eng, int64_t rows, void* src, const memory& weights_memory, void* dst) const {
    const bool is_full = rows == group;
    const memory::desc src_desc({1, rows, k}, src_type, tag::abc);
    const memory::desc weights_desc({1, k, n}, weights_type, tag::abc);
    const memory::desc dst_desc({1, rows, n}, dst_type, tag::abc);
    char* const s_base = static_cast<char*>(src);
    char* const w_base = static_cast<char*>(weights_memory.get_data_handle());
    char* const d_base = static_cast<char*>(dst);
    std::exception_ptr failure;
#pragma omp parallel
    {
        try {
            stream local(eng);
#pragma omp for schedule(static)
            for (int64_t p = 0; p < positions; ++p) {
                (is_full ? one_full : one_rest)
                    .execute(local, {{DNNL_ARG_SRC, memory(src_desc, eng, s_base + static_cast<size_t>(p * rows * k) * src_bytes)},
                                     {DNNL_ARG_WEIGHTS, memory(weights_desc, eng, w_base + static_cast<size_t>(p * k * n) * weight_bytes)},
                                     {DNNL_ARG_DST, memory(dst_desc, eng, d_base + static_cast<size_t>(p * rows * n) * dst_bytes)}});
                local.wait();
            }
        } catch (...) {
#pragma omp critical(resunet_tile_group_failure)
            failure = std::current_exception();
        }
    }
    if (failure) std::rethrow_exception(failure);
}

}  // namespace resunet
