#include "graph/atomic_file.h"

#include <fcntl.h>
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


void write_all(int fd, const uint8_t* data, size_t size, const std::string& temp_path) {
    while (size > 0) {
        ssize_t written = ::write(fd, data, std::min<size_t>(size, size_t{1} << 30));
        if (written < 0) {
            if (errno == EINTR) continue;
            throw Error(fmt::format("{}: write failed: {}", temp_path, errno_text(errno)));
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
    for (const auto& part : parts) write_all(out.fd, part.data(), part.size(), temp.path);
    if (::fsync(out.fd) != 0) throw Error(fmt::format("{}: fsync failed: {}", temp.path, errno_text(errno)));
    if (out.close_now() != 0) throw Error(fmt::format("{}: close failed: {}", temp.path, errno_text(errno)));
    if (::rename(temp.path.c_str(), path.c_str()) != 0)
        throw Error(fmt::format("{}: cannot rename {} over it: {}", path, temp.path, errno_text(errno)));
    temp.committed = true;

    // Makes the rename itself durable; some filesystems cannot fsync a folder, which is not an error.
    FileDescriptor dir(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir.fd < 0) throw Error(fmt::format("{}: cannot open folder {} to fsync: {}", path, folder.string(), errno_text(errno)));
    if (::fsync(dir.fd) != 0 && errno != EINVAL && errno != ENOTSUP)
        throw Error(fmt::format("{}: fsync of folder {} failed: {}", path, folder.string(), errno_text(errno)));
}

void write_file_atomic(const std::string& path, std::string_view text) {
    write_file_atomic(path, {std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size())});
}

}  // namespace resunet
