// The weights gradient of a 3x3 stride-1 pad-1 convolution by our own fp32 Winograd F(4x4,3x3) or
// F(2x2,3x3): the backward-weights pass of engine/winograd_own.h's convolution, for the trainer, on CPUs
// where oneDNN 2.6 has no Winograd (AVX2) and as a measured candidate elsewhere.
//
// Forward, per tile: Y = A^T [ (G g G^T) . (B^T d B) ] A, summed over input channels. So
//   dU[p, ic, oc] = sum over tiles of V[p, tile, ic] * Z[p, tile, oc],  V = B^T d B,  Z = A dY A^T,
//   d g[oc, ic]  = G^T dU[:, ic, oc] G  (alpha x alpha -> 3 x 3),
//   d bias[oc]   = sum of dY[oc] over the batch and the image.
// A run, per group of tiles, on each thread's own slot of the scratch (no barrier but the last):
//   1. input transform V = B^T d B (as the convolution's), [P, tiles, IC];
//   2. output-gradient transform Z = A dY A^T, [P, tiles, OC], and the tiles' sums for d bias;
//   3. dU += V^T Z, the P = 36 (F(4x4)) or 16 (F(2x2)) GEMMs as one batched oneDNN matmul with a sum
//      post-op, into the thread's own accumulator [P, IC, OC].
// Then the threads' accumulators are added and transformed back into OIHW, in double.
//
// Where the threads' accumulators (threads x P x IC x OC floats) would outweigh the transformed inputs
// (P x tiles x (IC + OC)), as in the deep layers with few tiles and many channels, it runs in the
// whole-batch mode instead: V and Z of every tile (transforms threaded over tiles), then one matmul over
// all of them, threaded by oneDNN, writing a single set of accumulators once. applies() refuses a layer
// whose whole-batch buffers would pass 512 MB.
//
// Intended usage (train/trainer.cpp, lower_backward):
//   resunet::WinogradOwnShape shape{.batch = 4, .in_channels = 64, .out_channels = 64, .height = 224,
//                                   .width = 224, .layout = dnnl::memory::format_tag::nChw8c};
//   auto grad = resunet::WinogradOwnBwdWeights::create(eng, 4, shape, &why);   // nullptr: not offered
//   std::vector<char> scratch(grad->scratch_bytes());
//   grad->execute(strm, src, diff_dst, diff_weights_oihw, diff_bias_or_nullptr, scratch.data());
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/winograd_own.h"

namespace resunet {

class WinogradOwnBwdWeights {
  public:
    // Whether create() accepts this tile and shape on this CPU; the reason in `why` when not. `shape`
    // is the forward convolution's (in_channels: its src, out_channels: its dst); sum and relu must be
    // off, and both activations dense (no batch strides).
    static bool applies(int tile, const WinogradOwnShape& shape, std::string* why = nullptr);

    // `tile` 4: F(4x4,3x3); 2: F(2x2,3x3). `tiles_per_group` 0 chooses (and chooses the mode); -1: the
    // whole-batch mode (tests). nullptr (and `why`) where it does not apply.
    static std::unique_ptr<WinogradOwnBwdWeights> create(const dnnl::engine& eng, int tile, const WinogradOwnShape& shape,
                                                         std::string* why = nullptr, int64_t tiles_per_group = 0);

    // One run over `shape.batch` images: writes (not adds) d weights, OIHW {OC, IC, 3, 3}, and, when
    // `diff_bias` is not nullptr, d bias (OC values). `src`: the forward's input, `diff_dst`: the
    // gradient of its output, both in shape.layout. `scratch` holds scratch_bytes(), 64-byte aligned.
    // Not for two threads at once; runs on at most the OpenMP thread count current at create().
    void execute(dnnl::stream& strm, const float* src, const float* diff_dst, float* diff_weights, float* diff_bias,
                 void* scratch);

    // Per thread (whole batch: once) V + Z + dU + d bias + the matmul's scratchpad.
    size_t scratch_bytes() const { return scratch_bytes_; }
    int tile() const { return tile_; }
    int64_t tiles_per_group() const { return group_; }
    std::string algorithm() const { return tile_ == 4 ? "winograd_f43" : "winograd_f23"; }
    // "own_f43_bwd_weights:avx2+gemm:jit"; "own_f23_bwd_weights_whole:avx2+gemm:jit" in the whole-batch mode.
    std::string kernel() const { return kernel_; }

  private:
    WinogradOwnBwdWeights() = default;
    // Tiles [first_tile, first_tile + count) into rows [row0, row0 + count) of V (from src) and Z (from
    // diff_dst), which hold `rows` tiles per position; the tiles' sums added to `bias_sum` (OC values).
    void transform(const float* src, const float* diff_dst, float* v, float* z, float* bias_sum, int64_t first_tile,
                   int64_t count, int64_t row0, int64_t rows) const;
    void finish(float* diff_weights, float* diff_bias, const std::vector<const float*>& accumulators,
                const std::vector<const float*>& bias_sums) const;

    WinogradOwnShape shape_;
    dnnl::engine eng_;
    int tile_ = 4;
    int alpha_ = 6;
    int64_t tiles_y_ = 0, tiles_x_ = 0, tiles_ = 0, group_ = 0;
    int threads_ = 1;
    int block_ = 8;  // channel block of the layout (nhwc: 0)
    bool whole_batch_ = false;  // one group of every tile, one set of accumulators (see create())
    dnnl::matmul full_, rest_;  // dU += V^T Z over a group of group_ tiles; the last, shorter group
    dnnl::memory::desc full_src_, full_weights_, rest_src_, rest_weights_, accumulator_desc_;
    size_t v_bytes_ = 0, z_bytes_ = 0, u_bytes_ = 0, bias_bytes_ = 0, matmul_scratch_bytes_ = 0, slot_bytes_ = 0;
    size_t scratch_bytes_ = 0;
    std::string kernel_;
};

}  // namespace resunet
