// Segmentation losses on logits, each returning the loss and d loss / d logits.
//
// Intended usage:
//   std::vector<float> dlogits(batch * pixels);
//   resunet::LossValue l = resunet::dice_bce_loss(logits, masks, batch, pixels, dlogits.data());
//   fmt::print("loss {} (dice {}, bce {})", l.total, l.dice, l.bce);
//   double d = resunet::dice_loss(logits, masks, batch, pixels, nullptr);  // value only
//
// Conventions (match the PyTorch code most polyp-segmentation repositories use):
//   - logits and masks are `batch` images of `pixels_per_image` values each (N x 1 x H x W flattened);
//     masks are in [0, 1].
//   - soft Dice: p = sigmoid(logit); per image dice_i = (2 sum(p y) + s) / (sum(p) + sum(y) + s) with
//     the smoothing constant s = 1.0 by default; loss = mean over the batch of (1 - dice_i).
//   - BCE-with-logits: mean over every pixel of the batch of max(x, 0) - x y + log(1 + exp(-|x|))
//     (the numerically stable form of torch.nn.BCEWithLogitsLoss, reduction "mean").
//   - dice_bce_loss = Dice + BCE, unweighted.
// Sums are accumulated in double in a fixed order, so the same input gives the same bits on every run
// (whatever the thread count). Gradients are written as floats; a null dlogits skips them.
#pragma once

#include <cstdint>
#include <functional>

namespace resunet {

// Smoothing constant of the soft Dice loss (added to numerator and denominator, per image).
inline constexpr double kDiceSmooth = 1.0;

enum class LossKind { dice_bce, dice, bce };
const char* loss_name(LossKind kind);  // "dice+bce", "dice", "bce"

struct LossValue {
    double total = 0;  // what was minimised
    double dice = 0;   // soft Dice loss term (0 when not part of the loss)
    double bce = 0;    // BCE-with-logits term (0 when not part of the loss)
};

double dice_loss(const float* logits, const float* masks, int batch, int64_t pixels_per_image, float* dlogits,
                 double smooth = kDiceSmooth);
double bce_with_logits_loss(const float* logits, const float* masks, int batch, int64_t pixels_per_image,
                            float* dlogits);
LossValue dice_bce_loss(const float* logits, const float* masks, int batch, int64_t pixels_per_image, float* dlogits,
                        double smooth = kDiceSmooth);
// The loss of `kind`; dice and bce fields are filled with the terms it contains.
LossValue compute_loss(LossKind kind, const float* logits, const float* masks, int batch, int64_t pixels_per_image,
                       float* dlogits, double smooth = kDiceSmooth);

// A user loss: returns the loss and writes d loss / d logits (never null when the trainer calls it).
using LossFunction = std::function<double(const float* logits, const float* masks, int batch,
                                          int64_t pixels_per_image, float* dlogits)>;

}  // namespace resunet
