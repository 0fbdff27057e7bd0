#include "graph/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
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

// The part of a temp name that stands for the target's: the name itself when short, else its start and a
// hash of the whole, so that ".<part>.tmp.<pid>.<counter>.<ticks>" stays under NAME_MAX (255 bytes) for any
// legal target name.
std::string temp_stem(const std::string& base) {
    constexpr size_t kKept = 120;
    if (base.size() <= kKept) return base;
    uint64_t hash = 1469598103934665603ull;  // FNV-1a
    for (unsigned char c : base) hash = (hash ^ c) * 1099511628211ull;
    return fmt::format("{}~{:016x}", base.substr(0, kKept - 17), hash);
}

// Creates a new empty temp file beside `path` (O_EXCL); returns its descriptor and sets `temp`.
int create_temp_beside(const std::string& path, std::string& temp) {
    const std::filesystem::path target(path);
    const std::string base = target.filename().string();
    if (base.empty() || base == "." || base == "..") throw Error(fmt::format("{}: not a file path", path));
    const std::filesystem::path folder = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
    static std::atomic<uint64_t> counter{0};
    for (int attempt = 0;; ++attempt) {
        const auto ticks = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
        temp = (folder / fmt::format(".{}.tmp.{}.{}.{:x}", temp_stem(base), ::getpid(), counter++, ticks & 0xffffff)).string();
        const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) return fd;
        const int error = errno;
        temp.clear();
        if (error != EEXIST || attempt >= 100)
            throw Error(fmt::format("{}: cannot create temp file in {}: {}", path, folder.string(), errno_text(error)));
    }
}

void fsync_folder_of(const std::string& path) {
    const std::filesystem::path target(path);
    const std::filesystem::path folder = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
    // Makes the rename itself durable; some filesystems cannot fsync a folder, which is not an error.
    FileDescriptor dir(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dir.fd < 0) throw Error(fmt::format("{}: cannot open folder {} to fsync: {}", path, folder.string(), errno_text(errno)));
    if (::fsync(dir.fd) != 0 && errno != EINVAL && errno != ENOTSUP)
        throw Error(fmt::format("{}: fsync of folder {} failed: {}", path, folder.string(), errno_text(errno)));
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
    TempFileGuard temp;
    FileDescriptor out(create_temp_beside(path, temp.path));
    for (const auto& part : parts) write_all(out.fd, part.data(), part.size(), path);
    if (::fsync(out.fd) != 0) throw Error(fmt::format("{}: fsync failed: {}; the previous file is kept", path, errno_text(errno)));
    if (out.close_now() != 0) throw Error(fmt::format("{}: close failed: {}; the previous file is kept", path, errno_text(errno)));
    if (::rename(temp.path.c_str(), path.c_str()) != 0)
        throw Error(fmt::format("{}: cannot rename {} over it: {}", path, temp.path, errno_text(errno)));
    temp.committed = true;
    fsync_folder_of(path);
}

std::string new_temp_file_beside(const std::string& path) {
    std::string temp;
    FileDescriptor fd(create_temp_beside(path, temp));
    return temp;
}

// ---- AtomicFileSet ----

namespace {
std::atomic<int> g_held_signal{0};
void hold_signal(int signal_number) { g_held_signal.store(signal_number); }
}  // namespace

AtomicFileSet::~AtomicFileSet() {
    if (committed_) return;
    for (const auto& [target, temp] : files_) ::unlink(temp.c_str());
}

std::string AtomicFileSet::add(const std::string& target) {
    files_.emplace_back(target, new_temp_file_beside(target));
    return files_.back().second;
}

void AtomicFileSet::commit() {
    for (const auto& [target, temp] : files_) {  // the writers closed them; their bytes must be on disk first
        FileDescriptor fd(::open(temp.c_str(), O_RDONLY | O_CLOEXEC));
        if (fd.fd < 0 || ::fsync(fd.fd) != 0)
            throw Error(fmt::format("{}: cannot sync {}: {}; nothing was replaced", target, temp, errno_text(errno)));
    }
    // SIGINT, SIGTERM and SIGHUP are held while the renames run (process-wide handlers, whichever thread gets
    // them), then take effect: the files appear all together or not at all.
    const int signals[] = {SIGINT, SIGTERM, SIGHUP};
    struct sigaction old_actions[3];
    struct sigaction hold {};
    hold.sa_handler = hold_signal;
    sigemptyset(&hold.sa_mask);
    g_held_signal = 0;
    for (int i = 0; i < 3; ++i) {
        sigaction(signals[i], nullptr, &old_actions[i]);
        if (old_actions[i].sa_handler != SIG_IGN) sigaction(signals[i], &hold, nullptr);
    }
    std::string failure;
    size_t renamed = 0;
    for (; renamed < files_.size(); ++renamed) {
        const auto& [target, temp] = files_[renamed];
        if (::rename(temp.c_str(), target.c_str()) != 0) {
            failure = fmt::format("{}: cannot rename {} over it: {}", target, temp, errno_text(errno));
            break;
        }
        // Test hook: a signal between two renames (tests/test_hostile_inputs_2.cpp).
        if (renamed == 0 && std::getenv("RESUNET_TEST_SIGNAL_DURING_COMMIT")) ::raise(SIGTERM);
    }
    if (!failure.empty())  // undo: a partial set is worse than none
        for (size_t i = 0; i < renamed; ++i) ::unlink(files_[i].first.c_str());
    committed_ = failure.empty();
    for (int i = 0; i < 3; ++i) sigaction(signals[i], &old_actions[i], nullptr);
    if (const int held = g_held_signal.exchange(0); held != 0) ::raise(held);
    if (!failure.empty()) throw Error(failure);
    for (const auto& [target, temp] : files_) fsync_folder_of(target);
}

int remove_stale_temp_files(const std::string& folder) {
    std::error_code ec;
    std::filesystem::directory_iterator it(folder, ec);
    if (ec) return 0;
    int removed = 0;
    for (const auto& entry : it) {
        const std::string name = entry.path().filename().string();
        // ".<base>.tmp.<pid>.<counter>.<ticks>", or ".<base>.partial.<pid>" as predict's streamed files were named
        size_t tag = name.rfind(".tmp.");
        size_t pid_begin = tag + 5;
        if (tag == std::string::npos) {
            tag = name.rfind(".partial.");
            pid_begin = tag + 9;
        }
        if (name.size() < 2 || name[0] != '.' || tag == std::string::npos || tag == 0) continue;
        size_t pid_end = name.find('.', pid_begin);
        if (pid_end == std::string::npos && name.compare(tag, 9, ".partial.") == 0) pid_end = name.size();
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
