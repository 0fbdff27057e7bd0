#include "engine/arena.h"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>

#include "graph/tensor.h"

namespace resunet {

ArenaPlan plan_arena(const std::vector<ArenaRequest>& requests, size_t alignment) {
    auto align_up = [alignment](size_t x) { return (x + alignment - 1) / alignment * alignment; };
    ArenaPlan plan;
    plan.offsets.assign(requests.size(), 0);
    std::vector<size_t> order(requests.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return requests[a].bytes > requests[b].bytes; });
    std::vector<size_t> placed;
    for (size_t index : order) {
        const ArenaRequest& r = requests[index];
        plan.naive_bytes += align_up(r.bytes);
        // Intervals [offset, offset + bytes) of placed buffers whose lifetime overlaps this one.
        std::vector<std::pair<size_t, size_t>> busy;
        for (size_t other : placed) {
            const ArenaRequest& o = requests[other];
            if (o.last_step < r.first_step || r.last_step < o.first_step) continue;
            busy.emplace_back(plan.offsets[other], plan.offsets[other] + align_up(o.bytes));
        }
        std::sort(busy.begin(), busy.end());
        size_t offset = 0;
        for (const auto& [begin, end] : busy) {
            if (offset + align_up(r.bytes) <= begin) break;
            offset = std::max(offset, end);
        }
        plan.offsets[index] = offset;
        plan.total_bytes = std::max(plan.total_bytes, offset + align_up(r.bytes));
        placed.push_back(index);
    }
    return plan;
}

std::vector<size_t> ActivationArena::allocate(const std::vector<ArenaRequest>& requests, const std::string& who) {
    ArenaPlan plan = plan_arena(requests, 64);
    bytes_ = plan.total_bytes;
    naive_bytes_ = plan.naive_bytes;
    block_.reset(static_cast<char*>(std::aligned_alloc(64, std::max<size_t>(64, (bytes_ + 63) / 64 * 64))));
    if (!block_) throw Error(fmt::format("{}: cannot allocate an activation arena of {} bytes", who, bytes_));
    return plan.offsets;
}

std::vector<int> last_uses(const Graph& graph, const std::vector<FusedOp>& ops) {
    std::vector<int> last_use(graph.values().size(), -1);
    for (size_t k = 0; k < ops.size(); ++k) {
        for (int src : ops[k].srcs) last_use[static_cast<size_t>(src)] = static_cast<int>(k);
        if (ops[k].residual >= 0) last_use[static_cast<size_t>(ops[k].residual)] = static_cast<int>(k);
    }
    return last_use;
}

bool residual_in_place(const Graph& graph, const std::vector<FusedOp>& ops, size_t k, const std::vector<int>& last_use,
                       bool keep_values) {
    const FusedOp& op = ops[k];
    const int r = op.residual;
    return r >= 0 && !keep_values && r != graph.input_value() && r != graph.output_value() &&
           last_use[static_cast<size_t>(r)] == static_cast<int>(k) &&
           std::find(op.srcs.begin(), op.srcs.end(), r) == op.srcs.end();
}

}  // namespace resunet
