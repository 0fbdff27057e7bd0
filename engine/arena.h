// Plans one activation arena: every buffer gets an offset so that buffers alive at the same time
// never overlap. Greedy by size (largest first, lowest fitting offset), as TFLite's arena planner does.
//
// Intended usage:
//   std::vector<resunet::ArenaRequest> requests = {{bytes, first_step, last_step}, ...};
//   resunet::ArenaPlan plan = resunet::plan_arena(requests, /*alignment=*/64);
//   char* base = allocate(plan.total_bytes);  // buffer i lives at base + plan.offsets[i]
// or, planned and allocated at once (the engines' one arena):
//   resunet::ActivationArena arena;
//   std::vector<size_t> offsets = arena.allocate(requests, "engine");  // buffer i at arena.base() + offsets[i]
// Which values may share a buffer is decided first, by rules every policy shares (below):
//   std::vector<int> last_use = resunet::last_uses(graph, ops);
//   if (resunet::residual_in_place(graph, ops, k, last_use, keep_values) && ...policy's own storage rule...)
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "graph/fusion.h"
#include "graph/graph.h"

namespace resunet {

struct ArenaRequest {
    size_t bytes = 0;    // size of the buffer
    int first_step = 0;  // step that first writes it
    int last_step = 0;   // step that last reads it (inclusive)
};

struct ArenaPlan {
    std::vector<size_t> offsets;  // one per request, aligned
    size_t total_bytes = 0;       // arena size needed
    size_t naive_bytes = 0;       // sum of all requests: what one buffer per tensor would take
};

ArenaPlan plan_arena(const std::vector<ArenaRequest>& requests, size_t alignment = 64);

// One planned arena, allocated 64-byte aligned: what the fp32 and int8 engines run in.
class ActivationArena {
  public:
    // Plans `requests` (plan_arena, 64-byte alignment), allocates the block and returns each request's
    // offset. A failed allocation is a resunet::Error naming `who` and the size.
    std::vector<size_t> allocate(const std::vector<ArenaRequest>& requests, const std::string& who);
    char* base() const { return block_.get(); }
    size_t bytes() const { return bytes_; }              // the arena's size
    size_t naive_bytes() const { return naive_bytes_; }  // one buffer per tensor would take this

  private:
    std::unique_ptr<char, decltype(&std::free)> block_{nullptr, &std::free};
    size_t bytes_ = 0;
    size_t naive_bytes_ = 0;
};

// ---- Value lifetimes and the in-place rule, one for the fp32 engine, the int8 engine and what comes next.

// last_use[v]: the index of the last fused op reading value v (as a source or as its residual), or -1.
std::vector<int> last_uses(const Graph& graph, const std::vector<FusedOp>& ops);

// Whether fused op k may accumulate its residual add in place: its output takes the residual operand's
// buffer. Only when the operand is neither the graph's input nor its output (the caller's buffers), the op
// does not also read it as a source, no op after k reads it, and the caller keeps every value readable
// (`keep_values`, for inspection). A policy adds what its own storage needs (a whole buffer rather than a
// concat slice, an unpacked one).
bool residual_in_place(const Graph& graph, const std::vector<FusedOp>& ops, size_t k, const std::vector<int>& last_use,
                       bool keep_values);

}  // namespace resunet
