// Tests for bench/bench_resunet (the Table 1 report), run as a program on a tiny network: the JSON, CSV, chart and
// Markdown it writes (every row, ordered percentiles, parameters, provenance, the paper's improvement rate), the
// scores on Kvasir-SEG at the model's own size, and the one-line errors for bad input before any long work.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include "apps/lib/version.h"
#include "engine/engine.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace resunet;

namespace {

const std::string kKvasirRoot = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";

std::string read_text(const fs::path& path) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

struct TempDir {
    fs::path path;
    TempDir() {
        char pattern[] = "/tmp/resunet-bench-XXXXXX";
        if (::mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
        path = pattern;
    }
    ~TempDir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
    std::string operator/(const std::string& name) const { return (path / name).string(); }
};

struct Result {
    int code = -1;
    std::string out, err;
};

// Runs bench_resunet; `arguments` that name a --json or --csv may replace the previous run's (--overwrite).
Result bench(const TempDir& dir, const std::string& arguments) {
    const fs::path binary = fs::canonical("/proc/self/exe").parent_path().parent_path() / "bench" / "bench_resunet";
    const bool writes = arguments.find("--json") != std::string::npos || arguments.find("--csv") != std::string::npos;
    const std::string command = binary.string() + " " + arguments + (writes ? " --overwrite" : "") + " >" + (dir / "stdout") + " 2>" + (dir / "stderr");
    const int status = std::system(command.c_str());
    Result r;
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = read_text(dir / "stdout");
    r.err = read_text(dir / "stderr");
    return r;
}

// A width-4 depth-4 model file with size 32 in its metadata (random weights).
std::string tiny_model(const TempDir& dir, int width) {
    ResUNetConfig config;
    config.width = width;
    config.depth = 4;
    config.height = config.width_px = 32;
    const std::string path = dir / fmt::format("w{}.safetensors", width);
    save_safetensors(path, init_weights(build_resunet(config), 1), resunet_metadata(config));
    return path;
}

TEST(BenchResunet, RandomWeightsReportEveryRowWithOrderedStatistics) {
    TempDir dir;
    const Result r = bench(dir, "--width 4 --size 32 --batch 2 --runs 5 --threads 1 --also-width 8 --json " + (dir / "t.json") +
                                    " --csv " + (dir / "t.csv") + " --chart " + (dir / "c.png"));
    ASSERT_EQ(r.code, 0) << r.err;
    const json report = json::parse(read_text(dir / "t.json"));
    ASSERT_EQ(report["rows"].size(), 6u);  // fp32, int8, int8-static at widths 4 and 8
    EXPECT_EQ(report["tool_version"], tool_version("bench_resunet"));
    EXPECT_NE(r.out.find("| " + tool_version("bench_resunet") + " |"), std::string::npos) << r.out;
    ResUNetConfig config;
    config.width = 4;
    config.height = config.width_px = 32;
    const Graph graph = build_resunet(config);
    EXPECT_EQ(report["micro_batch"], "default");
    for (const json& row : report["rows"]) {
        SCOPED_TRACE(row.dump().substr(0, 200));
        // --micro-batch default: fp32 rows 2 images per pass at batch 2 where that changes no number (AVX-512
        // classes), else 1; int8 rows 1.
        EXPECT_EQ(row["micro_batch"], row["precision"] == "fp32" && resunet::fp32_micro_batch_keeps_numbers_here() ? 2 : 1);
        const double min = row["latency_min_ms"], median = row["latency_median_ms"], p90 = row["latency_p90_ms"],
                     p99 = row["latency_p99_ms"], max = row["latency_max_ms"];
        EXPECT_GT(min, 0);
        EXPECT_LE(min, median);
        EXPECT_LE(median, p90);
        EXPECT_LE(p90, p99);
        EXPECT_LE(p99, max);
        EXPECT_NEAR(row["images_per_s"].get<double>(), 1000.0 * 2 / median, 1e-6 * row["images_per_s"].get<double>());
        EXPECT_EQ(row["runs"], 5);
        EXPECT_EQ(row["weights"], "random");
        EXPECT_GT(row["peak_rss_bytes"].get<double>(), row["engine_total_bytes"].get<double>());
        if (row["width"] == 4) {
            EXPECT_EQ(row["parameters"].get<int64_t>(), graph.num_parameters());
        }
        // The paper's improvement rate against the fp32 row of the same width.
        double fp32_rss = 0;
        for (const json& other : report["rows"])
            if (other["precision"] == "fp32" && other["width"] == row["width"]) fp32_rss = other["peak_rss_bytes"];
        EXPECT_NEAR(row["memory_improvement_rate_pct"].get<double>(),
                    100.0 * (fp32_rss - row["peak_rss_bytes"].get<double>()) / row["peak_rss_bytes"].get<double>(), 1e-9);
        EXPECT_FALSE(row.contains("eval"));
    }
    EXPECT_FALSE(report["provenance"]["git_commit"].get<std::string>().empty());
    EXPECT_NE(r.out.find("RANDOM"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("| static-int8 | 8 (random) |"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("Provenance:"), std::string::npos) << r.out;
    std::stringstream csv(read_text(dir / "t.csv"));
    std::string line;
    int lines = 0;
    while (std::getline(csv, line)) ++lines;
    EXPECT_EQ(lines, 7);
    EXPECT_FALSE(cv::imread(dir / "c.png").empty());
}

// With measured plans (--tune fast) and a plan cache, each row's plan is compiled first in a process
// of its own, which measures it into a cold cache; the timed row then runs it from the cache, so its peak RSS
// is the plan's. The report says what planning cost; --plan-cache none measures in the timed row itself.
TEST(BenchResunet, PlansAreMeasuredInAProcessOfTheirOwnBeforeTheTimedRow) {
    TempDir dir;
    const std::string common = "--random-weights --width 16 --size 32 --batch 2 --runs 1 --threads 1 --json " + (dir / "t.json");
    Result r = bench(dir, common + " --tune fast --plan-cache " + (dir / "plans"));
    ASSERT_EQ(r.code, 0) << r.err;
    json report = json::parse(read_text(dir / "t.json"));
    ASSERT_EQ(report["rows"].size(), 3u);
    EXPECT_NE(r.out.find("Plans (`resunet plan --save-plan`"), std::string::npos) << r.out;  // every row names its plan id
    for (const json& row : report["rows"]) EXPECT_TRUE(row.contains("plan_id")) << row.dump().substr(0, 300);
    for (const json& row : report["rows"]) {
        SCOPED_TRACE(row.dump().substr(0, 300));
        ASSERT_TRUE(row.contains("planning"));
        EXPECT_GT(row["planning"]["compile_ms"].get<double>(), 0);
        EXPECT_GT(row["planning"]["peak_rss_bytes"].get<double>(), 0);
        const std::string plan = row.contains("int8_plan") ? row["int8_plan"] : row["plan"];
        EXPECT_NE(plan.find("from the plan cache"), std::string::npos) << plan;
    }
    // the cold cache: fp32's and int8's plans measured by their planning processes (static-int8 reads int8's)
    EXPECT_NE(report["rows"][0]["planning"]["plan"].get<std::string>().find("measured: no cached plan"), std::string::npos);
    EXPECT_NE(report["rows"][1]["planning"]["plan"].get<std::string>().find("measured: no cached plan"), std::string::npos);
    EXPECT_NE(r.out.find("- Plans (measured: --tune fast or full) are compiled first in a process of their own"), std::string::npos) << r.out;
    r = bench(dir, common + " --tune fast --plan-cache none");
    ASSERT_EQ(r.code, 0) << r.err;
    report = json::parse(read_text(dir / "t.json"));
    for (const json& row : report["rows"]) EXPECT_FALSE(row.contains("planning")) << row.dump().substr(0, 300);
}

// Three test images at batch 2 and micro-batch 2: the last batch of one image runs padded.
TEST(BenchResunet, ScoresAModelOnKvasirAtItsOwnSize) {
    TempDir dir;
    const std::string model = tiny_model(dir, 4);
    const Result r = bench(dir, "--model " + model + " --width 4 --size 64 --batch 2 --micro-batch 2 --runs 2 --threads 1 --precision int8 --data " +
                                    kKvasirRoot + " --split " + (dir / "split.json") + " --limit 3 --json " + (dir / "t.json") +
                                    " --examples " + (dir / "e.png"));
    ASSERT_EQ(r.code, 0) << r.err;
    const json report = json::parse(read_text(dir / "t.json"));
    ASSERT_EQ(report["rows"].size(), 1u);
    const json& row = report["rows"][0];
    EXPECT_EQ(row["weights"], "model");
    EXPECT_EQ(row["eval"]["images"], 3);
    EXPECT_EQ(row["eval"]["size"], 32);  // the model file's resunet.size, not --size
    EXPECT_EQ(report["size"], 64);
    const double dice = row["eval"]["original_size"]["dice_mean"];
    EXPECT_GE(dice, 0.0);
    EXPECT_LE(dice, 1.0);
    EXPECT_TRUE(fs::exists(dir / "split.json"));
    EXPECT_FALSE(cv::imread(dir / "e.png").empty());
    EXPECT_NE(r.out.find("Scores use the model's own input size, 32x32"), std::string::npos) << r.out;
}

// --micro-batch auto: each row measures its candidates (powers of two dividing the batch) in a child of its
// own, each checked against micro-batch 1, and is then timed and scored at the one it chose.
TEST(BenchResunet, MicroBatchAutoMeasuresEachRowsCandidates) {
    TempDir dir;
    const std::string model = tiny_model(dir, 4);
    const Result r = bench(dir, "--model " + model + " --width 4 --size 32 --batch 4 --runs 2 --threads 1 --micro-batch auto "
                                "--plan-cache none --data " + kKvasirRoot + " --split " + (dir / "split.json") +
                                " --limit 3 --json " + (dir / "t.json"));
    ASSERT_EQ(r.code, 0) << r.err;
    const json report = json::parse(read_text(dir / "t.json"));
    EXPECT_EQ(report["micro_batch"], "auto");
    ASSERT_EQ(report["rows"].size(), 3u);
    for (const json& row : report["rows"]) {
        SCOPED_TRACE(row.dump().substr(0, 300));
        ASSERT_TRUE(row.contains("micro_batch_search"));
        const json& search = row["micro_batch_search"];
        const int chosen = search["micro_batch"];
        EXPECT_EQ(row["micro_batch"], chosen);  // the timed row ran the choice
        ASSERT_GE(search["trials"].size(), 2u);  // 1 and 2 at least (4 unless 2 was slower)
        EXPECT_EQ(search["trials"][0]["micro_batch"], 1);
        bool found = false;
        for (const json& t : search["trials"]) {
            EXPECT_EQ(4 % t["micro_batch"].get<int>(), 0);
            EXPECT_GT(t["median_ms"].get<double>(), 0);
            if (t["micro_batch"] == chosen) {
                found = true;
                EXPECT_EQ(t["verdict"], "ok");
            }
        }
        EXPECT_TRUE(found);
        EXPECT_EQ(row["eval"]["images"], 3);  // a last batch of 3 runs padded to the micro-batch
        EXPECT_NE(r.out.find(fmt::format("  - {} (width 4): {}", row["precision"].get<std::string>(),
                                         search["summary"].get<std::string>())),
                  std::string::npos)
            << r.out;
    }
    EXPECT_NE(r.out.find("Micro-batch measured per row (--micro-batch auto)"), std::string::npos) << r.out;
}

// Without --model, Table 1 uses the trained model of --model-dir (default models/resunet-w64-s224) when it
// has --width, scored on Kvasir-SEG's test split of its split.json; --random-weights, another width, or no
// such model give random weights, and the report says why.
TEST(BenchResunet, DefaultModelFolderIsUsedUnlessRandomWeightsAreAsked) {
    TempDir dir;
    fs::create_directories(dir / "shipped");
    fs::copy_file(tiny_model(dir, 4), dir / "shipped/model.safetensors");
    const std::string common = " --width 4 --size 32 --batch 2 --runs 1 --threads 1 --precision fp32 --limit 2 --json " + (dir / "t.json");
    Result r = bench(dir, "--model-dir " + (dir / "shipped") + common);
    ASSERT_EQ(r.code, 0) << r.err;
    json report = json::parse(read_text(dir / "t.json"));
    EXPECT_EQ(report["model"], dir / "shipped/model.safetensors");
    EXPECT_EQ(report["rows"][0]["weights"], "model");
    if (fs::is_directory(kKvasirRoot + "/images")) {
        EXPECT_EQ(report["data"], kKvasirRoot);
        EXPECT_EQ(report["rows"][0]["eval"]["images"], 2);
    }
    EXPECT_NE(r.out.find("the default model"), std::string::npos) << r.out;

    r = bench(dir, "--random-weights" + common);
    ASSERT_EQ(r.code, 0) << r.err;
    report = json::parse(read_text(dir / "t.json"));
    EXPECT_EQ(report["rows"][0]["weights"], "random");
    EXPECT_EQ(report["weights_note"], "--random-weights");

    // Without --model-dir: the repository's folder has no width-8 model (nor, before it ships, any).
    r = bench(dir, "--width 8 --size 32 --batch 2 --runs 1 --threads 1 --precision fp32 --json " + (dir / "t.json"));
    ASSERT_EQ(r.code, 0) << r.err;
    report = json::parse(read_text(dir / "t.json"));
    EXPECT_EQ(report["rows"][0]["weights"], "random");
    EXPECT_TRUE(report.contains("weights_note"));
}

TEST(BenchResunet, BadInputIsOneLineErrorBeforeAnyWork) {
    TempDir dir;
    const std::string model = tiny_model(dir, 4);
    auto expect_error = [&](const std::string& arguments, const std::string& needle) {
        SCOPED_TRACE(arguments);
        const Result r = bench(dir, arguments);
        EXPECT_EQ(r.code, 2);  // a usage error, as in `resunet`
        EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
        EXPECT_EQ(r.err.find(" run "), std::string::npos) << "timed runs started: " << r.err;
        EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    };
    expect_error("--model " + (dir / "missing.safetensors"), "missing.safetensors");
    expect_error("--model " + model + " --width 8 --size 32", "is a width-4 model but --width is 8");
    std::ofstream(dir / "blocker") << "a file, not a folder\n";
    expect_error("--width 4 --size 32 --json " + (dir / "blocker/t.json"), "is not a folder");
    expect_error("--width 4 --size 32 --data " + kKvasirRoot, "--data needs --model");
    expect_error("--model " + model + " --width 4 --size 32 --data " + (dir / "no-data"), "no-data");
    expect_error("--width 4 --size 32 --batch 3 --micro-batch 2", "multiple of --micro-batch");
    expect_error("--width 4 --size 32 --micro-batch 0", "--micro-batch: must be a whole number from 1 to 4096, default or auto, not 0");
    expect_error("--width 4 --size 32 --micro-batch fast", "--micro-batch: must be a whole number from 1 to 4096, default or auto, not fast");
    expect_error("--width 4 --size 32 --model-dir " + (dir / "no-model-here"), "no model.safetensors there");
    expect_error("--width 4 --size 32 --random-weights --model " + model, "exclude each other");
    expect_error("--width 4 --size 32 --warmup 0", "--warmup: must be greater than 0, not 0 (see --help)");
    expect_error("--width 4 --size 32 --threads -2", "--threads: must be 0 or more, not -2 (see --help)");
    fs::create_directories(dir / "w4");
    fs::copy_file(model, dir / "w4/model.safetensors");
    expect_error("--width 8 --size 32 --model-dir " + (dir / "w4"), "is a width-4 model but --width is 8");
    // A truncated model file.
    const std::string bytes = read_text(model);
    std::ofstream(dir / "cut.safetensors", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
    expect_error("--model " + (dir / "cut.safetensors") + " --width 4 --size 32", "cut.safetensors");
}

}  // namespace
