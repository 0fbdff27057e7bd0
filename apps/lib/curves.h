// curves.png of a training run: the training loss and the validation Dice per epoch, two panels side by side
// (1000 x 430 pixels), drawn with OpenCV and written atomically.
//
// Intended usage:
//   std::vector<resunet::CurvePoint> points;
//   for (const EpochRecord& r : report.epochs) points.push_back({r.epoch, r.train_loss, r.val_dice});
//   resunet::write_curves(run_dir / "curves.png", points, "w16 - width 16, depth 4, size 224");
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace resunet {

// One epoch of the plot.
struct CurvePoint {
    int epoch = 0;          // 1-based
    double train_loss = 0;  // mean loss of the epoch's steps (non-finite values are drawn clipped)
    double val_dice = 0;    // in [0, 1]
};

// Draws both panels and writes the PNG with write_file_atomic; throws resunet::Error if encoding or writing fails.
void write_curves(const std::filesystem::path& path, const std::vector<CurvePoint>& points, const std::string& title);

}  // namespace resunet
