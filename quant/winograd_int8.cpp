// Our own int8 Winograd F(2x2,3x3): weight transform at build time, per-position dynamic quantization of the
// transformed input, the 16 GEMMs as one batched u8 x s8 oneDNN matmul per group of tiles (quant/winograd_int8.h).
#include "quant/winograd_int8.h"

#include <fmt/format.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>

#include "engine/onednn_util.h"
#include "engine/tile_group_matmul.h"
#include "engine/winograd_tiles.h"
#include "quant/winograd_int8_tiles.h"

namespace resunet {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;
using namespace winograd_int8_tiles;

namespace {

constexpr int P = WinogradInt8::kPositions;

size_t align64(size_t bytes) { return (bytes + 63) / 64 * 64; }

bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// The AVX-512 transforms where oneDNN itself runs AVX-512 (ONEDNN_MAX_CPU_ISA=AVX2 keeps the AVX2 ones, so
// the capped test runs check them) and the CPU has AVX-512 BW.
bool avx512_transforms() {
    if (!effective_isa_name().starts_with("avx512_core")) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

}  // namespace

bool WinogradInt8::applies(const WinogradInt8Shape& shape, std::string* why) {
    auto refuse = [&](std::string reason) {
        if (why) *why = std::move(reason);
        return false;
    };
    if (!cpu_has_avx2()) return refuse("CPU without AVX2 and FMA");
    if (shape.in_channels <= 0 || shape.in_channels % 16 != 0 || shape.out_channels <= 0 || shape.out_channels % 8 != 0)
        return refuse(fmt::format("channels {} -> {} (input a multiple of 16, output of 8)", shape.in_channels,
                                  shape.out_channels));
    if (shape.batch <= 0 || shape.height <= 0 || shape.width <= 0 || shape.height % 2 != 0 || shape.width % 2 != 0)
        return refuse(fmt::format("image {}x{} (even sides)", shape.height, shape.width));
    if (shape.levels < 1 || shape.levels > 127) return refuse(fmt::format("weight levels {}", shape.levels));
    return true;
}

std::unique_ptr<WinogradInt8> WinogradInt8::create(const engine& eng, stream& strm, const WinogradInt8Shape& shape,
                                                   const int8_t* q, const float* scales, const float* bias, std::string* why,
                                                   int64_t tiles_per_group) {
    if (!applies(shape, why)) return nullptr;
    std::unique_ptr<WinogradInt8> conv(new WinogradInt8());
    WinogradInt8& c = *conv;
    c.shape_ = shape;
    c.eng_ = eng;
    c.tiles_y_ = shape.height / 2;
    c.tiles_x_ = shape.width / 2;
    c.tiles_ = shape.batch * c.tiles_y_ * c.tiles_x_;
    const int64_t ic = shape.in_channels, oc = shape.out_channels;

    // Threading as in our fp32 Winograd (engine/winograd_own.cpp): each thread runs whole groups of tiles on
    // its own slot, groups sized so that a group's V and M stay within a few MB.
    c.threads_ = std::max(1, omp_get_max_threads());
    const int64_t bytes_per_tile = P * (ic + 4 * oc);
    // With few tiles per thread (a small image: 14x14 has 49 tiles), per-thread groups would each stream all
    // of the layer's Winograd-domain weights (16 MB at 1024 channels) for a few dozen GEMM rows; there all tiles
    // form one shared group: the transforms split across the threads, one matmul threaded by oneDNN.
    c.shared_ = c.threads_ > 1 &&
                (tiles_per_group < 0 || (tiles_per_group == 0 && c.tiles_ < kSharedBelowTilesPerThread * c.threads_));
    int64_t group = c.shared_ ? c.tiles_ : tiles_per_group;
    if (group <= 0) {
        group = std::clamp<int64_t>((int64_t{4} << 20) / bytes_per_tile, 32, 256);
        group = std::min(group, (c.tiles_ + c.threads_ - 1) / c.threads_);
    }
    group = std::clamp<int64_t>(group, 1, c.tiles_);
    const bool per_thread = c.threads_ > 1 && !c.shared_;
    int64_t rest = 0;
    group = winograd_tiles::even_groups(c.tiles_, group, c.threads_, per_thread, &rest);
    // An even group puts the 16 position rows of a tile in V and M (group * IC and group * OC * 4 bytes
    // apart) on multiples of 4 KB at most channel counts: one L1 set, and loads that alias the stores 4 KB
    // away. Whole layers measured 1.2-1.6x slower at 64-128 channels with groups of 64, 128 and 224 than
    // with 63, 251 and 392. The kernel's own choice is therefore odd: one tile more per group.
    if (tiles_per_group == 0 && !c.shared_ && group % 2 == 0 && group < c.tiles_) {
        ++group;
        const int64_t groups = (c.tiles_ + group - 1) / group;
        rest = c.tiles_ - (groups - 1) * group;
    }
    c.group_ = group;

    c.gemm_ = TileGroupMatmul::create(eng, P, group, rest, ic, oc, dt::u8, dt::s8, dt::s32);

    // U = G g G^T per (oc, ic) in double from g = q * scale[oc]; s8 per (position, oc) with |U_q| <= levels.
    c.weights_ = memory(c.gemm_.weights, eng);
    const bool direct_into_weights = c.gemm_.weights_plain;
    std::vector<int8_t> plain(direct_into_weights ? 0 : static_cast<size_t>(P * ic * oc));  // transient
    int8_t* u_out = direct_into_weights ? static_cast<int8_t*>(c.weights_.get_data_handle()) : plain.data();
    c.u_scale_.assign(static_cast<size_t>(P * oc), 1.0f);
    c.u_sum_.assign(static_cast<size_t>(P * oc), 0.0f);
    const auto& G = winograd_tiles::kG23;
    const int levels = shape.levels;
#pragma omp parallel
    {
        std::vector<double> u(static_cast<size_t>(P * ic));
#pragma omp for schedule(static)
        for (int64_t o = 0; o < oc; ++o) {
            double largest[P] = {};
            for (int64_t i = 0; i < ic; ++i) {
                double g[3][3];
                for (int k = 0; k < 9; ++k) g[k / 3][k % 3] = static_cast<double>(q[(o * ic + i) * 9 + k]) * scales[o];
                for (int a = 0; a < 4; ++a) {
                    double left[3];
                    for (int x = 0; x < 3; ++x) left[x] = G[a][0] * g[0][x] + G[a][1] * g[1][x] + G[a][2] * g[2][x];
                    for (int b = 0; b < 4; ++b) {
                        const double value = left[0] * G[b][0] + left[1] * G[b][1] + left[2] * G[b][2];
                        u[static_cast<size_t>((a * 4 + b) * ic + i)] = value;
                        largest[a * 4 + b] = std::max(largest[a * 4 + b], std::abs(value));
                    }
                }
            }
            for (int p = 0; p < P; ++p) {
                const double scale = largest[p] > 0 ? largest[p] / levels : 1.0;
                float sum = 0;
                for (int64_t i = 0; i < ic; ++i) {
                    const double r = std::nearbyint(u[static_cast<size_t>(p * ic + i)] / scale);
                    const int8_t value = static_cast<int8_t>(std::clamp(r, -static_cast<double>(levels), static_cast<double>(levels)));
                    u_out[(p * ic + i) * oc + o] = value;
                    sum += value;
                }
                c.u_scale_[static_cast<size_t>(p * oc + o)] = static_cast<float>(scale);
                c.u_sum_[static_cast<size_t>(p * oc + o)] = sum;
            }
        }
    }
    if (!direct_into_weights) {
        memory user(memory::desc({P, ic, oc}, dt::s8, tag::abc), eng, plain.data());
        reorder(user, c.weights_).execute(strm, user, c.weights_);
        strm.wait();
    }
    c.bias_.assign(static_cast<size_t>(oc), 0.0f);
    if (bias) c.bias_.assign(bias, bias + oc);
    c.mul_.assign(static_cast<size_t>(P * oc), 0.0f);

    c.v_bytes_ = align64(static_cast<size_t>(P * group * ic));
    c.m_bytes_ = align64(static_cast<size_t>(P * group * oc) * sizeof(int32_t));
    c.matmul_scratch_bytes_aligned_ = align64(std::max<size_t>(c.gemm_.scratch_bytes, 1));
    c.row_bytes_ = align64(static_cast<size_t>(P * group) * sizeof(RowQuant));
    c.exact_bytes_ = align64(static_cast<size_t>(4 * ic) * sizeof(int16_t));  // one row of positions of V
    c.slot_bytes_ = c.v_bytes_ + c.m_bytes_ + c.matmul_scratch_bytes_aligned_ + c.row_bytes_ +
                    c.exact_bytes_ * static_cast<size_t>(c.shared_ ? c.threads_ : 1);
    c.scratch_bytes_ = c.slot_bytes_ * static_cast<size_t>(per_thread ? c.threads_ : 1);
    c.weight_bytes_ = c.gemm_.weights.get_size() + (c.u_scale_.size() + c.u_sum_.size() + c.bias_.size() +
                                                           c.mul_.size()) * sizeof(float);
    const bool avx512 = avx512_transforms();
    c.input_ = avx512 ? &WinogradInt8::input_transform_avx512 : &WinogradInt8::input_transform;
    c.output_ = avx512 ? &WinogradInt8::output_transform_avx512 : &WinogradInt8::output_transform;
    c.kernel_ = fmt::format("own_int8_f23:{}+{}", avx512 ? "avx512" : "avx2", c.gemm_.impl);
    return conv;
}

namespace {

// Row R of one tile's V (positions 4R..4R+3) over all input channels into `exact` ([4][IC] int16), then each
// position quantized into v (`v` at position 4R's row of this tile, `p_stride` between positions) with its
// quantization in `row` (position 4R's, `row_stride` between positions). Row by row, so that only four
// positions' minima and maxima are live.
template <int R>
__attribute__((target("avx2,fma"))) inline void input_row(const uint8_t* base, int64_t row_stride, int64_t ic, __m256i z,
                                                          int16_t* exact, uint8_t* v, int64_t p_stride, WinogradRowQuant* row,
                                                          int64_t quant_stride) {
    __m256i mn[4], mx[4];
    for (int64_t k = 0; k < ic; k += 16) {
        __m256i tv[4];
        row_v<R>(base + k, row_stride, ic, z, tv);
        for (int j = 0; j < 4; ++j) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(exact + j * ic + k), tv[j]);
            mn[j] = k == 0 ? tv[j] : _mm256_min_epi16(mn[j], tv[j]);
            mx[j] = k == 0 ? tv[j] : _mm256_max_epi16(mx[j], tv[j]);
        }
    }
    for (int j = 0; j < 4; ++j) {
        int32_t zero = 0;
        const int16_t multiplier = finish_row(mn[j], mx[j], row + j * quant_stride, &zero);
        quantize_row(exact + j * ic, ic, multiplier == 0, multiplier, static_cast<int16_t>(zero), v + j * p_stride);
    }
}

}  // namespace

// Per tile, row by row of V = B^T (d - z) B (input_row): int16 into `exact`, each position's range over the
// input channels, then V quantized per (position, tile) into v [P, count, IC] with its scale and zero point in `row`.
__attribute__((target("avx2,fma"))) void WinogradInt8::input_transform(const uint8_t* src, int32_t zero, uint8_t* v,
                                                                       RowQuant* row, int16_t* exact, int64_t first_tile,
                                                                       int64_t count, int64_t stride) const {
    const int64_t ic = shape_.in_channels;
    const int64_t row_stride = (shape_.width + 2) * ic;
    const int64_t image_stride = (shape_.height + 2) * row_stride;
    const int64_t per_image = tiles_y_ * tiles_x_;
    const int64_t p_stride = stride * ic;
    const __m256i z = _mm256_set1_epi16(static_cast<int16_t>(zero));
    for (int64_t t = 0; t < count; ++t) {
        const int64_t index = first_tile + t;
        const int64_t n = index / per_image, ty = (index % per_image) / tiles_x_, tx = index % tiles_x_;
        const uint8_t* base = src + n * image_stride + 2 * ty * row_stride + 2 * tx * ic;
        uint8_t* out = v + t * ic;
        input_row<0>(base, row_stride, ic, z, exact, out, p_stride, row + t, stride);
        input_row<1>(base, row_stride, ic, z, exact, out + 4 * p_stride, p_stride, row + 4 * stride + t, stride);
        input_row<2>(base, row_stride, ic, z, exact, out + 8 * p_stride, p_stride, row + 8 * stride + t, stride);
        input_row<3>(base, row_stride, ic, z, exact, out + 12 * p_stride, p_stride, row + 12 * stride + t, stride);
    }
}

__attribute__((target("avx2,fma"))) void WinogradInt8::output_transform(const int32_t* m, const RowQuant* row, float* dst,
                                                                        int64_t first_tile, int64_t count, int64_t stride) const {
    const int64_t oc = shape_.out_channels;
    const int64_t width = shape_.width;
    const int64_t per_image = tiles_y_ * tiles_x_;
    const int64_t p_stride = stride * oc;
    const bool sum = shape_.sum, relu = shape_.relu;
    for (int64_t t = 0; t < count; ++t) {
        const int64_t index = first_tile + t;
        const int64_t n = index / per_image, ty = (index % per_image) / tiles_x_, tx = index % tiles_x_;
        float* out = dst + ((n * shape_.height + 2 * ty) * width + 2 * tx) * oc;
        for (int64_t o = 0; o < oc; o += 8)
            output_chunk8(m + t * oc + o, p_stride, u_sum_.data() + o, mul_.data() + o, bias_.data() + o, oc, row + t,
                          stride, out + o, width, sum, relu);
    }
}

void WinogradInt8::execute(stream& strm, const uint8_t* src, const ActivationQuant& input, float* dst, void* scratch) {
    for (size_t at = 0; at < mul_.size(); ++at) mul_[at] = input.scale * u_scale_[at];
    auto run_group = [&](int64_t first, char* slot, stream& s) {
        const int64_t count = std::min(group_, tiles_ - first);
        uint8_t* v = reinterpret_cast<uint8_t*>(slot);
        int32_t* m = reinterpret_cast<int32_t*>(slot + v_bytes_);
        char* after_matmul = slot + v_bytes_ + m_bytes_ + matmul_scratch_bytes_aligned_;
        RowQuant* row = reinterpret_cast<RowQuant*>(after_matmul);
        int16_t* exact = reinterpret_cast<int16_t*>(after_matmul + row_bytes_);
        (this->*input_)(src, input.zero_point, v, row, exact, first, count, count);
        gemm_.run(eng_, s, count, v, weights_, m, slot + v_bytes_ + m_bytes_);
        (this->*output_)(m, row, dst, first, count, count);
    };
    char* bytes = static_cast<char*>(scratch);
    const int64_t groups = (tiles_ + group_ - 1) / group_;
    const int threads = std::min(threads_, std::max(1, omp_get_max_threads()));
    if (shared_) {  // one group: each thread transforms its share of the tiles, the matmul threads itself
        uint8_t* v = reinterpret_cast<uint8_t*>(bytes);
        int32_t* m = reinterpret_cast<int32_t*>(bytes + v_bytes_);
        char* after_matmul = bytes + v_bytes_ + m_bytes_ + matmul_scratch_bytes_aligned_;
        RowQuant* row = reinterpret_cast<RowQuant*>(after_matmul);
        const int64_t ic = shape_.in_channels, oc = shape_.out_channels;
        auto split = [&](auto&& work) {
#pragma omp parallel num_threads(threads)
            {
                const int thread = omp_get_thread_num(), team = omp_get_num_threads();
                const int64_t chunk = (tiles_ + team - 1) / team;
                const int64_t first = std::min<int64_t>(tiles_, thread * chunk);
                const int64_t count = std::min(chunk, tiles_ - first);
                if (count > 0) work(thread, first, count);
            }
        };
        split([&](int thread, int64_t first, int64_t count) {
            int16_t* exact = reinterpret_cast<int16_t*>(after_matmul + row_bytes_ + static_cast<size_t>(thread) * exact_bytes_);
            (this->*input_)(src, input.zero_point, v + first * ic, row + first, exact, first, count, tiles_);
        });
        gemm_.run(eng_, strm, tiles_, v, weights_, m, bytes + v_bytes_ + m_bytes_);
        split([&](int, int64_t first, int64_t count) {
            (this->*output_)(m + first * oc, row + first, dst, first, count, tiles_);
        });
        return;
    }
    if (threads_ == 1 || threads == 1) {
        for (int64_t g = 0; g < groups; ++g) run_group(g * group_, bytes, strm);
        return;
    }
    std::exception_ptr failure;
#pragma omp parallel num_threads(threads)
    {
        const int thread = omp_get_thread_num(), team = omp_get_num_threads();
        try {
            stream local(eng_);
            for (int64_t g = thread; g < groups; g += team)
                run_group(g * group_, bytes + static_cast<size_t>(thread) * slot_bytes_, local);
        } catch (...) {
#pragma omp critical(resunet_winograd_int8_failure)
            failure = std::current_exception();
        }
    }
    if (failure) std::rethrow_exception(failure);
}

}  // namespace resunet
