#include "engine/conv_tuning.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>

#include "engine/onednn_compat.h"

namespace resunet {

using namespace dnnl;

namespace {

// Fills a buffer with a fixed pseudo-random pattern in [0, 1) (no RNG state to share; reproducible).
void fill_pattern(float* data, size_t count, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1u;
    for (size_t i = 0; i < count; ++i) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        data[i] = static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
    }
}

// Reorders `from` into a new buffer of layout `desc` (or `from`'s buffer copied, when the layouts agree).
memory reordered(const engine& eng, stream& strm, const memory& from, const memory::desc& desc) {
    memory to(desc, eng);
    reorder(from, to).execute(strm, const_cast<memory&>(from), to);
    strm.wait();
    return to;
}

// Output of `pd` as plain NCHW floats, so that candidates with different dst layouts compare.
std::vector<float> as_nchw(const engine& eng, stream& strm, const memory& dst) {
    const memory::desc& desc = dst.get_desc();
    const memory::dims dims = onednn::dims_of(desc);
    size_t count = 1;
    for (memory::dim d : dims) count *= static_cast<size_t>(d);
    std::vector<float> out(count);
    memory plain({dims, memory::data_type::f32, memory::format_tag::nchw}, eng, out.data());
    reorder(dst, plain).execute(strm, const_cast<memory&>(dst), plain);
    strm.wait();
    return out;
}

}  // namespace

ConvTrial measure_conv(const engine& eng, stream& strm, std::vector<ConvCandidate>& candidates, const memory& weights,
                       const memory& bias, int reps, double margin) {
    std::vector<TrialCandidate> trial(candidates.size());
    for (size_t i = 0; i < candidates.size(); ++i) {
        ConvCandidate& c = candidates[i];
        trial[i].name = c.name;
        trial[i].bound = c.bound;
        // A lazily built kernel lives while it is measured, and after only while it is the choice.
        const bool lazy = !c.own && c.make_own;
        if (lazy) trial[i].drop = [&c] { c.own.reset(); };
        trial[i].prepare = [&eng, &strm, &c, &weights, &bias, lazy]() -> std::optional<TrialRun> {
            const auto& pd = c.pd;
            memory src(pd.src_desc(), eng);
            memory dst(pd.dst_desc(), eng);
            {
                // Synthetic data in plain layout, reordered into the candidate's: same values for every one.
                const memory::dims src_dims = onednn::dims_of(pd.src_desc());
                const memory::dims dst_dims = onednn::dims_of(pd.dst_desc());
                size_t src_count = 1, dst_count = 1;
                for (memory::dim d : src_dims) src_count *= static_cast<size_t>(d);
                for (memory::dim d : dst_dims) dst_count *= static_cast<size_t>(d);
                std::vector<float> plain_src(src_count), plain_dst(dst_count);
                fill_pattern(plain_src.data(), src_count, 1);
                fill_pattern(plain_dst.data(), dst_count, 2);
                memory ps({src_dims, memory::data_type::f32, memory::format_tag::nchw}, eng, plain_src.data());
                memory pdst({dst_dims, memory::data_type::f32, memory::format_tag::nchw}, eng, plain_dst.data());
                reorder(ps, src).execute(strm, ps, src);
                reorder(pdst, dst).execute(strm, pdst, dst);
                strm.wait();
            }
            // The fused residual sum reads dst: its initial content is restored before each run.
            auto initial = std::make_shared<std::vector<char>>(pd.dst_desc().get_size());
            std::memcpy(initial->data(), dst.get_data_handle(), initial->size());
            TrialRun run;
            run.reset = [initial, dst] { std::memcpy(dst.get_data_handle(), initial->data(), initial->size()); };
            run.output = [&eng, &strm, dst] { return as_nchw(eng, strm, dst); };
            if (lazy) c.own = c.make_own();
            if (c.own) {
                c.weight_bytes = c.own->weight_bytes();
                c.scratch_bytes = c.own->scratch_bytes();
                memory scratch({{static_cast<memory::dim>(std::max<size_t>(c.own->scratch_bytes(), 1))}, memory::data_type::u8,
                                memory::format_tag::x},
                               eng);
                run.run = [&strm, own = c.own, scratch, src, dst] {
                    own->execute(strm, static_cast<const float*>(src.get_data_handle()),
                                 static_cast<float*>(dst.get_data_handle()), scratch.get_data_handle());
                };
            } else if (c.make_own) {
                return std::nullopt;  // our kernel does not apply after all
            } else {
                c.weight_bytes = pd.weights_desc().get_size() + bias.get_desc().get_size();
                c.scratch_bytes = pd.scratchpad_desc().get_size();
                memory w = reordered(eng, strm, weights, pd.weights_desc());
                memory scratch(pd.scratchpad_desc(), eng);
                const std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_BIAS, bias},
                                                              {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}};
                run.run = [&strm, conv = convolution_forward(pd), args]() mutable {
                    conv.execute(strm, args);
                    strm.wait();
                };
            }
            return run;
        };
    }
    const ConvTrial result = run_trial(trial, {.reps = reps, .margin = margin});
    for (size_t i = 0; i < candidates.size(); ++i) {
        candidates[i].ms = trial[i].ms;
        candidates[i].error = trial[i].error;
        candidates[i].passed = trial[i].passed;
    }
    return result;
}

}  // namespace resunet
