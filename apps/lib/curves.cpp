// curves.png of a training run: see curves.h.
#include "apps/lib/curves.h"

#include <algorithm>
#include <cmath>
#include <span>

#include <fmt/format.h>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "graph/atomic_file.h"
#include "graph/tensor.h"

namespace fs = std::filesystem;

namespace resunet {
namespace {

double nice_ceiling(double value) {
    if (!(value > 0) || !std::isfinite(value)) return 1.0;
    const double power = std::pow(10.0, std::floor(std::log10(value)));
    for (double step : {1.0, 2.0, 5.0, 10.0})
        if (step * power >= value) return step * power;
    return 10.0 * power;
}

std::string tick_text(double value, double range) {
    if (range >= 10) return fmt::format("{:.0f}", value);
    if (range >= 1) return fmt::format("{:.1f}", value);
    return fmt::format("{:.2f}", value);
}

// One panel: axes with ticks and labels, and the curve of (epoch, value).
void draw_panel(cv::Mat& image, const cv::Rect& area, const std::vector<CurvePoint>& rows, double (*value_of)(const CurvePoint&),
                const std::string& title, const std::string& y_label, double y_max, const cv::Scalar& color) {
    const cv::Scalar black(0, 0, 0), grey(210, 210, 210);
    const int font = cv::FONT_HERSHEY_SIMPLEX;
    const int left = area.x + 64, right = area.x + area.width - 20, top = area.y + 34, bottom = area.y + area.height - 48;
    cv::putText(image, title, {area.x + 64, area.y + 22}, font, 0.55, black, 1, cv::LINE_AA);
    const int last_epoch = rows.empty() ? 1 : rows.back().epoch;
    const int first_epoch = rows.empty() ? 1 : rows.front().epoch;
    const double x_min = first_epoch - 0.5, x_max = std::max(last_epoch, first_epoch + 1) + 0.5;
    auto x_of = [&](double epoch) { return left + static_cast<int>(std::lround((epoch - x_min) / (x_max - x_min) * (right - left))); };
    auto y_of = [&](double v) { return bottom - static_cast<int>(std::lround(std::clamp(v / y_max, 0.0, 1.0) * (bottom - top))); };
    for (int i = 0; i <= 5; ++i) {  // y grid and ticks
        const double v = y_max * i / 5.0;
        const int y = y_of(v);
        cv::line(image, {left, y}, {right, y}, grey, 1);
        cv::line(image, {left - 4, y}, {left, y}, black, 1);
        const std::string text = tick_text(v, y_max);
        int baseline = 0;
        const cv::Size size = cv::getTextSize(text, font, 0.4, 1, &baseline);
        cv::putText(image, text, {left - 8 - size.width, y + size.height / 2}, font, 0.4, black, 1, cv::LINE_AA);
    }
    const int span = std::max(last_epoch, first_epoch + 1) - first_epoch + 1;
    const int step = std::max(1, static_cast<int>(nice_ceiling(span / 10.0)));
    for (int e = first_epoch; e <= std::max(last_epoch, first_epoch + 1); ++e) {  // x ticks
        if ((e - first_epoch) % step != 0 && e != last_epoch) continue;
        const int x = x_of(e);
        cv::line(image, {x, bottom}, {x, bottom + 4}, black, 1);
        const std::string text = std::to_string(e);
        int baseline = 0;
        const cv::Size size = cv::getTextSize(text, font, 0.4, 1, &baseline);
        cv::putText(image, text, {x - size.width / 2, bottom + 18}, font, 0.4, black, 1, cv::LINE_AA);
    }
    cv::line(image, {left, top}, {left, bottom}, black, 1);
    cv::line(image, {left, bottom}, {right, bottom}, black, 1);
    cv::putText(image, "epoch", {(left + right) / 2 - 20, bottom + 38}, font, 0.45, black, 1, cv::LINE_AA);
    // The y label, written horizontally then turned a quarter to the left.
    int baseline = 0;
    const cv::Size label_size = cv::getTextSize(y_label, font, 0.45, 1, &baseline);
    cv::Mat label(label_size.height + baseline + 4, label_size.width + 4, CV_8UC3, cv::Scalar(255, 255, 255));
    cv::putText(label, y_label, {2, label_size.height + 2}, font, 0.45, black, 1, cv::LINE_AA);
    cv::rotate(label, label, cv::ROTATE_90_COUNTERCLOCKWISE);
    const int label_y = std::max(area.y, (top + bottom) / 2 - label.rows / 2);
    if (label_y + label.rows <= image.rows && area.x + 4 + label.cols <= image.cols)
        label.copyTo(image(cv::Rect(area.x + 4, label_y, label.cols, label.rows)));
    std::vector<cv::Point> points;
    for (const CurvePoint& r : rows) points.emplace_back(x_of(r.epoch), y_of(value_of(r)));
    if (points.size() > 1) cv::polylines(image, points, false, color, 2, cv::LINE_AA);
    for (const cv::Point& p : points) cv::circle(image, p, 3, color, cv::FILLED, cv::LINE_AA);
}

}  // namespace

void write_curves(const fs::path& path, const std::vector<CurvePoint>& rows, const std::string& title) {
    cv::Mat image(430, 1000, CV_8UC3, cv::Scalar(255, 255, 255));
    cv::putText(image, title, {16, 24}, cv::FONT_HERSHEY_SIMPLEX, 0.55, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    double loss_max = 0;
    for (const CurvePoint& r : rows)
        if (std::isfinite(r.train_loss)) loss_max = std::max(loss_max, r.train_loss);
    draw_panel(image, {0, 30, 500, 400}, rows, [](const CurvePoint& r) { return r.train_loss; }, "Training loss (mean over steps)",
               "train loss", nice_ceiling(loss_max * 1.05), cv::Scalar(180, 90, 20));
    draw_panel(image, {500, 30, 500, 400}, rows, [](const CurvePoint& r) { return r.val_dice; },
               "Validation Dice (per-image mean)", "val Dice", 1.0, cv::Scalar(40, 40, 200));
    std::vector<uchar> png;
    if (!cv::imencode(".png", image, png)) throw Error(fmt::format("{}: PNG encoding failed", path.string()));
    write_file_atomic(path.string(), {std::span<const uint8_t>(png.data(), png.size())});
}

}  // namespace resunet
