// One vocabulary across `resunet` and `bench_resunet`, and outputs a user can rely on (issue 34): the same
// precision words and flag names (an old spelling is a one-line usage error naming the right one), the same
// --width default, bench_resunet reading width and size from a model file, every existing output refused
// without --overwrite and every output path checked before any work, --overwrite leaving no stale file of an
// earlier run, eval --progress, flags that would be silently overridden refused, convert keeping an int8 file
// exact, predict's probability maps, --threshold and summary.json, and eval's per-image rows. The built
// programs run on a tiny model (width 4, depth 2, 32x32) trained for one epoch on 12 Kvasir-SEG pairs.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <vector>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include "apps/lib/command_flags.h"
#include "tests/support/command.h"

namespace fs = std::filesystem;

namespace {

const std::string kKvasirRoot = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";
const std::string kImageA = kKvasirRoot + "/images/cju0qkwl35piu0993l0dewei2.jpg";
const std::string kImageB = kKvasirRoot + "/images/cju0qoxqj9q6s0835b43399p4.jpg";

using Result = resunet::test_support::CommandResult;
using resunet::test_support::build_dir;
Result run(const std::string& command) { return resunet::test_support::run_command(command); }
std::string resunet() { return (build_dir() / "apps" / "resunet").string() + " "; }
std::string bench() { return (build_dir() / "bench" / "bench_resunet").string() + " "; }
// bench_resunet is not built with -DRESUNET_BENCH=OFF (the sanitizer build): its cases are left out there.
bool have_bench() { return fs::exists(build_dir() / "bench" / "bench_resunet"); }
bool runnable(const std::string& command) { return have_bench() || command.rfind(bench(), 0) != 0; }

std::string read_text(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

// The value in `row` of the column `name` of `header` ("" when absent).
std::string csv_column(const std::string& header, const std::string& row, const std::string& name) {
    std::istringstream names(header), values(row);
    std::string column, value;
    while (std::getline(names, column, ',')) {
        if (!std::getline(values, value, ',')) return "";
        if (column == name) return value;
    }
    return "";
}

bool one_line(const std::string& text) { return !text.empty() && text.find('\n') == text.size() - 1; }

// The shared tiny model: RUN/best.safetensors (fp32, its split.json beside it) and int8.safetensors (stored scales).
class CliVocabulary : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        root_ = new fs::path(fs::temp_directory_path() / ("resunet_test_cli_vocabulary_" + std::to_string(::getpid())));
        fs::remove_all(*root_);
        fs::create_directories(*root_);
        const Result trained = run(resunet() + "train --data " + kKvasirRoot + " --out " + (*root_ / "run").string() +
                                   " --width 4 --depth 2 --size 32 --batch 4 --epochs 1 --limit 12 --threads 1 --loader-threads 1");
        ASSERT_EQ(trained.code, 0) << trained.out;
        const Result quantized = run(resunet() + "quantize --model " + model() + " --out " + int8_model() +
                                     " --calibration-count 1 --threads 1");
        ASSERT_EQ(quantized.code, 0) << quantized.out;
    }
    static void TearDownTestSuite() {
        std::error_code ec;
        fs::remove_all(*root_, ec);
        delete root_;
    }
    static std::string model() { return (*root_ / "run" / "best.safetensors").string(); }
    static std::string split() { return (*root_ / "run" / "split.json").string(); }
    static std::string int8_model() { return (*root_ / "int8.safetensors").string(); }
    static fs::path dir(const std::string& name) { return *root_ / name; }
    static std::string eval_args() {
        return "eval --model " + model() + " --data " + kKvasirRoot + " --split " + split() + " --threads 1 --limit 2 ";
    }
    static std::string bench_args() { return "--batch 1 --runs 1 --warmup 1 --threads 1 --precision fp32 "; }
    static fs::path* root_;
};
fs::path* CliVocabulary::root_ = nullptr;

// Precision: static-int8 in both programs; int8-static, bench_resunet's old word, refused with a hint in both.
TEST_F(CliVocabulary, OnePrecisionWordWithAHintForTheOldOne) {
    for (const std::string& command :
         {resunet() + "predict " + kImageA + " --model " + model() + " --out " + dir("p").string() + " --precision int8-static",
          resunet() + eval_args() + "--precision int8-static", bench() + "--random-weights --precision int8-static"}) {
        if (!runnable(command)) continue;
        const Result r = run(command);
        EXPECT_EQ(r.code, 2) << command << "\n" << r.out;
        EXPECT_TRUE(one_line(r.out)) << r.out;
        EXPECT_NE(r.out.find("did you mean 'static-int8'?"), std::string::npos) << r.out;
    }
    if (!have_bench()) return;
    const fs::path json = dir("bench-static.json");
    const Result r = run(bench() + "--random-weights --width 4 --size 32 --batch 1 --runs 1 --threads 1 --precision static-int8 "
                                   "--json " + json.string());
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_EQ(nlohmann::json::parse(read_text(json))["rows"][0]["precision"], "static-int8");
}

// One flag name per thing: the old names are one-line usage errors that name the new ones.
TEST_F(CliVocabulary, RenamedFlagsNameTheNewOne) {
    const std::string out = " --out " + dir("renamed").string();
    const std::vector<std::pair<std::string, std::string>> cases = {
        {resunet() + "predict " + kImageA + " --model " + model() + out + " --calibration-images 2", "use --calibration-count"},
        {resunet() + eval_args() + "--calibration-images 2", "use --calibration-count"},
        {resunet() + "quantize --model " + model() + out + "/m.safetensors --calibration-images 2", "use --calibration-count"},
        {bench() + "--random-weights --eval-limit 3", "use --limit"},
    };
    for (const auto& [command, hint] : cases) {
        if (!runnable(command)) continue;
        const Result r = run(command);
        EXPECT_EQ(r.code, 2) << command << "\n" << r.out;
        EXPECT_TRUE(one_line(r.out)) << r.out;
        EXPECT_NE(r.out.find(hint), std::string::npos) << r.out;
    }
    EXPECT_FALSE(fs::exists(dir("renamed")));
}

// --width: 64 (the paper's network, the shipped model) in summary, train, cv and bench_resunet alike.
TEST_F(CliVocabulary, WidthDefaultIsTheSameEverywhere) {
    EXPECT_EQ(resunet::TrainCommandOptions{}.width, 64);
    EXPECT_EQ(resunet::CvCommandOptions{}.train.width, 64);
    for (const std::string& command : {resunet() + "summary --help", resunet() + "train --help", resunet() + "cv --help",
                                       bench() + "--help"}) {
        if (!runnable(command)) continue;
        const Result r = run(command);
        EXPECT_EQ(r.code, 0) << r.out;
        EXPECT_NE(r.out.find("=64"), std::string::npos) << command << "\n" << r.out;
    }
}

// bench_resunet --model: width and size from the file, as resunet takes them; a --width that differs is refused.
TEST_F(CliVocabulary, BenchReadsWidthAndSizeFromTheModel) {
    if (!have_bench()) GTEST_SKIP() << "bench_resunet is not built";
    const fs::path json = dir("bench-model.json");
    Result r = run(bench() + "--model " + model() + " " + bench_args() + "--json " + json.string());
    ASSERT_EQ(r.code, 0) << r.out;
    const nlohmann::json report = nlohmann::json::parse(read_text(json));
    EXPECT_EQ(report["width"], 4);
    EXPECT_EQ(report["size"], 32);
    EXPECT_EQ(report["rows"][0]["weights"], "model");
    r = run(bench() + "--model " + model() + " --width 8 " + bench_args());
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find("width-4 model but --width is 8"), std::string::npos) << r.out;
}

// bench_resunet --csv: the Dice and IoU of --json's "eval", per row.
TEST_F(CliVocabulary, BenchCsvHasDiceAndIou) {
    if (!have_bench()) GTEST_SKIP() << "bench_resunet is not built";
    const fs::path csv = dir("bench.csv"), json = dir("bench-eval.json");
    const Result r = run(bench() + "--model " + model() + " " + bench_args() + "--data " + kKvasirRoot + " --split " + split() +
                         " --limit 2 --csv " + csv.string() + " --json " + json.string());
    ASSERT_EQ(r.code, 0) << r.out;
    std::istringstream lines(read_text(csv));
    std::string header, row;
    std::getline(lines, header);
    std::getline(lines, row);
    EXPECT_NE(header.find(",dice_mean,dice_std,iou_mean,iou_std,miou_mean,miou_std"), std::string::npos) << header;
    const double dice = nlohmann::json::parse(read_text(json))["rows"][0]["eval"]["original_size"]["dice_mean"];
    EXPECT_NEAR(std::stod(csv_column(header, row, "dice_mean")), dice, 1e-6) << row;
    EXPECT_FALSE(csv_column(header, row, "iou_mean").empty()) << row;
}

// Outputs that exist are refused without --overwrite, and output paths are checked before any work: eval --json
// into a "folder" that is a file fails at once; bench's --json and --csv as well. A missing folder is created,
// for predict, quantize and convert alike.
TEST_F(CliVocabulary, OutputsCheckedBeforeAnyWork) {
    const fs::path existing = dir("existing.json"), blocker = dir("blocker");
    std::ofstream(existing) << "{}\n";
    std::ofstream(blocker) << "a file, not a folder\n";
    const std::vector<std::pair<std::string, std::string>> cases = {
        {resunet() + eval_args() + "--json " + existing.string(), "exists; pass --overwrite"},
        {resunet() + eval_args() + "--json " + (blocker / "x.json").string(), "is not a folder"},
        {bench() + "--model " + model() + " " + bench_args() + "--json " + existing.string(), "exists; pass --overwrite"},
        {bench() + "--model " + model() + " " + bench_args() + "--csv " + existing.string(), "exists; pass --overwrite"},
        {bench() + "--model " + model() + " " + bench_args() + "--csv " + (blocker / "x.csv").string(), "is not a folder"},
        {resunet() + "predict " + kImageA + " --model " + model() + " --out " + (blocker / "sub").string(), "not a folder"},
    };
    for (const auto& [command, reason] : cases) {
        if (!runnable(command)) continue;
        const Result r = run(command);
        EXPECT_EQ(r.code, 2) << command << "\n" << r.out;
        EXPECT_NE(r.out.find(reason), std::string::npos) << r.out;
        EXPECT_EQ(r.out.find("| metric"), std::string::npos) << "the work ran first: " << r.out;
    }
    EXPECT_EQ(read_text(existing), "{}\n");
    Result r = run(resunet() + eval_args() + "--json " + existing.string() + " --overwrite");
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_EQ(nlohmann::json::parse(read_text(existing))["format"], "resunet-eval");
    // Missing folders are created by every command that writes into one.
    r = run(resunet() + "predict " + kImageA + " --model " + model() + " --out " + (dir("new1") / "a" / "b").string() + " --threads 1");
    EXPECT_EQ(r.code, 0) << r.out;
    r = run(resunet() + "quantize --model " + model() + " --out " + (dir("new2") / "a" / "m.safetensors").string() +
            " --calibration-count 1 --threads 1");
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_TRUE(fs::exists(dir("new2") / "a" / "m.safetensors"));
    r = run(resunet() + "convert --model " + model() + " --out " + (dir("new3") / "a" / "m.safetensors").string());
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_TRUE(fs::exists(dir("new3") / "a" / "m.safetensors"));
}

// predict --overwrite into the folder of an earlier run removes that run's files (the ones its summary.json lists),
// so none of them looks like the new run's; a file predict did not make stays.
TEST_F(CliVocabulary, OverwriteLeavesNoStaleOutputs) {
    const fs::path out = dir("stale");
    Result r = run(resunet() + "predict " + kImageA + " " + kImageB + " --model " + model() + " --out " + out.string() +
                   " --threads 1 --overlay --save-probabilities");
    ASSERT_EQ(r.code, 0) << r.out;
    std::ofstream(out / "notes.txt") << "mine\n";
    ASSERT_TRUE(fs::exists(out / "cju0qoxqj9q6s0835b43399p4_overlay.png"));
    r = run(resunet() + "predict " + kImageA + " --model " + model() + " --out " + out.string() + " --threads 1");
    EXPECT_EQ(r.code, 2) << r.out;  // without --overwrite: refused, nothing touched
    EXPECT_TRUE(fs::exists(out / "cju0qoxqj9q6s0835b43399p4_overlay.png"));
    r = run(resunet() + "predict " + kImageA + " --model " + model() + " --out " + out.string() + " --threads 1 --overwrite");
    ASSERT_EQ(r.code, 0) << r.out;
    std::set<std::string> names;
    for (const fs::directory_entry& entry : fs::directory_iterator(out)) names.insert(entry.path().filename().string());
    EXPECT_EQ(names, (std::set<std::string>{"cju0qkwl35piu0993l0dewei2.png", "notes.txt", "summary.json"}));
    const nlohmann::json summary = nlohmann::json::parse(read_text(out / "summary.json"));
    EXPECT_EQ(summary["rows"].size(), 1u);
}

// eval --progress: the bar predict has.
TEST_F(CliVocabulary, EvalShowsProgress) {
    const Result r = run(resunet() + eval_args() + "--progress");
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("2/2 images"), std::string::npos) << r.out;
}

// A flag another one would override is refused, not ignored: --fast-decode with --overlay; --precision int8
// (scales computed per image) on a file whose stored static scales it would run instead; --calibration-count
// where nothing is calibrated; convert of an int8 file, whose scales must stay exact.
TEST_F(CliVocabulary, OverriddenFlagsAreUsageErrors) {
    const std::string predict = resunet() + "predict " + kImageA + " --out " + dir("overridden").string() + " --threads 1 ";
    const std::vector<std::pair<std::string, std::string>> cases = {
        {predict + "--model " + model() + " --fast-decode --overlay", "--fast-decode and --overlay"},
        {predict + "--model " + int8_model() + " --precision int8", "use --precision static-int8"},
        {resunet() + "eval --model " + int8_model() + " --data " + kKvasirRoot + " --split " + split() + " --precision int8",
         "use --precision static-int8"},
        {bench() + "--model " + int8_model() + " --batch 1 --runs 1 --precision int8", "static-int8"},
        {resunet() + "convert --model " + int8_model() + " --out " + (dir("overridden") / "m.f16.safetensors").string(),
         "is an int8 file"},
        {predict + "--model " + model() + " --calibration-count 2", "applies to --precision static-int8 only"},
        {resunet() + eval_args() + "--calibration-count 2", "applies to --precision static-int8 only"},
        {predict + "--model " + int8_model() + " --precision static-int8 --calibration-count 2", "stores its static scales"},
        {predict + "--model " + model() + " --threshold 0", "--threshold must be between 0 and 1"},
        {predict + "--model " + model() + " --threshold 1.5", "--threshold must be between 0 and 1"},
    };
    for (const auto& [command, reason] : cases) {
        if (!runnable(command)) continue;
        const Result r = run(command);
        EXPECT_EQ(r.code, 2) << command << "\n" << r.out;
        EXPECT_TRUE(one_line(r.out)) << r.out;
        EXPECT_NE(r.out.find(reason), std::string::npos) << r.out;
    }
    EXPECT_FALSE(fs::exists(dir("overridden")));
    // Without --precision the file's own scales run, and the report says so.
    const Result r = run(predict + "--model " + int8_model());
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("static scales stored in the model"), std::string::npos) << r.out;
}

// predict --save-probabilities and --threshold: an 8-bit map (255 x probability) at the image's size, whose
// pixels above 255 x T are the mask's at that threshold; summary.json written without --masks too, listing
// inputs, outputs, failures, model, version and plan; eval's --json rows laid out as its rows.
TEST_F(CliVocabulary, ProbabilitiesThresholdAndSummary) {
    const fs::path out = dir("probabilities"), strict = dir("strict");
    Result r = run(resunet() + "predict " + kImageA + " --model " + model() + " --out " + out.string() +
                   " --threads 1 --save-probabilities");
    ASSERT_EQ(r.code, 0) << r.out;
    const cv::Mat mask = cv::imread((out / "cju0qkwl35piu0993l0dewei2.png").string(), cv::IMREAD_UNCHANGED);
    const cv::Mat probability = cv::imread((out / "cju0qkwl35piu0993l0dewei2_probability.png").string(), cv::IMREAD_UNCHANGED);
    ASSERT_FALSE(probability.empty());
    ASSERT_EQ(probability.size(), mask.size());
    ASSERT_EQ(probability.type(), CV_8UC1);
    size_t disagree = 0;  // away from 0.5, where the 8-bit rounding cannot tell
    for (int y = 0; y < mask.rows; ++y)
        for (int x = 0; x < mask.cols; ++x) {
            const int p = probability.at<uint8_t>(y, x);
            if (p != 127 && p != 128 && (p > 128) != (mask.at<uint8_t>(y, x) == 255)) ++disagree;
        }
    EXPECT_EQ(disagree, 0u);
    r = run(resunet() + "predict " + kImageA + " --model " + model() + " --out " + strict.string() + " --threads 1 --threshold 0.9");
    ASSERT_EQ(r.code, 0) << r.out;
    const cv::Mat strict_mask = cv::imread((strict / "cju0qkwl35piu0993l0dewei2.png").string(), cv::IMREAD_UNCHANGED);
    EXPECT_LE(cv::countNonZero(strict_mask), cv::countNonZero(mask));
    cv::Mat above;
    cv::compare(probability, 0.9 * 255 + 1, above, cv::CMP_GE);  // clearly above 0.9
    cv::Mat missed;
    cv::bitwise_and(above, ~strict_mask, missed);
    EXPECT_EQ(cv::countNonZero(missed), 0);

    const nlohmann::json summary = nlohmann::json::parse(read_text(out / "summary.json"));
    EXPECT_EQ(summary["format"], "resunet-predict");
    EXPECT_EQ(summary["model"], model());
    EXPECT_EQ(summary["threshold"], 0.5);
    EXPECT_EQ(summary["tool_version"].get<std::string>().rfind("resunet ", 0), 0u);
    EXPECT_EQ(summary["plan"].get<std::string>().size(), 9u);
    EXPECT_TRUE(summary["failures"].empty());
    ASSERT_EQ(summary["rows"].size(), 1u);
    const nlohmann::json& row = summary["rows"][0];
    EXPECT_EQ(row["input"], kImageA);
    EXPECT_EQ(row["width"], mask.cols);
    EXPECT_EQ(row["outputs"], (nlohmann::json{"cju0qkwl35piu0993l0dewei2.png", "cju0qkwl35piu0993l0dewei2_probability.png"}));

    const fs::path json = dir("eval-rows.json");
    r = run(resunet() + eval_args() + "--json " + json.string());
    ASSERT_EQ(r.code, 0) << r.out;
    const nlohmann::json eval = nlohmann::json::parse(read_text(json));
    ASSERT_EQ(eval["rows"].size(), 2u);
    for (const char* key : {"input", "id", "width", "height", "dice", "iou", "mean_iou"})
        EXPECT_TRUE(eval["rows"][0].contains(key)) << key << ": " << eval["rows"][0];
}

// A failed image leaves no output and is listed in summary.json's failures.
TEST_F(CliVocabulary, FailedImagesAreInTheSummary) {
    const fs::path out = dir("failed"), broken = dir("broken.jpg");
    std::ofstream(broken) << "not a JPEG";
    const Result r = run(resunet() + "predict " + kImageA + " " + broken.string() + " --model " + model() + " --out " +
                         out.string() + " --threads 1");
    EXPECT_EQ(r.code, 1) << r.out;
    const nlohmann::json summary = nlohmann::json::parse(read_text(out / "summary.json"));
    ASSERT_EQ(summary["failures"].size(), 1u);
    EXPECT_EQ(summary["failures"][0]["input"], broken.string());
    EXPECT_FALSE(fs::exists(out / "broken.png"));
}

// The everyday commands' --help speaks plainly: no kernel names or instruction sets (those are in docs/cli.md).
TEST_F(CliVocabulary, HelpInPlainWords) {
    for (const std::string command : {"predict", "eval", "quantize", "convert"}) {
        const Result r = run(resunet() + command + " --help");
        EXPECT_EQ(r.code, 0) << r.out;
        for (const char* jargon : {"winograd_int8", "VNNI", "127-level", "micro-batch", "arena", "OpenMP"})
            EXPECT_EQ(r.out.find(jargon), std::string::npos) << command << " --help says " << jargon << "\n" << r.out;
    }
}

}  // namespace
