// Tests for apps/lib/{train,cv,eval}_command (`resunet train`, `cv`, `eval`) on a small slice of Kvasir-SEG (24 pairs, width 4,
// depth 2, 32x32, batch 4, 2 epochs, one thread): every run file is written and loads, a resumed run equals an
// uninterrupted one, folds give the same numbers whatever the number run side by side, eval agrees with
// evaluate_split, config files feed the flags, and bad input is refused before any work (exit 2) while a NaN mid-run
// stops with exit 1 and keeps the last good checkpoint.
#include <gtest/gtest.h>

#include <stdlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include "apps/lib/cli_common.h"
#include "apps/lib/cv_command.h"
#include "apps/lib/eval_command.h"
#include "apps/lib/evaluate.h"
#include "apps/lib/predict_command.h"
#include "apps/lib/train_command.h"
#include "apps/lib/version.h"
#include "data/dataset.h"
#include "data/split.h"
#include "engine/engine.h"
#include "graph/atomic_file.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/model_config.h"
#include "graph/safetensors.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;
using namespace resunet;

namespace {

const std::string kKvasirRoot = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";

std::string read_text(const fs::path& path) {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

std::vector<std::string> read_lines(const fs::path& path) {
    std::ifstream in(path);
    std::vector<std::string> lines;
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
}

// Largest |a - b| over tensors of the same names; a missing or mis-shaped tensor fails the test.
double max_difference(const TensorMap& a, const TensorMap& b) {
    EXPECT_EQ(a.size(), b.size());
    double worst = 0;
    for (const auto& [name, tensor] : a) {
        auto it = b.find(name);
        if (it == b.end()) {
            ADD_FAILURE() << "missing tensor " << name;
            continue;
        }
        EXPECT_EQ(tensor.shape, it->second.shape) << name;
        if (tensor.dtype != DType::f32 || tensor.shape != it->second.shape) continue;
        for (int64_t i = 0; i < tensor.num_elements(); ++i)
            worst = std::max(worst, static_cast<double>(std::fabs(tensor.f32()[i] - it->second.f32()[i])));
    }
    return worst;
}

// Text written to a FILE* by the code under test.
class CapturedFile {
  public:
    CapturedFile() : file_(std::tmpfile()) {}
    ~CapturedFile() { std::fclose(file_); }
    CapturedFile(const CapturedFile&) = delete;
    CapturedFile& operator=(const CapturedFile&) = delete;
    std::FILE* get() { return file_; }
    std::string text() {
        std::fflush(file_);
        std::rewind(file_);
        std::string result;
        char buffer[4096];
        for (size_t n; (n = std::fread(buffer, 1, sizeof buffer, file_)) > 0;) result.append(buffer, n);
        return result;
    }

  private:
    std::FILE* file_;
};

class TrainCliTest : public ::testing::Test {
  protected:
    static void SetUpTestSuite() {
        char pattern[] = "/tmp/resunet-train-cli-XXXXXX";
        ASSERT_NE(::mkdtemp(pattern), nullptr);
        root_ = pattern;
        // One uninterrupted 2-epoch run that several tests read.
        report_ = new TrainReport(run_train(small(root_ / "full")));
    }
    static void TearDownTestSuite() {
        delete report_;
        report_ = nullptr;
        std::error_code ec;
        fs::remove_all(root_, ec);
    }

    // The small configuration of every test: 24 pairs (19 train / 5 test), width 4, depth 2, 32x32, batch 4.
    static TrainCommandOptions small(const fs::path& out) {
        TrainCommandOptions o;
        o.data_dir = kKvasirRoot;
        o.out_dir = out.string();
        o.limit = 24;
        o.width = 4;
        o.depth = 2;
        o.size = 32;
        o.batch = 4;
        o.epochs = 2;
        o.threads = 1;
        o.loader_threads = 1;
        o.log = nullptr;
        o.out = nullptr;
        // These tests compare runs made apart (resumed, folds side by side): measured kernels could differ.
        o.conv_algorithm = "direct";
        return o;
    }

    static fs::path root_;
    static TrainReport* report_;
};

fs::path TrainCliTest::root_;
TrainReport* TrainCliTest::report_ = nullptr;

TEST_F(TrainCliTest, TrainWritesEveryRunFile) {
    const fs::path run = root_ / "full";
    for (const char* name : {"config.toml", "split.json", "metrics.csv", "last.safetensors", "best.safetensors", "train.log", "curves.png"})
        EXPECT_TRUE(fs::is_regular_file(run / name)) << name;
    for (const auto& entry : fs::directory_iterator(run))  // no temp files left behind
        EXPECT_NE(entry.path().filename().string()[0], '.') << entry.path();

    const std::vector<std::string> csv = read_lines(run / "metrics.csv");
    ASSERT_EQ(csv.size(), 3u);
    EXPECT_EQ(csv[0], "epoch,lr,train_loss,val_dice,val_iou,val_miou,epoch_seconds,loader_wait_seconds,loader_wait_share");
    for (int row = 1; row <= 2; ++row) {
        std::stringstream fields(csv[static_cast<size_t>(row)]);
        std::vector<double> values;
        for (std::string field; std::getline(fields, field, ',');) values.push_back(std::stod(field));
        ASSERT_EQ(values.size(), 9u) << csv[static_cast<size_t>(row)];
        EXPECT_EQ(values[0], row);
        EXPECT_DOUBLE_EQ(values[1], 1e-4);
        EXPECT_TRUE(std::isfinite(values[2]) && values[2] > 0);
        for (int c = 3; c <= 5; ++c) EXPECT_TRUE(values[static_cast<size_t>(c)] >= 0 && values[static_cast<size_t>(c)] <= 1);
        EXPECT_GE(values[8], 0.0);
        EXPECT_LE(values[8], 1.0);
    }
    ASSERT_EQ(report_->epochs.size(), 2u);
    EXPECT_EQ(report_->train_images, 19u);
    EXPECT_EQ(report_->val_images, 5u);

    const Checkpoint last = load_checkpoint((run / "last.safetensors").string());
    EXPECT_EQ(last.state.epoch, 2);
    EXPECT_EQ(last.state.step, 2 * 4);  // 19 images, batch 4, last incomplete batch dropped
    EXPECT_EQ(last.input_shape, (Dims{3, 32, 32}));

    // best.safetensors is a plain model file: config from its metadata, and an engine compiles from it.
    const SafetensorsFile best = load_safetensors((run / "best.safetensors").string());
    const ResUNetConfig config = infer_resunet_config(best.tensors, best.metadata, 224);
    EXPECT_EQ(config.width, 4);
    EXPECT_EQ(config.depth, 2);
    EXPECT_EQ(config.height, 32);
    EXPECT_EQ(best.tensors.count("adam.exp_avg.e1.conv_a.weight"), 0u);
    EXPECT_EQ(best.metadata.at("resunet.epoch"), std::to_string(report_->best_epoch));
    Engine engine(build_resunet(config), best.tensors, {});

    const cv::Mat curves = cv::imread((run / "curves.png").string());
    EXPECT_FALSE(curves.empty());
    const std::string config_text = read_text(run / "config.toml");
    EXPECT_NE(config_text.find("width=4"), std::string::npos) << config_text;
    EXPECT_NE(config_text.find("limit=24"), std::string::npos);
    EXPECT_EQ(config_text.find("resume"), std::string::npos);
    const std::string log = read_text(run / "train.log");
    EXPECT_NE(log.find("epoch 2/2"), std::string::npos) << log;
    EXPECT_NE(log.find("validation after each epoch: the test side of"), std::string::npos) << log;
    const Dataset dataset = scan_dataset(kKvasirRoot);
    const Split split = load_split((run / "split.json").string(), dataset);
    EXPECT_EQ(split.train_ids.size() + split.test_ids.size(), 24u);
}

// --val-folds K: validation on fold 1 of K of the training side; the test side is never read.
TEST_F(TrainCliTest, ValidationFoldComesFromTheTrainingSide) {
    TrainCommandOptions o = small(root_ / "val-folds");
    o.epochs = 1;
    o.val_folds = 4;
    o.split_path = (root_ / "full" / "split.json").string();  // 19 train / 5 test ids
    const TrainReport report = run_train(o);
    const Dataset dataset = scan_dataset(kKvasirRoot);
    const Split split = load_split(o.split_path, dataset);
    const std::vector<Fold> folds = make_folds(split.train_ids, 4, o.seed);
    EXPECT_EQ(report.val_images, folds[0].val_ids.size());
    EXPECT_EQ(report.train_images + report.val_images, split.train_ids.size());
    const std::string log = read_text(root_ / "val-folds" / "train.log");
    EXPECT_NE(log.find("fold 1 of 4 of the training side"), std::string::npos) << log;
    EXPECT_NE(read_text(root_ / "val-folds" / "config.toml").find("val-folds=4"), std::string::npos);
    // A run made before --val-folds existed (no key in its config) reads as --val-folds 0.
    std::string config = read_text(root_ / "full" / "config.toml");
    ASSERT_NE(config.find("val-folds=0\n"), std::string::npos) << config;
    config.erase(config.find("val-folds=0\n"), std::string("val-folds=0\n").size());
    check_same_config(root_ / "full", config, true);  // the file on disk has the key, the text does not: equal
    o.val_folds = 1;
    try {
        run_train(o);
        ADD_FAILURE() << "expected a UsageError";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("--val-folds"), std::string::npos) << e.what();
    }
}

// conv_plan.txt: written when a run starts, reused by --resume; a damaged one is refused with a hint.
TEST_F(TrainCliTest, ResumeReusesTheConvPlan) {
    TrainCommandOptions o = small(root_ / "conv-plan");
    o.width = 8;  // 3x3 layers of 8 and 16 channels: our own Winograd applies where the CPU has AVX2
    o.conv_algorithm = "measured";
    o.epochs = 1;
    run_train(o);
    const fs::path plan = root_ / "conv-plan" / "conv_plan.txt";
    ASSERT_TRUE(fs::is_regular_file(plan));
    const std::string text = read_text(plan);
    EXPECT_NE(text.find("e1.conv_b forward "), std::string::npos) << text;
    EXPECT_NE(text.find("e1.conv_b backward_data "), std::string::npos) << text;
    // Force every pass to direct: the resumed run follows the file, not a new measurement.
    std::string forced;
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
        if (line.empty() || line[0] == '#') continue;
        forced += line.substr(0, line.rfind(' ')) + " direct\n";
    }
    write_file_atomic(plan.string(), forced);
    o.epochs = 2;
    o.resume = true;
    run_train(o);
    const std::string log = read_text(root_ / "conv-plan" / "train.log");
    EXPECT_NE(log.find("0 of"), std::string::npos) << log;
    EXPECT_NE(log.find("conv_plan.txt reused"), std::string::npos) << log;
    EXPECT_EQ(read_text(plan), forced);  // never rewritten
    write_file_atomic(plan.string(), "e1.conv_b forward\n");
    o.epochs = 3;
    try {
        run_train(o);
        ADD_FAILURE() << "expected a UsageError";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("expected 'layer pass algorithm'"), std::string::npos) << e.what();
    }
}

TEST_F(TrainCliTest, ResumeAfterEpochOneEqualsAnUninterruptedRun) {
    TrainCommandOptions o = small(root_ / "resumed");
    o.epochs = 1;
    run_train(o);
    EXPECT_EQ(load_checkpoint((root_ / "resumed" / "last.safetensors").string()).state.epoch, 1);
    o.epochs = 2;
    o.resume = true;
    const TrainReport resumed = run_train(o);
    EXPECT_EQ(resumed.first_epoch, 2);

    const Checkpoint a = load_checkpoint((root_ / "full" / "last.safetensors").string());
    const Checkpoint b = load_checkpoint((root_ / "resumed" / "last.safetensors").string());
    EXPECT_LE(max_difference(a.state.weights, b.state.weights), 1e-6);
    EXPECT_LE(max_difference(a.state.adam_first_moment, b.state.adam_first_moment), 1e-6);
    EXPECT_LE(max_difference(a.state.adam_second_moment, b.state.adam_second_moment), 1e-6);
    EXPECT_EQ(a.state.step, b.state.step);
    EXPECT_EQ(a.state.learning_rate, b.state.learning_rate);
    ASSERT_EQ(resumed.epochs.size(), 2u);
    for (size_t i = 0; i < 2; ++i) {
        EXPECT_NEAR(resumed.epochs[i].train_loss, report_->epochs[i].train_loss, 1e-6) << "epoch " << i + 1;
        EXPECT_NEAR(resumed.epochs[i].val_dice, report_->epochs[i].val_dice, 1e-6) << "epoch " << i + 1;
    }
    EXPECT_EQ(read_lines(root_ / "resumed" / "metrics.csv").size(), 3u);
    EXPECT_EQ(resumed.best_epoch, report_->best_epoch);
}

TEST_F(TrainCliTest, RefusesBadInputBeforeAnyWork) {
    // Missing data.
    TrainCommandOptions o = small(root_ / "refused");
    o.data_dir = (root_ / "no-such-data").string();
    EXPECT_THROW(run_train(o), UsageError);
    EXPECT_EQ(train_command(o), 2);
    // Unwritable out folder.
    o = small("/proc/resunet-no-such-folder/run");
    EXPECT_THROW(run_train(o), UsageError);

    // An existing run with a different configuration, with and without --resume; its files stay as they were.
    const std::string config_before = read_text(root_ / "full" / "config.toml");
    o = small(root_ / "full");
    o.learning_rate = 2e-4;
    try {
        run_train(o);
        ADD_FAILURE() << "expected a UsageError";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("different configuration"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("lr = 0.0001 there, 0.0002 now"), std::string::npos) << e.what();
    }
    EXPECT_EQ(train_command(o), 2);
    o.resume = true;
    EXPECT_THROW(run_train(o), UsageError);
    // The same configuration without --resume would restart over a checkpoint.
    o = small(root_ / "full");
    EXPECT_THROW(run_train(o), UsageError);
    EXPECT_EQ(read_text(root_ / "full" / "config.toml"), config_before);

    // A checkpoint of another width (its config.toml gone, so only the checkpoint can tell).
    const fs::path copy = root_ / "other-width";
    fs::create_directories(copy);
    fs::copy_file(root_ / "full" / "last.safetensors", copy / "last.safetensors");
    fs::copy_file(root_ / "full" / "split.json", copy / "split.json");
    o = small(copy);
    o.width = 8;
    o.resume = true;
    try {
        run_train(o);
        ADD_FAILURE() << "expected a UsageError";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("width-4"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(copy / "config.toml"));
    // A value config.toml cannot hold unchanged (found by fuzz_config): refused, not written half-right.
    o = small(root_ / "[[\"\"/x\"# y");
    try {
        run_train(o);
        ADD_FAILURE() << "expected a UsageError";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("cannot be written to config.toml"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(root_ / "[[\"\"/x\"# y" / "config.toml"));
    o = small(root_ / "run #2");
    EXPECT_THROW(run_train(o), UsageError);
    // Double quotes, ';' and brackets are fine.
    o = small(root_ / "run \"2\" [a;b]");
    o.epochs = 1;
    EXPECT_NO_THROW(run_train(o));
    // --resume with nothing to resume.
    o = small(root_ / "nothing-here");
    o.resume = true;
    EXPECT_THROW(run_train(o), UsageError);
}

// --init: a run starts from another run's model file, here at another input size (fine-tuning 32 -> 64); with a
// vanishing learning rate its learnable weights after one epoch are still the file's. A model of another width, a
// missing file, and an int8 file are refused before any work.
TEST_F(TrainCliTest, InitStartsFromAModelFileAtAnotherSize) {
    const fs::path model = root_ / "full" / "best.safetensors";
    TrainCommandOptions o = small(root_ / "init");
    o.init_path = model.string();
    o.size = 64;
    o.epochs = 1;
    o.learning_rate = 1e-12;
    o.seed = 99;  // its own initial weights would differ from the file's
    run_train(o);
    const TensorMap source = load_safetensors(model.string()).tensors;
    const Checkpoint after = load_checkpoint((root_ / "init" / "last.safetensors").string());
    EXPECT_EQ(after.input_shape, (Dims{3, 64, 64}));
    double worst = 0, moved_from_seed = 0;
    const ResUNetConfig config = infer_resunet_config(source, {}, 64);
    const TensorMap seeded = init_weights(build_resunet(config), o.seed);
    size_t compared = 0;
    for (const auto& [name, tensor] : after.state.weights) {
        if (name.find("running_") != std::string::npos) continue;  // BN statistics move with the data, not the lr
        const auto& expected = source.at(name);
        ASSERT_EQ(expected.shape, tensor.shape) << name;
        for (int64_t i = 0; i < tensor.num_elements(); ++i) {
            worst = std::max(worst, static_cast<double>(std::fabs(tensor.f32()[i] - expected.f32()[i])));
            moved_from_seed = std::max(moved_from_seed, static_cast<double>(std::fabs(tensor.f32()[i] - seeded.at(name).f32()[i])));
        }
        ++compared;
    }
    EXPECT_GT(compared, 10u);
    EXPECT_LE(worst, 1e-6);
    EXPECT_GT(moved_from_seed, 1e-3);  // not the seeded initial weights
    EXPECT_NE(read_text(root_ / "init" / "train.log").find("initial weights from"), std::string::npos);

    o = small(root_ / "init-wide");
    o.init_path = model.string();
    o.width = 8;
    try {
        run_train(o);
        ADD_FAILURE() << "expected a UsageError";
    } catch (const UsageError& e) {
        EXPECT_NE(std::string(e.what()).find("--init"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("--width 8"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(root_ / "init-wide" / "config.toml"));
    o.width = 4;
    o.init_path = (root_ / "missing.safetensors").string();
    EXPECT_THROW(run_train(o), UsageError);
    EXPECT_EQ(train_command(o), 2);
}

TEST_F(TrainCliTest, NonFiniteLossStopsWithExitOneAndKeepsTheLastCheckpoint) {
    // lr 1e-4 in epoch 1, then 1e26: the weights blow up in epoch 2 and the trainer refuses the step.
    TrainCommandOptions o = small(root_ / "nan");
    o.epochs = 3;
    o.lr_step = 1;
    o.lr_gamma = 1e30;
    const fs::path last = root_ / "nan" / "last.safetensors";
    try {
        run_train(o);
        ADD_FAILURE() << "expected resunet::Error";
    } catch (const UsageError& e) {
        ADD_FAILURE() << "not a usage error: " << e.what();
    } catch (const Error& e) {
        const std::string message = e.what();
        EXPECT_NE(message.find("epoch 2"), std::string::npos) << message;
        EXPECT_NE(message.find("step"), std::string::npos) << message;
        EXPECT_NE(message.find("non-finite"), std::string::npos) << message;
    }
    EXPECT_EQ(load_checkpoint(last.string()).state.epoch, 1);
    EXPECT_EQ(read_lines(root_ / "nan" / "metrics.csv").size(), 2u);
    EXPECT_NE(read_text(root_ / "nan" / "train.log").find("stopped: epoch 2"), std::string::npos);
    // The same failure through the command: exit 1, checkpoint still the one of epoch 1.
    o.resume = true;
    EXPECT_EQ(train_command(o), 1);
    EXPECT_EQ(load_checkpoint(last.string()).state.epoch, 1);
}

TEST_F(TrainCliTest, FoldsGiveTheSameNumbersWhateverRunsSideBySide) {
    CvCommandOptions cv;
    cv.train = small(root_ / "cv-k2");
    cv.folds = 2;
    cv.threads_per_fold = 1;
    cv.parallel_folds = 2;
    CapturedFile markdown;
    cv.train.out = markdown.get();
    const CvReport side_by_side = run_cv(cv);
    cv.train.out_dir = (root_ / "cv-k1").string();
    cv.train.out = nullptr;
    cv.parallel_folds = 1;
    const CvReport one_at_a_time = run_cv(cv);

    ASSERT_EQ(side_by_side.folds.size(), 2u);
    ASSERT_EQ(one_at_a_time.folds.size(), 2u);
    EXPECT_EQ(side_by_side.parallel_folds, 2);
    EXPECT_EQ(one_at_a_time.parallel_folds, 1);
    for (size_t k = 0; k < 2; ++k) {
        const FoldReport& a = side_by_side.folds[k];
        const FoldReport& b = one_at_a_time.folds[k];
        ASSERT_TRUE(a.ok) << a.error;
        ASSERT_TRUE(b.ok) << b.error;
        EXPECT_EQ(a.seed, 42u + k);
        ASSERT_EQ(a.train.epochs.size(), 2u);
        ASSERT_EQ(b.train.epochs.size(), 2u);
        for (size_t e = 0; e < 2; ++e) {
            EXPECT_EQ(a.train.epochs[e].train_loss, b.train.epochs[e].train_loss) << "fold " << k << " epoch " << e + 1;
            EXPECT_EQ(a.train.epochs[e].val_dice, b.train.epochs[e].val_dice) << "fold " << k << " epoch " << e + 1;
            EXPECT_EQ(a.train.epochs[e].val_iou, b.train.epochs[e].val_iou);
            EXPECT_EQ(a.train.epochs[e].val_miou, b.train.epochs[e].val_miou);
        }
        const fs::path fold = fmt::format("fold{}", k);
        const Checkpoint ca = load_checkpoint((root_ / "cv-k2" / fold / "last.safetensors").string());
        const Checkpoint cb = load_checkpoint((root_ / "cv-k1" / fold / "last.safetensors").string());
        EXPECT_EQ(max_difference(ca.state.weights, cb.state.weights), 0.0) << "fold " << k;
        for (const char* name : {"config.toml", "split.json", "metrics.csv", "best.safetensors", "train.log", "curves.png"})
            EXPECT_TRUE(fs::is_regular_file(root_ / "cv-k2" / fold / name)) << fold << "/" << name;
        EXPECT_EQ(a.train.train_images + a.train.val_images, 19u);  // the training side of the 24-pair split
    }
    EXPECT_EQ(side_by_side.dice.count, 2u);
    EXPECT_DOUBLE_EQ(side_by_side.dice.mean, (side_by_side.folds[0].train.last()->val_dice + side_by_side.folds[1].train.last()->val_dice) / 2);
    EXPECT_DOUBLE_EQ(side_by_side.dice.mean, one_at_a_time.dice.mean);
    EXPECT_DOUBLE_EQ(side_by_side.iou.std, one_at_a_time.iou.std);

    const nlohmann::json summary = nlohmann::json::parse(read_text(root_ / "cv-k2" / "cv_summary.json"));
    ASSERT_EQ(summary["folds"].size(), 2u);
    EXPECT_EQ(summary["tool_version"], tool_version("resunet"));
    EXPECT_DOUBLE_EQ(summary["summary"]["dice"]["mean"].get<double>(), side_by_side.dice.mean);
    EXPECT_TRUE(summary["folds"][0].contains("loader_wait_share"));
    const std::string text = markdown.text();
    EXPECT_NE(text.find("mean ± std"), std::string::npos) << text;
    EXPECT_NE(text.find("loader wait share"), std::string::npos) << text;
}

TEST_F(TrainCliTest, EvalAgreesWithEvaluateSplit) {
    const fs::path run = root_ / "full";
    EvalCommandOptions o;
    o.model_path = (run / "best.safetensors").string();
    o.data_dir = kKvasirRoot;
    o.split_path = (run / "split.json").string();
    o.precision = Precision::fp32;
    o.threads = 1;
    o.batch = 2;
    o.json_path = (root_ / "eval.json").string();
    o.log = nullptr;
    CapturedFile out;
    o.out = out.get();
    const EvalReport report = run_eval(o);

    const Dataset dataset = scan_dataset(kKvasirRoot);
    const Split split = load_split(o.split_path, dataset);
    const SafetensorsFile file = load_safetensors(o.model_path);
    const Graph graph = build_resunet(infer_resunet_config(file.tensors, file.metadata, 224));
    EngineOptions engine_options;
    engine_options.threads = 1;
    Engine engine(graph, file.tensors, engine_options);
    PreprocessOptions preprocess;
    preprocess.width = preprocess.height = 32;
    const EvalResult expected = evaluate_split(dataset, indices_of(dataset, split.test_ids), preprocess,
                                               [&](const float* x, int n, float* y) { engine.run(x, n, y); }, 2, 1);
    ASSERT_EQ(report.result.images, 5u);
    EXPECT_EQ(report.result.ids, expected.ids);
    EXPECT_DOUBLE_EQ(report.result.original.dice.mean, expected.original.dice.mean);
    EXPECT_DOUBLE_EQ(report.result.original.iou.std, expected.original.iou.std);
    EXPECT_DOUBLE_EQ(report.result.model_size.mean_iou.mean, expected.model_size.mean_iou.mean);
    EXPECT_DOUBLE_EQ(report.result.model_size.pooled_dice, expected.model_size.pooled_dice);
    // The training run validated the same model on the same ids.
    EXPECT_NEAR(report.result.original.dice.mean, report_->epochs[static_cast<size_t>(report_->best_epoch - 1)].val_dice, 1e-7);
    PixelCounts pooled;
    for (const MaskMetrics& m : expected.per_image) pooled += m.counts;
    EXPECT_DOUBLE_EQ(report.pooled_mean_iou_original, metrics_from_counts(pooled).mean_iou);
    EXPECT_GE(report.pooled_mean_iou_model, 0.0);
    EXPECT_LE(report.pooled_mean_iou_model, 1.0);

    const std::string text = out.text();
    for (const char* label : {"Dice (foreground), per-image mean ± std", "IoU (foreground), pooled over all pixels",
                              "mIoU (background and polyp), per-image mean ± std", "model size (32x32)", "original size"})
        EXPECT_NE(text.find(label), std::string::npos) << label << "\n" << text;
    EXPECT_NE(text.find(fmt::format("{:.4f} ± {:.4f}", expected.original.dice.mean, expected.original.dice.std)), std::string::npos)
        << text;
    const nlohmann::json json = nlohmann::json::parse(read_text(o.json_path));
    EXPECT_DOUBLE_EQ(json["original_size"]["dice"]["mean"].get<double>(), expected.original.dice.mean);
    EXPECT_EQ(json["tool_version"], tool_version("resunet"));
    EXPECT_NE(text.find("Tool: " + tool_version("resunet") + "."), std::string::npos) << text;
    EXPECT_DOUBLE_EQ(json["model_size"]["pooled_mean_iou"].get<double>(), report.pooled_mean_iou_model);

    o.model_path = (root_ / "no-such-model.safetensors").string();
    EXPECT_THROW(run_eval(o), UsageError);
    EXPECT_EQ(eval_command(o), 2);
}

TEST(TrainCliConfig, FlagsComeFromTheConfigFileAndTheCommandLineWins) {
    char pattern[] = "/tmp/resunet-train-cli-config-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    const fs::path dir = pattern;
    const fs::path config = dir / "run.toml";
    std::ofstream(config) << "# comment\nwidth = 8\nlr = 2.5e-4\nskip-bad = true\ndata = \"/some data\"\n[train]\ndepth = 3\n";

    CLI::App app;
    CLI::App* command = app.add_subcommand("train");
    TrainCommandOptions options;
    add_train_flags(*command, options);
    app.parse("train --config " + config.string() + " --width 12 --epochs 7", false);
    apply_config_file(*command);
    EXPECT_EQ(options.width, 12);  // command line wins
    EXPECT_EQ(options.epochs, 7);
    EXPECT_EQ(options.depth, 3);   // [train] section
    EXPECT_DOUBLE_EQ(options.learning_rate, 2.5e-4);
    EXPECT_TRUE(options.skip_bad);
    EXPECT_EQ(options.data_dir, "/some data");
    EXPECT_EQ(options.batch, 8);   // default

    // The effective configuration round-trips through a config file.
    std::ofstream(dir / "effective.toml") << train_config_text(options);
    CLI::App again;
    CLI::App* command_again = again.add_subcommand("train");
    TrainCommandOptions read_back;
    add_train_flags(*command_again, read_back);
    again.parse("train --config " + (dir / "effective.toml").string(), false);
    apply_config_file(*command_again);
    EXPECT_EQ(train_config_text(read_back), train_config_text(options));
    EXPECT_EQ(read_back.width, 12);
    EXPECT_DOUBLE_EQ(read_back.learning_rate, 2.5e-4);

    // Unknown keys and bad values are refused like bad flags.
    std::ofstream(dir / "unknown.toml") << "widht = 8\n";
    CLI::App unknown;
    CLI::App* command_unknown = unknown.add_subcommand("train");
    TrainCommandOptions ignored;
    add_train_flags(*command_unknown, ignored);
    unknown.parse("train --config " + (dir / "unknown.toml").string(), false);
    EXPECT_THROW(apply_config_file(*command_unknown), CLI::ConfigError);
    std::ofstream(dir / "bad.toml") << "width = 0\n";
    CLI::App bad;
    CLI::App* command_bad = bad.add_subcommand("train");
    add_train_flags(*command_bad, ignored);
    bad.parse("train --config " + (dir / "bad.toml").string(), false);
    EXPECT_THROW(apply_config_file(*command_bad), CLI::ValidationError);
    fs::remove_all(dir);
}

// --depth takes what build_resunet builds (1..8), eval refuses --size 0, and eval's default precision is
// predict's (int8, dynamic scales), stated in --help.
TEST(TrainCliConfig, DepthAndSizeRangesAndTheDefaultPrecision) {
    auto parse_train = [](const std::string& flags, TrainCommandOptions& o) {
        CLI::App app;
        add_train_flags(*app.add_subcommand("train"), o);
        app.parse("train " + flags, false);
    };
    for (const char* depth : {"0", "9", "12"}) {
        TrainCommandOptions o;
        EXPECT_THROW(parse_train(std::string("--depth ") + depth, o), CLI::ValidationError) << depth;
        CvCommandOptions cv;
        CLI::App app;
        add_cv_flags(*app.add_subcommand("cv"), cv);
        EXPECT_THROW(app.parse(std::string("cv --depth ") + depth, false), CLI::ValidationError) << depth;
    }
    for (int depth : {1, kMaxResUNetDepth}) {
        TrainCommandOptions o;
        EXPECT_NO_THROW(parse_train(fmt::format("--depth {}", depth), o)) << depth;
        EXPECT_EQ(o.depth, depth);
        // Every accepted depth builds (at the smallest size it allows).
        EXPECT_NO_THROW(build_resunet({.width = 1, .depth = depth, .height = 1 << depth, .width_px = 1 << depth})) << depth;
    }

    // Number checks name the flag and the rule in a short line.
    for (const auto& [flags, message] : std::vector<std::pair<std::string, std::string>>{
             {"--lr 0", "--lr: must be greater than 0, not 0"}, {"--lr-gamma -0.5", "--lr-gamma: must be greater than 0, not -0.5"},
             {"--lr abc", "--lr: 'abc' is not a number"}}) {
        TrainCommandOptions o;
        try {
            parse_train(flags, o);
            ADD_FAILURE() << flags << " was accepted";
        } catch (const CLI::ValidationError& e) {
            EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
            EXPECT_LT(std::string(e.what()).size(), 100u) << e.what();
        }
    }

    auto eval_app = [](CLI::App& app, EvalCommandOptions& o) { add_eval_flags(*app.add_subcommand("eval"), o); };
    {
        CLI::App app;
        EvalCommandOptions o;
        eval_app(app, o);
        EXPECT_THROW(app.parse("eval --model m --data d --size 0", false), CLI::ValidationError);
    }
    {
        CLI::App app;
        EvalCommandOptions o;
        eval_app(app, o);
        app.parse("eval --model m --data d --size 32", false);
        EXPECT_EQ(o.size, 32);
        EXPECT_EQ(o.precision, Precision::int8) << "eval's default precision is predict's";
        const std::string help = app.get_subcommand("eval")->help();
        EXPECT_NE(help.find("int8 (scales computed per image, the default)"), std::string::npos) << help;
        EXPECT_NE(help.find("scores do not depend on it"), std::string::npos) << help;
    }
    EXPECT_EQ(EvalCommandOptions{}.precision, PredictOptions{}.precision);
    EXPECT_EQ(PredictOptions{}.precision, Precision::int8);
}

}  // namespace
