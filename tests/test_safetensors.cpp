// Safetensors I/O: round trips, the exact byte layout, atomic saves, a hostile corpus built here, and check_tensors.
#include "graph/safetensors.h"
#include "graph/half_float.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using resunet::DType;
using resunet::Error;
using resunet::HostTensor;
using resunet::TensorMap;

using Bytes = std::vector<uint8_t>;

// A file image: 8-byte little-endian `header_length` (the header's real size unless given), header, data.
Bytes make_file(const std::string& header, const Bytes& data = {}, std::optional<uint64_t> header_length = {}) {
    // Sized once and filled by memcpy: GCC 12 -O3 warns falsely (-Warray-bounds) on growing inserts here.
    Bytes bytes(8 + header.size() + data.size());
    const uint64_t length = header_length.value_or(header.size());
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(length >> (8 * i));
    if (!header.empty()) std::memcpy(bytes.data() + 8, header.data(), header.size());
    if (!data.empty()) std::memcpy(bytes.data() + 8 + header.size(), data.data(), data.size());
    return bytes;
}

Bytes read_bytes(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& path, const Bytes& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

uint64_t header_length_of(const Bytes& file) {
    uint64_t length = 0;
    for (int i = 7; i >= 0; --i) length = (length << 8) | file[i];
    return length;
}

// Runs `action`, expecting a one-line resunet::Error whose message contains `keyword`; anything else fails.
void expect_error(const std::function<void()>& action, const std::string& keyword) {
    try {
        action();
        ADD_FAILURE() << "no resunet::Error thrown; expected one mentioning '" << keyword << "'";
    } catch (const Error& e) {
        const std::string message = e.what();
        EXPECT_NE(message.find(keyword), std::string::npos) << "message: " << message;
        EXPECT_EQ(message.find('\n'), std::string::npos) << "message spans lines: " << message;
    } catch (const std::exception& e) {
        ADD_FAILURE() << "wrong exception type (" << e.what() << "); expected resunet::Error";
    }
}

void expect_parse_error(const Bytes& file, const std::string& keyword) {
    expect_error([&] { resunet::parse_safetensors(file.data(), file.size(), "hostile.safetensors"); }, keyword);
}

// A one-tensor header {"t": {dtype, shape, data_offsets}} with the given JSON fragments.
std::string one_tensor(const std::string& dtype, const std::string& shape, const std::string& offsets,
                       const std::string& name = "t") {
    return fmt::format(R"({{"{}":{{"dtype":{},"shape":{},"data_offsets":{}}}}})", name, dtype, shape, offsets);
}

// Random bytes; for F32, any NaN or Inf bit pattern (exponent all ones) is made finite by clearing the
// exponent's top bit, since weight files must hold finite numbers.
HostTensor random_tensor(const resunet::Dims& shape, DType dtype, std::mt19937& rng) {
    HostTensor tensor = HostTensor::zeros(shape, dtype);
    for (uint8_t& byte : tensor.bytes) byte = static_cast<uint8_t>(rng());
    if (dtype == DType::f32)
        for (size_t i = 0; i + 3 < tensor.bytes.size(); i += 4)
            if ((tensor.bytes[i + 3] & 0x7f) == 0x7f && (tensor.bytes[i + 2] & 0x80)) tensor.bytes[i + 3] &= 0xbf;
    return tensor;
}

uint32_t bitwise_crc32(const uint8_t* data, size_t size) {
    uint32_t crc = 0xffffffffu;
    for (size_t i = 0; i < size; ++i) {
        crc ^= data[i];
        for (int bit = 0; bit < 8; ++bit) crc = (crc & 1u) ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
    }
    return ~crc;
}

class SafetensorsTest : public ::testing::Test {
protected:
    void SetUp() override {
        const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
        dir_ = fs::temp_directory_path() / fmt::format("resunet_test_safetensors_{}_{}", ::getpid(), info->name());
        fs::remove_all(dir_);
        fs::create_directories(dir_);
    }
    void TearDown() override { fs::remove_all(dir_); }

    std::vector<std::string> folder_entries() const {
        std::vector<std::string> names;
        for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
        std::sort(names.begin(), names.end());
        return names;
    }

    fs::path dir_;
};

TEST(Crc32, MatchesZlibAndBitwiseReference) {
    const std::string check = "123456789";
    EXPECT_EQ(resunet::crc32(reinterpret_cast<const uint8_t*>(check.data()), check.size()), 0xCBF43926u);
    EXPECT_EQ(resunet::crc32(nullptr, 0), 0u);

    std::mt19937 rng(7);
    Bytes data(300);
    for (uint8_t& byte : data) byte = static_cast<uint8_t>(rng());
    for (size_t start = 0; start < 9; ++start)
        for (size_t size = 0; start + size <= data.size(); size += 1 + size / 3) {
            const uint32_t whole = resunet::crc32(data.data() + start, size);
            EXPECT_EQ(whole, bitwise_crc32(data.data() + start, size)) << "start " << start << " size " << size;
            const size_t half = size / 2;
            EXPECT_EQ(resunet::crc32(data.data() + start + half, size - half, resunet::crc32(data.data() + start, half)),
                      whole);
        }
}

TEST_F(SafetensorsTest, RoundTripsDtypesAndShapes) {
    std::mt19937 rng(42);
    TensorMap tensors;
    tensors["e1.conv_a.weight"] = random_tensor({4, 3, 3, 3}, DType::f32, rng);
    tensors["e1.bn_a.running_mean"] = random_tensor({4}, DType::f32, rng);
    tensors["q.weight_s8"] = random_tensor({5, 7}, DType::s8, rng);
    tensors["mask_u8"] = random_tensor({3, 1, 2}, DType::u8, rng);
    tensors["index_s32"] = random_tensor({2, 2}, DType::s32, rng);
    tensors["e1.bn_a.num_batches_tracked"] = random_tensor({}, DType::i64, rng);
    tensors["scale"] = random_tensor({}, DType::f32, rng);
    tensors["empty_f32"] = random_tensor({0, 3}, DType::f32, rng);
    tensors["empty_u8"] = random_tensor({0}, DType::u8, rng);
    tensors["odd_u8"] = random_tensor({3}, DType::u8, rng);
    tensors["after_odd_i64"] = random_tensor({3}, DType::i64, rng);
    const std::map<std::string, std::string> metadata = {{"arch", "resunet"}, {"note", "gr\xC3\xBC\xC3\x9F \"quoted\"\n"}};

    const fs::path path = dir_ / "weights.safetensors";
    resunet::save_safetensors(path.string(), tensors, metadata);
    const resunet::SafetensorsFile file = resunet::load_safetensors(path.string());

    ASSERT_EQ(file.tensors.size(), tensors.size());
    for (const auto& [name, tensor] : tensors) {
        SCOPED_TRACE(name);
        const HostTensor& loaded = file.tensors.at(name);
        EXPECT_EQ(loaded.shape, tensor.shape);
        EXPECT_EQ(loaded.dtype, tensor.dtype);
        EXPECT_EQ(loaded.bytes, tensor.bytes);
    }
    EXPECT_EQ(file.tensors.at("scale").num_elements(), 1);
    EXPECT_EQ(file.tensors.at("empty_f32").byte_size(), 0u);
    EXPECT_EQ(file.metadata.at("arch"), "resunet");
    EXPECT_EQ(file.metadata.at("note"), metadata.at("note"));
    EXPECT_EQ(file.metadata.at(resunet::kSafetensorsChecksumKey).size(), 8u);

    // Layout as Python safetensors expects: data section 8-aligned, tensors contiguous (no gaps, ending at
    // the end of the file) and each begin aligned to its element size.
    const Bytes bytes = read_bytes(path);
    const uint64_t header_length = header_length_of(bytes);
    EXPECT_EQ((8 + header_length) % 8, 0u);
    const json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_length));
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (const auto& [name, info] : header.items()) {
        if (name == "__metadata__") continue;
        const uint64_t begin = info["data_offsets"][0], end = info["data_offsets"][1];
        const size_t element = resunet::dtype_size(tensors.at(name).dtype);
        EXPECT_EQ(begin % element, 0u) << name;
        spans.emplace_back(begin, end);
    }
    std::sort(spans.begin(), spans.end());
    uint64_t cursor = 0;
    for (const auto& [begin, end] : spans) {
        EXPECT_EQ(begin, cursor);
        cursor = end;
    }
    EXPECT_EQ(8 + header_length + cursor, bytes.size());
}

TEST_F(SafetensorsTest, WritesExactByteLayoutOfTinyFile) {
    TensorMap tensors;
    tensors["a"] = HostTensor::zeros({2});
    tensors["a"].f32()[0] = 1.0f;
    tensors["a"].f32()[1] = 2.0f;
    const fs::path path = dir_ / "tiny.safetensors";
    resunet::save_safetensors(path.string(), tensors);

    // zlib.crc32(struct.pack('<2f', 1.0, 2.0)) == 0x2e3fa576; 101 bytes of JSON plus 3 spaces of padding.
    const std::string json_text =
        R"({"__metadata__":{"resunet.checksum":"2e3fa576"},"a":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}})";
    ASSERT_EQ(json_text.size(), 101u);
    Bytes expected = {0x68, 0, 0, 0, 0, 0, 0, 0};
    expected.insert(expected.end(), json_text.begin(), json_text.end());
    expected.insert(expected.end(), {' ', ' ', ' '});
    expected.insert(expected.end(), {0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40});
    const Bytes bytes = read_bytes(path);
    EXPECT_EQ(bytes, expected);

    ASSERT_GE(bytes.size(), 8u);
    const uint64_t header_length = header_length_of(bytes);
    ASSERT_EQ(header_length, 104u);
    const json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + 104);
    EXPECT_EQ(header["a"]["dtype"], "F32");
    EXPECT_EQ(header["a"]["shape"], json::array({2}));
    EXPECT_EQ(header["a"]["data_offsets"], json::array({0, 8}));
    EXPECT_EQ(header["__metadata__"]["resunet.checksum"], "2e3fa576");
}

TEST(Safetensors, LoadsFilesWrittenElsewhere) {
    // The example from the Rust crate's documentation: unpadded 60-byte header, no metadata, I32 zeros.
    const Bytes rust = make_file(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})", Bytes(16, 0));
    const resunet::SafetensorsFile file = resunet::parse_safetensors(rust.data(), rust.size(), "rust.safetensors");
    ASSERT_EQ(file.tensors.size(), 1u);
    EXPECT_EQ(file.tensors.at("test").shape, (resunet::Dims{2, 2}));
    EXPECT_EQ(file.tensors.at("test").dtype, DType::s32);
    EXPECT_EQ(file.tensors.at("test").bytes, Bytes(16, 0));
    EXPECT_TRUE(file.metadata.empty());

    // As safetensors.torch.save_file writes it: {"format": "pt"} metadata, no checksum, space padding.
    std::string header =
        R"({"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
        R"("b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})";
    header.append((8 - header.size() % 8) % 8, ' ');
    const Bytes torch = make_file(header, {0, 0, 0x80, 0x3f, 7, 9});
    const resunet::SafetensorsFile loaded = resunet::parse_safetensors(torch.data(), torch.size(), "torch.safetensors");
    EXPECT_EQ(loaded.metadata.at("format"), "pt");
    EXPECT_EQ(loaded.tensors.at("w").f32()[0], 1.0f);
    EXPECT_EQ(loaded.tensors.at("b").bytes, (Bytes{7, 9}));

    // Empty file: an empty header object and no data.
    const Bytes empty = make_file("{}");
    EXPECT_TRUE(resunet::parse_safetensors(empty.data(), empty.size(), "empty").tensors.empty());
}

TEST_F(SafetensorsTest, RefusesUnreadableAndTinyFiles) {
    expect_error([&] { resunet::load_safetensors((dir_ / "absent.safetensors").string()); }, "cannot open");
    expect_error([&] { resunet::load_safetensors(dir_.string()); }, "not a regular file");
    write_bytes(dir_ / "zero.safetensors", {});
    expect_error([&] { resunet::load_safetensors((dir_ / "zero.safetensors").string()); }, "too small");
    write_bytes(dir_ / "seven.safetensors", Bytes(7, 0));
    expect_error([&] { resunet::load_safetensors((dir_ / "seven.safetensors").string()); }, "too small");
    EXPECT_THROW(resunet::parse_safetensors(nullptr, 0, "null"), Error);
    // The file name leads the message.
    expect_error([&] { resunet::load_safetensors((dir_ / "seven.safetensors").string()); },
                 (dir_ / "seven.safetensors").string() + ":");
}

TEST(SafetensorsHostile, HeaderLength) {
    expect_parse_error(make_file("{}", {}, 1000), "header length 1000 exceeds");
    expect_parse_error(make_file("{}", {}, uint64_t{1} << 63), "header length");
    expect_parse_error(make_file("{}", {}, ~uint64_t{0}), "header length");
    expect_parse_error(make_file("{}", {}, 3), "header length 3 exceeds");

    // Above the 100 MB cap even though the file is long enough.
    Bytes huge(8 + resunet::kSafetensorsMaxHeaderBytes + 8, ' ');
    const uint64_t length = resunet::kSafetensorsMaxHeaderBytes + 1;
    for (int i = 0; i < 8; ++i) huge[i] = static_cast<uint8_t>(length >> (8 * i));
    expect_parse_error(huge, "limit of 100000000 bytes");
}

TEST(SafetensorsHostile, HeaderJson) {
    expect_parse_error(make_file(""), "not valid JSON");
    expect_parse_error(make_file(R"({"t": )"), "not valid JSON");
    expect_parse_error(make_file("{\"t\xff\": 1}"), "not valid JSON");
    expect_parse_error(make_file(std::string("{}\0\0", 4)), "NUL byte at header offset 2");
    expect_parse_error(make_file(std::string("{}\0{\"hidden\": 1}", 16)), "NUL byte");
    expect_parse_error(make_file("[1, 2]"), "header is a JSON array, expected an object");
    expect_parse_error(make_file("\"text\""), "expected an object");
    expect_parse_error(make_file(R"({"t": 5})"), "tensor 't': entry is a JSON number");
    expect_parse_error(make_file("{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}"),
                       "nests deeper");
    const std::string entry = R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})";
    expect_parse_error(make_file(R"({"t":)" + entry + R"(,"t":)" + entry + "}", {1}), "names 't' twice");
}

TEST(SafetensorsHostile, Dtype) {
    expect_parse_error(make_file(R"({"t":{"shape":[1],"data_offsets":[0,4]}})", Bytes(4)), "tensor 't': missing \"dtype\"");
    expect_parse_error(make_file(one_tensor("7", "[1]", "[0,4]"), Bytes(4)), "\"dtype\" is a JSON number");
    expect_parse_error(make_file(one_tensor(R"("F64")", "[2]", "[0,16]", "e1.conv_a.weight"), Bytes(16)),
                       "tensor 'e1.conv_a.weight': unsupported dtype 'F64'");
    expect_parse_error(make_file(one_tensor(R"("bf16")", "[2]", "[0,4]"), Bytes(4)), "unsupported dtype 'bf16'");
    // F16 and BF16 take 2 bytes per element: 2 elements in 8 bytes is a size mismatch, named with the dtype.
    expect_parse_error(make_file(one_tensor(R"("F16")", "[2]", "[0,8]"), Bytes(8)), "shape [2] of F16 needs 4");
    expect_parse_error(make_file(one_tensor(R"("BF16")", "[3]", "[0,4]"), Bytes(4)), "shape [3] of BF16 needs 6");
    expect_parse_error(make_file(one_tensor(R"("f32")", "[1]", "[0,4]"), Bytes(4)), "unsupported dtype 'f32'");
    expect_parse_error(make_file(one_tensor(R"("")", "[1]", "[0,4]"), Bytes(4)), "unsupported dtype ''");
}

TEST(SafetensorsHostile, Shape) {
    expect_parse_error(make_file(R"({"t":{"dtype":"U8","data_offsets":[0,1]}})", Bytes(1)), "missing \"shape\"");
    expect_parse_error(make_file(one_tensor(R"("U8")", "3", "[0,3]"), Bytes(3)), "\"shape\" is a JSON number");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[2,-3]", "[0,6]"), Bytes(6)), "non-negative integers");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[2.5]", "[0,2]"), Bytes(2)), "non-negative integers");
    expect_parse_error(make_file(one_tensor(R"("U8")", R"(["2"])", "[0,2]"), Bytes(2)), "non-negative integers");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[18446744073709551615]", "[0,1]"), Bytes(1)),
                       "non-negative integers");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[1e400]", "[0,1]"), Bytes(1)), "not valid JSON");
    expect_parse_error(make_file(one_tensor(R"("F32")", "[4294967296,4294967296,16]", "[0,4]"), Bytes(4)), "overflow");
    expect_parse_error(make_file(one_tensor(R"("I64")", "[9223372036854775807,2]", "[0,8]"), Bytes(8)), "overflow");
    // A zero dim must not hide dims whose product overflows (later stride arithmetic would).
    expect_parse_error(make_file(one_tensor(R"("F32")", "[0,1099511627776,1099511627776]", "[0,0]")), "overflow");
    std::string rank_33 = "[1";
    for (int i = 0; i < 32; ++i) rank_33 += ",1";
    expect_parse_error(make_file(one_tensor(R"("U8")", rank_33 + "]", "[0,1]"), Bytes(1)), "33 dims");
}

TEST(SafetensorsHostile, DataOffsets) {
    expect_parse_error(make_file(R"({"t":{"dtype":"U8","shape":[1]}})", Bytes(1)), "missing \"data_offsets\"");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[1]", "[0]"), Bytes(1)), "not two non-negative integers");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[1]", "[0,1,2]"), Bytes(2)), "not two non-negative integers");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[1]", "[-1,0]"), Bytes(1)), "not two non-negative integers");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[1]", R"({"a":0,"b":1})"), Bytes(1)), "data_offsets");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[1]", "[0,1.0]"), Bytes(1)), "not two non-negative integers");

    // The exact message, as engines show it to users.
    const Bytes past_end = make_file(one_tensor(R"("F32")", "[25]", "[0,100]", "e1.conv_a.weight"), Bytes(64));
    try {
        resunet::parse_safetensors(past_end.data(), past_end.size(), "weights.safetensors");
        ADD_FAILURE() << "no error";
    } catch (const Error& e) {
        EXPECT_STREQ(e.what(),
                     "weights.safetensors: tensor 'e1.conv_a.weight': data_offsets [0, 100] exceed data section of 64 bytes");
    }
    expect_parse_error(make_file(one_tensor(R"("U8")", "[1]", "[18446744073709551615,18446744073709551615]"), Bytes(1)),
                       "exceed data section");
    expect_parse_error(make_file(one_tensor(R"("U8")", "[0]", "[5,2]"), Bytes(8)), "begin after their end");
    expect_parse_error(make_file(one_tensor(R"("F32")", "[2,2]", "[0,12]"), Bytes(16)),
                       "span 12 bytes but shape [2, 2] of F32 needs 16");
    expect_parse_error(make_file(one_tensor(R"("I64")", "[]", "[0,4]"), Bytes(8)), "needs 8");
}

TEST(SafetensorsHostile, OverlappingTensors) {
    const std::string overlapping = R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";
    expect_parse_error(make_file(overlapping, Bytes(16)), "overlap");
    const std::string identical = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                  R"("b":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}})";
    expect_parse_error(make_file(identical, Bytes(4)), "tensors 'a' [0, 4] and 'b' [0, 4] overlap");

    // Zero-byte tensors hold no bytes, so they may sit anywhere in the section.
    const std::string zero_inside = R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                    R"("z":{"dtype":"F32","shape":[0,5],"data_offsets":[2,2]}})";
    const Bytes fine = make_file(zero_inside, Bytes(4));
    EXPECT_EQ(resunet::parse_safetensors(fine.data(), fine.size(), "fine").tensors.size(), 2u);
}

TEST(SafetensorsHostile, Metadata) {
    expect_parse_error(make_file(R"({"__metadata__":{"format":5}})"), "value for key 'format' is a JSON number");
    expect_parse_error(make_file(R"({"__metadata__":{"format":null}})"), "expected a string");
    expect_parse_error(make_file(R"({"__metadata__":["pt"]})"), "\"__metadata__\" is a JSON array");
    expect_parse_error(make_file(R"({"__metadata__":{"resunet.checksum":"xyz"}})"), "malformed resunet.checksum");
    expect_parse_error(make_file(R"({"__metadata__":{"resunet.checksum":"00000001"}})"), "checksum mismatch");
    // CRC-32 of an empty data section is 0.
    const Bytes empty = make_file(R"({"__metadata__":{"resunet.checksum":"00000000"}})");
    EXPECT_NO_THROW(resunet::parse_safetensors(empty.data(), empty.size(), "empty"));
}

TEST(SafetensorsHostile, NamesAreEscapedIntoOneLine) {
    const Bytes file = make_file(one_tensor(R"("F64")", "[1]", "[0,8]", "bad\\nname\\u001b[31m"), Bytes(8));
    expect_error([&] { resunet::parse_safetensors(file.data(), file.size(), "x"); }, "tensor 'bad\\x0aname\\x1b[31m'");
    const std::string long_name(5000, 'n');
    const Bytes long_file = make_file(one_tensor(R"("F64")", "[1]", "[0,8]", long_name), Bytes(8));
    try {
        resunet::parse_safetensors(long_file.data(), long_file.size(), "x");
        ADD_FAILURE() << "no error";
    } catch (const Error& e) {
        EXPECT_LT(std::strlen(e.what()), 400u);
    }
}

TEST_F(SafetensorsTest, DetectsCorruptionAndTruncation) {
    std::mt19937 rng(3);
    TensorMap tensors;
    tensors["w"] = random_tensor({8, 4}, DType::f32, rng);
    tensors["b"] = random_tensor({8}, DType::f32, rng);
    const fs::path path = dir_ / "weights.safetensors";
    resunet::save_safetensors(path.string(), tensors);
    const Bytes good = read_bytes(path);

    Bytes flipped = good;
    flipped[flipped.size() - 5] ^= 0x01;
    write_bytes(path, flipped);
    expect_error([&] { resunet::load_safetensors(path.string()); }, "checksum mismatch");

    Bytes truncated(good.begin(), good.end() - 1);
    write_bytes(path, truncated);
    expect_error([&] { resunet::load_safetensors(path.string()); }, "exceed data section");

    // Every prefix of a valid file is refused cleanly.
    for (size_t size = 0; size < good.size(); ++size) {
        SCOPED_TRACE(size);
        expect_parse_error(Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(size)), "hostile.safetensors");
    }

    // Without a checksum (as PyTorch writes) truncation is still caught by the offsets.
    const std::string header = one_tensor(R"("F32")", "[4]", "[0,16]");
    const Bytes no_checksum = make_file(header, Bytes(15));
    expect_parse_error(no_checksum, "data_offsets [0, 16] exceed data section of 15 bytes");
}

// A file whose checksum is valid but which holds a NaN or an Inf (written by another tool, or damaged
// before the checksum was taken) is refused at load, naming the tensor and the first bad element; saving
// such tensors is refused too, and the previous file stays.
TEST_F(SafetensorsTest, RefusesNonFiniteWeightsWithAValidChecksum) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    struct Case {
        float value;
        size_t index;
        const char* label;
        const char* where;
    };
    for (const Case& c : {Case{nan, 40, "NaN", "element 40 (index [1, 1, 1, 1])"},
                          Case{inf, 0, "+Inf", "element 0 (index [0, 0, 0, 0])"},
                          Case{-inf, 53, "-Inf", "element 53 (index [1, 2, 2, 2])"}}) {
        SCOPED_TRACE(c.label);
        std::vector<float> values(2 * 3 * 3 * 3);
        for (size_t i = 0; i < values.size(); ++i) values[i] = 0.01f * static_cast<float>(i) - 0.2f;
        values[c.index] = c.value;
        // Written as another tool would: a plain header, then the checksum of the data as it is.
        Bytes data(values.size() * sizeof(float) + 8);
        std::memcpy(data.data(), values.data(), values.size() * sizeof(float));
        const float bias[2] = {0.5f, -0.5f};
        std::memcpy(data.data() + values.size() * sizeof(float), bias, sizeof(bias));
        const std::string header = fmt::format(
            R"({{"__metadata__":{{"{}":"{:08x}"}},"d2.conv_a.weight":{{"dtype":"F32","shape":[2,3,3,3],"data_offsets":[0,216]}},)"
            R"("d2.conv_a.bias":{{"dtype":"F32","shape":[2],"data_offsets":[216,224]}}}})",
            resunet::kSafetensorsChecksumKey, resunet::crc32(data.data(), data.size()));
        const fs::path path = dir_ / "nan.safetensors";
        write_bytes(path, make_file(header, data));
        expect_error([&] { resunet::load_safetensors(path.string()); },
                     fmt::format("tensor 'd2.conv_a.weight': {} is {}; weights must be finite", c.where, c.label));
        // The same values through save_safetensors: refused, and a previous file at that path is kept.
        const fs::path kept = dir_ / "kept.safetensors";
        TensorMap good;
        good["w"] = HostTensor::zeros({3});
        resunet::save_safetensors(kept.string(), good);
        const Bytes before = read_bytes(kept);
        TensorMap bad;
        bad["d2.conv_a.weight"] = HostTensor::zeros({2, 3, 3, 3});
        std::memcpy(bad["d2.conv_a.weight"].bytes.data(), values.data(), values.size() * sizeof(float));
        expect_error([&] { resunet::save_safetensors(kept.string(), bad); }, c.where);
        EXPECT_EQ(read_bytes(kept), before);
    }
    // Integer tensors have no NaN: every bit pattern loads.
    TensorMap ints;
    ints["q"] = HostTensor::zeros({4}, DType::s32);
    std::memset(ints["q"].bytes.data(), 0xff, ints["q"].bytes.size());
    const fs::path path = dir_ / "ints.safetensors";
    resunet::save_safetensors(path.string(), ints);
    EXPECT_EQ(resunet::load_safetensors(path.string()).tensors.at("q").bytes, ints["q"].bytes);
}

// load_safetensors streams the data section in 4 MiB chunks straight into the tensors; tensors that
// straddle chunk boundaries, tiny ones between them and a gap that belongs to no tensor must load exactly
// as parse_safetensors reads the whole file, and damage in the last chunk must still fail the checksum.
TEST_F(SafetensorsTest, StreamedLoadEqualsWholeFileParse) {
    std::mt19937 rng(21);
    TensorMap tensors;
    tensors["a"] = random_tensor({3 << 20}, DType::f32, rng);  // 12 MiB: crosses three chunk boundaries
    tensors["b"] = random_tensor({5}, DType::u8, rng);
    tensors["c"] = random_tensor({1 << 19, 3}, DType::s8, rng);
    tensors["d"] = random_tensor({7}, DType::i64, rng);
    tensors["e"] = random_tensor({}, DType::f32, rng);
    const fs::path path = dir_ / "big.safetensors";
    resunet::save_safetensors(path.string(), tensors, {{"k", "v"}});
    const Bytes bytes = read_bytes(path);
    const resunet::SafetensorsFile streamed = resunet::load_safetensors(path.string());
    const resunet::SafetensorsFile whole = resunet::parse_safetensors(bytes.data(), bytes.size(), "whole");
    ASSERT_EQ(streamed.tensors.size(), tensors.size());
    for (const auto& [name, tensor] : tensors) {
        EXPECT_EQ(streamed.tensors.at(name).bytes, tensor.bytes) << name;
        EXPECT_EQ(streamed.tensors.at(name).shape, tensor.shape) << name;
        EXPECT_EQ(whole.tensors.at(name).bytes, tensor.bytes) << name;
    }
    EXPECT_EQ(streamed.metadata, whole.metadata);

    // A gap of 4 bytes between two tensors (allowed by the format): loaded alike, covered by the checksum.
    Bytes data(4 + 8 + 4, 0);
    const float first = 1.5f, second = -2.0f;
    std::memcpy(data.data(), &first, 4);
    std::memcpy(data.data() + 12, &second, 4);
    const std::string header = fmt::format(
        R"({{"__metadata__":{{"{}":"{:08x}"}},"x":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},)"
        R"("y":{{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}}})",
        resunet::kSafetensorsChecksumKey, resunet::crc32(data.data(), data.size()));
    write_bytes(path, make_file(header, data));
    const resunet::SafetensorsFile gap = resunet::load_safetensors(path.string());
    EXPECT_EQ(gap.tensors.at("x").f32()[0], first);
    EXPECT_EQ(gap.tensors.at("y").f32()[0], second);
    Bytes damaged_gap = make_file(header, data);
    damaged_gap[8 + header.size() + 6] ^= 0x10;  // a byte of the gap
    write_bytes(path, damaged_gap);
    expect_error([&] { resunet::load_safetensors(path.string()); }, "checksum mismatch");

    Bytes damaged = bytes;
    damaged[damaged.size() - 3] ^= 0x40;  // in the last chunk
    write_bytes(path, damaged);
    expect_error([&] { resunet::load_safetensors(path.string()); }, "checksum mismatch");
}

TEST_F(SafetensorsTest, RandomMutationsOnlyEverThrowError) {
    std::mt19937 rng(11);
    TensorMap tensors;
    tensors["e1.conv_a.weight"] = random_tensor({2, 3, 3, 3}, DType::f32, rng);
    tensors["e1.bn_a.num_batches_tracked"] = random_tensor({}, DType::i64, rng);
    tensors["q"] = random_tensor({5}, DType::s8, rng);
    const fs::path path = dir_ / "weights.safetensors";
    resunet::save_safetensors(path.string(), tensors, {{"arch", "resunet"}});
    const Bytes good = read_bytes(path);
    const size_t header_end = 8 + header_length_of(good);

    int loaded = 0;
    for (int iteration = 0; iteration < 4000; ++iteration) {
        Bytes mutated = good;
        const int edits = 1 + static_cast<int>(rng() % 4);
        for (int e = 0; e < edits; ++e) {
            // Mostly aim at the length prefix and header, where parsing happens.
            const size_t limit = (rng() % 4 == 0) ? mutated.size() : std::min(header_end, mutated.size());
            if (limit == 0) break;
            const size_t at = rng() % limit;
            switch (rng() % 4) {
                case 0: mutated[at] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
                case 1: mutated[at] = static_cast<uint8_t>("0123456789[]{},:\"-e. "[rng() % 21]); break;
                case 2: mutated.erase(mutated.begin() + static_cast<std::ptrdiff_t>(at)); break;
                default: mutated.insert(mutated.begin() + static_cast<std::ptrdiff_t>(at), static_cast<uint8_t>(rng())); break;
            }
        }
        try {
            resunet::parse_safetensors(mutated.data(), mutated.size(), "mutated");
            ++loaded;
        } catch (const Error& e) {
            ASSERT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
        } catch (const std::exception& e) {
            FAIL() << "iteration " << iteration << " threw a non-resunet exception: " << e.what();
        }
    }
    EXPECT_LT(loaded, 4000);
}

TEST_F(SafetensorsTest, SaveReplacesAtomicallyAndLeavesNoTempFiles) {
    const fs::path path = dir_ / "weights.safetensors";
    TensorMap old_tensors;
    old_tensors["w"] = HostTensor::zeros({3});
    resunet::save_safetensors(path.string(), old_tensors, {{"version", "old"}});

    TensorMap new_tensors;
    new_tensors["w"] = HostTensor::zeros({2, 2});
    new_tensors["w"].f32()[3] = 5.0f;
    resunet::save_safetensors(path.string(), new_tensors, {{"version", "new"}});
    EXPECT_EQ(folder_entries(), std::vector<std::string>{"weights.safetensors"});
    const resunet::SafetensorsFile file = resunet::load_safetensors(path.string());
    EXPECT_EQ(file.metadata.at("version"), "new");
    EXPECT_EQ(file.tensors.at("w").shape, (resunet::Dims{2, 2}));
    EXPECT_EQ(file.tensors.at("w").f32()[3], 5.0f);

    // A save that fails leaves the previous file intact and nothing behind.
    TensorMap broken;
    broken["w"] = HostTensor::zeros({4});
    broken["w"].bytes.resize(15);
    expect_error([&] { resunet::save_safetensors(path.string(), broken); }, "holds 15 bytes but shape [4] of F32 needs 16");
    TensorMap reserved;
    reserved["__metadata__"] = HostTensor::zeros({1});
    expect_error([&] { resunet::save_safetensors(path.string(), reserved); }, "reserved");
    TensorMap bad_utf8;
    bad_utf8["w\xff"] = HostTensor::zeros({1});
    expect_error([&] { resunet::save_safetensors(path.string(), bad_utf8); }, "UTF-8");
    TensorMap negative;
    negative["w"] = HostTensor{{-1}, DType::f32, {}};
    expect_error([&] { resunet::save_safetensors(path.string(), negative); }, "negative");
    EXPECT_EQ(folder_entries(), std::vector<std::string>{"weights.safetensors"});
    EXPECT_EQ(resunet::load_safetensors(path.string()).metadata.at("version"), "new");

    expect_error([&] { resunet::save_safetensors((dir_ / "no_such_folder" / "w.safetensors").string(), new_tensors); },
                 "cannot create temp file");
    expect_error([&] { resunet::save_safetensors((dir_ / "").string(), new_tensors); }, "not a file path");
}

TEST_F(SafetensorsTest, SaveOverridesGivenChecksumAndHandlesEdgeCases) {
    const fs::path path = dir_ / "w.safetensors";
    TensorMap tensors;
    tensors["w"] = HostTensor::zeros({2});
    resunet::save_safetensors(path.string(), tensors, {{resunet::kSafetensorsChecksumKey, "deadbeef"}});
    EXPECT_NE(resunet::load_safetensors(path.string()).metadata.at(resunet::kSafetensorsChecksumKey), "deadbeef");

    resunet::save_safetensors(path.string(), {});
    const resunet::SafetensorsFile empty = resunet::load_safetensors(path.string());
    EXPECT_TRUE(empty.tensors.empty());
    EXPECT_EQ(empty.metadata.at(resunet::kSafetensorsChecksumKey), "00000000");

    // A bare file name saves into the working folder.
    const fs::path previous = fs::current_path();
    fs::current_path(dir_);
    EXPECT_NO_THROW(resunet::save_safetensors("bare.safetensors", tensors));
    fs::current_path(previous);
    EXPECT_EQ(resunet::load_safetensors((dir_ / "bare.safetensors").string()).tensors.size(), 1u);
}

TEST(CheckTensors, AcceptsExactSetAndToleratesBatchNormCounters) {
    TensorMap tensors;
    tensors["conv.weight"] = HostTensor::zeros({8, 3, 3, 3});
    tensors["bn.running_mean"] = HostTensor::zeros({8});
    tensors["bn.num_batches_tracked"] = HostTensor::zeros({}, DType::i64);
    EXPECT_NO_THROW(resunet::check_tensors(tensors, {{"conv.weight", {8, 3, 3, 3}}, {"bn.running_mean", {8}}}, "w"));
}

TEST(CheckTensors, NamesFirstProblem) {
    TensorMap tensors;
    tensors["conv.weight"] = HostTensor::zeros({8, 3, 3, 3});
    tensors["bn.running_mean"] = HostTensor::zeros({8});
    const std::vector<std::pair<std::string, resunet::Dims>> expected = {{"conv.weight", {8, 3, 3, 3}},
                                                                         {"bn.running_mean", {8}}};

    TensorMap missing = tensors;
    missing.erase("bn.running_mean");
    expect_error([&] { resunet::check_tensors(missing, expected, "weights.safetensors"); },
                 "weights.safetensors: missing tensor 'bn.running_mean' (expected shape [8])");

    TensorMap extra = tensors;
    extra["head.bias"] = HostTensor::zeros({2});
    expect_error([&] { resunet::check_tensors(extra, expected, "w"); }, "unexpected tensor 'head.bias'");

    TensorMap wrong_shape = tensors;
    wrong_shape["conv.weight"] = HostTensor::zeros({8, 3, 3, 4});
    expect_error([&] { resunet::check_tensors(wrong_shape, expected, "w"); },
                 "tensor 'conv.weight': shape [8, 3, 3, 4], expected [8, 3, 3, 3]");

    TensorMap wrong_dtype = tensors;
    wrong_dtype["bn.running_mean"] = HostTensor::zeros({8}, DType::s8);
    expect_error([&] { resunet::check_tensors(wrong_dtype, expected, "w"); }, "dtype I8, expected F32");

    TensorMap several = extra;
    several.erase("conv.weight");
    expect_error([&] { resunet::check_tensors(several, expected, "w"); }, "missing tensor 'conv.weight'");
    expect_error([&] { resunet::check_tensors(several, expected, "w"); }, "(and 1 more problems)");

    // Counters are only tolerated by suffix, not any name containing it.
    TensorMap near_miss = tensors;
    near_miss["bn.num_batches_tracked.x"] = HostTensor::zeros({});
    expect_error([&] { resunet::check_tensors(near_miss, expected, "w"); }, "unexpected tensor");
}

}  // namespace

namespace {

// Every F16 bit pattern widens to the float of IEEE 754 binary16 (computed here from its fields with ldexp).
float f16_reference(uint16_t h) {
    const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    const float sign = (h & 0x8000) ? -1.0f : 1.0f;
    if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -24);
    if (exponent == 31) return mantissa ? std::numeric_limits<float>::quiet_NaN() : sign * std::numeric_limits<float>::infinity();
    return sign * std::ldexp(static_cast<float>(1024 + mantissa), exponent - 25);
}

}  // namespace

TEST(HalfFloat, F16WidensExactlyAndRoundsToNearestEven) {
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float wide = resunet::f16_bits_to_f32(static_cast<uint16_t>(h));
        const float expected = f16_reference(static_cast<uint16_t>(h));
        if (std::isnan(expected)) {
            ASSERT_TRUE(std::isnan(wide)) << h;
            continue;
        }
        ASSERT_EQ(resunet::float_bits(wide), resunet::float_bits(expected)) << "F16 bits " << h;
        ASSERT_EQ(resunet::f32_to_f16_bits(wide), h) << "round trip of F16 bits " << h;
    }
    // Between two neighbours a < b (positive finite, and the step from 65504 to the first value that
    // overflows), the midpoint goes to the one with the even mantissa, anything above it to b.
    for (uint32_t h = 0; h < 0x7bff; ++h) {
        const float a = resunet::f16_bits_to_f32(static_cast<uint16_t>(h));
        const float b = resunet::f16_bits_to_f32(static_cast<uint16_t>(h + 1));
        const float mid = (a + b) / 2;  // exact in float: F16 has 11 significant bits
        ASSERT_EQ(resunet::f32_to_f16_bits(mid), (h & 1) ? h + 1 : h) << "midpoint above F16 bits " << h;
        ASSERT_EQ(resunet::f32_to_f16_bits(std::nextafter(mid, b)), h + 1) << h;
        ASSERT_EQ(resunet::f32_to_f16_bits(std::nextafter(mid, a)), h) << h;
        ASSERT_EQ(resunet::f32_to_f16_bits(-std::nextafter(mid, b)), 0x8000 | (h + 1)) << h;
    }
    EXPECT_TRUE(resunet::f16_fits(65519.0f));
    EXPECT_FALSE(resunet::f16_fits(65520.0f));
    EXPECT_EQ(resunet::f32_to_f16_bits(65519.0f), 0x7bff);
    EXPECT_EQ(resunet::f32_to_f16_bits(65520.0f), 0x7c00);
    EXPECT_EQ(resunet::f32_to_f16_bits(1e-8f), 0);  // below half the smallest subnormal (2^-25)
    EXPECT_EQ(resunet::f32_to_f16_bits(std::ldexp(1.0f, -25)), 0);             // tie: to even (0)
    EXPECT_EQ(resunet::f32_to_f16_bits(std::ldexp(1.5f, -25)), 1);             // above the tie
}

TEST(HalfFloat, Bf16RoundsToNearestEven) {
    std::mt19937 rng(7);
    for (int i = 0; i < 100000; ++i) {
        uint32_t bits = static_cast<uint32_t>(rng());
        if ((bits & 0x7f800000u) == 0x7f800000u) continue;  // NaN/Inf
        const float value = resunet::bits_float(bits);
        const uint16_t rounded = resunet::f32_to_bf16_bits(value);
        const uint16_t down = static_cast<uint16_t>(bits >> 16);
        const uint32_t rest = bits & 0xffffu;
        const uint16_t expected = rest > 0x8000u || (rest == 0x8000u && (down & 1)) ? down + 1 : down;
        ASSERT_EQ(rounded, expected) << std::hex << bits;
        ASSERT_EQ(resunet::float_bits(resunet::bf16_bits_to_f32(rounded)), uint32_t{rounded} << 16);
    }
}

TEST_F(SafetensorsTest, StoresF32AsF16OrBf16AndLoadsThemWidened) {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 0.05f);
    TensorMap tensors;
    tensors["conv.weight"] = HostTensor::zeros({16, 8, 3, 3});
    for (size_t i = 0; i < 16 * 8 * 9; ++i) tensors["conv.weight"].f32()[i] = normal(rng);
    tensors["bn.running_var"] = HostTensor::zeros({3});
    tensors["bn.running_var"].f32()[0] = 70000.0f;  // beyond F16: this tensor stays F32 in an f16 file
    tensors["bn.running_var"].f32()[1] = 1e-9f;
    tensors["steps"] = random_tensor({5}, DType::i64, rng);
    tensors["odd"] = random_tensor({3}, DType::u8, rng);  // 3 bytes: the 2-byte tensors after it start odd
    const fs::path f32_path = dir_ / "m.safetensors";
    resunet::save_safetensors(f32_path.string(), tensors, {{"k", "v"}});
    for (resunet::FloatStorage storage : {resunet::FloatStorage::f16, resunet::FloatStorage::bf16}) {
        SCOPED_TRACE(resunet::float_storage_name(storage));
        const fs::path path = dir_ / fmt::format("m.{}.safetensors", resunet::float_storage_name(storage));
        resunet::save_safetensors(path.string(), tensors, {{"k", "v"}}, {.floats = storage});
        const resunet::SafetensorsFile file = resunet::load_safetensors(path.string());
        const Bytes bytes = read_bytes(path);
        const resunet::SafetensorsFile parsed = resunet::parse_safetensors(bytes.data(), bytes.size(), "in memory");
        EXPECT_EQ(file.metadata.at("k"), "v");
        const bool f16 = storage == resunet::FloatStorage::f16;
        EXPECT_EQ(file.stored_as.at("conv.weight"), f16 ? "F16" : "BF16");
        EXPECT_EQ(file.stored_as.count("bn.running_var"), f16 ? 0u : 1u);
        EXPECT_EQ(file.stored_as.count("steps"), 0u);
        EXPECT_EQ(file.stored_as, parsed.stored_as);
        for (const auto& [name, tensor] : tensors) {
            const HostTensor& loaded = file.tensors.at(name);
            ASSERT_EQ(loaded.dtype, tensor.dtype) << name;
            ASSERT_EQ(loaded.shape, tensor.shape) << name;
            EXPECT_EQ(loaded.bytes, parsed.tensors.at(name).bytes) << name;
            if (tensor.dtype != DType::f32 || !file.stored_as.count(name)) {
                EXPECT_EQ(loaded.bytes, tensor.bytes) << name;
                continue;
            }
            for (int64_t i = 0; i < resunet::num_elements(tensor.shape); ++i) {
                const float x = tensor.f32()[i];
                const float expected = f16 ? resunet::f16_bits_to_f32(resunet::f32_to_f16_bits(x))
                                           : resunet::bf16_bits_to_f32(resunet::f32_to_bf16_bits(x));
                ASSERT_EQ(loaded.f32()[i], expected) << name << "[" << i << "]";
                // The stated precision: half an ulp of 11 (F16) or 8 (BF16) significant bits, relative.
                if (std::fabs(x) > 1e-4f) {
                    ASSERT_LE(std::fabs(loaded.f32()[i] - x), std::fabs(x) * (f16 ? 0x1p-11 : 0x1p-8));
                }
            }
        }
        // The narrowed weights take half the bytes.
        EXPECT_LT(fs::file_size(path), fs::file_size(f32_path) * 6 / 10);
        // A file written with narrowed tensors is itself checksummed like any other.
        Bytes damaged = bytes;
        damaged[damaged.size() - 20] ^= 0x01;
        write_bytes(dir_ / "damaged.safetensors", damaged);
        expect_error([&] { resunet::load_safetensors((dir_ / "damaged.safetensors").string()); }, "checksum mismatch");
    }
    EXPECT_EQ(resunet::parse_float_storage("bf16"), resunet::FloatStorage::bf16);
    EXPECT_FALSE(resunet::parse_float_storage("fp16").has_value());
}

TEST(Safetensors, LoadsHalfPrecisionFilesWrittenByPyTorchAndRefusesTheirNaN) {
    // torch.save_file of {"w": torch.tensor([1.0, -2.5, 65504, 2**-24], dtype=torch.float16)} and of the
    // same in bfloat16 ([1.0, -2.5, 65280, 2**-24]), bytes spelled out.
    const Bytes f16 = make_file(R"({"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}})",
                                {0x00, 0x3c, 0x00, 0xc1, 0xff, 0x7b, 0x01, 0x00});
    const resunet::SafetensorsFile a = resunet::parse_safetensors(f16.data(), f16.size(), "half.safetensors");
    const float* w = a.tensors.at("w").f32();
    EXPECT_EQ(a.tensors.at("w").dtype, DType::f32);
    EXPECT_EQ(w[0], 1.0f);
    EXPECT_EQ(w[1], -2.5f);
    EXPECT_EQ(w[2], 65504.0f);
    EXPECT_EQ(w[3], std::ldexp(1.0f, -24));
    const Bytes bf16 = make_file(R"({"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}})",
                                 {0x80, 0x3f, 0x20, 0xc0, 0x7f, 0x47, 0x80, 0x33});
    const resunet::SafetensorsFile b = resunet::parse_safetensors(bf16.data(), bf16.size(), "bf16.safetensors");
    EXPECT_EQ(b.tensors.at("w").f32()[0], 1.0f);
    EXPECT_EQ(b.tensors.at("w").f32()[1], -2.5f);
    EXPECT_EQ(b.tensors.at("w").f32()[2], 65280.0f);
    EXPECT_EQ(b.tensors.at("w").f32()[3], std::ldexp(1.0f, -24));
    // An F16 NaN (0x7e00) or BF16 -Inf (0xff80) is refused like an F32 one, naming the element.
    const Bytes nan16 = make_file(R"({"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", {0x00, 0x3c, 0x00, 0x7e});
    expect_parse_error(nan16, "tensor 'w': element 1 (index [1]) is NaN");
    const Bytes inf16 = make_file(R"({"w":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}})", {0x80, 0xff});
    expect_parse_error(inf16, "is -Inf");
}
