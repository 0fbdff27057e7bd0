// A compiled schedule with its memory: what the fp32 and the int8 engine hold alike, whichever policy
// lowered the graph (engine/engine_impl.h, quant/quant_engine_impl.h derive from it). One oneDNN engine
// and stream, the steps (engine/lowering.h), one activation arena (engine/arena.h), one scratchpad shared
// by every step, the uploaded weights, and the caller's buffers, whose handles each pass sets.
//
// Intended usage (a policy's Impl):
//   struct Engine::Impl : lowering::Schedule<Step> { ...policy state...; void lower(...); };
//   impl.arena.allocate(requests, "engine");  ...  steps.push_back(...);  impl.bind_scratchpad();
//   impl.run_batch(src, batch, dst, micro_batch, nullptr);          // run()
//   impl.profile_rows(step_ms, passes);                             // profile()
//
// Internal to engine/ and quant/ (oneDNN types).
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "engine/arena.h"
#include "engine/engine.h"
#include "engine/lowering.h"
#include "graph/fusion.h"
#include "graph/graph.h"

namespace resunet::lowering {

template <class StepT>
struct Schedule {
    dnnl::engine eng{dnnl::engine::kind::cpu, 0};
    dnnl::stream strm{eng};
    Graph graph;  // with the micro-batch as N
    std::vector<FusedOp> ops;

    std::vector<StepT> steps;
    ActivationArena arena;
    WeightStore weight_store;      // reordered weights, kept alive for the steps' argument maps
    dnnl::memory scratchpad;       // one for every step (user scratchpad mode)
    size_t scratchpad_bytes = 0;   // the largest step's
    dnnl::memory user_src, user_dst;  // the caller's NCHW buffers: handles set per pass
    Dims input_dims, output_dims;     // one image
    double compile_ms = 0;
    std::atomic<bool> running{false};  // a run()/profile()/calibrate() is in progress (checked without NDEBUG)

    // Allocates the shared scratchpad at its largest step's size and gives it to every step.
    void bind_scratchpad() {
        scratchpad = dnnl::memory({{static_cast<dnnl::memory::dim>(std::max<size_t>(scratchpad_bytes, 1))},
                                   dnnl::memory::data_type::u8, dnnl::memory::format_tag::x},
                                  eng);
        for (StepT& step : steps) step.args[DNNL_ARG_SCRATCHPAD] = scratchpad;
    }

    // One pass of one micro-batch: src and dst hold it in NCHW.
    void run_pass(const float* src, float* dst, std::vector<double>* step_ms) {
        user_src.set_data_handle(const_cast<float*>(src));
        user_dst.set_data_handle(dst);
        run_schedule(steps, strm, step_ms);
    }

    // `batch` images (a multiple of `micro_batch`), one pass per micro-batch; `dst_stride` false writes
    // every pass to the same dst (calibration reads no output).
    void run_batch(const float* src, int batch, float* dst, int micro_batch, std::vector<double>* step_ms,
                   bool dst_stride = true) {
        const int64_t in = num_elements(input_dims), out = dst_stride ? num_elements(output_dims) : 0;
        for (int b = 0; b < batch; b += micro_batch) run_pass(src + b * in, dst + b * out, step_ms);
    }

    // The profile of `passes` passes whose step times are `step_ms`.
    std::vector<LayerProfile> profile_rows(const std::vector<double>& step_ms, double passes) const {
        std::vector<LayerProfile> rows;
        for (size_t i = 0; i < steps.size(); ++i) {
            const StepT& s = steps[i];
            rows.push_back({s.name, s.op, s.kernel, s.precision.empty() ? "f32" : s.precision, step_ms[i],
                            2.0 * s.macs * passes / 1e9, s.algorithm, s.candidates});
        }
        return rows;
    }

    EngineMemory memory_usage() const { return {weight_store.bytes(), arena.bytes(), arena.naive_bytes(), scratchpad_bytes}; }
};

}  // namespace resunet::lowering
