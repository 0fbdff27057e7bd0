// The weights gradient of a 3x3 convolution by our own fp32 Winograd (engine/winograd_own_bwd_weights.h):
// input and output-gradient transforms on AVX2, dU += V^T Z as one batched oneDNN matmul per group of
// tiles, the accumulators transformed back into OIHW at the end.
#include "engine/winograd_own_bwd_weights.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <vector>

#include "engine/onednn_compat.h"
#include "engine/winograd_tiles.h"

namespace resunet {

using namespace dnnl;
using namespace winograd_tiles;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

size_t align64(size_t bytes) { return (bytes + 63) / 64 * 64; }

// The whole-batch mode's buffers (V and Z of every tile, one set of accumulators) at most this.
constexpr int64_t kWholeBatchLimit = int64_t{512} << 20;

// Per-thread accumulators (threads x P x IC x OC) outweighing the transformed inputs (P x tiles x (IC + OC)):
// the deep layers, with few tiles and many channels. Those run in the whole-batch mode.
bool whole_batch_mode(int tile, const WinogradOwnShape& shape) {
    const int64_t tiles = shape.batch * ((shape.height + tile - 1) / tile) * ((shape.width + tile - 1) / tile);
    const int64_t threads = std::max(1, omp_get_max_threads());
    return threads * shape.in_channels * shape.out_channels > tiles * (shape.in_channels + shape.out_channels);
}

}  // namespace

bool WinogradOwnBwdWeights::applies(int tile, const WinogradOwnShape& shape, std::string* why) {
    if (!WinogradOwn::applies(tile, shape, why)) return false;
    auto refuse = [&](std::string reason) {
        if (why) *why = std::move(reason);
        return false;
    };
    if (shape.sum || shape.relu) return refuse("a weights gradient has no fused sum or ReLU");
    if (shape.src_batch_stride != 0 || shape.dst_batch_stride != 0) return refuse("activations must be dense");
    const int64_t tiles = shape.batch * ((shape.height + tile - 1) / tile) * ((shape.width + tile - 1) / tile);
    const int64_t positions = static_cast<int64_t>(tile + 2) * (tile + 2);
    const int64_t ic = shape.in_channels, oc = shape.out_channels;
    const int64_t whole_bytes = positions * (tiles * (ic + oc) + ic * oc) * static_cast<int64_t>(sizeof(float));
    if (whole_batch_mode(tile, shape) && whole_bytes > kWholeBatchLimit)
        return refuse(fmt::format("{} tiles of {}->{} channels: the transformed batch and the accumulators would take {} MB",
                                  tiles, ic, oc, whole_bytes >> 20));
    return true;
}

std::unique_ptr<WinogradOwnBwdWeights> WinogradOwnBwdWeights::create(const engine& eng, int tile,
                                                                     const WinogradOwnShape& shape, std::string* why,
                                                                     int64_t tiles_per_group) {
    if (!applies(tile, shape, why)) return nullptr;
    std::unique_ptr<WinogradOwnBwdWeights> grad(new WinogradOwnBwdWeights());
    WinogradOwnBwdWeights& c = *grad;
    c.shape_ = shape;
    c.eng_ = eng;
    c.tile_ = tile;
    c.alpha_ = tile + 2;
    c.block_ = shape.channel_block();
    c.tiles_y_ = (shape.height + tile - 1) / tile;
    c.tiles_x_ = (shape.width + tile - 1) / tile;
    c.tiles_ = shape.batch * c.tiles_y_ * c.tiles_x_;
    c.threads_ = std::max(1, omp_get_max_threads());
    const int64_t positions = static_cast<int64_t>(c.alpha_) * c.alpha_;
    const int64_t ic = shape.in_channels, oc = shape.out_channels;

    c.whole_batch_ = tiles_per_group < 0 || (tiles_per_group == 0 && whole_batch_mode(tile, shape));
    if (c.whole_batch_) tiles_per_group = c.tiles_;
    // Tiles per group are the GEMMs' K. Each group adds its product into the accumulators, which costs
    // a read and a write of P * IC * OC floats: K of about 2 IC OC / (IC + OC) keeps that below the
    // transformed inputs' traffic. V and Z of a group at most 16 MB; at most a thread's share of the
    // tiles, and equal groups, a multiple of the thread count.
    const int64_t bytes_per_tile = positions * (ic + oc) * static_cast<int64_t>(sizeof(float));
    int64_t group = tiles_per_group;
    if (group <= 0) {
        group = std::clamp<int64_t>(std::min<int64_t>(2 * ic * oc / (ic + oc), (int64_t{16} << 20) / bytes_per_tile), 32, 512);
        group = std::min(group, (c.tiles_ + c.threads_ - 1) / c.threads_);
    }
    int64_t rest = 0;
    c.group_ = group = even_groups(c.tiles_, group, c.threads_, !c.whole_batch_, &rest);

    primitive_attr attr;
    attr.set_scratchpad_mode(scratchpad_mode::user);
    if (!c.whole_batch_) {  // the groups add into the accumulators; the whole batch writes them once
        post_ops accumulate;
        accumulate.append_sum(1.0f);
        attr.set_post_ops(accumulate);
    }
    c.accumulator_desc_ = memory::desc({positions, ic, oc}, dt::f32, tag::abc);
    // V [P, K, IC] read as its transpose {P, IC, K}; Z [P, K, OC].
    auto make = [&](int64_t k, memory::desc* src, memory::desc* weights) {
        *src = memory::desc({positions, ic, k}, dt::f32, memory::dims{k * ic, 1, ic});
        *weights = memory::desc({positions, k, oc}, dt::f32, tag::abc);
        return onednn::matmul(eng, *src, *weights, c.accumulator_desc_, attr);
    };
    matmul::primitive_desc full_pd, rest_pd;
    try {
        full_pd = make(group, &c.full_src_, &c.full_weights_);
        if (rest != group) rest_pd = make(rest, &c.rest_src_, &c.rest_weights_);
    } catch (const dnnl::error& e) {
        if (why) *why = fmt::format("oneDNN matmul refused V^T Z: {}", e.what());
        return nullptr;
    }
    c.full_ = matmul(full_pd);
    c.matmul_scratch_bytes_ = full_pd.scratchpad_desc().get_size();
    if (rest != group) {
        c.rest_ = matmul(rest_pd);
        c.matmul_scratch_bytes_ = std::max(c.matmul_scratch_bytes_, rest_pd.scratchpad_desc().get_size());
    }
    c.v_bytes_ = align64(static_cast<size_t>(positions * group * ic) * sizeof(float));
    c.z_bytes_ = align64(static_cast<size_t>(positions * group * oc) * sizeof(float));
    c.u_bytes_ = align64(static_cast<size_t>(positions * ic * oc) * sizeof(float));
    c.bias_bytes_ = align64(static_cast<size_t>(oc) * sizeof(float));
    c.slot_bytes_ = c.v_bytes_ + c.z_bytes_ + c.u_bytes_ + c.bias_bytes_ + align64(std::max<size_t>(c.matmul_scratch_bytes_, 1));
    c.scratch_bytes_ = c.whole_batch_ ? c.slot_bytes_ + c.bias_bytes_ * static_cast<size_t>(c.threads_)
                                      : c.slot_bytes_ * static_cast<size_t>(c.threads_);
    c.kernel_ = fmt::format("own_f{}3_bwd_weights{}:avx2+{}", tile, c.whole_batch_ ? "_whole" : "", full_pd.impl_info_str());
    return grad;
}

// AVX2: applies() refuses the kernel on a CPU without it.
__attribute__((target("avx2,fma"))) void WinogradOwnBwdWeights::transform(const float* src, const float* diff_dst, float* v, float* z, float* bias_sum,
                                      int64_t first_tile, int64_t count, int64_t row0, int64_t rows) const {
    const int64_t ic = shape_.in_channels, oc = shape_.out_channels;
    const int64_t height = shape_.height, width = shape_.width;
    const int64_t per_image = tiles_y_ * tiles_x_;
    const int64_t plane_elements = block_ ? height * width * block_ : 0;
    // Channel group g (8 channels) of image n: where its pixel (0, 0) is, and how its pixels are laid out.
    auto group_offset = [&](int64_t channels, int64_t n, int64_t g) {
        const int64_t within = block_ ? (g * 8 / block_) * plane_elements + (g * 8) % block_ : g * 8;
        return n * channels * height * width + within;
    };
    const Plane src_plane = block_ ? Plane{width * block_, block_} : Plane{width * ic, ic};
    const Plane dst_plane = block_ ? Plane{width * block_, block_} : Plane{width * oc, oc};
    for (int64_t t = 0; t < count; ++t) {
        const int64_t index = first_tile + t;
        const int64_t n = index / per_image, ty = (index % per_image) / tiles_x_, tx = index % tiles_x_;
        const int64_t row = row0 + t;
        for (int64_t g = 0; g < ic / 8; ++g) {
            const float* base = src + group_offset(ic, n, g);
            if (tile_ == 4)
                input_tile<4>(base, src_plane, ty * 4 - 1, tx * 4 - 1, height, width, v + row * ic + g * 8, rows * ic);
            else
                input_tile<2>(base, src_plane, ty * 2 - 1, tx * 2 - 1, height, width, v + row * ic + g * 8, rows * ic);
        }
        for (int64_t g = 0; g < oc / 8; ++g) {
            const float* base = diff_dst + group_offset(oc, n, g);
            __m256 sum = _mm256_loadu_ps(bias_sum + g * 8);
            if (tile_ == 4)
                grad_tile<4>(base, dst_plane, ty * 4, tx * 4, height, width, z + row * oc + g * 8, rows * oc, sum);
            else
                grad_tile<2>(base, dst_plane, ty * 2, tx * 2, height, width, z + row * oc + g * 8, rows * oc, sum);
            _mm256_storeu_ps(bias_sum + g * 8, sum);
        }
    }
}

// The accumulators added, then d g = G^T dU G per (oc, ic) in double, into OIHW; the bias sums added.
void WinogradOwnBwdWeights::finish(float* diff_weights, float* diff_bias, const std::vector<const float*>& accumulators,
                                   const std::vector<const float*>& bias_sums) const {
    const int64_t ic = shape_.in_channels, oc = shape_.out_channels;
    const int64_t positions = static_cast<int64_t>(alpha_) * alpha_;
    const double* g_rows = tile_ == 4 ? &kG43[0][0] : &kG23[0][0];
    const int alpha = alpha_;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < ic; ++i)
        for (int64_t o = 0; o < oc; ++o) {
            double u[6][6] = {};
            for (const float* acc : accumulators)
                for (int64_t p = 0; p < positions; ++p) u[p / alpha][p % alpha] += acc[(p * ic + i) * oc + o];
            double left[3][6];  // G^T u
            for (int y = 0; y < 3; ++y)
                for (int b = 0; b < alpha; ++b) {
                    double value = 0;
                    for (int a = 0; a < alpha; ++a) value += g_rows[a * 3 + y] * u[a][b];
                    left[y][b] = value;
                }
            float* out = diff_weights + (o * ic + i) * 9;
            for (int y = 0; y < 3; ++y)
                for (int x = 0; x < 3; ++x) {
                    double value = 0;
                    for (int b = 0; b < alpha; ++b) value += left[y][b] * g_rows[b * 3 + x];
                    out[y * 3 + x] = static_cast<float>(value);
                }
        }
    if (!diff_bias) return;
    for (int64_t o = 0; o < oc; ++o) {
        double value = 0;
        for (const float* sums : bias_sums) value += sums[o];
        diff_bias[o] = static_cast<float>(value);
    }
}

void WinogradOwnBwdWeights::execute(stream& strm, const float* src, const float* diff_dst, float* diff_weights,
                                    float* diff_bias, void* scratch) {
    char* bytes = static_cast<char*>(scratch);
    const int threads = std::min(threads_, std::max(1, omp_get_max_threads()));
    const memory::desc scratch_desc({static_cast<memory::dim>(std::max<size_t>(matmul_scratch_bytes_, 1))}, dt::u8, tag::x);
    std::vector<const float*> accumulators, bias_sums;
    if (whole_batch_) {
        // Every tile's V and Z (the transforms threaded over tiles, a bias sum per thread), then one matmul
        // that oneDNN threads, writing the accumulators once.
        float* v = reinterpret_cast<float*>(bytes);
        float* z = reinterpret_cast<float*>(bytes + v_bytes_);
        float* u = reinterpret_cast<float*>(bytes + v_bytes_ + z_bytes_);
        char* matmul_scratch = bytes + v_bytes_ + z_bytes_ + u_bytes_ + bias_bytes_;
        char* bias_base = bytes + slot_bytes_;
#pragma omp parallel num_threads(threads)
        {
            const int thread = omp_get_thread_num(), team = omp_get_num_threads();
            float* sums = reinterpret_cast<float*>(bias_base + static_cast<size_t>(thread) * bias_bytes_);
            std::memset(sums, 0, bias_bytes_);
            const int64_t per = (tiles_ + team - 1) / team;
            const int64_t first = std::min<int64_t>(tiles_, thread * per);
            const int64_t count = std::min<int64_t>(per, tiles_ - first);
            if (count > 0) transform(src, diff_dst, v, z, sums, first, count, first, tiles_);
        }
        const memory v_memory(full_src_, eng_, v), z_memory(full_weights_, eng_, z), u_memory(accumulator_desc_, eng_, u);
        const memory scratch_memory(scratch_desc, eng_, matmul_scratch);
        full_.execute(strm, {{DNNL_ARG_SRC, v_memory}, {DNNL_ARG_WEIGHTS, z_memory}, {DNNL_ARG_DST, u_memory},
                             {DNNL_ARG_SCRATCHPAD, scratch_memory}});
        strm.wait();
        accumulators.push_back(u);
        for (int t = 0; t < threads; ++t)
            bias_sums.push_back(reinterpret_cast<const float*>(bias_base + static_cast<size_t>(t) * bias_bytes_));
        finish(diff_weights, diff_bias, accumulators, bias_sums);
        return;
    }
    const int64_t groups = (tiles_ + group_ - 1) / group_;
    std::exception_ptr failure;
    // Each thread its own groups, scratch slot and accumulators; oneDNN runs a primitive called inside a
    // parallel region on the calling thread.
#pragma omp parallel num_threads(threads)
    {
        const int thread = omp_get_thread_num(), team = omp_get_num_threads();
        char* slot = bytes + static_cast<size_t>(thread) * slot_bytes_;
        float* v = reinterpret_cast<float*>(slot);
        float* z = reinterpret_cast<float*>(slot + v_bytes_);
        float* u = reinterpret_cast<float*>(slot + v_bytes_ + z_bytes_);
        float* bias_sum = reinterpret_cast<float*>(slot + v_bytes_ + z_bytes_ + u_bytes_);
        std::memset(u, 0, u_bytes_);
        std::memset(bias_sum, 0, bias_bytes_);
        try {
            stream local(eng_);
            const memory accumulator(accumulator_desc_, eng_, u);
            const memory scratch_memory(scratch_desc, eng_, slot + v_bytes_ + z_bytes_ + u_bytes_ + bias_bytes_);
            for (int64_t g = thread; g < groups; g += team) {
                const int64_t first = g * group_;
                const int64_t count = std::min(group_, tiles_ - first);
                const bool full = count == group_;
                transform(src, diff_dst, v, z, bias_sum, first, count, 0, count);
                const memory v_memory(full ? full_src_ : rest_src_, eng_, v);
                const memory z_memory(full ? full_weights_ : rest_weights_, eng_, z);
                (full ? full_ : rest_)
                    .execute(local, {{DNNL_ARG_SRC, v_memory}, {DNNL_ARG_WEIGHTS, z_memory}, {DNNL_ARG_DST, accumulator},
                                     {DNNL_ARG_SCRATCHPAD, scratch_memory}});
                local.wait();
            }
        } catch (...) {
#pragma omp critical(resunet_winograd_own_bwd_weights_failure)
            failure = std::current_exception();
        }
    }
    if (failure) std::rethrow_exception(failure);
    for (int t = 0; t < threads; ++t) {
        const char* slot = bytes + static_cast<size_t>(t) * slot_bytes_;
        accumulators.push_back(reinterpret_cast<const float*>(slot + v_bytes_ + z_bytes_));
        bias_sums.push_back(reinterpret_cast<const float*>(slot + v_bytes_ + z_bytes_ + u_bytes_));
    }
    finish(diff_weights, diff_bias, accumulators, bias_sums);
}

}  // namespace resunet
