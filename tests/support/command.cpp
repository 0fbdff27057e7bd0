// Running the built programs from a test (tests/support/command.h).
#include "tests/support/command.h"

#include <sys/wait.h>

#include <array>
#include <cstdio>

namespace resunet::test_support {

CommandResult run_command(const std::string& command) {
    CommandResult r;
    FILE* pipe = popen((command + " 2>&1").c_str(), "r");
    if (!pipe) return r;
    std::array<char, 4096> buffer;
    while (size_t n = fread(buffer.data(), 1, buffer.size(), pipe)) r.out.append(buffer.data(), n);
    const int status = pclose(pipe);
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return r;
}

std::filesystem::path build_dir() { return std::filesystem::canonical("/proc/self/exe").parent_path().parent_path(); }

}  // namespace resunet::test_support
