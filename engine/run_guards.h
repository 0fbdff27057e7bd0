// What every engine's run()/profile()/calibrate() does on entry, shared by engine/ and quant/ (never by
// others): refuse NaN/Inf input, keep the caller's OpenMP thread setting, and (in builds without NDEBUG)
// catch a second concurrent run on the same engine.
//
// Intended usage, at the top of a run():
//   ConcurrentRunCheck busy(impl.running, "engine");         // throws if another run() is in progress
//   check_run_batch(src, batch, dst, micro_batch, "engine");
//   check_finite_input(src, batch * image_elements, "engine");
//   ThreadSetting threads(impl.options.threads);           // omp_set_num_threads until the scope ends
#pragma once

#include <atomic>
#include <cstdint>

namespace resunet {

// True if no value of data[0..count) is NaN or infinite (OpenMP-parallel, one read of the data).
bool all_finite(const float* data, int64_t count);

// Throws resunet::Error("<who>: the input images contain NaN or Inf") unless all_finite(data, count).
// The first layers may clip or ReLU a NaN away, so bad input is refused before it can turn into a
// plausible mask.
void check_finite_input(const float* data, int64_t count, const char* who);

// Throws resunet::Error("<who>: ...") unless src and dst are non-null and batch is a positive multiple of
// micro_batch.
void check_run_batch(const float* src, int batch, const float* dst, int micro_batch, const char* who);

// Sets the OpenMP thread count of the calling thread for the scope (threads > 0), and restores the
// value omp_get_max_threads() had before when the scope ends, also on exceptions. threads == 0 leaves
// the setting alone.
class ThreadSetting {
  public:
    explicit ThreadSetting(int threads);
    ~ThreadSetting();
    ThreadSetting(const ThreadSetting&) = delete;
    ThreadSetting& operator=(const ThreadSetting&) = delete;

  private:
    int previous_ = 0;  // 0: nothing to restore
};

// In builds without NDEBUG: marks an engine busy for the scope, and throws resunet::Error if it already
// was (a second run() on one engine from another thread, which would share its arena and buffers). In
// NDEBUG builds it does nothing, so a release run() pays no atomic operation.
class ConcurrentRunCheck {
  public:
    ConcurrentRunCheck(std::atomic<bool>& running, const char* who);
    ~ConcurrentRunCheck();
    ConcurrentRunCheck(const ConcurrentRunCheck&) = delete;
    ConcurrentRunCheck& operator=(const ConcurrentRunCheck&) = delete;

  private:
    std::atomic<bool>* running_ = nullptr;  // set when this scope owns the flag
};

}  // namespace resunet
