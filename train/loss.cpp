#include "train/loss.h"

#include <fmt/format.h>

#include <cmath>
#include <vector>

#include "graph/tensor.h"

namespace resunet {

namespace {

void check_arguments(const float* logits, const float* masks, int batch, int64_t pixels_per_image, const char* what) {
    if (!logits || !masks) throw Error(fmt::format("{} loss: logits and masks must not be null", what));
    if (batch <= 0 || pixels_per_image <= 0)
        throw Error(fmt::format("{} loss: batch {} and pixels per image {} must be positive", what, batch,
                                pixels_per_image));
}

double sigmoid(double x) {
    if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
    const double e = std::exp(x);
    return e / (1.0 + e);
}

// Adds (or writes, when !accumulate) the Dice term; returns its value.
double dice_term(const float* logits, const float* masks, int batch, int64_t pixels, float* dlogits, double smooth,
                 bool accumulate) {
    std::vector<double> per_image(static_cast<size_t>(batch));
#pragma omp parallel for schedule(static)
    for (int n = 0; n < batch; ++n) {
        const float* x = logits + n * pixels;
        const float* y = masks + n * pixels;
        double intersection = 0, sum_p = 0, sum_y = 0;
        for (int64_t i = 0; i < pixels; ++i) {
            const double p = sigmoid(x[i]);
            intersection += p * y[i];
            sum_p += p;
            sum_y += y[i];
        }
        const double numerator = 2.0 * intersection + smooth;
        const double denominator = sum_p + sum_y + smooth;
        per_image[static_cast<size_t>(n)] = 1.0 - numerator / denominator;
        if (dlogits) {
            // d(1 - num/den)/dp_j = -(2 y_j den - num) / den^2, divided by the batch for the mean.
            const double scale = 1.0 / (static_cast<double>(batch) * denominator * denominator);
            float* g = dlogits + n * pixels;
            for (int64_t i = 0; i < pixels; ++i) {
                const double p = sigmoid(x[i]);
                const double d = -(2.0 * y[i] * denominator - numerator) * scale * p * (1.0 - p);
                g[i] = accumulate ? static_cast<float>(g[i] + d) : static_cast<float>(d);
            }
        }
    }
    double total = 0;
    for (double v : per_image) total += v;
    return total / batch;
}

double bce_term(const float* logits, const float* masks, int batch, int64_t pixels, float* dlogits, bool accumulate) {
    const int64_t count = static_cast<int64_t>(batch) * pixels;
    // Fixed chunks summed in order: the same bits for any thread count.
    const int64_t chunk = 4096;
    const int64_t num_chunks = (count + chunk - 1) / chunk;
    std::vector<double> partial(static_cast<size_t>(num_chunks));
    const double inverse_count = 1.0 / static_cast<double>(count);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < num_chunks; ++c) {
        double sum = 0;
        const int64_t end = std::min(count, (c + 1) * chunk);
        for (int64_t i = c * chunk; i < end; ++i) {
            const double x = logits[i];
            const double y = masks[i];
            sum += std::max(x, 0.0) - x * y + std::log1p(std::exp(-std::abs(x)));
            if (dlogits) {
                const double d = (sigmoid(x) - y) * inverse_count;
                dlogits[i] = accumulate ? static_cast<float>(dlogits[i] + d) : static_cast<float>(d);
            }
        }
        partial[static_cast<size_t>(c)] = sum;
    }
    double total = 0;
    for (double v : partial) total += v;
    return total * inverse_count;
}

}  // namespace

const char* loss_name(LossKind kind) {
    switch (kind) {
        case LossKind::dice_bce: return "dice+bce";
        case LossKind::dice: return "dice";
        case LossKind::bce: return "bce";
    }
    return "?";
}

double dice_loss(const float* logits, const float* masks, int batch, int64_t pixels_per_image, float* dlogits,
                 double smooth) {
    check_arguments(logits, masks, batch, pixels_per_image, "dice");
    if (!(smooth >= 0)) throw Error(fmt::format("dice loss: smoothing constant {} must be >= 0", smooth));
    return dice_term(logits, masks, batch, pixels_per_image, dlogits, smooth, false);
}

double bce_with_logits_loss(const float* logits, const float* masks, int batch, int64_t pixels_per_image,
                            float* dlogits) {
    check_arguments(logits, masks, batch, pixels_per_image, "bce");
    return bce_term(logits, masks, batch, pixels_per_image, dlogits, false);
}

LossValue dice_bce_loss(const float* logits, const float* masks, int batch, int64_t pixels_per_image, float* dlogits,
                        double smooth) {
    return compute_loss(LossKind::dice_bce, logits, masks, batch, pixels_per_image, dlogits, smooth);
}

LossValue compute_loss(LossKind kind, const float* logits, const float* masks, int batch, int64_t pixels_per_image,
                       float* dlogits, double smooth) {
    check_arguments(logits, masks, batch, pixels_per_image, loss_name(kind));
    if (!(smooth >= 0)) throw Error(fmt::format("dice loss: smoothing constant {} must be >= 0", smooth));
    LossValue value;
    bool written = false;
    if (kind == LossKind::bce || kind == LossKind::dice_bce) {
        value.bce = bce_term(logits, masks, batch, pixels_per_image, dlogits, false);
        written = true;
    }
    if (kind == LossKind::dice || kind == LossKind::dice_bce)
        value.dice = dice_term(logits, masks, batch, pixels_per_image, dlogits, smooth, written);
    value.total = value.dice + value.bce;
    return value;
}

}  // namespace resunet
