// A graceful stop for long commands (`resunet train`): the first SIGINT or SIGTERM asks the command to
// stop at its next safe point (the end of the current epoch, once its checkpoint is written); a second
// one stops the process at once, as the signal's default action would have. A signal the process started
// with ignored (SIG_IGN: a background job of a shell script, nohup) stays ignored.
//
//   resunet::StopOnSignal stop;              // installs the handlers; the destructor restores the old ones
//   while (...) { ... if (stop.requested()) break; }
//   return stop.requested() ? 128 + stop.requested() : 0;
#pragma once

#include <string>

namespace resunet {

class StopOnSignal {
  public:
    StopOnSignal();  // one at a time per process (throws Error otherwise)
    ~StopOnSignal();
    StopOnSignal(const StopOnSignal&) = delete;
    StopOnSignal& operator=(const StopOnSignal&) = delete;

    // The first signal received (SIGINT or SIGTERM), 0 while none.
    int requested() const;
};

// "SIGINT", "SIGTERM", else "signal N".
std::string signal_name(int signal_number);

// Test hook of `resunet train`: with RESUNET_TEST_INTERRUPT_AT_STEPS="2,3" the process sends itself SIGINT
// just before those training steps (1-based, counted over the whole run).
void maybe_interrupt_for_test(long long next_step);

}  // namespace resunet
