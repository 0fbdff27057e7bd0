// SHA-256 (FIPS 180-4), self-contained, for checking data files against a sha256sum manifest.
//
// Intended usage:
//   std::string hex = resunet::sha256_file_hex("kvasir-seg/images/x.jpg");  // 64 lowercase hex digits
//   resunet::Sha256 hasher;                                               // or incrementally:
//   hasher.update(bytes.data(), bytes.size());
//   std::string digest = hasher.final_hex();
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace resunet {

// Incremental SHA-256; call update() any number of times, then final_hex() once.
class Sha256 {
public:
    Sha256();
    // Feeds size bytes at data.
    void update(const void* data, size_t size);
    // Pads, finishes and returns the digest as 64 lowercase hex digits.
    std::string final_hex();

private:
    void compress(const uint8_t* block);
    std::array<uint32_t, 8> state_;
    std::array<uint8_t, 64> buffer_{};
    size_t buffered_ = 0;
    uint64_t total_bytes_ = 0;
};

// Digest of an in-memory buffer, 64 lowercase hex digits.
std::string sha256_hex(const void* data, size_t size);
// Digest of a file's bytes; throws resunet::Error naming the file if it cannot be read.
std::string sha256_file_hex(const std::string& path);

}  // namespace resunet
