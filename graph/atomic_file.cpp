#include "graph/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "graph/tensor.h"

namespace resunet {
namespace {

std::string errno_text(int error) { return std::strerror(error); }


void write_all(int fd, const uint8_t* data, size_t size, const std::string& path) {
    while (size > 0) {
        ssize_t written = ::write(fd, data, std::min<size_t>(size, size_t{1} << 30));
        if (written < 0) {
            if (errno == EINTR) continue;
            throw Error(fmt::format("{}: write failed: {}; the previous file is kept", path, errno_text(errno)));
        }
        data += written;
        size -= static_cast<size_t>(written);
    }
}

// Removes the temp file unless the rename over the destination happened.
struct TempFileGuard {
    std::string path;
    bool committed = false;
    ~TempFileGuard() {
        if (!committed && !path.empty()) ::unlink(path.c_str());
    }
};

}  // namespace

void write_file_atomic(const std::string& path, const std::vector<std::span<const uint8_t>>& parts) {
    const std::filesystem::path target(path);
    const std::string base = target.filename().string();
    if (base.empty() || base == "." || base == "..") throw Error(fmt::format("{}: not a file path", path));
    const std::filesystem::path folder = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");

    static std::atomic<uint64_t> counter{0};
    TempFileGuard temp;
    int fd = -1;
    for (int attempt = 0; fd < 0; ++attempt) {
        const auto ticks = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
        temp.path = (folder / fmt::format(".{}.tmp.{}.{}.{:x}", base, ::getpid(), counter++, ticks & 0xffffff)).string();
        fd = ::open(temp.path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0) {
            const int error = errno;
            temp.path.clear();
            if (error != EEXIST || attempt >= 100)
                throw Error(fmt::format("{}: cannot create temp file in {}: {}", path, folder.string(), errno_text(error)));
        }
    }
    FileDescriptor out(fd);
    for (const auto& part : parts) write_all(out.fd, part.data(), part.size(), path);
    if (::fsync(out.fd) != 0) throw Error(fmt::format("{}: fsync failed: {}; the previous file is kept", path, errno_text(errno)));
    if (out.close_now() != 0) throw Error(fmt::format("{}: close failed: {}; the previous file is kept", path, errno_text(errno)));
    if (::rename(temp.path.c_str(), path.c_str()) != 0)
        throw Error(fmt::format("{}: cannot rename {} over it: {}", path, temp.path, errno_text(errno)));
    temp.committed = true;

    // Makes the rename itself durable; some filesystems cannot fsync a folder, which is not an error.
    FileDescriptor dir(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir.fd < 0) throw Error(fmt::format("{}: cannot open folder {} to fsync: {}", path, folder.string(), errno_text(errno)));
    if (::fsync(dir.fd) != 0 && errno != EINVAL && errno != ENOTSUP)
        throw Error(fmt::format("{}: fsync of folder {} failed: {}", path, folder.string(), errno_text(errno)));
}

int remove_stale_temp_files(const std::string& folder) {
    std::error_code ec;
    std::filesystem::directory_iterator it(folder, ec);
    if (ec) return 0;
    int removed = 0;
    for (const auto& entry : it) {
        const std::string name = entry.path().filename().string();
        const size_t tag = name.rfind(".tmp.");
        if (name.size() < 2 || name[0] != '.' || tag == std::string::npos || tag == 0) continue;
        // ".<base>.tmp.<pid>.<counter>.<ticks>"
        const size_t pid_begin = tag + 5;
        const size_t pid_end = name.find('.', pid_begin);
        if (pid_end == std::string::npos || pid_end == pid_begin || pid_end - pid_begin > 9) continue;
        if (!std::all_of(name.begin() + static_cast<std::ptrdiff_t>(pid_begin), name.begin() + static_cast<std::ptrdiff_t>(pid_end),
                         [](char c) { return c >= '0' && c <= '9'; }))
            continue;
        const pid_t pid = static_cast<pid_t>(std::stol(name.substr(pid_begin, pid_end - pid_begin)));
        if (pid == ::getpid() || pid <= 0) continue;
        if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // alive (or not ours to judge)
        if (entry.is_regular_file(ec) && std::filesystem::remove(entry.path(), ec)) ++removed;
    }
    return removed;
}

void write_file_atomic(const std::string& path, std::string_view text) {
    write_file_atomic(path, {std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size())});
}

}  // namespace resunet
