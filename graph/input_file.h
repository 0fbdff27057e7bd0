// The one way the programs open a file a user names (images, masks, --model, --split, --config, @lists,
// checkpoints): refused unless it is a regular file, checked before open() and again on the opened
// descriptor, so a FIFO, a device or a folder is a one-line error and never a read that blocks forever.
//
// Intended usage:
//   resunet::FileDescriptor fd = resunet::open_input_file(path, "--model");     // throws resunet::Error
//   std::string text = resunet::read_input_file(path, "--split", 64 << 20);      // the whole file
#pragma once

#include <cstdint>
#include <string>

#include "graph/atomic_file.h"

namespace resunet {

// Opens `path` read-only; resunet::Error "<what> '<path>': ..." when it is missing, not a regular file
// (FIFO, socket, device, folder) or cannot be opened. The open itself never blocks (O_NONBLOCK, cleared after).
FileDescriptor open_input_file(const std::string& path, const std::string& what);

// Why `path` is not a regular file that can be opened, or "" when it is (stat only; nothing is opened).
std::string input_file_problem(const std::string& path);

// The whole content of a regular file, at most `max_bytes` (Error beyond).
std::string read_input_file(const std::string& path, const std::string& what, uint64_t max_bytes);

}  // namespace resunet
