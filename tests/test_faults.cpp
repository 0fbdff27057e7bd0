// Fault tests (issue 8): a training process killed with SIGKILL, or stopped by Ctrl-C after its epoch, and
// resumed ends with the weights of an uninterrupted run; a checkpoint write cut at any byte, or killed at a random moment, leaves the previous
// checkpoint loadable; a full disk (a file-size limit) or an unwritable folder during a checkpoint or a report
// gives a clear error and keeps the previous file; stale temp files of a killed writer are cleaned up.
//
// The whole-program tests run the built `resunet` on a small slice of Kvasir-SEG (24 pairs, width 4, depth 2,
// 32x32, batch 4, one thread); the write tests run save_checkpoint / write_file_atomic in forked children so
// that a limit or a kill hits only the child.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "graph/atomic_file.h"
#include "graph/graph.h"
#include "graph/init.h"
#include "graph/safetensors.h"
#include "train/checkpoint.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace resunet;

namespace {

const std::string kKvasirRoot = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";

std::string read_text(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
}

size_t count_lines(const fs::path& path) {
    std::ifstream in(path);
    size_t lines = 0;
    for (std::string line; std::getline(in, line);) ++lines;
    return lines;
}

struct TempDir {
    fs::path path;
    TempDir() {
        char pattern[] = "/tmp/resunet-faults-XXXXXX";
        if (::mkdtemp(pattern) == nullptr) throw std::runtime_error("mkdtemp failed");
        path = pattern;
    }
    ~TempDir() {
        std::error_code ec;
        fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
        for (const auto& entry : fs::recursive_directory_iterator(path, ec))
            if (entry.is_directory(ec)) fs::permissions(entry.path(), fs::perms::owner_all, fs::perm_options::add, ec);
        fs::remove_all(path, ec);
    }
    fs::path operator/(const std::string& name) const { return path / name; }
};

// Files whose name marks them as write_file_atomic temp files.
std::vector<std::string> temp_files(const fs::path& dir) {
    std::vector<std::string> names;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const std::string name = entry.path().filename().string();
        if (name.find(".tmp.") != std::string::npos) names.push_back(name);
    }
    return names;
}

fs::path resunet_binary() { return fs::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet"; }

// A child process running the built `resunet` with stdout/stderr in files; `before_exec` runs in the child.
struct Program {
    pid_t pid = -1;
    fs::path out, err;

    Program(const std::vector<std::string>& arguments, const fs::path& log_prefix, const std::function<void()>& before_exec = {})
        : out(log_prefix.string() + ".out"), err(log_prefix.string() + ".err") {
        const std::string binary = resunet_binary().string();
        std::vector<std::string> argv_strings{binary};
        argv_strings.insert(argv_strings.end(), arguments.begin(), arguments.end());
        std::vector<char*> argv;
        for (std::string& a : argv_strings) argv.push_back(a.data());
        argv.push_back(nullptr);
        pid = ::fork();
        if (pid == 0) {
            const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (o < 0 || e < 0) ::_exit(126);
            ::dup2(o, 1);
            ::dup2(e, 2);
            ::setenv("OMP_WAIT_POLICY", "passive", 1);
            if (before_exec) before_exec();
            ::execv(binary.c_str(), argv.data());
            ::_exit(127);
        }
    }
    // Exit status, or 128 + signal number for a process killed by a signal.
    int wait() {
        int status = 0;
        while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
        pid = -1;
        if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    bool running() const {
        int status = 0;
        return ::waitpid(pid, &status, WNOHANG) == 0;
    }
    int kill_nine() {
        ::kill(pid, SIGKILL);
        return wait();
    }
    ~Program() {
        if (pid > 0) kill_nine();
    }
    std::string stderr_text() const { return read_text(err); }
};

std::vector<std::string> train_arguments(const fs::path& run, int epochs, bool resume) {
    std::vector<std::string> a{"train",    "--data",  kKvasirRoot, "--out",  run.string(), "--limit", "24",        "--width",
                               "4",        "--depth", "2",         "--size", "32",         "--batch", "4",         "--epochs",
                               std::to_string(epochs), "--lr", "0.001", "--seed", "7", "--threads", "1", "--loader-threads", "1",
                               "--conv-algorithm", "direct"};  // runs are compared: no timing-dependent kernels
    if (resume) a.push_back("--resume");
    return a;
}

// Waits until `run`/metrics.csv has `rows` epoch rows (or the program ended); false on timeout or exit.
bool wait_for_rows(const Program& program, const fs::path& run, size_t rows, double timeout_seconds = 600) {
    const auto start = std::chrono::steady_clock::now();
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < timeout_seconds) {
        if (count_lines(run / "metrics.csv") >= rows + 1) return true;
        if (!program.running()) return false;
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return false;
}

double max_difference(const TensorMap& a, const TensorMap& b) {
    EXPECT_EQ(a.size(), b.size());
    double worst = 0;
    for (const auto& [name, tensor] : a) {
        auto it = b.find(name);
        if (it == b.end() || it->second.shape != tensor.shape || tensor.dtype != DType::f32) {
            ADD_FAILURE() << "tensor " << name << " missing or of another shape";
            continue;
        }
        for (int64_t i = 0; i < tensor.num_elements(); ++i)
            worst = std::max(worst, static_cast<double>(std::fabs(tensor.f32()[i] - it->second.f32()[i])));
    }
    return worst;
}

// ------------------------------------------------------------------------------------------------ kill -9

// Kills `resunet train` twice: the first time the moment epoch 1's metrics row appears (while best, curves and
// last.safetensors of epoch 1 are being written), the second time halfway through epoch 3's training. Each
// --resume continues from whatever checkpoint survived; the final weights, Adam moments and metrics equal those
// of an uninterrupted run.
TEST(KillNine, TrainingKilledTwiceThenResumedEqualsAnUninterruptedRun) {
    ASSERT_TRUE(fs::exists(resunet_binary())) << resunet_binary();
    TempDir dir;
    const int epochs = 4;
    {
        Program full(train_arguments(dir / "full", epochs, false), dir / "full-log");
        ASSERT_EQ(full.wait(), 0) << full.stderr_text();
    }
    const fs::path run = dir / "killed";
    {
        Program first(train_arguments(run, epochs, false), dir / "first");
        ASSERT_TRUE(wait_for_rows(first, run, 1)) << first.stderr_text();
        EXPECT_EQ(first.kill_nine(), 128 + SIGKILL) << "the run ended before it could be killed";
    }
    const int checkpoint_epoch = fs::exists(run / "last.safetensors") ? load_checkpoint((run / "last.safetensors").string()).state.epoch : 0;
    fmt::print("first kill: last.safetensors holds epoch {}; temp files left: {}\n", checkpoint_epoch, temp_files(run).size());
    {
        // Kill again halfway through epoch 3 (measured on the uninterrupted run's epoch 3).
        const std::string csv = read_text(dir / "full" / "metrics.csv");
        std::stringstream rows(csv);
        std::string line;
        std::vector<double> seconds;
        std::getline(rows, line);
        while (std::getline(rows, line)) {
            std::stringstream fields(line);
            std::string field;
            for (int i = 0; i < 7; ++i) std::getline(fields, field, ',');
            seconds.push_back(std::stod(field));
        }
        ASSERT_EQ(seconds.size(), static_cast<size_t>(epochs));
        Program second(train_arguments(run, epochs, true), dir / "second");
        ASSERT_TRUE(wait_for_rows(second, run, 2)) << second.stderr_text();
        std::this_thread::sleep_for(std::chrono::duration<double>(0.5 * seconds[2]));
        EXPECT_EQ(second.kill_nine(), 128 + SIGKILL) << "the run ended before it could be killed";
    }
    const int second_epoch = load_checkpoint((run / "last.safetensors").string()).state.epoch;
    fmt::print("second kill: last.safetensors holds epoch {}\n", second_epoch);
    EXPECT_GE(second_epoch, 2);
    EXPECT_LT(second_epoch, epochs);
    {
        Program last(train_arguments(run, epochs, true), dir / "last");
        ASSERT_EQ(last.wait(), 0) << last.stderr_text();
    }

    const Checkpoint a = load_checkpoint((dir / "full" / "last.safetensors").string());
    const Checkpoint b = load_checkpoint((run / "last.safetensors").string());
    EXPECT_EQ(b.state.epoch, epochs);
    EXPECT_EQ(a.state.step, b.state.step);
    EXPECT_EQ(a.state.learning_rate, b.state.learning_rate);
    const double weights = max_difference(a.state.weights, b.state.weights);
    fmt::print("uninterrupted vs killed twice and resumed: max |weight difference| {:.3g}\n", weights);
    EXPECT_LE(weights, 1e-6);
    EXPECT_LE(max_difference(a.state.adam_first_moment, b.state.adam_first_moment), 1e-6);
    EXPECT_LE(max_difference(a.state.adam_second_moment, b.state.adam_second_moment), 1e-6);
    EXPECT_LE(max_difference(load_safetensors((dir / "full" / "best.safetensors").string()).tensors,
                             load_safetensors((run / "best.safetensors").string()).tensors),
              1e-6);
    // Same epochs, losses and scores (the timing columns differ).
    auto metric_columns = [](const std::string& csv) {
        std::stringstream rows(csv);
        std::string line, kept;
        while (std::getline(rows, line)) {
            std::stringstream fields(line);
            std::string field;
            for (int i = 0; i < 6 && std::getline(fields, field, ','); ++i) kept += field + ",";
            kept += "\n";
        }
        return kept;
    };
    EXPECT_EQ(metric_columns(read_text(run / "metrics.csv")), metric_columns(read_text(dir / "full" / "metrics.csv")));
    EXPECT_TRUE(temp_files(run).empty()) << "temp files of the killed writers were not cleaned up";
    const std::string log = read_text(run / "train.log");
    EXPECT_NE(log.find("resumed from last.safetensors"), std::string::npos) << log;
}

// ------------------------------------------------------------------------------------------------ Ctrl-C

// The first SIGINT (sent by the program itself just before step 2, through RESUNET_TEST_INTERRUPT_AT_STEPS)
// lets epoch 1 finish and write its checkpoint, then the run stops with status 130; --resume continues and
// ends with the weights of an uninterrupted run. A second SIGINT (before step 3) stops it at once: the
// signal's default action, nothing written.
// In the child before exec: the test hook, and SIGINT's default action (a test run started in the background
// of a script inherits SIGINT ignored, which `resunet train` keeps ignored).
void interrupt_at_steps(const char* steps) {
    ::setenv("RESUNET_TEST_INTERRUPT_AT_STEPS", steps, 1);
    ::signal(SIGINT, SIG_DFL);
}

TEST(CtrlC, FirstSignalFinishesTheEpochThenResumeEqualsAnUninterruptedRun) {
    ASSERT_TRUE(fs::exists(resunet_binary())) << resunet_binary();
    TempDir dir;
    {
        Program full(train_arguments(dir / "full", 3, false), dir / "full-log");
        ASSERT_EQ(full.wait(), 0) << full.stderr_text();
    }
    const fs::path run = dir / "stopped";
    {
        Program first(train_arguments(run, 3, false), dir / "first",
                      [] { interrupt_at_steps("2"); });
        EXPECT_EQ(first.wait(), 128 + SIGINT) << first.stderr_text();
    }
    EXPECT_EQ(count_lines(run / "metrics.csv"), 2u) << "header and epoch 1";
    ASSERT_TRUE(fs::exists(run / "last.safetensors"));
    EXPECT_EQ(load_checkpoint((run / "last.safetensors").string()).state.epoch, 1);
    const std::string log = read_text(run / "train.log");
    EXPECT_NE(log.find("SIGINT received: finishing epoch 1/3 (batch 2 of"), std::string::npos) << log;
    EXPECT_NE(log.find("stopped on SIGINT after epoch 1/3"), std::string::npos) << log;
    {
        Program rest(train_arguments(run, 3, true), dir / "rest");
        ASSERT_EQ(rest.wait(), 0) << rest.stderr_text();
    }
    const Checkpoint a = load_checkpoint((dir / "full" / "last.safetensors").string());
    const Checkpoint b = load_checkpoint((run / "last.safetensors").string());
    EXPECT_EQ(b.state.epoch, 3);
    EXPECT_EQ(a.state.step, b.state.step);
    EXPECT_LE(max_difference(a.state.weights, b.state.weights), 1e-6);
    EXPECT_LE(max_difference(a.state.adam_second_moment, b.state.adam_second_moment), 1e-6);
}

TEST(CtrlC, SecondSignalStopsAtOnce) {
    ASSERT_TRUE(fs::exists(resunet_binary())) << resunet_binary();
    TempDir dir;
    const fs::path run = dir / "run";
    Program program(train_arguments(run, 3, false), dir / "log",
                    [] { interrupt_at_steps("2,3"); });
    EXPECT_EQ(program.wait(), 128 + SIGINT) << program.stderr_text();
    EXPECT_FALSE(fs::exists(run / "last.safetensors")) << "epoch 1 did not end: nothing to keep";
    const std::string log = read_text(run / "train.log");
    EXPECT_NE(log.find("SIGINT received"), std::string::npos) << log;
    EXPECT_EQ(log.find("stopped on"), std::string::npos) << log;
    EXPECT_NE(program.stderr_text().find("interrupt again to stop now"), std::string::npos) << program.stderr_text();
}

TEST(CtrlC, AnIgnoredSignalStaysIgnored) {
    ASSERT_TRUE(fs::exists(resunet_binary())) << resunet_binary();
    TempDir dir;
    const fs::path run = dir / "run";
    Program program(train_arguments(run, 2, false), dir / "log", [] {
        ::setenv("RESUNET_TEST_INTERRUPT_AT_STEPS", "2", 1);
        ::signal(SIGINT, SIG_IGN);  // as `resunet train ... &` in a script
    });
    EXPECT_EQ(program.wait(), 0) << program.stderr_text();
    EXPECT_EQ(count_lines(run / "metrics.csv"), 3u) << "both epochs ran";
    EXPECT_EQ(read_text(run / "train.log").find("SIGINT"), std::string::npos);
}

// ------------------------------------------------------------------------------------- interrupted writes

struct TinyTraining {
    Graph graph;
    Trainer trainer;
    std::vector<float> images, masks;

    static Graph make_graph() {
        ResUNetConfig c;
        c.width = 4;
        c.depth = 2;
        c.height = c.width_px = 32;
        c.batch = 2;
        return build_resunet(c);
    }
    TinyTraining() : graph(make_graph()), trainer(graph, init_weights(graph, 5), {}) {
        images.resize(2 * 3 * 32 * 32);
        masks.resize(2 * 32 * 32);
        std::mt19937 rng(3);
        std::uniform_real_distribution<float> pixel(-1.0f, 1.0f);
        for (float& v : images) v = pixel(rng);
        for (size_t i = 0; i < masks.size(); ++i) masks[i] = (i % 32 > 8 && i % 32 < 20) ? 1.0f : 0.0f;
    }
    void step() { trainer.step(images.data(), masks.data()); }
};

// Runs `body` in a forked child under a file-size limit of `limit_bytes`. With `die_at_limit` the child is
// killed by SIGXFSZ when a write crosses the limit (a process killed at that byte); otherwise the write fails
// with EFBIG, as on a full disk. Returns the child's exit code, or 128 + signal. The child writes what it wants
// the parent to read into `message_path`.
int run_limited(size_t limit_bytes, bool die_at_limit, const std::function<int()>& body) {
    const pid_t pid = ::fork();
    if (pid == 0) {
        rlimit no_core{0, 0};
        ::setrlimit(RLIMIT_CORE, &no_core);
        rlimit size{static_cast<rlim_t>(limit_bytes), static_cast<rlim_t>(limit_bytes)};
        ::setrlimit(RLIMIT_FSIZE, &size);
        ::signal(SIGXFSZ, die_at_limit ? SIG_DFL : SIG_IGN);
        ::_exit(body());
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void write_message(const fs::path& path, const std::string& text) {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    (void)!::write(fd, text.data(), text.size());
    ::close(fd);
}

// A checkpoint write cut at every interesting byte (start, inside the 8-byte length, inside the JSON header,
// first data byte, middle, last byte) by SIGXFSZ: the previous checkpoint loads unchanged; the next writer
// removes the dead writer's temp file; a write that completes replaces it.
TEST(InterruptedWrite, CheckpointCutAtAnyByteLeavesThePreviousOneLoadable) {
    TempDir dir;
    TinyTraining tiny;
    const std::string path = (dir / "last.safetensors").string();
    save_checkpoint(path, tiny.trainer);  // step 0: the previous checkpoint
    const std::string previous = read_text(path);
    tiny.step();
    save_checkpoint((dir / "next.safetensors").string(), tiny.trainer);  // to learn the new file's layout
    const std::string next = read_text(dir / "next.safetensors");
    fs::remove(dir / "next.safetensors");
    ASSERT_GT(next.size(), 64u);
    uint64_t header_length = 0;
    std::memcpy(&header_length, next.data(), 8);
    const size_t data_start = 8 + static_cast<size_t>(header_length);
    const std::vector<size_t> cuts{0, 1, 4, 8, 9, data_start / 2, data_start - 1, data_start, data_start + 1,
                                   (data_start + next.size()) / 2, next.size() - 1};
    for (size_t cut : cuts) {
        SCOPED_TRACE(fmt::format("cut at byte {} of {}", cut, next.size()));
        const int result = run_limited(cut, true, [&] {
            save_checkpoint(path, tiny.trainer);
            return 0;
        });
        EXPECT_EQ(result, 128 + SIGXFSZ);
        EXPECT_EQ(read_text(path), previous);
        EXPECT_EQ(load_checkpoint(path).state.step, 0);
        EXPECT_EQ(temp_files(dir.path).size(), 1u);  // the dead writer's, never renamed
        EXPECT_EQ(remove_stale_temp_files(dir.path.string()), 1);
        EXPECT_TRUE(temp_files(dir.path).empty());
    }
    EXPECT_EQ(run_limited(next.size(), true, [&] {
                  save_checkpoint(path, tiny.trainer);
                  return 0;
              }),
              0);
    EXPECT_EQ(load_checkpoint(path).state.step, 1);
    EXPECT_TRUE(temp_files(dir.path).empty());
}

// A child rewrites the checkpoint in a loop (alternating two states) and is killed with SIGKILL at random
// moments, which lands before, during and after the write, fsync and rename: the file always loads and holds
// one of the two states.
TEST(InterruptedWrite, CheckpointWriterKilledAtRandomMomentsAlwaysLeavesALoadableFile) {
    TempDir dir;
    TinyTraining tiny;
    const std::string path = (dir / "last.safetensors").string();
    save_checkpoint(path, tiny.trainer);
    const std::string state0 = read_text(path);
    tiny.step();
    save_checkpoint((dir / "b.safetensors").string(), tiny.trainer);
    const std::string state1 = read_text(dir / "b.safetensors");
    fs::remove(dir / "b.safetensors");
    const std::string contents[2] = {state0, state1};

    std::mt19937 rng(11);
    std::uniform_int_distribution<int> delay_us(0, 20000);
    int saw[2] = {0, 0};
    for (int round = 0; round < 25; ++round) {
        const pid_t pid = ::fork();
        if (pid == 0) {
            for (uint64_t i = 0;; ++i) {
                const std::string& bytes = contents[i % 2];
                write_file_atomic(path, {std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size())});
            }
        }
        std::this_thread::sleep_for(std::chrono::microseconds(delay_us(rng)));
        ::kill(pid, SIGKILL);
        int status = 0;
        ::waitpid(pid, &status, 0);
        ASSERT_TRUE(WIFSIGNALED(status));
        const std::string now = read_text(path);
        ASSERT_TRUE(now == state0 || now == state1) << "round " << round << ": torn file of " << now.size() << " bytes";
        const Checkpoint c = load_checkpoint(path);
        ++saw[c.state.step];
        remove_stale_temp_files(dir.path.string());
    }
    fmt::print("25 kills: the file held step 0 {} times and step 1 {} times, never anything else\n", saw[0], saw[1]);
    EXPECT_TRUE(temp_files(dir.path).empty());
}

// ------------------------------------------------------------------------------ full disk, unwritable folder

// EFBIG from a file-size limit takes the same path as ENOSPC: the error names the file and the reason, the temp
// file is removed, the previous checkpoint and report stay.
TEST(FullDisk, CheckpointAndReportWritesFailClearlyAndKeepThePreviousFiles) {
    TempDir dir;
    TinyTraining tiny;
    const std::string checkpoint = (dir / "last.safetensors").string();
    const std::string report = (dir / "report.json").string();
    save_checkpoint(checkpoint, tiny.trainer);
    write_file_atomic(report, std::string("{\"dice\": 0.5}\n"));
    const std::string previous_checkpoint = read_text(checkpoint);
    tiny.step();
    const fs::path message = dir / "message.txt";
    const int result = run_limited(4096, false, [&] {
        std::string text;
        try {
            save_checkpoint(checkpoint, tiny.trainer);
            text += "checkpoint written\n";
        } catch (const Error& e) {
            text += std::string(e.what()) + "\n";
        }
        try {
            write_file_atomic(report, std::string(8192, ' '));
            text += "report written\n";
        } catch (const Error& e) {
            text += std::string(e.what()) + "\n";
        }
        // The limit applies to this message too: it is far below 4096 bytes.
        write_message(message, text);
        return 0;
    });
    ASSERT_EQ(result, 0);
    const std::string text = read_text(message);
    fmt::print("{}", text);
    std::stringstream lines(text);
    std::string line;
    std::getline(lines, line);
    EXPECT_NE(line.find("last.safetensors"), std::string::npos) << line;
    EXPECT_NE(line.find("File too large"), std::string::npos) << line;
    std::getline(lines, line);
    EXPECT_NE(line.find("report.json"), std::string::npos) << line;
    EXPECT_NE(line.find("File too large"), std::string::npos) << line;
    EXPECT_EQ(read_text(checkpoint), previous_checkpoint);
    EXPECT_EQ(load_checkpoint(checkpoint).state.step, 0);
    EXPECT_EQ(read_text(report), "{\"dice\": 0.5}\n");
    EXPECT_TRUE(temp_files(dir.path).empty());
}

// The same through the program: `resunet train --resume` under a file-size limit below the checkpoint's size
// stops with exit 1 and a one-line error, and last.safetensors still holds epoch 1; without the limit the run
// then resumes and finishes.
TEST(FullDisk, TrainingStopsWithAClearErrorAndKeepsTheLastCheckpoint) {
    ASSERT_TRUE(fs::exists(resunet_binary())) << resunet_binary();
    TempDir dir;
    const fs::path run = dir / "run";
    {
        Program one(train_arguments(run, 1, false), dir / "one");
        ASSERT_EQ(one.wait(), 0) << one.stderr_text();
    }
    const std::string before = read_text(run / "last.safetensors");
    const size_t limit = before.size() - 1;
    {
        Program limited(train_arguments(run, 2, true), dir / "limited", [limit] {
            rlimit size{static_cast<rlim_t>(limit), static_cast<rlim_t>(limit)};
            ::setrlimit(RLIMIT_FSIZE, &size);
            ::signal(SIGXFSZ, SIG_IGN);  // inherited through exec: the write fails with EFBIG, like ENOSPC
        });
        EXPECT_EQ(limited.wait(), 1);
        const std::string err = limited.stderr_text();
        fmt::print("stderr under a {}-byte file limit:\n{}", limit, err);
        EXPECT_NE(err.find("File too large"), std::string::npos) << err;
        EXPECT_NE(err.find("keeps epoch 1"), std::string::npos) << err;
        const size_t last_line = err.rfind('\n', err.size() - 2);
        EXPECT_EQ(err.compare(last_line == std::string::npos ? 0 : last_line + 1, 22, "resunet train: error: "), 0) << err;
    }
    EXPECT_EQ(read_text(run / "last.safetensors"), before);
    EXPECT_EQ(load_checkpoint((run / "last.safetensors").string()).state.epoch, 1);
    EXPECT_TRUE(temp_files(run).empty());
    {
        Program resumed(train_arguments(run, 2, true), dir / "resumed");
        ASSERT_EQ(resumed.wait(), 0) << resumed.stderr_text();
    }
    EXPECT_EQ(load_checkpoint((run / "last.safetensors").string()).state.epoch, 2);
    EXPECT_EQ(count_lines(run / "metrics.csv"), 3u);
}

// A folder that refuses new files (mode 0555; root drops to an unprivileged user in the child, since root
// ignores the mode): checkpoint, weights and report writes fail with "Permission denied" naming the file, and
// the previous files stay.
TEST(UnwritableFolder, WritesFailClearlyAndKeepThePreviousFiles) {
    TempDir dir;
    TinyTraining tiny;
    const fs::path folder = dir / "run";
    fs::create_directory(folder);
    const std::string checkpoint = (folder / "last.safetensors").string();
    const std::string report = (folder / "report.json").string();
    save_checkpoint(checkpoint, tiny.trainer);
    write_file_atomic(report, std::string("{}\n"));
    const std::string previous = read_text(checkpoint);
    tiny.step();
    fs::permissions(dir.path, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec | fs::perms::others_read |
                                  fs::perms::others_exec);
    fs::permissions(folder, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read | fs::perms::group_exec |
                                fs::perms::others_read | fs::perms::others_exec);
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
        ::close(fds[0]);
        std::string text;
        if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) {
            text = "cannot drop root privileges\n";
        } else {
            for (const auto& write : std::vector<std::function<void()>>{
                     [&] { save_checkpoint(checkpoint, tiny.trainer); },
                     [&] { save_safetensors((folder / "best.safetensors").string(), tiny.trainer.weights(), {}); },
                     [&] { write_file_atomic(report, std::string("{\"dice\": 1}\n")); }}) {
                try {
                    write();
                    text += "written\n";
                } catch (const Error& e) {
                    text += std::string(e.what()) + "\n";
                }
            }
        }
        (void)!::write(fds[1], text.data(), text.size());
        ::_exit(0);
    }
    ::close(fds[1]);
    std::string text;
    char buffer[4096];
    for (ssize_t n; (n = ::read(fds[0], buffer, sizeof buffer)) > 0;) text.append(buffer, static_cast<size_t>(n));
    ::close(fds[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    fs::permissions(folder, fs::perms::owner_all, fs::perm_options::add);
    if (text == "cannot drop root privileges\n") GTEST_SKIP() << "running as root without CAP_SETUID: a 0555 folder stays writable";
    fmt::print("{}", text);
    std::stringstream lines(text);
    for (const char* name : {"last.safetensors", "best.safetensors", "report.json"}) {
        std::string line;
        std::getline(lines, line);
        EXPECT_NE(line.find(name), std::string::npos) << line;
        EXPECT_NE(line.find("Permission denied"), std::string::npos) << line;
    }
    EXPECT_EQ(read_text(checkpoint), previous);
    EXPECT_EQ(read_text(report), "{}\n");
    EXPECT_FALSE(fs::exists(folder / "best.safetensors"));
}

TEST(StaleTempFiles, OnlyThoseOfDeadProcessesAreRemoved) {
    TempDir dir;
    const pid_t dead = ::fork();
    if (dead == 0) ::_exit(0);
    ::waitpid(dead, nullptr, 0);
    write_message(dir / fmt::format(".last.safetensors.tmp.{}.0.abc", dead), "partial");
    write_message(dir / fmt::format(".last.safetensors.tmp.{}.1.abc", ::getpid()), "mine, in progress");
    write_message(dir / fmt::format(".best.safetensors.tmp.{}.0.abc", ::getppid()), "a live process's");
    write_message(dir / "notes.tmp.txt", "not a temp file of ours");
    write_message(dir / ".hidden", "not a temp file of ours");
    EXPECT_EQ(remove_stale_temp_files(dir.path.string()), 1);
    EXPECT_FALSE(fs::exists(dir / fmt::format(".last.safetensors.tmp.{}.0.abc", dead)));
    EXPECT_EQ(temp_files(dir.path).size(), 3u);
    EXPECT_TRUE(fs::exists(dir / ".hidden"));
    EXPECT_EQ(remove_stale_temp_files((dir / "missing").string()), 0);
}

}  // namespace
