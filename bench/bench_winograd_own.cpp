// Per-layer figures for our own Winograd (engine/winograd_own.h) against oneDNN's direct convolution,
// on the 3x3 layers of the width-64 ResUNet at 224x224: each candidate checked against direct first,
// then timed with the candidates interleaved (the VM clock drifts), median and spread of the repeats.
//
// Intended usage:
//   OMP_NUM_THREADS=2 ./build/bench/bench_winograd_own                    # batch 1 and 4, 7 repeats
//   OMP_NUM_THREADS=2 ./build/bench/bench_winograd_own --batch 4 --repeats 9 --groups 0,64,256,100000
//   OMP_NUM_THREADS=2 ./build/bench/bench_winograd_own --batch 4 --nChw16c --both-transforms   # AVX2 vs AVX-512 transforms
// Prints a Markdown table: per layer and batch, direct ms, each candidate's ms (median [min-max]) and
// speed-up, and its max|own - direct| / max|direct|. `--groups` lists the tiles per group tried for
// F(4x4) (0: the kernel's own choice; a large number: one group of every tile).
#include <fmt/format.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "engine/onednn_compat.h"
#include "engine/winograd_own.h"

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

struct Layer {
    int in_channels, out_channels, size;
    bool sum;  // the block's second conv with an identity shortcut ends with sum + ReLU
};

void fill(std::vector<float>& data, uint32_t seed, float low, float high) {
    uint32_t x = seed * 2654435761u + 1u;
    for (float& v : data) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v = low + (high - low) * static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
    }
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

std::vector<int64_t> parse_list(const char* text) {
    std::vector<int64_t> out;
    for (const char* p = text; *p;) {
        out.push_back(std::strtoll(p, const_cast<char**>(&p), 10));
        if (*p == ',') ++p;
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    std::vector<int64_t> batches = {1, 4};
    std::vector<int64_t> groups = {0};
    int repeats = 7;
    tag layout = tag::nChw8c;      // --nChw16c: the engine's layout on AVX-512 (where the AVX-512 transforms run)
    bool both_transforms = false;  // --both-transforms: each own candidate with AVX2 and with AVX-512 transforms
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--batch" && i + 1 < argc) batches = parse_list(argv[++i]);
        else if (a == "--repeats" && i + 1 < argc) repeats = std::atoi(argv[++i]);
        else if (a == "--groups" && i + 1 < argc) groups = parse_list(argv[++i]);
        else if (a == "--nChw16c") layout = tag::nChw16c;
        else if (a == "--both-transforms") both_transforms = true;
        else {
            fmt::print("usage: bench_winograd_own [--batch 1,4] [--repeats 7] [--groups 0,64,...] [--nChw16c] [--both-transforms]\n");
            return a == "--help" ? 0 : 2;
        }
    }
    const Layer layers[] = {{64, 64, 224, true},    {128, 64, 224, false},  {64, 128, 112, false},
                            {128, 128, 112, true},  {256, 128, 112, false}, {128, 256, 56, false},
                            {256, 256, 56, true},   {512, 256, 56, false},  {256, 512, 28, false},
                            {512, 512, 28, true},   {1024, 512, 28, false}, {512, 1024, 14, false},
                            {1024, 1024, 14, true}};
    engine eng(engine::kind::cpu, 0);
    stream strm(eng);
    fmt::print("| layer | batch | direct ms [min-max] | candidate | ms [min-max] | speed-up | rel. error | scratch MB | weights MB (direct) |\n");
    fmt::print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (int64_t batch : batches)
        for (const Layer& l : layers) {
            const memory::dims src_dims = {batch, l.in_channels, l.size, l.size};
            const memory::dims dst_dims = {batch, l.out_channels, l.size, l.size};
            std::vector<float> weights(static_cast<size_t>(l.out_channels) * l.in_channels * 9), bias(l.out_channels);
            fill(weights, 3, -1.0f / std::sqrt(9.0f * l.in_channels), 1.0f / std::sqrt(9.0f * l.in_channels));
            fill(bias, 4, -0.1f, 0.1f);
            memory src({src_dims, dt::f32, layout}, eng);
            memory dst_initial({dst_dims, dt::f32, layout}, eng);
            {
                std::vector<float> plain(src.get_desc().get_size() / 4);
                fill(plain, 1, 0.0f, 1.0f);
                std::memcpy(src.get_data_handle(), plain.data(), plain.size() * 4);
                std::vector<float> d(dst_initial.get_desc().get_size() / 4);
                fill(d, 2, 0.0f, 1.0f);
                std::memcpy(dst_initial.get_data_handle(), d.data(), d.size() * 4);
            }
            primitive_attr attr;
            post_ops post;
            if (l.sum) post.append_sum(1.0f);
            resunet::onednn::append_eltwise(post, algorithm::eltwise_relu, 0.0f, 0.0f);
            attr.set_post_ops(post);
            const convolution_forward::primitive_desc pd = resunet::onednn::conv_forward(
                eng, prop_kind::forward_inference, algorithm::convolution_direct, src.get_desc(),
                memory::desc({l.out_channels, l.in_channels, 3, 3}, dt::f32, tag::any),
                memory::desc({l.out_channels}, dt::f32, tag::x), dst_initial.get_desc(), {1, 1}, {1, 1}, {1, 1}, attr);
            memory user_weights({{l.out_channels, l.in_channels, 3, 3}, dt::f32, tag::oihw}, eng, weights.data());
            memory conv_weights(pd.weights_desc(), eng);
            reorder(user_weights, conv_weights).execute(strm, user_weights, conv_weights);
            memory conv_bias({{l.out_channels}, dt::f32, tag::x}, eng, bias.data());
            memory direct_dst(dst_initial.get_desc(), eng);
            convolution_forward conv(pd);
            const size_t dst_bytes = dst_initial.get_desc().get_size();

            struct Candidate {
                std::string name;
                std::function<void()> run;
                memory dst;
                std::vector<double> ms;
                double error = 0;
                size_t scratch = 0, weight_bytes = 0;
            };
            std::vector<Candidate> candidates;
            candidates.push_back({fmt::format("direct {}", pd.impl_info_str()),
                                  [&] {
                                      conv.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, conv_weights},
                                                          {DNNL_ARG_BIAS, conv_bias}, {DNNL_ARG_DST, direct_dst}});
                                      strm.wait();
                                  },
                                  direct_dst, {}, 0, pd.scratchpad_desc().get_size(), pd.weights_desc().get_size()});
            std::vector<std::unique_ptr<resunet::WinogradOwn>> kernels;
            std::vector<std::vector<char>> scratches;
            kernels.reserve(16);
            scratches.reserve(16);
            for (int tile : {4, 2})
                for (int64_t group : tile == 4 ? groups : std::vector<int64_t>{0})
                for (bool allow_avx512 : both_transforms ? std::vector<bool>{false, true} : std::vector<bool>{true}) {
                    resunet::WinogradOwnShape shape{.batch = batch, .in_channels = l.in_channels,
                                                    .out_channels = l.out_channels, .height = l.size, .width = l.size,
                                                    .layout = layout, .sum = l.sum, .relu = true};
                    std::string why;
                    auto own = resunet::WinogradOwn::create(eng, strm, tile, shape, weights.data(), bias.data(), &why, group,
                                                            allow_avx512);
                    if (!own) {
                        fmt::print("skip F({0}x{0}): {1}\n", tile, why);
                        continue;
                    }
                    resunet::WinogradOwn* k = own.get();
                    kernels.push_back(std::move(own));
                    scratches.emplace_back(k->scratch_bytes() + 64);
                    void* scratch = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratches.back().data()) + 63) / 64 * 64);
                    memory d(dst_initial.get_desc(), eng);
                    candidates.push_back({fmt::format("F({0}x{0}) g{1} {2}", tile, k->tiles_per_group(), k->kernel()),
                                          [&strm, k, scratch, &src, d]() mutable {
                                              k->execute(strm, static_cast<const float*>(src.get_data_handle()),
                                                         static_cast<float*>(d.get_data_handle()), scratch);
                                          },
                                          d, {}, 0, k->scratch_bytes(), k->weight_bytes()});
                }
            // Check each against direct once (dst starts from the same values: the sum reads them).
            std::vector<float> reference;
            for (size_t c = 0; c < candidates.size(); ++c) {
                std::memcpy(candidates[c].dst.get_data_handle(), dst_initial.get_data_handle(), dst_bytes);
                candidates[c].run();
                const float* out = static_cast<const float*>(candidates[c].dst.get_data_handle());
                if (c == 0) {
                    reference.assign(out, out + dst_bytes / 4);
                    continue;
                }
                double max_ref = 0, max_err = 0;
                for (size_t i = 0; i < reference.size(); ++i) {
                    max_ref = std::max(max_ref, std::fabs(static_cast<double>(reference[i])));
                    max_err = std::max(max_err, std::fabs(static_cast<double>(out[i]) - reference[i]));
                }
                candidates[c].error = max_err / max_ref;
            }
            for (int r = 0; r < repeats; ++r)
                for (Candidate& c : candidates) {
                    std::memcpy(c.dst.get_data_handle(), dst_initial.get_data_handle(), dst_bytes);
                    const auto start = std::chrono::steady_clock::now();
                    c.run();
                    c.ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
                }
            const double direct_ms = median(candidates[0].ms);
            for (size_t c = 1; c < candidates.size(); ++c) {
                const Candidate& k = candidates[c];
                fmt::print("| {}->{} @{}{} | {} | {:.2f} [{:.2f}-{:.2f}] | {} | {:.2f} [{:.2f}-{:.2f}] | {:.2f}x | {:.1e} | {:.1f} | {:.1f} ({:.1f}) |\n",
                           l.in_channels, l.out_channels, l.size, l.sum ? " +sum" : "", batch, direct_ms,
                           *std::min_element(candidates[0].ms.begin(), candidates[0].ms.end()),
                           *std::max_element(candidates[0].ms.begin(), candidates[0].ms.end()), k.name, median(k.ms),
                           *std::min_element(k.ms.begin(), k.ms.end()), *std::max_element(k.ms.begin(), k.ms.end()),
                           direct_ms / median(k.ms), k.error, k.scratch / 1e6, k.weight_bytes / 1e6,
                           candidates[0].weight_bytes / 1e6);
            }
            std::fflush(stdout);
        }
    return 0;
}
