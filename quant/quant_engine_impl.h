// The int8 engine's compiled state (QuantEngine::Impl), shared by its two sources: quant/quant_engine.cpp
// (the lowering: value forms, quantize and gather passes, arena, primitives) and quant/quant_engine_run.cpp
// (construction, a pass, run, profile, calibrate, accessors). Internal to quant/.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine/arena.h"
#include "engine/conv_choice.h"
#include "engine/lowering.h"
#include "engine/schedule.h"
#include "engine/onednn_util.h"
#include "graph/fusion.h"
#include "quant/int8_conv_choice.h"
#include "quant/quant_engine.h"
#include "quant/quant_layers.h"
#include "quant/quantize.h"
#include "quant/quantize_kernels.h"

namespace resunet {

using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace quant_detail {

using Clock = std::chrono::steady_clock;

// A buffer in the arena.
struct Buffer {
    size_t bytes = 0;
    int first_step = INT_MAX;
    int last_step = -1;
    size_t offset = 0;
};

enum class StepKind { input_reorder, quantize, gather, conv, residual_copy, pool, output_reorder };

// A step of the schedule before any oneDNN object exists: what it reads and writes.
struct PlannedStep {
    StepKind kind;
    int op = -1;     // fused op index (conv, pool, residual_copy)
    int value = -1;  // value quantized or gathered
    std::vector<int> reads;
    std::vector<int> writes;
};

using Step = lowering::Step;

// The values one quantize pass covers, and the u8 buffers (one per padding) it writes.
struct QuantGroup {
    int value = -1;
    std::vector<std::pair<int, int>> outputs;  // (padding, buffer)
    ActivationQuant current;
    float calibrated_min = INFINITY;
    float calibrated_max = -INFINITY;
    bool have_static = false;
    ActivationQuant static_quant;
    int64_t saturated = 0;
    int64_t counted = 0;
    float last_max = 0;  // the largest value its last range pass found (the range_donors of later passes)
};

}  // namespace quant_detail

using namespace quant_detail;

// The int8 policy over the planner's schedule (engine/schedule.h): which layers run int8, the quantize
// and gather passes between them, and each pass's activation scales.
struct QuantEngine::Impl : lowering::Schedule<Step> {
    QuantOptions options;
    std::vector<bool> int8_op;
    int levels = 63;

    // Per value: its raw buffer (fp32 NHWC, or the packed 1x1 output of a transposed conv), whether it
    // is packed, whether it is a concat that exists only inside quantize/gather passes, and a buffer
    // with its plain fp32 NHWC form when one is needed.
    std::vector<int> raw_buffer;
    std::vector<bool> packed;
    std::vector<bool> virtual_concat;
    std::vector<int> fp32_buffer;
    std::vector<int> group_of;  // value -> quant group
    std::vector<QuantGroup> groups;
    std::vector<Buffer> buffers;
    std::vector<PlannedStep> plan;
    std::vector<bool> copy_residual;

    // Int8ConvAlgorithm::mixed, per op: the fp32 algorithm a layer measured faster than its int8 kernel runs
    // (given to the planner as its choice, not measured again), and what the measurement found.
    std::vector<std::string> fp32_forced;
    std::vector<std::string> precision_note;

    // The int8 3x3 layers' choices lower() was given (a plan file's or the plan cache's: node name -> "direct" |
    // "winograd_int8_f23"), its own copy; nullopt: chosen by the options (rule or measured).
    std::optional<std::map<std::string, ConvAlgo>> chosen_int8;
    std::string plan_note;  // where the int8 3x3 choices came from, for conv_summary (empty: not cached)
    Plan engine_plan;       // what it runs (QuantEngine::plan())
    Plan plan_of_steps(const std::string& source) const;

    std::vector<std::vector<float>> host_vectors;  // per-layer scale/bias sources kept for `before`
    bool calibrating = false;

    const Dims& dims(int value) const { return graph.value(value).dims; }
    char* ptr(int buffer) const { return arena.base() + buffers[static_cast<size_t>(buffer)].offset; }
    int new_buffer(size_t bytes) {
        buffers.push_back(Buffer{bytes, INT_MAX, -1, 0});
        return static_cast<int>(buffers.size()) - 1;
    }
    size_t f32_bytes(const Dims& d) const { return static_cast<size_t>(num_elements(d)) * sizeof(float); }

    void plan_values(const TensorMap& weights_for_checks);
    int ensure_fp32(int value);
    int ensure_group(int value);
    void collect_sources(int value, int64_t channel_offset, std::vector<KernelSource>& out) const;
    // The values behind collect_sources' sources, in the same order.
    void collect_source_values(int value, std::vector<int>& out) const;
    std::vector<int> range_donors() const;
    void allocate();
    void lower(const TensorMap& weights, bool from_int8_file, std::optional<std::map<std::string, ConvAlgo>> chosen = std::nullopt);
    void lower_conv(const PlannedStep& planned, const PreparedLayer& layer);
    // The layer's convolution as this engine runs it: an int8 layer reads the quantize pass's padded u8 NHWC
    // copy, an fp32 one the fp32 NHWC buffer; the dst is fp32 NHWC.
    lowering::ConvSpec conv_spec(const FusedOp& op, const PreparedLayer& layer) const;
    // The planner's request for an fp32 3x3 layer (our own Winograd over NHWC with the op's sum and ReLU);
    // `layer` must outlive the request.
    ConvChoiceRequest fp32_conv_request(const FusedOp& op, const PreparedLayer& layer, const lowering::ConvSpec& spec);
    // Int8ConvAlgorithm::mixed: measures each int8 3x3 layer in both precisions and moves the ones faster in
    // fp32 out of int8_op (quant/mixed_precision.cpp).
    void choose_precisions(const TensorMap& weights);
    // QuantEngine::conv_summary without the plan cache's note.
    std::string conv_summary_text() const;
    memory f32_memory(int buffer, const Dims& d, tag layout) {
        return memory({to_dnnl_dims(d), dt::f32, layout}, eng, ptr(buffer));
    }
};

}  // namespace resunet
