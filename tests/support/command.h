// Running the built programs from a test: a shell command's exit status and output, and the build folder.
//
// Intended usage:
//   const resunet::test_support::CommandResult r = resunet::test_support::run_command(binary + " --version");
//   EXPECT_EQ(r.code, 0) << r.out;
#pragma once

#include <filesystem>
#include <string>

namespace resunet::test_support {

struct CommandResult {
    int code = -1;    // the exit status; -1 when the command did not exit (or could not start)
    std::string out;  // stdout and stderr together
};

CommandResult run_command(const std::string& command);

// The build folder: the parent of the folder that holds the running test binary.
std::filesystem::path build_dir();

}  // namespace resunet::test_support
