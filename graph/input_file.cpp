// See input_file.h.
#include "graph/input_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "graph/tensor.h"

namespace resunet {

namespace {

const char* kind_of(mode_t mode) {
    if (S_ISDIR(mode)) return "a folder";
    if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
    if (S_ISSOCK(mode)) return "a socket";
    if (S_ISCHR(mode) || S_ISBLK(mode)) return "a device";
    return "not a regular file";
}

std::string mode_problem(mode_t mode) {
    if (S_ISREG(mode)) return std::string();
    const std::string kind = kind_of(mode);
    return kind.starts_with("not") ? kind : "is " + kind + ", not a regular file";
}

}  // namespace

std::string input_file_problem(const std::string& path) {
    struct stat info {};
    if (::stat(path.c_str(), &info) != 0) return std::string("cannot open: ") + std::strerror(errno);
    return mode_problem(info.st_mode);
}

FileDescriptor open_input_file(const std::string& path, const std::string& what) {
    if (const std::string problem = input_file_problem(path); !problem.empty())
        throw Error(fmt::format("{} '{}': {}", what, path, problem));
    // O_NONBLOCK: had the file been replaced by a FIFO since the stat, open() would wait for a writer.
    FileDescriptor file(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
    if (file.fd < 0) throw Error(fmt::format("{} '{}': cannot open: {}", what, path, std::strerror(errno)));
    struct stat info {};
    if (::fstat(file.fd, &info) != 0) throw Error(fmt::format("{} '{}': cannot stat: {}", what, path, std::strerror(errno)));
    if (const std::string problem = mode_problem(info.st_mode); !problem.empty())
        throw Error(fmt::format("{} '{}': {}", what, path, problem));
    const int flags = ::fcntl(file.fd, F_GETFL);
    if (flags >= 0) ::fcntl(file.fd, F_SETFL, flags & ~O_NONBLOCK);
    return file;
}

std::string read_input_file(const std::string& path, const std::string& what, uint64_t max_bytes) {
    FileDescriptor file = open_input_file(path, what);
    struct stat info {};
    if (::fstat(file.fd, &info) != 0) throw Error(fmt::format("{} '{}': cannot stat: {}", what, path, std::strerror(errno)));
    if (static_cast<uint64_t>(info.st_size) > max_bytes)
        throw Error(fmt::format("{} '{}': {} bytes, more than the {} this file may have", what, path, info.st_size, max_bytes));
    std::string text;
    char buffer[65536];
    for (;;) {
        const ssize_t got = ::read(file.fd, buffer, sizeof buffer);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) throw Error(fmt::format("{} '{}': cannot read: {}", what, path, std::strerror(errno)));
        if (got == 0) break;
        text.append(buffer, static_cast<size_t>(got));
        if (text.size() > max_bytes)
            throw Error(fmt::format("{} '{}': more than the {} bytes this file may have", what, path, max_bytes));
    }
    return text;
}

}  // namespace resunet
