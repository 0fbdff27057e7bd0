// Helpers shared by the libFuzzer targets: a scratch folder per process and whole-file writes.
//
// Intended usage (in a target):
//   static const resunet::fuzz::ScratchDir scratch("fuzz_split");   // removed at exit
//   const std::string path = scratch.write("split.json", data, size);
//   try { resunet::load_split(path, dataset); } catch (const resunet::Error&) {}  // expected for bad input
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace resunet::fuzz {

// A folder under the system temp folder, unique to this process, removed by the destructor.
class ScratchDir {
public:
    explicit ScratchDir(const std::string& tag)
        : path_(std::filesystem::temp_directory_path() / (tag + "_" + std::to_string(::getpid()))) {
        std::filesystem::remove_all(path_);
        std::filesystem::create_directories(path_);
    }
    ~ScratchDir() {
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    ScratchDir(const ScratchDir&) = delete;
    ScratchDir& operator=(const ScratchDir&) = delete;

    const std::filesystem::path& path() const { return path_; }

    // Replaces `relative` (folders created as needed) with exactly `size` bytes; aborts on I/O errors,
    // which are the harness's problem, not a finding.
    std::string write(const std::string& relative, const uint8_t* data, size_t size) const {
        const std::filesystem::path file = path_ / relative;
        std::filesystem::create_directories(file.parent_path());
        std::FILE* out = std::fopen(file.c_str(), "wb");
        if (!out || (size > 0 && std::fwrite(data, 1, size, out) != size) || std::fclose(out) != 0) {
            std::perror(file.c_str());
            std::abort();
        }
        return file.string();
    }

private:
    std::filesystem::path path_;
};

// Aborts with a message: a broken invariant on an accepted input is a finding like a crash.
[[noreturn]] inline void invariant_failed(const char* what) {
    std::fprintf(stderr, "fuzz invariant failed: %s\n", what);
    std::abort();
}

#define RESUNET_FUZZ_CHECK(condition) \
    do {                              \
        if (!(condition)) ::resunet::fuzz::invariant_failed(#condition); \
    } while (0)

}  // namespace resunet::fuzz
