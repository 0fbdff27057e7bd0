// Atomic file writes: a temp file in the same folder, write, fsync, rename over the target, fsync the
// folder. A crash or a full disk leaves either the old file or the new one, never a torn file.
//
// Intended usage:
//   resunet::write_file_atomic("out/report.json", text);                   // throws resunet::Error
//   resunet::write_file_atomic("model.safetensors", {prefix, header, data}); // several parts
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

namespace resunet {

// An owned POSIX file descriptor, closed on scope exit.
struct FileDescriptor {
    int fd = -1;
    explicit FileDescriptor(int value) : fd(value) {}
    FileDescriptor(const FileDescriptor&) = delete;
    FileDescriptor& operator=(const FileDescriptor&) = delete;
    ~FileDescriptor() {
        if (fd >= 0) ::close(fd);
    }
    // Closes now so that a failing close (lost delayed write) can be reported.
    int close_now() {
        int rc = ::close(fd);
        fd = -1;
        return rc;
    }
};


// Writes the parts one after another as the new content of `path`.
void write_file_atomic(const std::string& path, const std::vector<std::span<const uint8_t>>& parts);
void write_file_atomic(const std::string& path, std::string_view text);

// Removes the temp files (".<name>.tmp.<pid>.*") that write_file_atomic left in `folder` when its process was
// killed mid-write (kill -9, power loss); files of processes still alive are kept. Returns how many it removed.
// A missing or unreadable folder removes nothing.
int remove_stale_temp_files(const std::string& folder);

}  // namespace resunet
