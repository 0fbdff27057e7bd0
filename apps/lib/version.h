// The programs' version, as `--version` prints it and every report and JSON file records it: the project
// version (CMake's project(VERSION)) and the git commit of the build, "-dirty" with local changes.
//
// Intended usage:
//   app.set_version_flag("--version", resunet::tool_version("resunet"));   // "resunet 0.1.0 (git 5f1b54b)"
//   json["tool_version"] = resunet::tool_version("resunet");
#pragma once

#include <string>

namespace resunet {

// "0.1.0 (git 5f1b54b)", or "0.1.0" where the build knew no commit (a tree without git).
std::string version_string();
// "<program> " + version_string().
std::string tool_version(const std::string& program);

}  // namespace resunet
