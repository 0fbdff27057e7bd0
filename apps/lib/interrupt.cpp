// See interrupt.h.
#include "apps/lib/interrupt.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <set>
#include <sstream>
#include <string>

#include "graph/tensor.h"  // resunet::Error

namespace resunet {
namespace {

std::atomic<int> g_requested{0};
std::atomic<bool> g_installed{false};
struct sigaction g_old_int, g_old_term;

// Async-signal-safe: an atomic store, write(2), and for a second signal the default action again.
void on_signal(int signal_number) {
    int expected = 0;
    if (g_requested.compare_exchange_strong(expected, signal_number)) {
        static const char message[] =
            "\nresunet: stopping at the end of this epoch, once its checkpoint is written; interrupt again to stop now\n";
        [[maybe_unused]] const ssize_t written = ::write(STDERR_FILENO, message, sizeof(message) - 1);
        return;
    }
    ::signal(signal_number, SIG_DFL);
    ::raise(signal_number);
}

}  // namespace

StopOnSignal::StopOnSignal() {
    if (g_installed.exchange(true)) throw Error("StopOnSignal: one is already installed");
    g_requested = 0;
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;  // reads and writes in flight carry on
    sigaction(SIGINT, &action, &g_old_int);
    sigaction(SIGTERM, &action, &g_old_term);
    // A signal ignored when the program started stays ignored: a shell script's `resunet train ... &` ignores
    // SIGINT so that Ctrl-C on the script leaves it running, as it always did.
    if (g_old_int.sa_handler == SIG_IGN) sigaction(SIGINT, &g_old_int, nullptr);
    if (g_old_term.sa_handler == SIG_IGN) sigaction(SIGTERM, &g_old_term, nullptr);
}

StopOnSignal::~StopOnSignal() {
    sigaction(SIGINT, &g_old_int, nullptr);
    sigaction(SIGTERM, &g_old_term, nullptr);
    g_installed = false;
}

int StopOnSignal::requested() const { return g_requested.load(); }

std::string signal_name(int signal_number) {
    if (signal_number == SIGINT) return "SIGINT";
    if (signal_number == SIGTERM) return "SIGTERM";
    return "signal " + std::to_string(signal_number);
}

void maybe_interrupt_for_test(long long next_step) {
    static const std::set<long long> steps = [] {
        std::set<long long> parsed;
        if (const char* hook = std::getenv("RESUNET_TEST_INTERRUPT_AT_STEPS")) {
            std::stringstream list(hook);
            std::string item;
            while (std::getline(list, item, ','))
                if (!item.empty()) parsed.insert(std::atoll(item.c_str()));
        }
        return parsed;
    }();
    if (steps.count(next_step)) ::raise(SIGINT);  // to this thread: handled before raise returns
}

}  // namespace resunet
