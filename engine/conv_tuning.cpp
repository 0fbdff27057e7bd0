#include "engine/conv_tuning.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>

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
    const memory::dims dims = desc.dims();
    size_t count = 1;
    for (memory::dim d : dims) count *= static_cast<size_t>(d);
    std::vector<float> out(count);
    memory plain({dims, memory::data_type::f32, memory::format_tag::nchw}, eng, out.data());
    reorder(dst, plain).execute(strm, const_cast<memory&>(dst), plain);
    strm.wait();
    return out;
}

}  // namespace

std::string ConvTrial::summary(const std::vector<ConvCandidate>& candidates) const {
    std::string text;
    for (size_t i = 0; i < candidates.size(); ++i) {
        const ConvCandidate& c = candidates[i];
        if (!text.empty()) text += ", ";
        text += c.name;
        if (c.ms >= 0) text += fmt::format(" {:.3g} ms", c.ms);
        if (i > 0) text += c.passed ? fmt::format(" (err {:.1e})", c.error) : fmt::format(" (REJECTED: err {:.1e})", c.error);
        if (i == chosen) text += " *";
    }
    return text;
}

ConvTrial measure_conv(const engine& eng, stream& strm, std::vector<ConvCandidate>& candidates, const memory& weights,
                       const memory& bias, int reps, double margin) {
    using Clock = std::chrono::steady_clock;
    ConvTrial trial;
    std::vector<float> reference;
    double best_ms = -1;
    for (size_t i = 0; i < candidates.size(); ++i) {
        ConvCandidate& c = candidates[i];
        const auto& pd = c.pd;
        memory src(pd.src_desc(), eng);
        memory dst(pd.dst_desc(), eng);
        {
            // Synthetic data in plain layout, reordered into the candidate's: same values for every one.
            const memory::dims src_dims = pd.src_desc().dims();
            const memory::dims dst_dims = pd.dst_desc().dims();
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
        // The fused residual sum reads dst: keep its initial content to restore before each run.
        std::vector<char> initial(pd.dst_desc().get_size());
        std::memcpy(initial.data(), dst.get_data_handle(), initial.size());
        // A lazily built candidate lives while it is measured, and after only if it wins.
        const bool lazy = !c.own && c.make_own;
        if (lazy) c.own = c.make_own();
        std::function<void()> run;
        if (c.own) {
            c.weight_bytes = c.own->weight_bytes();
            c.scratch_bytes = c.own->scratch_bytes();
            memory scratch({{static_cast<memory::dim>(std::max<size_t>(c.own->scratch_bytes(), 1))}, memory::data_type::u8,
                            memory::format_tag::x},
                           eng);
            run = [&strm, own = c.own, scratch, src, dst] {
                own->execute(strm, static_cast<const float*>(src.get_data_handle()),
                             static_cast<float*>(dst.get_data_handle()), scratch.get_data_handle());
            };
        } else {
            c.weight_bytes = pd.weights_desc().get_size() + bias.get_desc().get_size();
            c.scratch_bytes = pd.scratchpad_desc().get_size();
            memory w = reordered(eng, strm, weights, pd.weights_desc());
            memory scratch(pd.scratchpad_desc(), eng);
            const std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_BIAS, bias},
                                                          {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}};
            run = [&strm, conv = convolution_forward(pd), args]() mutable {
                conv.execute(strm, args);
                strm.wait();
            };
        }
        run();
        const std::vector<float> out = as_nchw(eng, strm, dst);
        if (i == 0) {
            reference = out;
            c.passed = true;
        } else {
            double max_ref = 0, max_err = 0;
            for (size_t k = 0; k < out.size(); ++k) {
                max_ref = std::max(max_ref, std::fabs(static_cast<double>(reference[k])));
                const double err = std::fabs(static_cast<double>(out[k]) - reference[k]);
                max_err = std::isfinite(err) ? std::max(max_err, err) : INFINITY;
            }
            c.error = max_ref > 0 ? max_err / max_ref : (max_err > 0 ? INFINITY : 0);
            c.passed = c.error <= c.bound;
        }
        if (!c.passed) {  // never timed: a wrong kernel cannot win
            if (lazy) c.own.reset();
            continue;
        }
        double best = INFINITY;
        for (int r = 0; r < reps; ++r) {
            std::memcpy(dst.get_data_handle(), initial.data(), initial.size());
            const auto start = Clock::now();
            run();
            best = std::min(best, std::chrono::duration<double, std::milli>(Clock::now() - start).count());
        }
        c.ms = best;
        run = nullptr;  // holds the kernel
        if (i == 0 || best < best_ms * (1.0 - margin)) {
            best_ms = best;
            if (candidates[trial.chosen].make_own) candidates[trial.chosen].own.reset();  // superseded
            trial.chosen = i;
        } else if (lazy) {
            c.own.reset();
        }
    }
    return trial;
}

}  // namespace resunet
