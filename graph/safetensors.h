// Safetensors weight files (https://github.com/huggingface/safetensors): load, save, check names and shapes.
//
// Intended usage:
//   resunet::TensorMap weights;
//   weights["e1.conv_a.weight"] = resunet::HostTensor::zeros({64, 3, 3, 3});
//   resunet::save_safetensors("weights.safetensors", weights, {{"arch", "resunet-34"}});
//
//   resunet::SafetensorsFile file = resunet::load_safetensors("weights.safetensors");  // throws resunet::Error
//   resunet::check_tensors(file.tensors, {{"e1.conv_a.weight", {64, 3, 3, 3}}}, "weights.safetensors");
//   const float* w = file.tensors.at("e1.conv_a.weight").f32();
//   std::string arch = file.metadata.at("arch");
//
// Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data section; tensor
// data_offsets are relative to the data section. Files are treated as untrusted: every length, offset
// and shape is checked against the file's real size before any tensor byte is copied.
//
// Checksum: save_safetensors adds metadata "resunet.checksum" = CRC-32 (IEEE 802.3 / zlib polynomial,
// as Python's zlib.crc32) of the whole data section, as 8 lowercase hex digits. load_safetensors
// verifies it when present; files without it (written by PyTorch or Python safetensors) load unchecked.
//
// Storage types: F32, I8, U8, I32 and I64 load as they are; F16 and BF16 (PyTorch half / bfloat16 exports,
// or SaveOptions below) load widened to F32 exactly, and `stored_as` says which tensors were narrowed.
//
// Finite values: every F32 tensor must hold finite numbers. Loading and saving refuse a NaN or Inf with a
// one-line error naming the tensor and its first bad element (a checksum taken after the damage, or a
// file written by another tool, would otherwise let it through; saving refuses so that a previous good
// file is never replaced by one that cannot be loaded).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "graph/tensor.h"

namespace resunet {

// Metadata key holding the data-section checksum written by save_safetensors.
inline constexpr const char* kSafetensorsChecksumKey = "resunet.checksum";

// Largest JSON header accepted, as in the reference implementation.
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

// A loaded weight file: tensors by name plus the free-form "__metadata__" strings (checksum included).
struct SafetensorsFile {
    TensorMap tensors;                            // name -> tensor (F32, I8, U8, I32, I64 only)
    std::map<std::string, std::string> metadata;  // "__metadata__" of the header; empty when absent
    std::map<std::string, std::string> stored_as;  // tensors stored as "F16" or "BF16" (now F32 in `tensors`)
};

// How save_safetensors stores F32 tensors. f16 and bf16 halve the file (a width-64 model: 130 -> 65 MB):
// bf16 keeps the float range with 8 significant bits; f16 keeps 11 bits within +-65504, and a tensor with a
// value beyond that range stays F32 (never Inf). Loading widens both back to F32 exactly.
enum class FloatStorage { f32, f16, bf16 };
const char* float_storage_name(FloatStorage storage);                  // "f32", "f16", "bf16"
std::optional<FloatStorage> parse_float_storage(std::string_view text);  // nullopt for anything else

struct SaveOptions {
    FloatStorage floats = FloatStorage::f32;
};

// Reads a .safetensors file; every check happens before any tensor byte is used. Throws resunet::Error
// with a one-line message naming the file and, where relevant, the tensor.
SafetensorsFile load_safetensors(const std::string& path);

// Parses a whole file held in memory (used by load_safetensors and fuzz targets); `what` names the
// source in errors. `data` may be null when `size` is 0.
SafetensorsFile parse_safetensors(const uint8_t* data, size_t size, const std::string& what);

// Writes atomically (temp file in the same folder, write, fsync, rename, fsync the folder), so a crash
// leaves either the old or the new file. Tensors are laid out contiguously, widest dtype first then by
// name, so Python safetensors loads the result; metadata gains "resunet.checksum" (overwriting any given).
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {}, const SaveOptions& options = {});

// Checks that `tensors` holds exactly the expected names with the expected shapes and dtype F32; throws
// resunet::Error naming the first missing, mis-shaped or unexpected tensor (expected vs actual shape)
// and how many other problems there are. Names ending in ".num_batches_tracked" (PyTorch BatchNorm
// bookkeeping) are tolerated when not expected.
void check_tensors(const TensorMap& tensors, const std::vector<std::pair<std::string, Dims>>& expected,
                   const std::string& what);

// CRC-32 (zlib polynomial) of `size` bytes, continuing from `crc` (0 to start); exposed for tests.
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0);

}  // namespace resunet
