// Our own fp32 Winograd convolution F(4x4,3x3) or F(2x2,3x3) for 3x3 stride-1 pad-1 layers: the rule's
// (docs/plan.md) on every CPU with AVX2, since its sums do not depend on the thread count or the micro-batch,
// and the only Winograd oneDNN 3.x leaves on x86.
//
// Built once per layer at compile time from the folded OIHW weights and bias: the weight transform
// U = G g G^T is done then, in double, and stored in the layout oneDNN's matmul asked for. A run, per
// group of tiles (so that the transformed tiles stay in cache):
//   1. input transform V = B^T d B of each tile, 8 channels per AVX2 vector, into V [P, tiles, IC];
//   2. the P = 36 (F(4x4)) or 16 (F(2x2)) GEMMs as one batched oneDNN matmul, M = V x U [P, tiles, OC];
//   3. output transform Y = A^T M A with the bias, the fused residual sum (dst += ...) and ReLU, written
//      into the dst, whose edge tiles (H, W not multiples of the tile) are clipped.
// Transforms run on AVX2+FMA intrinsics, or 16 channels per vector on AVX-512 (the same bits), threaded with OpenMP
// over tiles and channel groups.
//
// Intended usage (engine/engine.cpp, lower_conv; internal to engine/):
//   resunet::WinogradOwnShape shape{.batch = 1, .in_channels = 64, .out_channels = 64, .height = 56,
//                                   .width = 56, .layout = dnnl::memory::format_tag::nChw8c, .sum = true,
//                                   .relu = true};
//   std::string why;
//   auto conv = resunet::WinogradOwn::create(eng, strm, 4, shape, folded.weights.data(), folded.bias.data(), &why);
//   if (!conv) ...not offered: `why` says why (CPU without AVX2, layout, channels)...
//   std::vector<char> scratch(conv->scratch_bytes());          // or a part of the engine's scratchpad
//   conv->execute(strm, src, dst, scratch.data());             // src, dst: the layer's activations
// A dst that is a channel slice of a larger (blocked) buffer: pass the pointer to the slice's first
// channel block and set `dst_batch_stride` to the whole buffer's elements per image.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/tile_group_matmul.h"

namespace resunet {

// The layer a WinogradOwn computes: 3x3, stride 1, padding 1, same H and W in and out.
struct WinogradOwnShape {
    int64_t batch = 1;         // images per run (the engine's micro-batch)
    int64_t in_channels = 0;   // multiple of 8 (of 16 in nChw16c)
    int64_t out_channels = 0;  // multiple of 8 (of 16 in nChw16c)
    int64_t height = 0;
    int64_t width = 0;
    dnnl::memory::format_tag layout = dnnl::memory::format_tag::nChw8c;  // nChw8c, nChw16c or nhwc
    bool sum = false;   // dst += conv(src) + bias (oneDNN's sum post-op), before the activation
    bool relu = false;  // ReLU last
    // Elements between consecutive images; 0: dense (C * H * W). A channel slice of a blocked buffer
    // of Ctotal channels has Ctotal * H * W.
    int64_t src_batch_stride = 0;
    int64_t dst_batch_stride = 0;

    // Channels per block of `layout`: 8 (nChw8c), 16 (nChw16c), 0 (nhwc and anything else).
    int channel_block() const {
        return layout == dnnl::memory::format_tag::nChw8c ? 8 : layout == dnnl::memory::format_tag::nChw16c ? 16 : 0;
    }
};

// Whether this CPU runs the transforms (AVX2 and FMA).
bool winograd_own_supported();

class WinogradOwn {
  public:
    // Whether create() accepts this tile and shape on this CPU (a cheap check, no weights); the reason
    // in `why` when not.
    static bool applies(int tile, const WinogradOwnShape& shape, std::string* why = nullptr);
    // The bytes create() would hold for the transformed weights and bias (the GEMM's packed layout included),
    // without transforming anything; 0 where it does not apply. The planner's rule budgets with it.
    static size_t weight_bytes_of(const dnnl::engine& eng, int tile, const WinogradOwnShape& shape);

    // `allow_avx512` false keeps the transforms on AVX2 (the tests compare the two).
    // `tile` 4: F(4x4,3x3), 36 GEMMs; 2: F(2x2,3x3), 16 GEMMs. `weights` OIHW {OC, IC, 3, 3}, `bias` OC
    // values (nullptr: zero). `tiles_per_group` 0 chooses (see create() in the .cpp); at least the run's tile count: one
    // group threaded by phases. Returns nullptr (and the
    // reason in `why`) where it does not apply, so the candidate is simply not offered.
    static std::unique_ptr<WinogradOwn> create(const dnnl::engine& eng, dnnl::stream& strm, int tile,
                                               const WinogradOwnShape& shape, const float* weights, const float* bias,
                                               std::string* why = nullptr, int64_t tiles_per_group = 0,
                                               bool allow_avx512 = true);

    // Replaces the weights (training: once per step, before the forward). `weights` OIHW {OC, IC, 3, 3} and
    // `bias` OC values (nullptr: zero), as create() takes them; or, with `flipped_transposed`, the OIHW
    // weights {IC, OC, 3, 3} of the forward convolution whose backward-data this one computes (each 3x3
    // kernel rotated by 180 degrees, input and output channels swapped).
    void set_weights(dnnl::stream& strm, const float* weights, const float* bias, bool flipped_transposed = false);

    // One run over `shape.batch` images. `scratch` holds scratch_bytes(), 64-byte aligned; only this run
    // uses it (the engine passes its shared scratchpad). Not for two threads at once. Runs on at most the
    // OpenMP thread count current at create() (the scratch has one slot per thread).
    void execute(dnnl::stream& strm, const float* src, float* dst, void* scratch);

    size_t scratch_bytes() const { return scratch_bytes_; }  // V + M + the matmul's scratchpad, per run
    size_t weight_bytes() const { return weight_bytes_; }    // U in the matmul's layout + bias
    int tile() const { return tile_; }
    int64_t tiles_per_group() const { return group_; }
    std::string algorithm() const { return tile_ == 4 ? "winograd_f43" : "winograd_f23"; }
    // "own_f43:avx2+gemm:jit" (the transforms' ISA, then the matmul's implementation); no "wino" in it, so
    // a profile row says which Winograd runs through the algorithm name.
    std::string kernel() const { return kernel_; }

  private:
    WinogradOwn() = default;
    // Tiles [first_tile, first_tile + count) of the run; `parallel`: threaded over tiles and channels.
    void input_transform(const float* src, float* v, int64_t first_tile, int64_t count, bool parallel) const;
    void output_transform(const float* m, float* dst, int64_t first_tile, int64_t count, bool parallel) const;

    WinogradOwnShape shape_;
    dnnl::engine eng_;
    int tile_ = 4;
    int alpha_ = 6;          // tile + 2
    int64_t tiles_y_ = 0;    // tiles per image, down
    int64_t tiles_x_ = 0;    // tiles per image, across
    int64_t tiles_ = 0;      // batch * tiles_y_ * tiles_x_
    int64_t group_ = 0;      // tiles per group (the matmul's M)
    int threads_ = 1;        // OpenMP threads when built: the scratch has a slot for each
    bool private_groups_ = false;  // each thread runs whole groups in its own slot (else one threaded group)
    int block_ = 8;          // channel block of the layout (nhwc: 0)
    int64_t wide_ = 0;       // input channel groups of 16 the input transform runs on AVX-512 (the rest: 8 on AVX2)
    int64_t wide_out_ = 0;   // output channel groups of 16 the output transform runs on AVX-512
    std::vector<float> bias_;
    bool direct_into_weights_ = true;  // U written straight into weights_ (else through a plain copy and a reorder)
    dnnl::memory weights_;   // U, [P, IC, OC] in the matmul's layout
    TileGroupMatmul gemm_;   // the P GEMMs of a group of group_ tiles (and of a shorter last group)
    size_t v_bytes_ = 0, m_bytes_ = 0, slot_bytes_ = 0;
    size_t scratch_bytes_ = 0;
    size_t weight_bytes_ = 0;
    std::string kernel_;
};

}  // namespace resunet
