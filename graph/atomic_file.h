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
#include <utility>
#include <vector>

#include <unistd.h>

namespace resunet {

// An owned POSIX file descriptor, closed on scope exit.
struct FileDescriptor {
    int fd = -1;
    explicit FileDescriptor(int value) : fd(value) {}
    FileDescriptor(const FileDescriptor&) = delete;
    FileDescriptor& operator=(const FileDescriptor&) = delete;
    FileDescriptor(FileDescriptor&& other) noexcept : fd(other.fd) { other.fd = -1; }
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

// Creates an empty temp file beside `path`, named as write_file_atomic names its own (".<name>.tmp.<pid>.*",
// the name shortened with a hash when long, so any legal target name works), for a writer that streams into
// it and renames it over `path` itself. remove_stale_temp_files removes it if the process dies first.
std::string new_temp_file_beside(const std::string& path);

// Several files that must appear together (a model and its reports): each is written to its temp file, then
// commit() renames them all in the order added (put the file whose presence says "done" last), holding
// SIGINT, SIGTERM and SIGHUP until the last rename so that a signal cannot split the set; a failed rename
// removes the ones already made. Uncommitted temp files are removed by the destructor.
//
//   AtomicFileSet outputs;
//   write_file_atomic(outputs.add("m.report.md"), text);  // any writer, to the temp path add() returns
//   save_safetensors(outputs.add("m.safetensors"), tensors);
//   outputs.commit();
class AtomicFileSet {
  public:
    AtomicFileSet() = default;
    ~AtomicFileSet();
    AtomicFileSet(const AtomicFileSet&) = delete;
    AtomicFileSet& operator=(const AtomicFileSet&) = delete;
    std::string add(const std::string& target);  // the temp path to write `target`'s content to
    void commit();

  private:
    std::vector<std::pair<std::string, std::string>> files_;  // target, temp
    bool committed_ = false;
};

// Removes the temp files (".<name>.tmp.<pid>.*", and ".<name>.partial.<pid>" of older predict runs) left in
// `folder` by a process killed mid-write (kill -9, power loss, a signal); files of processes still alive are
// kept. Returns how many it removed. A missing or unreadable folder removes nothing.
int remove_stale_temp_files(const std::string& folder);

}  // namespace resunet
