// Our own int8 Winograd F(2x2,3x3) for the int8 engine's 3x3 stride-1 pad-1 layers: quantized inside the
// Winograd domain with one dynamic scale per row of the GEMMs (a tile position of one tile), the 16 GEMMs as one batched u8 x s8 oneDNN
// matmul, and the dequantization, bias, residual sum and ReLU in the output transform. oneDNN 2.6 has no
// int8 Winograd on AVX2 and its AVX-512 one takes no per-channel dequantization post-op; this is one more
// candidate the int8 engine measures per layer against direct, after checking it (quant/int8_conv_choice.h).
//
// Built once per layer from the layer's s8 weights (q * scale[oc], the same weights the direct kernel
// runs): U = G g G^T in double, then s8 with one scale per (tile position, output channel), |U_q| <= the
// CPU's weight levels (63 without VNNI: vpmaddubsw adds two products in int16). A run, per group of tiles:
//   1. V = B^T (d - z) B of each tile in int16 (exact: B has only 0 and +-1, |V| <= 4 * 255), and per
//      position p of the tile a u8 quantization of its IC values (scale s_pt, zero point z_pt; scale 1,
//      exact, when their range fits in 256 values), into [16, tiles, IC]: a per-row scale of the GEMM's
//      left operand factors out of the sum over input channels, so it costs no accuracy of the others;
//   2. the matmul into [16, tiles, OC] s32;
//   3. the output transform Y = A^T M A of M = s_pt * (acc - z_pt * sum_ic U_q) * s_x * s_u[p][oc], with
//      the bias, the residual sum (dst += ...) and ReLU, into the dst.
// Transforms on AVX2 intrinsics, 16 input (8 output) channels per vector, or on AVX-512 where oneDNN runs
// AVX-512, 32 (16) per vector; threaded with OpenMP: each thread runs whole groups on its own scratch slot
// with a single-threaded matmul.
//
// Intended usage (quant/quant_engine.cpp, lower_conv; internal to quant/):
//   WinogradInt8Shape shape{.batch = 1, .in_channels = 64, .out_channels = 64, .height = 56, .width = 56,
//                           .relu = true, .levels = weight_levels()};
//   auto conv = WinogradInt8::create(eng, shape, layer.quant.q.data(), layer.quant.scales.data(), bias, &why);
//   conv->execute(strm, src_u8_padded, input_quant, dst_f32, scratch);   // scratch: conv->scratch_bytes()
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/tile_group_matmul.h"
#include "quant/quantize.h"

namespace resunet {

// The layer: 3x3, stride 1, padding 1, same H and W in and out. src is u8 NHWC with one pixel of padding
// holding the input's zero point ({batch, height + 2, width + 2, in_channels}, as the quantize pass writes
// it); dst is f32 NHWC, dense.
struct WinogradInt8Shape {
    int64_t batch = 1;
    int64_t in_channels = 0;   // multiple of 16
    int64_t out_channels = 0;  // multiple of 8
    int64_t height = 0;        // even
    int64_t width = 0;         // even
    bool sum = false;          // dst += conv(src) + bias, before the activation
    bool relu = false;
    int levels = 63;           // |U_q| bound: weight_levels()
};

// The bound the int8 engine checks this kernel against before it may be chosen: max |winograd - direct| at
// most this share of max |direct| on the layer's real shape (the tests hold it to the plain reference).
inline constexpr double kInt8WinogradBound = 0.05;

// The kernel's revision, part of the int8 plan cache's key: raised whenever its speed or numerics change, so
// that measured choices cached by an earlier build are measured again (what each revision changed:
// docs/design.md, "Tuning constants").
inline constexpr int kInt8WinogradRevision = 3;

// One (position, tile) row of our int8 Winograd's transformed input: V ~= scale * (V_q - zero), the zero
// point an integer held as float (the output transform's operand). Internal to quant/winograd_int8*.
struct WinogradRowQuant {
    float scale;
    float zero;
};

class WinogradInt8 {
  public:
    static constexpr int kPositions = 16;
    // Fewer tiles per thread than this (tiles_per_group 0): one group of all tiles, shared by the threads.
    static constexpr int64_t kSharedBelowTilesPerThread = 128;

    // Whether create() accepts the shape on this CPU (AVX2 and FMA); the reason in `why` when not.
    static bool applies(const WinogradInt8Shape& shape, std::string* why = nullptr);

    // `q` OIHW {OC, IC, 3, 3} s8 and `scales` OC values (w = q * scale[oc]); `bias` OC values (nullptr: 0).
    // `tiles_per_group` 0 chooses, < 0 asks for one group shared by the threads. nullptr (and the reason) where it does not apply.
    static std::unique_ptr<WinogradInt8> create(const dnnl::engine& eng, dnnl::stream& strm, const WinogradInt8Shape& shape,
                                                const int8_t* q, const float* scales, const float* bias,
                                                std::string* why = nullptr, int64_t tiles_per_group = 0);

    // One run over shape.batch images; `input` is the quantization src was written with. `scratch` holds
    // scratch_bytes(), 64-byte aligned. Not for two threads at once.
    void execute(dnnl::stream& strm, const uint8_t* src, const ActivationQuant& input, float* dst, void* scratch);

    size_t scratch_bytes() const { return scratch_bytes_; }
    size_t weight_bytes() const { return weight_bytes_; }  // U_q + its per-(position, channel) scales and sums + bias
    int64_t tiles_per_group() const { return group_; }
    std::string algorithm() const { return "winograd_int8_f23"; }
    std::string kernel() const { return kernel_; }  // "own_int8_f23:avx512+brg:avx512_core_vnni", "own_int8_f23:avx2+gemm:jit"

  private:
    WinogradInt8() = default;
    using RowQuant = WinogradRowQuant;
    void input_transform(const uint8_t* src, int32_t zero, uint8_t* v, RowQuant* row, int16_t* exact, int64_t first_tile,
                         int64_t count, int64_t stride) const;
    void output_transform(const int32_t* m, const RowQuant* row, float* dst, int64_t first_tile, int64_t count, int64_t stride) const;
    // The same two on AVX-512 (quant/winograd_int8_avx512.cpp): 32 input and 16 output channels per vector,
    // the last 16 (8) through the AVX2 tile kernels. Chosen when oneDNN's effective ISA is AVX-512 (so
    // ONEDNN_MAX_CPU_ISA=AVX2 runs the AVX2 ones) and the CPU has AVX-512 BW.
    void input_transform_avx512(const uint8_t* src, int32_t zero, uint8_t* v, RowQuant* row, int16_t* exact,
                                int64_t first_tile, int64_t count, int64_t stride) const;
    void output_transform_avx512(const int32_t* m, const RowQuant* row, float* dst, int64_t first_tile,
                                 int64_t count, int64_t stride) const;

    WinogradInt8Shape shape_;
    dnnl::engine eng_;
    int64_t tiles_y_ = 0, tiles_x_ = 0, tiles_ = 0, group_ = 0;
    int threads_ = 1;
    // The transforms this CPU runs: the AVX-512 ones where oneDNN runs AVX-512, else the AVX2 ones.
    void (WinogradInt8::*input_)(const uint8_t*, int32_t, uint8_t*, RowQuant*, int16_t*, int64_t, int64_t, int64_t) const = nullptr;
    void (WinogradInt8::*output_)(const int32_t*, const RowQuant*, float*, int64_t, int64_t, int64_t) const = nullptr;
    bool shared_ = false;  // one group of all tiles shared by the threads (see create)
    std::vector<float> bias_;
    std::vector<float> u_scale_;   // [P][OC]
    std::vector<float> u_sum_;     // [P][OC]: sum over input channels of U_q (exact in float: |sum| < 2^24)
    std::vector<float> mul_;       // [P][OC] per run: s_x * s_u
    dnnl::memory weights_;
    TileGroupMatmul gemm_;  // the 16 GEMMs of a group (and of a shorter last group)
    size_t v_bytes_ = 0, m_bytes_ = 0, matmul_scratch_bytes_aligned_ = 0, row_bytes_ = 0;
    size_t exact_bytes_ = 0, slot_bytes_ = 0, scratch_bytes_ = 0, weight_bytes_ = 0;
    std::string kernel_;
};

}  // namespace resunet
