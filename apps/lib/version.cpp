#include "apps/lib/version.h"

#include <string_view>

#include "git_commit.h"  // RESUNET_GIT_COMMIT, written at build time (cmake/git_commit.cmake)

#ifndef RESUNET_VERSION
#error "RESUNET_VERSION (the project version) comes from apps/CMakeLists.txt"
#endif

namespace resunet {

std::string version_string() {
    const std::string_view commit = RESUNET_GIT_COMMIT;
    if (commit.empty() || commit == "unknown") return RESUNET_VERSION;
    return std::string(RESUNET_VERSION) + " (git " + std::string(commit) + ")";
}

std::string tool_version(const std::string& program) { return program + " " + version_string(); }

}  // namespace resunet
