// Plans one activation arena: every buffer gets an offset so that buffers alive at the same time
// never overlap. Greedy by size (largest first, lowest fitting offset), as TFLite's arena planner does.
//
// Intended usage:
//   std::vector<resunet::ArenaRequest> requests = {{bytes, first_step, last_step}, ...};
//   resunet::ArenaPlan plan = resunet::plan_arena(requests, /*alignment=*/64);
//   char* base = allocate(plan.total_bytes);  // buffer i lives at base + plan.offsets[i]
#pragma once

#include <cstddef>
#include <vector>

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

}  // namespace resunet
