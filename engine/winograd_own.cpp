// Our own fp32 Winograd F(4x4,3x3) / F(2x2,3x3): weight transform at build time, AVX2 input and output
// transforms, the GEMMs as one batched oneDNN matmul per group of tiles (engine/winograd_own.h).
#include "engine/winograd_own.h"
#include "engine/run_guards.h"
#include "engine/tile_group_matmul.h"
#include "engine/winograd_tiles.h"
#include "engine/winograd_tiles_avx512.h"
#include "engine/onednn_compat.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <exception>

namespace resunet {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

size_t align64(size_t bytes) { return (bytes + 63) / 64 * 64; }

}  // namespace

using namespace winograd_tiles;

bool winograd_own_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

namespace {

// Whether the transforms run 16 channels per vector: the CPU has AVX-512 F and oneDNN dispatches an AVX-512 ISA
// (so ONEDNN_MAX_CPU_ISA=AVX2 checks the AVX2 kernels). The same bits either way (engine/winograd_tiles_avx512.h).
bool avx512_transforms() {
    if (!onednn::effective_isa_name().starts_with("avx512")) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

}  // namespace

bool WinogradOwn::applies(int tile, const WinogradOwnShape& shape, std::string* why) {
    auto refuse = [&](std::string reason) {
        if (why) *why = std::move(reason);
        return false;
    };
    if (tile != 4 && tile != 2) return refuse(fmt::format("tile {} (4 or 2)", tile));
    if (!winograd_own_supported()) return refuse("CPU without AVX2 and FMA");
    const int block = shape.channel_block();
    if (block == 0 && shape.layout != tag::nhwc) return refuse("activation layout is not nChw8c, nChw16c or nhwc");
    const int64_t channel_multiple = std::max(block, 8);
    if (shape.in_channels <= 0 || shape.out_channels <= 0 || shape.in_channels % channel_multiple != 0 ||
        shape.out_channels % channel_multiple != 0)
        return refuse(fmt::format("channels {} -> {} are not multiples of {}", shape.in_channels, shape.out_channels,
                                  channel_multiple));
    if (shape.batch <= 0 || shape.height <= 0 || shape.width <= 0) return refuse("empty image");
    const int64_t image_elements_in = shape.in_channels * shape.height * shape.width;
    const int64_t image_elements_out = shape.out_channels * shape.height * shape.width;
    if ((shape.src_batch_stride != 0 && shape.src_batch_stride < image_elements_in) ||
        (shape.dst_batch_stride != 0 && shape.dst_batch_stride < image_elements_out))
        return refuse("batch stride smaller than an image");
    if (block == 0 && ((shape.src_batch_stride != 0 && shape.src_batch_stride != image_elements_in) ||
                       (shape.dst_batch_stride != 0 && shape.dst_batch_stride != image_elements_out)))
        return refuse("a channel slice in nhwc is strided per pixel");
    return true;
}

namespace {

// The tiles of one group and of the last one, from the shape alone (never the thread count): groups of 32 to
// 128 tiles whose V and M take about 8 MB.
int64_t group_of(int64_t tiles, int64_t positions, int64_t ic, int64_t oc, int64_t tiles_per_group, int64_t* rest) {
    const int64_t bytes_per_tile = positions * (ic + oc) * static_cast<int64_t>(sizeof(float));
    int64_t group = tiles_per_group;
    if (group <= 0) group = std::clamp<int64_t>((int64_t{8} << 20) / bytes_per_tile, 32, 128);
    group = std::clamp<int64_t>(group, 1, tiles);
    return even_groups(tiles, group, 1, false, rest);
}

}  // namespace

size_t WinogradOwn::weight_bytes_of(const engine& eng, int tile, const WinogradOwnShape& shape) {
    if (!applies(tile, shape)) return 0;
    const int64_t tiles = shape.batch * ((shape.height + tile - 1) / tile) * ((shape.width + tile - 1) / tile);
    const int64_t positions = static_cast<int64_t>(tile + 2) * (tile + 2);
    int64_t rest = 0;
    const int64_t group = group_of(tiles, positions, shape.in_channels, shape.out_channels, 0, &rest);
    const ThreadSetting one_thread(1);
    const TileGroupMatmul gemm =
        TileGroupMatmul::create(eng, positions, group, rest, shape.in_channels, shape.out_channels, dt::f32, dt::f32, dt::f32);
    return gemm.weights.get_size() + static_cast<size_t>(shape.out_channels) * sizeof(float);
}

std::unique_ptr<WinogradOwn> WinogradOwn::create(const engine& eng, stream& strm, int tile, const WinogradOwnShape& shape,
                                                 const float* weights, const float* bias, std::string* why,
                                                 int64_t tiles_per_group, bool allow_avx512) {
    if (!applies(tile, shape, why)) return nullptr;
    const int block = shape.channel_block();
    const int64_t image_elements_in = shape.in_channels * shape.height * shape.width;
    const int64_t image_elements_out = shape.out_channels * shape.height * shape.width;
    std::unique_ptr<WinogradOwn> conv(new WinogradOwn());
    WinogradOwn& c = *conv;
    c.shape_ = shape;
    if (c.shape_.src_batch_stride == 0) c.shape_.src_batch_stride = image_elements_in;
    if (c.shape_.dst_batch_stride == 0) c.shape_.dst_batch_stride = image_elements_out;
    c.tile_ = tile;
    c.alpha_ = tile + 2;
    c.block_ = block;
    c.eng_ = eng;
    c.tiles_y_ = (shape.height + tile - 1) / tile;
    c.tiles_x_ = (shape.width + tile - 1) / tile;
    c.tiles_ = shape.batch * c.tiles_y_ * c.tiles_x_;
    const int64_t positions = static_cast<int64_t>(c.alpha_) * c.alpha_;
    const int64_t ic = shape.in_channels, oc = shape.out_channels;

    // Several groups of tiles: each thread runs whole groups (input transform, a one-thread matmul, output
    // transform) on its own slot of the scratch, with no barrier but the one at the end (a team barrier per
    // phase costs a scheduler slice on a loaded 2-core machine). Groups of 32 to 128 tiles whose V and M take
    // about 8 MB: fewer tiles starve the GEMMs at 256-512 channels, one group of thousands runs out of cache.
    c.threads_ = std::max(1, omp_get_max_threads());
    // The groups (and so each GEMM's shape) never depend on the thread count, and each GEMM is made for and
    // run on one thread: a tile's sums are then the same on any thread count (docs/plan.md).
    int64_t rest = 0;
    int64_t group = c.group_ = group_of(c.tiles_, positions, ic, oc, tiles_per_group, &rest);
    // Several groups: each thread runs whole groups (one thread too); one group: shared, its GEMM's positions
    // side by side (TileGroupMatmul::run_positions). Neither depends on the thread count.
    c.private_groups_ = c.tiles_ > group;

    {
        const ThreadSetting one_thread(1);
        c.gemm_ = TileGroupMatmul::create(eng, positions, group, rest, ic, oc, dt::f32, dt::f32, dt::f32);
    }
    c.weights_ = memory(c.gemm_.weights, eng);
    c.direct_into_weights_ = c.gemm_.weights_plain;
    c.bias_.assign(static_cast<size_t>(oc), 0.0f);
    c.set_weights(strm, weights, bias);

    c.v_bytes_ = align64(static_cast<size_t>(positions * group * ic) * sizeof(float));
    c.m_bytes_ = align64(static_cast<size_t>(positions * group * oc) * sizeof(float));
    c.slot_bytes_ = c.v_bytes_ + c.m_bytes_ + align64(std::max<size_t>(c.gemm_.scratch_bytes, 1));
    c.scratch_bytes_ = c.slot_bytes_ * static_cast<size_t>(c.private_groups_ ? c.threads_ : 1);
    c.weight_bytes_ = c.gemm_.weights.get_size() + c.bias_.size() * sizeof(float);
    // 16 channels per vector where a layout keeps 16 consecutive channels together (nChw16c, nhwc).
    const bool wide = allow_avx512 && avx512_transforms() && block != 8;
    c.wide_ = wide ? shape.in_channels / 16 : 0;
    c.wide_out_ = wide ? shape.out_channels / 16 : 0;
    c.kernel_ = fmt::format("own_f{}3:{}+{}", tile, c.wide_ ? "avx512" : "avx2", c.gemm_.impl);
    return conv;
}

namespace {

// U = G g G^T for output channels [o, o + 4) of input channel i, in double (FMA, 4 lanes), rounded once to
// float into u[P][IC][OC]. `w(o, y, x)` reads the 3x3 kernel of (o, i). G's zeros and constants fold at
// compile time.
template <int Tile, typename Kernel>
__attribute__((target("avx2,fma"))) inline void weight_transform_4(Kernel w, int64_t i, int64_t o, int64_t ic, int64_t oc,
                                                                   float* u_out) {
    constexpr int alpha = Tile + 2;
    constexpr const double(&g_rows)[alpha][3] = *[] {
        if constexpr (Tile == 4)
            return &kG43;
        else
            return &kG23;
    }();
    __m256d g[3][3];
    for (int y = 0; y < 3; ++y)
        for (int x = 0; x < 3; ++x) g[y][x] = _mm256_set_pd(w(o + 3, y, x), w(o + 2, y, x), w(o + 1, y, x), w(o, y, x));
    __m256d left[alpha][3];
    for (int a = 0; a < alpha; ++a)
        for (int x = 0; x < 3; ++x)
            left[a][x] = _mm256_fmadd_pd(_mm256_set1_pd(g_rows[a][2]), g[2][x],
                                         _mm256_fmadd_pd(_mm256_set1_pd(g_rows[a][1]), g[1][x],
                                                         _mm256_mul_pd(_mm256_set1_pd(g_rows[a][0]), g[0][x])));
    for (int a = 0; a < alpha; ++a)
        for (int b = 0; b < alpha; ++b) {
            const __m256d u = _mm256_fmadd_pd(left[a][2], _mm256_set1_pd(g_rows[b][2]),
                                              _mm256_fmadd_pd(left[a][1], _mm256_set1_pd(g_rows[b][1]),
                                                              _mm256_mul_pd(left[a][0], _mm256_set1_pd(g_rows[b][0]))));
            _mm_storeu_ps(u_out + ((a * alpha + b) * ic + i) * oc + o, _mm256_cvtpd_ps(u));
        }
}

// All (oc, ic) pairs, threaded over input channels so that each thread writes runs of consecutive output
// channels. `flipped_transposed`: see WinogradOwn::set_weights.
template <int Tile>
__attribute__((target("avx2,fma"))) void weight_transform(const float* weights, bool flipped_transposed, int64_t ic,
                                                          int64_t oc, float* u_out) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < ic; ++i)
        for (int64_t o = 0; o < oc; o += 4) {
            if (flipped_transposed)  // {IC, OC, 3, 3} of the forward convolution, each kernel rotated by 180 degrees
                weight_transform_4<Tile>(
                    [&](int64_t out, int y, int x) { return static_cast<double>(weights[(i * oc + out) * 9 + (2 - y) * 3 + (2 - x)]); },
                    i, o, ic, oc, u_out);
            else
                weight_transform_4<Tile>(
                    [&](int64_t out, int y, int x) { return static_cast<double>(weights[(out * ic + i) * 9 + y * 3 + x]); }, i, o,
                    ic, oc, u_out);
        }
}

}  // namespace

// U = G g G^T per (oc, ic), in double, as [P, IC, OC]: straight into the matmul's weights when it takes
// that layout (gemm:jit on AVX2), else through a reorder from a transient plain copy. The trainer calls it
// every step (twice per layer: forward and backward-data), so it runs on AVX2, 4 output channels at a time
// (the channels are multiples of 8: applies()).
void WinogradOwn::set_weights(stream& strm, const float* weights, const float* bias, bool flipped_transposed) {
    const int64_t positions = static_cast<int64_t>(alpha_) * alpha_;
    const int64_t ic = shape_.in_channels, oc = shape_.out_channels;
    std::vector<float> plain(direct_into_weights_ ? 0 : static_cast<size_t>(positions * ic * oc));  // transient
    float* u_out = direct_into_weights_ ? static_cast<float*>(weights_.get_data_handle()) : plain.data();
    if (tile_ == 4)
        weight_transform<4>(weights, flipped_transposed, ic, oc, u_out);
    else
        weight_transform<2>(weights, flipped_transposed, ic, oc, u_out);
    if (!direct_into_weights_) {
        memory user(memory::desc({positions, ic, oc}, dt::f32, tag::abc), eng_, plain.data());
        reorder(user, weights_).execute(strm, user, weights_);
        strm.wait();
    }
    if (bias)
        bias_.assign(bias, bias + oc);
    else
        std::fill(bias_.begin(), bias_.end(), 0.0f);
}

void WinogradOwn::input_transform(const float* src, float* v, int64_t first_tile, int64_t count, bool parallel) const {
    const int64_t channels = shape_.in_channels;
    // wide_ groups of 16 channels (AVX-512), then groups of 8 (AVX2)
    const int64_t groups = wide_ + (channels - wide_ * 16) / 8;
    const int64_t wide = wide_;
    const int64_t height = shape_.height, width = shape_.width;
    const int64_t per_image = tiles_y_ * tiles_x_;
    const int64_t p_stride = count * channels;
    const Plane plane = block_ ? Plane{width * block_, block_} : Plane{width * channels, channels};
    const int64_t block_plane = block_ ? height * width * block_ : 0;
    const int tile = tile_;
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
    for (int64_t t = 0; t < count; ++t)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t index = first_tile + t;
            const int64_t n = index / per_image, ty = (index % per_image) / tiles_x_, tx = index % tiles_x_;
            const int64_t c0 = g < wide ? g * 16 : wide * 16 + (g - wide) * 8;
            const int64_t offset = block_ ? (c0 / block_) * block_plane + c0 % block_ : c0;
            const float* base = src + n * shape_.src_batch_stride + offset;
            float* out = v + t * channels + c0;
            if (g < wide) {
                if (tile == 4)
                    input_tile16<4>(base, plane, ty * 4 - 1, tx * 4 - 1, height, width, out, p_stride);
                else
                    input_tile16<2>(base, plane, ty * 2 - 1, tx * 2 - 1, height, width, out, p_stride);
            } else if (tile == 4) {
                input_tile<4>(base, plane, ty * 4 - 1, tx * 4 - 1, height, width, out, p_stride);
            } else {
                input_tile<2>(base, plane, ty * 2 - 1, tx * 2 - 1, height, width, out, p_stride);
            }
        }
}

void WinogradOwn::output_transform(const float* m, float* dst, int64_t first_tile, int64_t count, bool parallel) const {
    const int64_t channels = shape_.out_channels;
    const int64_t groups = wide_out_ + (channels - wide_out_ * 16) / 8;
    const int64_t wide = wide_out_;
    const int64_t height = shape_.height, width = shape_.width;
    const int64_t per_image = tiles_y_ * tiles_x_;
    const int64_t p_stride = count * channels;
    const Plane plane = block_ ? Plane{width * block_, block_} : Plane{width * channels, channels};
    const int64_t block_plane = block_ ? height * width * block_ : 0;
    const int tile = tile_;
    const bool sum = shape_.sum, relu = shape_.relu;
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
    for (int64_t t = 0; t < count; ++t)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t index = first_tile + t;
            const int64_t n = index / per_image, ty = (index % per_image) / tiles_x_, tx = index % tiles_x_;
            const int64_t c0 = g < wide ? g * 16 : wide * 16 + (g - wide) * 8;
            const int64_t offset = block_ ? (c0 / block_) * block_plane + c0 % block_ : c0;
            float* base = dst + n * shape_.dst_batch_stride + offset;
            const float* in = m + t * channels + c0;
            if (g < wide) {
                if (tile == 4)
                    output_tile16<4>(in, p_stride, bias_.data() + c0, base, plane, ty * 4, tx * 4, height, width, sum, relu);
                else
                    output_tile16<2>(in, p_stride, bias_.data() + c0, base, plane, ty * 2, tx * 2, height, width, sum, relu);
            } else if (tile == 4) {
                output_tile<4>(in, p_stride, bias_.data() + c0, base, plane, ty * 4, tx * 4, height, width, sum, relu);
            } else {
                output_tile<2>(in, p_stride, bias_.data() + c0, base, plane, ty * 2, tx * 2, height, width, sum, relu);
            }
        }
}

void WinogradOwn::execute(stream& strm, const float* src, float* dst, void* scratch) {
    // One group of tiles with the scratch slot at `slot`: transforms threaded or not, matmul on `s`.
    auto run_group = [&](int64_t first, char* slot, stream& s, bool parallel) {
        const int64_t count = std::min(group_, tiles_ - first);
        float* v = reinterpret_cast<float*>(slot);
        float* m = reinterpret_cast<float*>(slot + v_bytes_);
        input_transform(src, v, first, count, parallel);
        if (parallel && gemm_.per_position)
            gemm_.run_positions(eng_, count, v, weights_, m);
        else
            gemm_.run(eng_, s, count, v, weights_, m, slot + v_bytes_ + m_bytes_);
        output_transform(m, dst, first, count, parallel);
    };
    char* bytes = static_cast<char*>(scratch);
    const int64_t groups = (tiles_ + group_ - 1) / group_;
    if (!private_groups_) {
        for (int64_t g = 0; g < groups; ++g) run_group(g * group_, bytes, strm, true);
        return;
    }
    // Each thread its own groups and scratch slot; oneDNN runs a primitive called inside a parallel
    // region on the calling thread. Never more threads than slots.
    const int threads = std::min(threads_, std::max(1, omp_get_max_threads()));
    std::exception_ptr failure;
#pragma omp parallel num_threads(threads)
    {
        const int thread = omp_get_thread_num(), team = omp_get_num_threads();
        try {
            stream local(eng_);
            for (int64_t g = thread; g < groups; g += team)
                run_group(g * group_, bytes + static_cast<size_t>(thread) * slot_bytes_, local, false);
        } catch (...) {
#pragma omp critical(resunet_winograd_own_failure)
            failure = std::current_exception();
        }
    }
    if (failure) std::rethrow_exception(failure);
}

}  // namespace resunet
