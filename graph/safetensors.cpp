#include "graph/safetensors.h"
#include "graph/input_file.h"

#include "graph/atomic_file.h"
#include "graph/half_float.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <span>
#include <array>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <set>
#include <string_view>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace resunet {
namespace {

using json = nlohmann::json;

// Far above any real weight tensor, low enough that element counts times 8 and any stride stay in int64.
constexpr uint64_t kMaxElements = uint64_t{1} << 40;
constexpr size_t kMaxRank = 32;
// A valid header nests two levels (file object -> entry object -> shape array); stop runaway nesting early.
constexpr int kMaxJsonDepth = 8;
constexpr size_t kMaxNameChars = 160;

// Hostile names may hold newlines or escapes; errors stay on one line and bounded in length.
std::string printable(std::string_view text, size_t max_chars = kMaxNameChars) {
    std::string out;
    for (unsigned char c : text) {
        if (out.size() >= max_chars) {
            out += "...";
            break;
        }
        if (c < 0x20 || c == 0x7f)
            out += fmt::format("\\x{:02x}", c);
        else
            out += static_cast<char>(c);
    }
    return out;
}

std::string tensor_context(const std::string& what, const std::string& name) {
    return fmt::format("{}: tensor '{}'", what, printable(name));
}

std::optional<DType> dtype_from_name(std::string_view name) {
    for (DType dtype : {DType::f32, DType::s8, DType::u8, DType::s32, DType::i64})
        if (name == dtype_name(dtype)) return dtype;
    return std::nullopt;
}

// 2-byte float storage of a tensor that is F32 in memory.
enum class Narrow { none, f16, bf16 };

const char* narrow_name(Narrow narrow) { return narrow == Narrow::f16 ? "F16" : "BF16"; }

std::optional<Narrow> narrow_from_name(std::string_view name) {
    if (name == "F16") return Narrow::f16;
    if (name == "BF16") return Narrow::bf16;
    return std::nullopt;
}

std::optional<uint64_t> as_u64(const json& value) {
    if (value.is_number_unsigned()) return value.get<uint64_t>();
    if (value.is_number_integer() && value.get<int64_t>() >= 0) return static_cast<uint64_t>(value.get<int64_t>());
    return std::nullopt;
}

// Element count of `shape`, or nullopt when the product of its non-zero dims exceeds kMaxElements
// (a zero dim must not hide an overflowing stride such as [0, 2^40, 2^40]).
std::optional<uint64_t> checked_elements(const Dims& shape) {
    uint64_t nonzero_product = 1;
    bool has_zero = false;
    for (int64_t d : shape) {
        if (d < 0) return std::nullopt;
        if (d == 0) {
            has_zero = true;
            continue;
        }
        if (__builtin_mul_overflow(nonzero_product, static_cast<uint64_t>(d), &nonzero_product)) return std::nullopt;
        if (nonzero_product > kMaxElements) return std::nullopt;
    }
    return has_zero ? 0 : nonzero_product;
}

uint64_t read_u64_le(const uint8_t* bytes) {
    uint64_t value = 0;
    for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
    return value;
}

struct Entry {
    std::string name;
    DType dtype = DType::f32;     // in memory
    Narrow narrow = Narrow::none;  // F16 or BF16 on disk (dtype is then F32)
    Dims shape;
    uint64_t begin = 0;
    uint64_t end = 0;
};

struct ParseAbort {
    std::string message;
};

json parse_header_json(const uint8_t* text, size_t size, const std::string& what) {
    std::set<std::string> top_level_keys;
    auto callback = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
        if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
            depth > kMaxJsonDepth)
            throw ParseAbort{fmt::format("{}: header JSON nests deeper than {} levels", what, kMaxJsonDepth)};
        if (event == json::parse_event_t::key && depth == 1 && parsed.is_string() &&
            !top_level_keys.insert(parsed.get<std::string>()).second)
            throw ParseAbort{fmt::format("{}: header names '{}' twice", what, printable(parsed.get<std::string>()))};
        return true;
    };
    // nlohmann's lexer stops at a NUL as if the input ended, which would hide whatever follows it.
    if (const void* nul = std::memchr(text, 0, size))
        throw Error(fmt::format("{}: header is not valid JSON: NUL byte at header offset {}", what,
                                static_cast<const uint8_t*>(nul) - text));
    try {
        return json::parse(text, text + size, callback);
    } catch (const ParseAbort& abort) {
        throw Error(abort.message);
    } catch (const json::exception& e) {
        throw Error(fmt::format("{}: header is not valid JSON: {}", what, printable(e.what(), 300)));
    }
}

Entry parse_entry(const std::string& name, const json& info, uint64_t data_size, const std::string& what) {
    const std::string context = tensor_context(what, name);
    if (!info.is_object())
        throw Error(fmt::format("{}: entry is a JSON {}, expected an object with dtype, shape, data_offsets", context,
                                info.type_name()));
    Entry entry;
    entry.name = name;

    auto dtype_it = info.find("dtype");
    if (dtype_it == info.end()) throw Error(fmt::format("{}: missing \"dtype\"", context));
    if (!dtype_it->is_string())
        throw Error(fmt::format("{}: \"dtype\" is a JSON {}, expected a string", context, dtype_it->type_name()));
    const std::string& dtype_text = dtype_it->get_ref<const std::string&>();
    std::optional<DType> dtype = dtype_from_name(dtype_text);
    if (std::optional<Narrow> narrow = narrow_from_name(dtype_text)) {
        entry.narrow = *narrow;
        dtype = DType::f32;
    }
    if (!dtype)
        throw Error(fmt::format("{}: unsupported dtype '{}' (supported: F32, F16, BF16, I8, U8, I32, I64)", context,
                                printable(dtype_text, 32)));
    entry.dtype = *dtype;

    auto shape_it = info.find("shape");
    if (shape_it == info.end()) throw Error(fmt::format("{}: missing \"shape\"", context));
    if (!shape_it->is_array())
        throw Error(fmt::format("{}: \"shape\" is a JSON {}, expected an array", context, shape_it->type_name()));
    if (shape_it->size() > kMaxRank)
        throw Error(fmt::format("{}: shape has {} dims, more than the limit of {}", context, shape_it->size(), kMaxRank));
    for (const json& dim : *shape_it) {
        std::optional<uint64_t> value = as_u64(dim);
        if (!value || *value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
            throw Error(fmt::format("{}: shape {} holds {}, expected non-negative integers", context,
                                    printable(shape_it->dump(), 200), printable(dim.dump(), 40)));
        entry.shape.push_back(static_cast<int64_t>(*value));
    }
    std::optional<uint64_t> elements = checked_elements(entry.shape);
    if (!elements)
        throw Error(fmt::format("{}: shape {} overflows the limit of {} elements", context,
                                dims_to_string(entry.shape), kMaxElements));
    const uint64_t needed_bytes = *elements * (entry.narrow == Narrow::none ? dtype_size(entry.dtype) : 2);

    auto offsets_it = info.find("data_offsets");
    if (offsets_it == info.end()) throw Error(fmt::format("{}: missing \"data_offsets\"", context));
    std::optional<uint64_t> begin, end;
    if (offsets_it->is_array() && offsets_it->size() == 2) {
        begin = as_u64((*offsets_it)[0]);
        end = as_u64((*offsets_it)[1]);
    }
    if (!begin || !end)
        throw Error(fmt::format("{}: data_offsets {} is not two non-negative integers", context,
                                printable(offsets_it->dump(), 80)));
    entry.begin = *begin;
    entry.end = *end;
    if (entry.begin > entry.end)
        throw Error(fmt::format("{}: data_offsets [{}, {}] begin after their end", context, entry.begin, entry.end));
    if (entry.end > data_size)
        throw Error(fmt::format("{}: data_offsets [{}, {}] exceed data section of {} bytes", context, entry.begin,
                                entry.end, data_size));
    if (entry.end - entry.begin != needed_bytes)
        throw Error(fmt::format("{}: data_offsets [{}, {}] span {} bytes but shape {} of {} needs {}", context,
                                entry.begin, entry.end, entry.end - entry.begin, dims_to_string(entry.shape),
                                entry.narrow == Narrow::none ? dtype_name(entry.dtype) : narrow_name(entry.narrow),
                                needed_bytes));
    return entry;
}

std::map<std::string, std::string> parse_metadata(const json& value, const std::string& what) {
    if (!value.is_object())
        throw Error(fmt::format("{}: \"__metadata__\" is a JSON {}, expected an object of strings", what,
                                value.type_name()));
    std::map<std::string, std::string> metadata;
    for (const auto& [key, item] : value.items()) {
        if (!item.is_string())
            throw Error(fmt::format("{}: \"__metadata__\" value for key '{}' is a JSON {}, expected a string", what,
                                    printable(key), item.type_name()));
        metadata.emplace(key, item.get<std::string>());
    }
    return metadata;
}

void check_no_overlap(std::vector<const Entry*> entries, const std::string& what) {
    // Zero-byte tensors occupy nothing, so they cannot overlap anything.
    std::erase_if(entries, [](const Entry* e) { return e->begin == e->end; });
    std::sort(entries.begin(), entries.end(), [](const Entry* a, const Entry* b) {
        if (a->begin != b->begin) return a->begin < b->begin;
        return a->end != b->end ? a->end < b->end : a->name < b->name;
    });
    for (size_t i = 1; i < entries.size(); ++i) {
        const Entry& previous = *entries[i - 1];
        const Entry& current = *entries[i];
        if (current.begin < previous.end)
            throw Error(fmt::format("{}: tensors '{}' [{}, {}] and '{}' [{}, {}] overlap", what, printable(previous.name),
                                    previous.begin, previous.end, printable(current.name), current.begin, current.end));
    }
}

std::optional<uint32_t> parse_hex32(const std::string& text) {
    if (text.size() != 8) return std::nullopt;
    uint32_t value = 0;
    for (char c : text) {
        uint32_t digit;
        if (c >= '0' && c <= '9')
            digit = static_cast<uint32_t>(c - '0');
        else if (c >= 'a' && c <= 'f')
            digit = static_cast<uint32_t>(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            digit = static_cast<uint32_t>(c - 'A' + 10);
        else
            return std::nullopt;
        value = (value << 4) | digit;
    }
    return value;
}

// Slicing-by-8 tables for the reflected polynomial 0xEDB88320 (zlib's CRC-32).
constexpr std::array<std::array<uint32_t, 256>, 8> make_crc_tables() {
    std::array<std::array<uint32_t, 256>, 8> tables{};
    for (uint32_t i = 0; i < 256; ++i) {
        uint32_t crc = i;
        for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        tables[0][i] = crc;
    }
    for (size_t k = 1; k < 8; ++k)
        for (size_t i = 0; i < 256; ++i) tables[k][i] = (tables[k - 1][i] >> 8) ^ tables[0][tables[k - 1][i] & 0xff];
    return tables;
}
constexpr auto kCrcTables = make_crc_tables();

uint32_t load_u32_le(const uint8_t* p) {
    return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}

std::string errno_text(int error) { return std::strerror(error); }

// The first NaN or Inf of an F32 tensor's little-endian bytes, as a flat index, or nullopt.
std::optional<uint64_t> first_non_finite_f32(const uint8_t* bytes, uint64_t count) {
    for (uint64_t i = 0; i < count; ++i) {
        const uint32_t bits = load_u32_le(bytes + 4 * i);
        if ((bits & 0x7f800000u) == 0x7f800000u) return i;  // exponent all ones: Inf or NaN
    }
    return std::nullopt;
}

// Weights must be numbers. A NaN or Inf that was there before the checksum was taken passes it, and
// ReLU would turn a NaN channel into zeros: a silently different result. Names the tensor, the first bad
// element (flat and per dimension) and what it holds.
void check_finite(const std::string& context, const Dims& shape, DType dtype, const uint8_t* bytes) {
    if (dtype != DType::f32) return;
    uint64_t count = 1;
    for (int64_t d : shape) count *= static_cast<uint64_t>(d);
    const std::optional<uint64_t> bad = first_non_finite_f32(bytes, count);
    if (!bad) return;
    std::vector<int64_t> index(shape.size(), 0);
    uint64_t rest = *bad;
    for (size_t k = shape.size(); k-- > 0;) {
        index[k] = static_cast<int64_t>(rest % static_cast<uint64_t>(shape[k]));
        rest /= static_cast<uint64_t>(shape[k]);
    }
    float value;
    std::memcpy(&value, bytes + 4 * *bad, sizeof(value));
    throw Error(fmt::format("{}: element {} (index [{}]) is {}; weights must be finite numbers", context, *bad,
                            fmt::join(index, ", "), std::isnan(value) ? "NaN" : (value > 0 ? "+Inf" : "-Inf")));
}

}  // namespace

uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc) {
    crc = ~crc;
    while (size >= 8) {
        uint32_t low = load_u32_le(data) ^ crc;
        uint32_t high = load_u32_le(data + 4);
        crc = kCrcTables[7][low & 0xff] ^ kCrcTables[6][(low >> 8) & 0xff] ^ kCrcTables[5][(low >> 16) & 0xff] ^
              kCrcTables[4][low >> 24] ^ kCrcTables[3][high & 0xff] ^ kCrcTables[2][(high >> 8) & 0xff] ^
              kCrcTables[1][(high >> 16) & 0xff] ^ kCrcTables[0][high >> 24];
        data += 8;
        size -= 8;
    }
    while (size-- > 0) crc = (crc >> 8) ^ kCrcTables[0][(crc ^ *data++) & 0xff];
    return ~crc;
}

namespace {

// The parsed header: every entry checked against the data section's size, no overlaps, metadata.
struct Header {
    std::vector<Entry> entries;
    std::map<std::string, std::string> metadata;
};

// Checks the 8-byte length prefix against the file's size; returns the header's length.
uint64_t checked_header_size(const uint8_t* prefix, size_t size, const std::string& what) {
    if (size < 8)
        throw Error(fmt::format("{}: file is {} bytes, too small to hold the 8-byte header length", what, size));
    const uint64_t header_size = read_u64_le(prefix);
    if (header_size > size - 8)
        throw Error(fmt::format("{}: header length {} exceeds the {} bytes after the length prefix", what, header_size,
                                size - 8));
    if (header_size > kSafetensorsMaxHeaderBytes)
        throw Error(fmt::format("{}: header length {} exceeds the limit of {} bytes", what, header_size,
                                kSafetensorsMaxHeaderBytes));
    return header_size;
}

Header parse_header(const uint8_t* text, size_t header_size, uint64_t data_size, const std::string& what) {
    json header = parse_header_json(text, header_size, what);
    if (!header.is_object())
        throw Error(fmt::format("{}: header is a JSON {}, expected an object", what, header.type_name()));
    Header h;
    h.entries.reserve(header.size());
    for (const auto& [name, info] : header.items()) {
        if (name == "__metadata__")
            h.metadata = parse_metadata(info, what);
        else
            h.entries.push_back(parse_entry(name, info, data_size, what));
    }
    std::vector<const Entry*> entry_pointers;
    for (const Entry& entry : h.entries) entry_pointers.push_back(&entry);
    check_no_overlap(std::move(entry_pointers), what);
    return h;
}

// The checksum the metadata states, or nullopt when it states none.
std::optional<uint32_t> stated_checksum(const Header& h, const std::string& what) {
    auto it = h.metadata.find(kSafetensorsChecksumKey);
    if (it == h.metadata.end()) return std::nullopt;
    std::optional<uint32_t> expected = parse_hex32(it->second);
    if (!expected)
        throw Error(fmt::format("{}: malformed {} '{}', expected 8 hex digits", what, kSafetensorsChecksumKey,
                                printable(it->second, 40)));
    return expected;
}

void check_checksum(uint32_t expected, uint32_t actual, uint64_t data_size, const std::string& what) {
    if (actual != expected)
        throw Error(fmt::format("{}: checksum mismatch: header says CRC-32 {:08x}, data section ({} bytes) has "
                                "{:08x}; the file is corrupt or was modified",
                                what, expected, data_size, actual));
}

// A narrowed entry's 2-byte values sit in the first half of its F32 tensor's bytes: widens them in place,
// last element first, so no value is overwritten before it is read (element i's float goes to bytes
// [4i, 4i+4), past every 2-byte value j < i).
void widen_in_place(HostTensor& tensor, Narrow narrow) {
    const size_t count = tensor.bytes.size() / 4;
    uint8_t* bytes = tensor.bytes.data();
    for (size_t i = count; i-- > 0;) {
        const uint16_t raw = static_cast<uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));
        const float value = narrow == Narrow::f16 ? f16_bits_to_f32(raw) : bf16_bits_to_f32(raw);
        std::memcpy(bytes + 4 * i, &value, sizeof(value));
    }
}

// Empty tensors of the entries' shapes and dtypes, their bytes to be filled.
TensorMap allocate_tensors(const Header& h, const std::string& what) {
    TensorMap tensors;
    for (const Entry& entry : h.entries) {
        HostTensor tensor;
        tensor.shape = entry.shape;
        tensor.dtype = entry.dtype;
        try {
            tensor.bytes.resize((entry.end - entry.begin) * (entry.narrow == Narrow::none ? 1 : 2));
        } catch (const std::bad_alloc&) {
            throw Error(fmt::format("{}: out of memory allocating {} bytes", tensor_context(what, entry.name),
                                    entry.end - entry.begin));
        }
        tensors.emplace(entry.name, std::move(tensor));
    }
    return tensors;
}

}  // namespace

SafetensorsFile parse_safetensors(const uint8_t* data, size_t size, const std::string& what) {
    const uint64_t header_size = checked_header_size(data, size, what);
    const uint8_t* data_section = data + 8 + header_size;
    const uint64_t data_size = size - 8 - header_size;
    Header h = parse_header(data + 8, static_cast<size_t>(header_size), data_size, what);
    if (std::optional<uint32_t> expected = stated_checksum(h, what))
        check_checksum(*expected, crc32(data_section, static_cast<size_t>(data_size)), data_size, what);
    for (const Entry& entry : h.entries)
        if (entry.narrow == Narrow::none)
            check_finite(tensor_context(what, entry.name), entry.shape, entry.dtype, data_section + entry.begin);
    SafetensorsFile file;
    file.metadata = std::move(h.metadata);
    file.tensors = allocate_tensors(h, what);
    for (const Entry& entry : h.entries) {
        HostTensor& tensor = file.tensors.at(entry.name);
        if (entry.end > entry.begin) std::memcpy(tensor.bytes.data(), data_section + entry.begin, entry.end - entry.begin);
        if (entry.narrow != Narrow::none) {
            widen_in_place(tensor, entry.narrow);
            check_finite(tensor_context(what, entry.name), entry.shape, entry.dtype, tensor.bytes.data());
            file.stored_as[entry.name] = narrow_name(entry.narrow);
        }
    }
    return file;
}

namespace {

// Reads exactly `count` bytes at the file's current position.
void read_exact(int fd, uint8_t* into, size_t count, size_t done_before, size_t size, const std::string& path) {
    size_t done = 0;
    while (done < count) {
        ssize_t got = ::read(fd, into + done, std::min<size_t>(count - done, size_t{1} << 30));
        if (got < 0) {
            if (errno == EINTR) continue;
            throw Error(fmt::format("{}: read failed: {}", path, errno_text(errno)));
        }
        if (got == 0)
            throw Error(fmt::format("{}: file shrank while reading ({} of {} bytes)", path, done_before + done, size));
        done += static_cast<size_t>(got);
    }
}

}  // namespace

// Streams the file: the header first, then the data section in chunks, copied straight into the tensors
// while its checksum is computed, so the peak memory is the tensors plus one chunk (not the whole file
// twice). Read rather than mmap: a file truncated by someone else mid-load then gives an error, not SIGBUS.
SafetensorsFile load_safetensors(const std::string& path) {
    FileDescriptor file = open_input_file(path, "weights file");
    struct stat info {};
    if (::fstat(file.fd, &info) != 0) throw Error(fmt::format("{}: cannot stat: {}", path, errno_text(errno)));
    if (!S_ISREG(info.st_mode)) throw Error(fmt::format("{}: not a regular file", path));
    const size_t size = static_cast<size_t>(info.st_size);

    std::array<uint8_t, 8> prefix{};
    if (size >= 8) read_exact(file.fd, prefix.data(), 8, 0, size, path);
    const uint64_t header_size = checked_header_size(prefix.data(), size, path);
    std::vector<uint8_t> header_text;
    try {
        header_text.resize(static_cast<size_t>(header_size));
    } catch (const std::bad_alloc&) {
        throw Error(fmt::format("{}: out of memory reading a header of {} bytes", path, header_size));
    }
    read_exact(file.fd, header_text.data(), header_text.size(), 8, size, path);
    const uint64_t data_size = size - 8 - header_size;
    Header h = parse_header(header_text.data(), header_text.size(), data_size, path);
    header_text = {};
    const std::optional<uint32_t> expected = stated_checksum(h, path);

    SafetensorsFile loaded;
    loaded.metadata = std::move(h.metadata);
    loaded.tensors = allocate_tensors(h, path);
    // Entries by offset: each chunk is copied into the tensors it overlaps.
    std::vector<std::pair<const Entry*, HostTensor*>> order;
    for (const Entry& entry : h.entries)
        if (entry.end > entry.begin) order.emplace_back(&entry, &loaded.tensors.at(entry.name));
    std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first->begin < b.first->begin; });
    constexpr size_t kChunk = size_t{4} << 20;
    std::vector<uint8_t> chunk(static_cast<size_t>(std::min<uint64_t>(data_size, kChunk)));
    uint32_t crc = 0;
    size_t next = 0;  // first entry that may still overlap
    for (uint64_t at = 0; at < data_size;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(data_size - at, kChunk));
        read_exact(file.fd, chunk.data(), n, static_cast<size_t>(8 + header_size + at), size, path);
        crc = crc32(chunk.data(), n, crc);
        const uint64_t chunk_end = at + n;
        for (size_t i = next; i < order.size() && order[i].first->begin < chunk_end; ++i) {
            const Entry& e = *order[i].first;
            const uint64_t from = std::max(e.begin, at), to = std::min(e.end, chunk_end);
            if (from < to) std::memcpy(order[i].second->bytes.data() + (from - e.begin), chunk.data() + (from - at), to - from);
            if (e.end <= chunk_end && i == next) ++next;
        }
        at = chunk_end;
    }
    if (expected) check_checksum(*expected, crc, data_size, path);
    for (const auto& [entry, tensor] : order) {
        if (entry->narrow != Narrow::none) {
            widen_in_place(*tensor, entry->narrow);
            loaded.stored_as[entry->name] = narrow_name(entry->narrow);
        }
        check_finite(tensor_context(path, entry->name), entry->shape, entry->dtype, tensor->bytes.data());
    }
    return loaded;
}

const char* float_storage_name(FloatStorage storage) {
    switch (storage) {
        case FloatStorage::f32: return "f32";
        case FloatStorage::f16: return "f16";
        case FloatStorage::bf16: return "bf16";
    }
    return "?";
}

std::optional<FloatStorage> parse_float_storage(std::string_view text) {
    for (FloatStorage storage : {FloatStorage::f32, FloatStorage::f16, FloatStorage::bf16})
        if (text == float_storage_name(storage)) return storage;
    return std::nullopt;
}

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata, const SaveOptions& options) {
    // What goes on disk per tensor: its own bytes, or its F32 values narrowed to 2 bytes.
    struct Stored {
        const std::string* name;
        const HostTensor* tensor;
        const char* dtype;
        std::span<const uint8_t> bytes;
    };
    std::vector<std::vector<uint8_t>> narrowed;  // owns the 2-byte copies
    narrowed.reserve(tensors.size());
    std::vector<Stored> order;
    for (const auto& [name, tensor] : tensors) {
        if (name == "__metadata__") throw Error(fmt::format("{}: tensor name '__metadata__' is reserved", path));
        std::optional<uint64_t> elements = checked_elements(tensor.shape);
        if (!elements)
            throw Error(fmt::format("{}: shape {} has a negative dim or too many elements", tensor_context(path, name),
                                    dims_to_string(tensor.shape)));
        const uint64_t needed = *elements * dtype_size(tensor.dtype);
        if (tensor.bytes.size() != needed)
            throw Error(fmt::format("{}: holds {} bytes but shape {} of {} needs {}", tensor_context(path, name),
                                    tensor.bytes.size(), dims_to_string(tensor.shape), dtype_name(tensor.dtype),
                                    needed));
        check_finite(tensor_context(path, name), tensor.shape, tensor.dtype, tensor.bytes.data());
        Stored stored{&name, &tensor, dtype_name(tensor.dtype), {tensor.bytes.data(), tensor.bytes.size()}};
        const size_t count = tensor.bytes.size() / 4;
        const float* values = tensor.dtype == DType::f32 ? reinterpret_cast<const float*>(tensor.bytes.data()) : nullptr;
        const bool fits = options.floats != FloatStorage::f16 || !values ||
                          std::all_of(values, values + count, [](float v) { return f16_fits(v); });
        if (values && options.floats != FloatStorage::f32 && fits) {
            std::vector<uint8_t>& out = narrowed.emplace_back(2 * count);
            for (size_t i = 0; i < count; ++i) {
                const uint16_t bits = options.floats == FloatStorage::f16 ? f32_to_f16_bits(values[i])
                                                                          : f32_to_bf16_bits(values[i]);
                out[2 * i] = static_cast<uint8_t>(bits);
                out[2 * i + 1] = static_cast<uint8_t>(bits >> 8);
            }
            stored.dtype = options.floats == FloatStorage::f16 ? "F16" : "BF16";
            stored.bytes = {out.data(), out.size()};
        }
        order.push_back(stored);
    }
    // Widest element first keeps every tensor aligned to its element size without padding between tensors
    // (Python safetensors rejects gaps); names break ties because `tensors` is already sorted by name.
    auto element_size = [](const Stored& s) {
        return s.bytes.data() == s.tensor->bytes.data() ? dtype_size(s.tensor->dtype) : size_t{2};
    };
    std::stable_sort(order.begin(), order.end(),
                     [&](const Stored& a, const Stored& b) { return element_size(a) > element_size(b); });

    json header = json::object();
    uint64_t offset = 0;
    uint32_t crc = 0;
    for (const Stored& s : order) {
        const uint64_t end = offset + s.bytes.size();
        header[*s.name] = {{"dtype", s.dtype}, {"shape", s.tensor->shape}, {"data_offsets", {offset, end}}};
        crc = crc32(s.bytes.data(), s.bytes.size(), crc);
        offset = end;
    }
    json meta = json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    meta[kSafetensorsChecksumKey] = fmt::format("{:08x}", crc);
    header["__metadata__"] = std::move(meta);

    std::string header_text;
    try {
        header_text = header.dump();
    } catch (const json::exception& e) {
        throw Error(fmt::format("{}: cannot encode header (names and metadata must be UTF-8): {}", path,
                                printable(e.what(), 300)));
    }
    // Pad with spaces so the data section starts 8-aligned, as the reference implementation does.
    header_text.append((8 - (8 + header_text.size()) % 8) % 8, ' ');
    if (header_text.size() > kSafetensorsMaxHeaderBytes)
        throw Error(fmt::format("{}: header of {} bytes exceeds the limit of {} bytes ({} tensors)", path,
                                header_text.size(), kSafetensorsMaxHeaderBytes, tensors.size()));
    std::array<uint8_t, 8> prefix{};
    for (size_t i = 0; i < 8; ++i) prefix[i] = static_cast<uint8_t>(uint64_t{header_text.size()} >> (8 * i));

    std::vector<std::span<const uint8_t>> parts = {
        {prefix.data(), prefix.size()},
        {reinterpret_cast<const uint8_t*>(header_text.data()), header_text.size()}};
    for (const Stored& s : order) parts.push_back(s.bytes);
    write_file_atomic(path, parts);
}

void check_tensors(const TensorMap& tensors, const std::vector<std::pair<std::string, Dims>>& expected,
                   const std::string& what) {
    std::vector<std::string> problems;
    std::set<std::string_view> expected_names;
    for (const auto& [name, shape] : expected) {
        expected_names.insert(name);
        auto it = tensors.find(name);
        if (it == tensors.end()) {
            problems.push_back(fmt::format("missing tensor '{}' (expected shape {})", printable(name),
                                           dims_to_string(shape)));
            continue;
        }
        const HostTensor& tensor = it->second;
        if (tensor.dtype != DType::f32)
            problems.push_back(fmt::format("tensor '{}': dtype {}, expected F32", printable(name), dtype_name(tensor.dtype)));
        else if (tensor.shape != shape)
            problems.push_back(fmt::format("tensor '{}': shape {}, expected {}", printable(name),
                                           dims_to_string(tensor.shape), dims_to_string(shape)));
    }
    constexpr std::string_view kTolerated = ".num_batches_tracked";
    for (const auto& [name, tensor] : tensors)
        if (!expected_names.contains(name) && !std::string_view(name).ends_with(kTolerated))
            problems.push_back(fmt::format("unexpected tensor '{}' with shape {}", printable(name),
                                           dims_to_string(tensor.shape)));
    if (problems.empty()) return;
    if (problems.size() == 1) throw Error(fmt::format("{}: {}", what, problems[0]));
    throw Error(fmt::format("{}: {} (and {} more problems)", what, problems[0], problems.size() - 1));
}

}  // namespace resunet
