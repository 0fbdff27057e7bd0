// See resunet_report.h.
#include "bench/resunet_report.h"

#include <fmt/format.h>

#include <algorithm>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "engine/micro_batch.h"
#include "graph/atomic_file.h"

namespace resunet::bench {

using json = nlohmann::json;

namespace {

// "0.8162 ± 0.0058" from an evaluated row (per-image mean ± std at the original resolution), else n/a.
std::string score(const json& row, const std::string& key) {
    if (!row.contains("eval")) return "n/a";
    const json& s = row["eval"]["original_size"];
    return fmt::format("{:.4f} ± {:.4f}", s[key + "_mean"].get<double>(), s[key + "_std"].get<double>());
}

}  // namespace

std::string markdown(const json& report) {
    std::string md;
    const json& p = report["provenance"];
    md += fmt::format("## ResUNet on {} — batch {}, {}x{}, width {}{}\n\n", p["cpu"].get<std::string>(),
                      report["batch"].get<int>(), report["size"].get<int>(), report["size"].get<int>(),
                      report["width"].get<int>(),
                      report.contains("also_width") ? fmt::format(" and {} (random weights)", report["also_width"].get<int>()) : "");
    md += "| precision | width | Dice | IoU (fg) | mIoU (2-class) | latency median (ms) | P90 | P99 | min | max | std | first run (ms) | images/s | GFLOP/s | speed-up vs fp32 | latency reduction | parameters | peak RSS (MB) | memory improvement rate | engine bytes (MB) | model file (MB) |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const json& r : report["rows"]) {
        auto pct = [&](const char* key) { return r.contains(key) ? fmt::format("{:+.1f}%", r[key].get<double>()) : std::string("n/a"); };
        md += fmt::format("| {} | {} | {} | {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.2f} | {:.1f} | {} | {} | {} | {:.1f} | {} | {:.1f} | {} |\n",
                          r["precision"].get<std::string>(),
                          fmt::format("{}{}", r["width"].get<int>(), r["weights"] == "random" ? " (random)" : ""), score(r, "dice"), score(r, "iou"), score(r, "miou"),
                          r["latency_median_ms"].get<double>(),
                          r["latency_p90_ms"].get<double>(), r["latency_p99_ms"].get<double>(),
                          r["latency_min_ms"].get<double>(), r["latency_max_ms"].get<double>(),
                          r["latency_std_ms"].get<double>(), r["first_run_ms"].get<double>(),
                          r["images_per_s"].get<double>(), r["gflops"].get<double>(),
                          r.contains("speedup_vs_fp32") ? fmt::format("{:.2f}x", r["speedup_vs_fp32"].get<double>()) : "n/a",
                          pct("latency_reduction_vs_fp32_pct"),
                          r["parameters"].get<int64_t>(), r["peak_rss_bytes"].get<double>() / 1e6, pct("memory_improvement_rate_pct"),
                          r["engine_total_bytes"].get<double>() / 1e6,
                          report.contains("model_file_bytes") && r["weights"] == "model" ? fmt::format("{:.1f}", report["model_file_bytes"].get<double>() / 1e6) : "n/a");
    }
    md += "\nHow each figure was measured:\n";
    md += fmt::format("- Weights: {}{}.\n",
                      report["model"].get<std::string>().empty() ? "RANDOM (Kaiming, seed 1): speed and memory only, no accuracy" : report["model"].get<std::string>(),
                      report.contains("weights_note") ? fmt::format(" ({})", report["weights_note"].get<std::string>()) : "");
    if (report.contains("eval_images"))
        md += fmt::format("- Dice, IoU (fg), mIoU (2-class): per-image mean ± sample std over {} test-split images of {}, at each "
                          "image's original resolution (logits resized bilinearly, threshold 0.5); IoU (fg) is the polyp class's, "
                          "mIoU the mean of background and polyp IoU (most likely the paper's \"IoU\"). Scored in a separate "
                          "process from the timed one. Pooled and model-size scores are in the JSON.\n",
                          report["eval_images"].get<int>(), report["data"].get<std::string>());
    if (report.contains("eval_size"))
        md += fmt::format("- Scores use the model's own input size, {0}x{0} (images resized with INTER_AREA); latency and memory "
                          "use {1}x{1}.\n",
                          report["eval_size"].get<int>(), report["size"].get<int>());
    else
        md += "- Dice/IoU: n/a — they need --model and --data.\n";
    md += fmt::format("- Latency: wall time of one engine.run() on a batch of {} images (input NCHW fp32 in memory, logits out), "
                      "{} timed runs after {} warm-up run(s); the first run (cold caches, first touch) is reported separately. ",
                      report["batch"].get<int>(), report["runs"].get<int>(), report["warmup"].get<int>());
    if (report["micro_batch"].is_number()) {
        md += fmt::format("Micro-batch {} (the batch runs as {} passes of the same compiled plan).\n", report["micro_batch"].get<int>(),
                          report["batch"].get<int>() / report["micro_batch"].get<int>());
    } else if (report["micro_batch"] == "default") {
        std::string per_row;
        for (const json& r : report["rows"])
            per_row += fmt::format("{}{} {}", per_row.empty() ? "" : ", ", r["precision"].get<std::string>(), r["micro_batch"].get<int>());
        md += fmt::format("Micro-batch per row ({}): fp32 rows several images per pass where that gives the same numbers as "
                          "one (AVX-512 CPUs; the deep layers share each streamed weight), else one; int8 rows one image per "
                          "pass (dynamic scales are per pass, as in resunet predict).\n",
                          per_row);
    } else {
        md += fmt::format("Micro-batch measured per row (--micro-batch auto): the candidates dividing the batch, smallest first, "
                          "each compiled and timed on the whole batch (median of up to 3 runs), checked against micro-batch 1's "
                          "logits (fp32: max abs diff <= {:g} x max|logit|; int8: SQNR >= {:g} dB), the fastest kept (* chosen):\n",
                          kMicroBatchFp32Bound, kMicroBatchInt8Db);
        for (const json& r : report["rows"])
            if (r.contains("micro_batch_search"))
                md += fmt::format("  - {} (width {}): {}\n", r["precision"].get<std::string>(), r["width"].get<int>(),
                                  r["micro_batch_search"]["summary"].get<std::string>());
    }
    md += "- Peak RSS: VmHWM of a separate process per row (this program re-executed), after all runs: weights, "
          "engine, input and output buffers, code and libraries.\n";
    std::string planning;
    for (const json& r : report["rows"])
        if (r.contains("planning"))
            planning += fmt::format("{}{} {:.1f} s, peak RSS {:.0f} MB", planning.empty() ? "" : "; ", r["precision"].get<std::string>(),
                                    r["planning"]["compile_ms"].get<double>() / 1e3,
                                    r["planning"]["peak_rss_bytes"].get<double>() / 1e6);
    if (!planning.empty())
        md += fmt::format("- Plans (measured: --tune fast or full) are compiled first in a process of their own, which measures "
                          "them into the plan cache or reads them from it ({}); the rows then run the cached plan, so their "
                          "peak RSS is the plan's, not the measuring's.\n",
                          planning);
    md += "- Engine bytes: what the engine holds: reordered BN-folded weights + the planned activation arena + "
          "oneDNN's shared user scratchpad.\n";
    md += "- GFLOP/s: 2 x MACs of the graph x batch / median latency (int8 rows: the same MAC count).\n";
    md += "- Latency reduction: (fp32 - row) / fp32 median latency. Memory improvement rate: the paper's definition, "
          "(fp32 - row) / row peak RSS (so 208% means fp32 needs 3.08x the memory).\n";
    md += "- int8: u8 activations x s8 per-output-channel weights through oneDNN; dynamic rows compute each int8 layer's "
          "input scale and zero point from that pass's values (per image at micro-batch 1); static-int8 uses scales "
          "calibrated once (on the benchmark's input distribution without --data). The RGB stem and the 1-channel head stay fp32.\n";
    bool int8_conv_said = false;
    for (const json& r : report["rows"]) {
        if (r.value("int8_conv", std::string("direct")) == "direct") continue;
        if (!int8_conv_said && r["int8_conv"] == "mixed")
            md += "- int8 3x3 convolutions: --int8-conv mixed (each layer timed at compile time with oneDNN's u8 x s8 "
                  "direct kernel and with the fastest fp32 candidate; it runs fp32 where that was at least 10% faster "
                  "on this CPU, so those layers are exact and the row is mixed precision).\n";
        else if (!int8_conv_said)
            md += fmt::format("- int8 3x3 convolutions: --int8-conv {} (our own int8 Winograd F(2x2,3x3) where {}; it "
                              "requantizes inside the Winograd domain, so it is faster and less exact than direct).\n",
                              r["int8_conv"].get<std::string>(),
                              r["int8_conv"] == "winograd" ? "it applies"
                                                             : "the plan names it (by default a rule fixed per CPU class, "
                                                               "on CPUs whose weights have 127 levels (VNNI); elsewhere "
                                                               "every layer runs direct)");
        int8_conv_said = true;
        if (r.contains("int8_plan"))
            md += fmt::format("  {} row: {}.\n", r["precision"].get<std::string>(), r["int8_plan"].get<std::string>());
    }
    std::string plans;
    for (const json& r : report["rows"])
        if (r.contains("plan_id"))
            plans += fmt::format("{}{} {}", plans.empty() ? "" : ", ", r["precision"].get<std::string>(), r["plan_id"].get<std::string>());
    if (!plans.empty()) md += fmt::format("\nPlans (`resunet plan --save-plan` writes one; `--plan FILE` runs it again): {}\n", plans);
    const std::string tool = report.contains("tool_version") ? report["tool_version"].get<std::string>()
                                                              : "git " + p["git_commit"].get<std::string>();
    md += fmt::format("\nProvenance: {} | ISA {} | threads {} | {} | {} | {}\n", p["cpu"].get<std::string>(),
                      p["isa"].get<std::string>(), p["threads"].get<std::string>(), p["onednn"].get<std::string>(), tool,
                      p["date"].get<std::string>());
    for (const json& r : report["rows"]) {
        if (!r.contains("layers")) continue;
        md += fmt::format("\n### Per-layer profile, {} (one profiled run; waits after each primitive)\n\n", r["precision"].get<std::string>());
        if (r.contains("plan"))
            md += fmt::format("Plan (--tune {}): {}\n\n", r["tune"].get<std::string>(), r["plan"].get<std::string>());
        md += "| layer | op | kernel | precision | time (ms) | GFLOP/s | candidates tried at compile time (* chosen) |\n"
              "|---|---|---|---|---|---|---|\n";
        for (const json& l : r["layers"])
            md += fmt::format("| {} | {} | {} | {} | {:.2f} | {:.1f} | {} |\n", l["name"].get<std::string>(),
                              l["op"].get<std::string>(), l["kernel"].get<std::string>(),
                              l["precision"].get<std::string>(), l["time_ms"].get<double>(), l["gflops"].get<double>(),
                              l.value("candidates", std::string()));
    }
    return md;
}

void write_chart(const json& report, const std::string& path) {
    struct Panel {
        std::string title, key, unit;
        double scale;
    };
    std::vector<Panel> panels = {{"latency, batch " + std::to_string(report["batch"].get<int>()), "latency_median_ms", "ms", 1.0},
                                 {"peak RSS", "peak_rss_bytes", "MB", 1e-6}};
    const bool has_dice = !report["rows"].empty() && report["rows"][0].contains("eval");
    if (has_dice) panels.push_back({"Dice (test split)", "dice", "", 1.0});
    const int rows = static_cast<int>(report["rows"].size());
    const int panel_w = std::max(360, 80 + 100 * rows), h = 420, margin = 40;
    cv::Mat canvas(h, panel_w * static_cast<int>(panels.size()), CV_8UC3, cv::Scalar(255, 255, 255));
    const cv::Scalar colors[] = {{180, 119, 31}, {14, 127, 255}, {44, 160, 44}, {40, 39, 214}};
    for (size_t p = 0; p < panels.size(); ++p) {
        const int x0 = static_cast<int>(p) * panel_w;
        std::vector<double> values;
        for (const json& r : report["rows"])
            values.push_back(panels[p].key != "dice" ? r[panels[p].key].get<double>() * panels[p].scale
                             : r.contains("eval")   ? r["eval"]["original_size"]["dice_mean"].get<double>()
                                                    : 0.0);
        const double top = std::max(1e-9, *std::max_element(values.begin(), values.end())) * 1.15;
        cv::putText(canvas, panels[p].title, {x0 + margin, 28}, cv::FONT_HERSHEY_SIMPLEX, 0.6, {0, 0, 0}, 1, cv::LINE_AA);
        const int bar_w = (panel_w - 2 * margin) / static_cast<int>(std::max<size_t>(values.size(), 1));
        const int base = h - 60;
        cv::line(canvas, {x0 + margin, base}, {x0 + panel_w - margin, base}, {0, 0, 0});
        for (size_t i = 0; i < values.size(); ++i) {
            const int bh = static_cast<int>((base - 60) * values[i] / top);
            const int bx = x0 + margin + static_cast<int>(i) * bar_w + 8;
            const std::string precision = report["rows"][i]["precision"].get<std::string>();
            const cv::Scalar color = colors[precision == "fp32" ? 0 : precision == "int8" ? 1 : precision == "static-int8" ? 2 : 3];
            cv::rectangle(canvas, {bx, base - bh}, {bx + bar_w - 16, base}, color, cv::FILLED);
            const bool scored = panels[p].key != "dice" || report["rows"][i].contains("eval");
            const std::string label = !scored ? std::string("n/a")
                                      : panels[p].key == "dice" ? fmt::format("{:.4f}", values[i])
                                                                : fmt::format("{:.0f} {}", values[i], panels[p].unit);
            cv::putText(canvas, label, {bx, base - bh - 6}, cv::FONT_HERSHEY_SIMPLEX, 0.45, {0, 0, 0}, 1, cv::LINE_AA);
            const json& row = report["rows"][i];
            cv::putText(canvas, row["precision"].get<std::string>(), {bx, base + 20}, cv::FONT_HERSHEY_SIMPLEX, 0.45, {0, 0, 0}, 1,
                        cv::LINE_AA);
            cv::putText(canvas, fmt::format("w{}{}", row["width"].get<int>(), row["weights"] == "random" ? " rnd" : ""),
                        {bx, base + 38}, cv::FONT_HERSHEY_SIMPLEX, 0.4, {80, 80, 80}, 1, cv::LINE_AA);
        }
    }
    std::vector<uint8_t> png;
    cv::imencode(".png", canvas, png);
    resunet::write_file_atomic(path, std::string_view(reinterpret_cast<const char*>(png.data()), png.size()));
}

// The rows as CSV: latency, memory and, for rows scored with --data, Dice and IoU at the original size (the
// columns of --json's "eval"; empty when not scored).
std::string csv(const nlohmann::json& report) {
    std::string csv = "precision,width,weights,latency_median_ms,latency_p90_ms,latency_p99_ms,latency_min_ms,latency_max_ms,"
                      "latency_std_ms,first_run_ms,images_per_s,gflops,parameters,peak_rss_bytes,engine_total_bytes,"
                      "eval_images,dice_mean,dice_std,iou_mean,iou_std,miou_mean,miou_std,pooled_dice,pooled_iou\n";
    for (const nlohmann::json& r : report["rows"]) {
        csv += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}", r["precision"].get<std::string>(), r["width"].get<int>(),
                           r["weights"].get<std::string>(), r["latency_median_ms"].get<double>(), r["latency_p90_ms"].get<double>(),
                           r["latency_p99_ms"].get<double>(), r["latency_min_ms"].get<double>(), r["latency_max_ms"].get<double>(),
                           r["latency_std_ms"].get<double>(), r["first_run_ms"].get<double>(), r["images_per_s"].get<double>(),
                           r["gflops"].get<double>(), r["parameters"].get<int64_t>(), r["peak_rss_bytes"].get<double>(),
                           r["engine_total_bytes"].get<double>());
        if (r.contains("eval")) {
            const nlohmann::json& e = r["eval"]["original_size"];
            csv += fmt::format(",{},{},{},{},{},{},{},{},{}\n", r["eval"]["images"].get<int64_t>(), e["dice_mean"].get<double>(),
                               e["dice_std"].get<double>(), e["iou_mean"].get<double>(), e["iou_std"].get<double>(),
                               e["miou_mean"].get<double>(), e["miou_std"].get<double>(), e["pooled_dice"].get<double>(),
                               e["pooled_iou"].get<double>());
        } else {
            csv += ",,,,,,,,,\n";
        }
    }
    return csv;
}

}  // namespace resunet::bench
