// See image_decode.h.
#include "data/image_decode.h"

#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include <jpeglib.h>
#include <png.h>

#include <fmt/format.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "graph/tensor.h"

namespace resunet {
namespace {

// ---- EXIF orientation (the TIFF tag 0x0112 of IFD0 in an APP1 "Exif" segment) ----

// From a TIFF structure (a PNG eXIf chunk, or an APP1 segment after its "Exif\0\0").
int tiff_orientation(const uint8_t* tiff, size_t tiff_size) {
    if (tiff_size < 8) return 1;
    const bool big = tiff[0] == 'M' && tiff[1] == 'M';
    if (!big && !(tiff[0] == 'I' && tiff[1] == 'I')) return 1;
    auto u16 = [&](size_t at) -> uint32_t {
        return big ? (uint32_t{tiff[at]} << 8 | tiff[at + 1]) : (uint32_t{tiff[at + 1]} << 8 | tiff[at]);
    };
    auto u32 = [&](size_t at) -> uint32_t { return big ? (u16(at) << 16 | u16(at + 2)) : (u16(at + 2) << 16 | u16(at)); };
    const uint32_t ifd = u32(4);
    if (ifd > tiff_size || tiff_size - ifd < 2) return 1;
    const uint32_t count = u16(ifd);
    for (uint32_t i = 0; i < count; ++i) {
        const size_t entry = ifd + 2 + size_t{12} * i;
        if (entry + 12 > tiff_size) return 1;
        if (u16(entry) != 0x0112) continue;
        const uint32_t value = u16(entry + 2) == 3 ? u16(entry + 8) : 1;  // SHORT
        return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
    }
    return 1;
}


// As OpenCV's imread applies it (ApplyExifOrientation), so every path agrees with it.
void apply_orientation(cv::Mat& image, int orientation) {
    switch (orientation) {
        case 2: cv::flip(image, image, 1); break;
        case 3: cv::flip(image, image, -1); break;
        case 4: cv::flip(image, image, 0); break;
        case 5: cv::transpose(image, image); break;
        case 6: cv::transpose(image, image); cv::flip(image, image, 1); break;
        case 7: cv::transpose(image, image); cv::flip(image, image, -1); break;
        case 8: cv::transpose(image, image); cv::flip(image, image, 0); break;
        default: break;
    }
}

// ---- JPEG through libjpeg, its warnings taken as errors ----

struct JpegErrors {
    jpeg_error_mgr base{};
    std::jmp_buf jump{};
    char message[JMSG_LENGTH_MAX] = {};  // the first warning, or the error
    bool warned = false;
};

[[noreturn]] void jpeg_fail(j_common_ptr info) {
    auto* errors = reinterpret_cast<JpegErrors*>(info->err);
    (*info->err->format_message)(info, errors->message);
    std::longjmp(errors->jump, 1);
}

// libjpeg reports corrupt or missing data (a truncated stream, a marker inside the entropy-coded data) as a
// warning and fills the rest with grey; each one is kept here and refused after the decode. Never printed.
void jpeg_message(j_common_ptr info, int level) {
    if (level >= 0) return;  // trace messages
    auto* errors = reinterpret_cast<JpegErrors*>(info->err);
    if (!errors->warned) (*info->err->format_message)(info, errors->message);
    errors->warned = true;
}

// Adobe-inverted CMYK (as libjpeg hands it) to BGR, with OpenCV's formula.
void cmyk_to_bgr(const cv::Mat& cmyk, cv::Mat& bgr) {
    bgr.create(cmyk.size(), CV_8UC3);
    for (int y = 0; y < cmyk.rows; ++y) {
        const uint8_t* src = cmyk.ptr<uint8_t>(y);
        uint8_t* dst = bgr.ptr<uint8_t>(y);
        for (int x = 0; x < cmyk.cols; ++x, src += 4, dst += 3) {
            const int k = src[3];
            dst[2] = static_cast<uint8_t>(k - ((255 - src[0]) * k >> 8));
            dst[1] = static_cast<uint8_t>(k - ((255 - src[1]) * k >> 8));
            dst[0] = static_cast<uint8_t>(k - ((255 - src[2]) * k >> 8));
        }
    }
}

// Decodes into `pixels` (allocated before the longjmp point, so unwinding skips no destructor); false with
// errors.message on failure or on any libjpeg warning.
bool decode_jpeg_raw(const uint8_t* data, size_t size, const DecodeOptions& options, cv::Mat& pixels, cv::Size& full_size,
                     int& orientation, JpegErrors& errors) {
    jpeg_decompress_struct info{};
    info.err = jpeg_std_error(&errors.base);
    errors.base.error_exit = jpeg_fail;
    errors.base.emit_message = jpeg_message;
    if (setjmp(errors.jump)) {
        jpeg_destroy_decompress(&info);
        return false;
    }
    jpeg_create_decompress(&info);
    jpeg_mem_src(&info, data, static_cast<unsigned long>(size));
    jpeg_save_markers(&info, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&info, TRUE);
    for (jpeg_saved_marker_ptr marker = info.marker_list; marker; marker = marker->next)
        if (marker->marker == JPEG_APP0 + 1) {
            orientation = exif_orientation(marker->data, marker->data_length);
            if (orientation != 1) break;
        }
    full_size = cv::Size(static_cast<int>(info.image_width), static_cast<int>(info.image_height));
    const bool cmyk = info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK;
    info.out_color_space = cmyk ? JCS_CMYK : options.grey ? JCS_GRAYSCALE : JCS_EXT_BGR;
    info.scale_num = 1;
    info.scale_denom = static_cast<unsigned>(options.reduction);
    jpeg_start_decompress(&info);
    pixels.create(static_cast<int>(info.output_height), static_cast<int>(info.output_width),
                  CV_8UC(static_cast<int>(info.output_components)));
    while (info.output_scanline < info.output_height) {
        JSAMPROW row = pixels.ptr<uint8_t>(static_cast<int>(info.output_scanline));
        jpeg_read_scanlines(&info, &row, 1);
    }
    jpeg_finish_decompress(&info);  // reads on to the end-of-image marker: a stream cut short warns here
    jpeg_destroy_decompress(&info);
    return !errors.warned;
}

DecodedImage decode_jpeg(std::string_view bytes, const DecodeOptions& options, const std::string& what) {
    DecodedImage out;
    JpegErrors errors;
    int orientation = 1;
    if (!decode_jpeg_raw(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), options, out.pixels, out.full_size,
                         orientation, errors))
        throw Error(fmt::format("{}: corrupt or truncated JPEG data (libjpeg: {})", what, errors.message));
    if (out.pixels.channels() == 4) {  // CMYK
        cv::Mat bgr;
        cmyk_to_bgr(out.pixels, bgr);
        if (options.grey) cv::cvtColor(bgr, out.pixels, cv::COLOR_BGR2GRAY);
        else out.pixels = bgr;
    }
    apply_orientation(out.pixels, orientation);
    if (orientation >= 5) out.full_size = cv::Size(out.full_size.height, out.full_size.width);
    return out;
}

// ---- PNG through libpng, silently: its messages become our one line ----

struct PngSource {
    const uint8_t* data = nullptr;
    size_t size = 0;
    size_t at = 0;
    char message[200] = {};
};

void png_read_bytes(png_structp png, png_bytep out, png_size_t count) {
    auto* source = static_cast<PngSource*>(png_get_io_ptr(png));
    if (count > source->size - source->at) png_error(png, "the file ends early (truncated)");
    std::memcpy(out, source->data + source->at, count);
    source->at += count;
}

[[noreturn]] void png_fail(png_structp png, png_const_charp message) {
    auto* source = static_cast<PngSource*>(png_get_error_ptr(png));
    std::snprintf(source->message, sizeof source->message, "%s", message);
    png_longjmp(png, 1);
}

void png_warn(png_structp, png_const_charp) {}  // benign (an ancillary chunk dropped); never printed

// The transformations OpenCV's PNG reader asks libpng for (8 bits, alpha dropped, BGR or grey with its
// weights), so the pixels are OpenCV's; false with source.message on failure.
bool decode_png_raw(PngSource& source, bool grey, cv::Mat& pixels, int& orientation) {
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &source, png_fail, png_warn);
    if (!png) {
        std::snprintf(source.message, sizeof source.message, "out of memory");
        return false;
    }
    png_infop info = png_create_info_struct(png);
    png_infop end_info = png_create_info_struct(png);
    std::vector<png_bytep> rows;  // before the longjmp point, so a failure unwinds nothing
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_read_struct(&png, &info, &end_info);
        return false;
    }
    if (!info || !end_info) png_error(png, "out of memory");
    png_set_read_fn(png, &source, png_read_bytes);
    png_read_info(png, info);
    png_uint_32 width = 0, height = 0;
    int bit_depth = 0, color_type = 0;
    png_get_IHDR(png, info, &width, &height, &bit_depth, &color_type, nullptr, nullptr, nullptr);
    if (bit_depth == 16) png_set_strip_16(png);
    png_set_strip_alpha(png);
    if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if ((color_type & PNG_COLOR_MASK_COLOR) == 0 && bit_depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if ((color_type & PNG_COLOR_MASK_COLOR) && !grey) png_set_bgr(png);
    else if (!grey) png_set_gray_to_rgb(png);
    else png_set_rgb_to_gray(png, 1, 0.299, 0.587);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    if (png_get_rowbytes(png, info) != static_cast<size_t>(width) * (grey ? 1 : 3)) png_error(png, "unexpected pixel layout");
    pixels.create(static_cast<int>(height), static_cast<int>(width), grey ? CV_8UC1 : CV_8UC3);
    rows.resize(height);
    for (png_uint_32 y = 0; y < height; ++y) rows[y] = pixels.ptr<uint8_t>(static_cast<int>(y));
    png_read_image(png, rows.data());
    png_read_end(png, end_info);
    png_uint_32 exif_size = 0;
    png_bytep exif = nullptr;
    if (png_get_eXIf_1(png, info, &exif_size, &exif) || png_get_eXIf_1(png, end_info, &exif_size, &exif))
        orientation = tiff_orientation(exif, exif_size);
    png_destroy_read_struct(&png, &info, &end_info);
    return true;
}

DecodedImage decode_png(std::string_view bytes, const DecodeOptions& options, const std::string& what) {
    PngSource source;
    source.data = reinterpret_cast<const uint8_t*>(bytes.data());
    source.size = bytes.size();
    DecodedImage out;
    int orientation = 1;
    if (!decode_png_raw(source, options.grey, out.pixels, orientation))
        throw Error(fmt::format("{}: corrupt or truncated PNG data (libpng: {})", what, source.message));
    apply_orientation(out.pixels, orientation);
    out.full_size = out.pixels.size();
    return out;
}

}  // namespace

int exif_orientation(const uint8_t* data, size_t size) {
    if (size < 14 || std::memcmp(data, "Exif\0\0", 6) != 0) return 1;
    return tiff_orientation(data + 6, size - 6);
}

DecodedImage decode_image_bytes(std::string_view bytes, const DecodeOptions& options, const std::string& what) {
    if (options.reduction != 1 && options.reduction != 2 && options.reduction != 4 && options.reduction != 8)
        throw Error(fmt::format("{}: reduction must be 1, 2, 4 or 8, got {}", what, options.reduction));
    if (bytes.size() >= 2 && static_cast<uint8_t>(bytes[0]) == 0xFF && static_cast<uint8_t>(bytes[1]) == 0xD8)
        return decode_jpeg(bytes, options, what);
    static const char kPngSignature[8] = {'\x89', 'P', 'N', 'G', '\r', '\n', '\x1a', '\n'};
    if (bytes.size() >= 8 && std::memcmp(bytes.data(), kPngSignature, 8) == 0) return decode_png(bytes, options, what);
    DecodedImage out;
    const cv::Mat encoded(1, static_cast<int>(bytes.size()), CV_8UC1, const_cast<char*>(bytes.data()));
    try {
        out.pixels = cv::imdecode(encoded, options.grey ? cv::IMREAD_GRAYSCALE : cv::IMREAD_COLOR);
    } catch (const cv::Exception& e) {
        throw Error(fmt::format("{}: cannot decode: {}", what, e.what()));
    }
    if (out.pixels.empty()) throw Error(fmt::format("{}: cannot decode", what));
    out.full_size = out.pixels.size();
    return out;
}

}  // namespace resunet
