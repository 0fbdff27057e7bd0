#include "engine/run_guards.h"

#include <fmt/format.h>
#include <omp.h>

#include "graph/tensor.h"

namespace resunet {

bool all_finite(const float* data, int64_t count) {
    float probe = 0.0f;
#pragma omp parallel for simd reduction(+ : probe) schedule(static)
    for (int64_t i = 0; i < count; ++i) probe += data[i] - data[i];  // 0 for finite values, NaN for NaN and +-Inf
    return probe == 0.0f;
}

void check_finite_input(const float* data, int64_t count, const char* who) {
    if (!all_finite(data, count)) throw Error(fmt::format("{}: the input images contain NaN or Inf", who));
}

void check_run_batch(const float* src, int batch, const float* dst, int micro_batch, const char* who) {
    if (!src || !dst) throw Error(fmt::format("{}: run() needs non-null input and output buffers", who));
    if (batch <= 0 || batch % micro_batch != 0)
        throw Error(fmt::format("{}: batch {} is not a positive multiple of the micro-batch {}", who, batch, micro_batch));
}

ThreadSetting::ThreadSetting(int threads) {
    if (threads <= 0) return;
    previous_ = omp_get_max_threads();
    omp_set_num_threads(threads);
}

ThreadSetting::~ThreadSetting() {
    if (previous_ > 0) omp_set_num_threads(previous_);
}

#ifdef NDEBUG
ConcurrentRunCheck::ConcurrentRunCheck(std::atomic<bool>&, const char*) {}
ConcurrentRunCheck::~ConcurrentRunCheck() = default;
#else
ConcurrentRunCheck::ConcurrentRunCheck(std::atomic<bool>& running, const char* who) {
    if (running.exchange(true, std::memory_order_acquire))
        throw Error(fmt::format("{}: run() called while another run() of the same engine is in progress; an engine "
                                "is not thread-safe, use one engine per thread",
                                who));
    running_ = &running;
}
ConcurrentRunCheck::~ConcurrentRunCheck() {
    if (running_) running_->store(false, std::memory_order_release);
}
#endif

}  // namespace resunet
