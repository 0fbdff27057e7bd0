// dist/: shard() arithmetic, threads_per_rank, the one-process stand-in of Comm (no MPI is initialised
// in a plain run), and data-parallel training:
//   - DataParallel.*: one process; a single group equals Trainer::step bit for bit; the trainer names
//     each gradient to the overlap callback once, when it is final; gradient_scale scales gradients.
//   - DataParallelMpi.*: run by tests/CMakeLists.txt under mpirun at -np 2 and -np 3 (label `mpi`;
//     skipped in a plain run): after 3 steps the weights equal the single-process twin within the bound
//     of dist/data_parallel.h, and are bit-identical on every rank (running statistics included).
//   - MpiJob.*: spawns mpirun itself (RESUNET_MPI_SPAWN_TESTS=1, label `mpi`): a rank killed with
//     SIGKILL mid-run ends the job with a non-zero status and mpirun's one-line reason, and the
//     checkpoint rank 0 wrote atomically after the last completed step loads with a good checksum;
//     the same for `resunet train` on Kvasir images, which then resumes under mpirun to the end.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "dist/comm.h"
#include "dist/data_parallel.h"
#include "graph/init.h"
#include "train/checkpoint.h"

namespace {

using resunet::dist::Comm;
using resunet::dist::shard;

TEST(Shard, CoversEveryItemOnceInOrderWithSizesWithinOne) {
    for (size_t n : {0u, 1u, 2u, 3u, 7u, 8u, 16u, 1000u, 1001u})
        for (int size = 1; size <= 9; ++size) {
            size_t next = 0, smallest = n, largest = 0;
            for (int rank = 0; rank < size; ++rank) {
                auto [begin, end] = shard(n, rank, size);
                ASSERT_EQ(begin, next) << "n " << n << " rank " << rank << " of " << size;
                ASSERT_LE(begin, end);
                next = end;
                smallest = std::min(smallest, end - begin);
                largest = std::max(largest, end - begin);
            }
            EXPECT_EQ(next, n) << "n " << n << " size " << size;
            EXPECT_LE(largest - smallest, 1u) << "n " << n << " size " << size;
        }
}

TEST(Shard, FirstRanksTakeTheRemainder) {
    EXPECT_EQ(shard(8, 0, 3), std::make_pair(size_t{0}, size_t{3}));
    EXPECT_EQ(shard(8, 1, 3), std::make_pair(size_t{3}, size_t{6}));
    EXPECT_EQ(shard(8, 2, 3), std::make_pair(size_t{6}, size_t{8}));
    EXPECT_EQ(shard(2, 2, 3), std::make_pair(size_t{2}, size_t{2}));  // more ranks than items: empty share
}

TEST(Shard, RejectsRanksOutOfRange) {
    EXPECT_THROW(shard(4, 2, 2), resunet::Error);
    EXPECT_THROW(shard(4, -1, 2), resunet::Error);
    EXPECT_THROW(shard(4, 0, 0), resunet::Error);
}

TEST(Comm, StandInWhenNotLaunchedByMpirun) {
    if (resunet::dist::launched_by_mpirun()) GTEST_SKIP() << "running under mpirun";
    Comm& comm = Comm::world();
    EXPECT_EQ(comm.rank(), 0);
    EXPECT_EQ(comm.size(), 1);
    EXPECT_FALSE(comm.distributed());
    EXPECT_EQ(comm.local_size(), 1);
    comm.barrier();
    std::vector<float> f = {1.5f, -2.0f};
    comm.allreduce_sum(f.data(), f.size());
    EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f}));
    std::vector<double> d = {3.0, 4.0};
    comm.allreduce_sum(d.data(), d.size());
    comm.allreduce_max(d.data(), d.size());
    EXPECT_EQ(d, (std::vector<double>{3.0, 4.0}));
    EXPECT_EQ(comm.gather("mine"), std::vector<std::string>{"mine"});
    EXPECT_THROW(comm.gather("mine", 1), resunet::Error);
    std::string text = "unchanged";
    comm.broadcast(text);
    EXPECT_EQ(text, "unchanged");
}

TEST(Comm, ThreadsPerRank) {
    EXPECT_EQ(resunet::dist::threads_per_rank(3), 3);
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    EXPECT_EQ(resunet::dist::threads_per_rank(0), std::max(1, cores / Comm::world().local_size()));
    EXPECT_GE(resunet::dist::threads_per_rank(-1), 1);
}

// ---- data-parallel training

constexpr int kGlobalBatch = 7;  // 4 + 3 on 2 ranks, 3 + 2 + 2 on 3
constexpr int kSize = 32;
constexpr int kSteps = 3;
constexpr double kBound = 1e-5;  // max |dp - twin| / max |twin| per tensor, see dist/data_parallel.h

resunet::Graph tiny_graph() {
    return resunet::build_resunet({.width = 4, .depth = 3, .height = kSize, .width_px = kSize, .batch = kGlobalBatch});
}

resunet::TrainOptions tiny_options() {
    resunet::TrainOptions options;
    options.learning_rate = 1e-3;
    options.threads = 1;
    return options;
}

// kSteps global batches of noise images and blob masks, the same on every rank (fixed seed).
struct Batches {
    std::vector<float> images, masks;  // kSteps x kGlobalBatch x {3, 1} x kSize x kSize
    static constexpr size_t image_floats = 3 * kSize * kSize, mask_floats = kSize * kSize;
    const float* image(int step, size_t index) const { return images.data() + (static_cast<size_t>(step) * kGlobalBatch + index) * image_floats; }
    const float* mask(int step, size_t index) const { return masks.data() + (static_cast<size_t>(step) * kGlobalBatch + index) * mask_floats; }
};

Batches make_batches() {
    Batches b;
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> noise(-1.0f, 1.0f), centre(8.0f, 24.0f), radius(3.0f, 10.0f);
    const size_t images = static_cast<size_t>(kSteps) * kGlobalBatch;
    b.images.resize(images * Batches::image_floats);
    b.masks.resize(images * Batches::mask_floats);
    for (float& v : b.images) v = noise(rng);
    for (size_t i = 0; i < images; ++i) {
        const float cy = centre(rng), cx = centre(rng), r = radius(rng);
        for (int y = 0; y < kSize; ++y)
            for (int x = 0; x < kSize; ++x) {
                const bool inside = (y - cy) * (y - cy) + (x - cx) * (x - cx) < r * r;
                b.masks[i * Batches::mask_floats + static_cast<size_t>(y * kSize + x)] = inside ? 1.0f : 0.0f;
                if (inside) b.images[i * Batches::image_floats + static_cast<size_t>(y * kSize + x)] += 1.5f;  // learnable
            }
    }
    return b;
}

// Biases of convolutions whose output feeds a batch norm: their true gradient is exactly 0 (batch norm
// removes any constant shift), so what backward computes for them is rounding noise, and Adam turns
// noise of either sign into steps of up to about lr; that batch norm's running mean inherits the same
// shift (times the momentum). They are compared in absolute terms (a few lr) instead.
std::set<std::string> biases_before_batch_norm(const resunet::Graph& graph) {
    std::set<std::string> names;
    for (const resunet::Node& node : graph.nodes())
        if (node.kind == resunet::OpKind::batch_norm) {
            const resunet::Node* producer = nullptr;
            for (const resunet::Node& other : graph.nodes())
                if (other.output == node.inputs[0]) producer = &other;
            if (producer && producer->kind == resunet::OpKind::conv && producer->bias) {
                names.insert(producer->name + ".bias");
                names.insert(node.name + ".running_mean");
            }
        }
    return names;
}

// Largest per-tensor max |a - b| / max |b| over every tensor not in `skip`.
double max_relative_difference(const resunet::TensorMap& a, const resunet::TensorMap& b, std::string* where,
                               const std::set<std::string>& skip = {}) {
    double worst = 0;
    for (const auto& [name, tb] : b) {
        if (skip.count(name)) continue;
        const resunet::HostTensor& ta = a.at(name);
        double diff = 0, scale = 1e-30;
        for (int64_t i = 0; i < tb.num_elements(); ++i) {
            diff = std::max(diff, static_cast<double>(std::fabs(ta.f32()[i] - tb.f32()[i])));
            scale = std::max(scale, static_cast<double>(std::fabs(tb.f32()[i])));
        }
        if (diff / scale > worst) {
            worst = diff / scale;
            if (where) *where = name;
        }
    }
    return worst;
}

std::string fingerprint(const resunet::TensorMap& map) {
    uint64_t hash = 1469598103934665603ull;
    for (const auto& [name, t] : map)
        for (uint8_t byte : t.bytes) hash = (hash ^ byte) * 1099511628211ull;
    return std::to_string(hash);
}

std::vector<float> run_twin(int groups, std::vector<float>* losses_out, resunet::TensorMap* weights_out) {
    const resunet::Graph graph = tiny_graph();
    const Batches batches = make_batches();
    resunet::dist::DataParallelTrainer twin(graph, resunet::init_weights(graph, 7), tiny_options(), {.groups_per_rank = groups});
    std::vector<float> losses;
    for (int s = 0; s < kSteps; ++s) losses.push_back(twin.step(batches.image(s, 0), batches.mask(s, 0)));
    if (weights_out) *weights_out = twin.trainer().weights();
    if (losses_out) *losses_out = losses;
    return losses;
}

TEST(DataParallel, OneGroupEqualsTrainerStepBitForBit) {
    const resunet::Graph graph = tiny_graph();
    const Batches batches = make_batches();
    resunet::Trainer plain(graph, resunet::init_weights(graph, 7), tiny_options());
    std::vector<float> plain_losses;
    for (int s = 0; s < kSteps; ++s) plain_losses.push_back(plain.step(batches.image(s, 0), batches.mask(s, 0)));
    std::vector<float> losses;
    resunet::TensorMap weights;
    run_twin(1, &losses, &weights);
    EXPECT_EQ(losses, plain_losses);
    EXPECT_EQ(fingerprint(weights), fingerprint(plain.weights()));
}

// The overlap relies on this: when the callback names a gradient, backward has finished writing it.
TEST(DataParallel, GradientReadyCallbackNamesEachGradientOnceWhenFinal) {
    const resunet::Graph graph = tiny_graph();
    const Batches batches = make_batches();
    resunet::Trainer trainer(graph, resunet::init_weights(graph, 7), tiny_options());
    std::map<std::string, std::vector<float>> seen;
    trainer.set_gradient_ready_callback([&](const std::string& name) {
        EXPECT_EQ(seen.count(name), 0u) << name << " named twice";
        const resunet::HostTensor& g = trainer.gradients().at(name);
        seen[name].assign(g.f32(), g.f32() + g.num_elements());
    });
    trainer.compute_gradients(batches.image(0, 0), batches.mask(0, 0), 0.5f);
    EXPECT_EQ(seen.size(), trainer.gradients().size());
    for (const auto& [name, g] : trainer.gradients())
        EXPECT_TRUE(std::equal(seen[name].begin(), seen[name].end(), g.f32())) << name << " changed after its callback";
    // gradient_scale scales every gradient (the same primitives on a scaled d loss / d logits).
    trainer.set_gradient_ready_callback({});
    trainer.compute_gradients(batches.image(0, 0), batches.mask(0, 0), 1.0f);
    const resunet::HostTensor& weight = trainer.gradients().at("e1.conv_a.weight");
    EXPECT_NEAR(weight.f32()[0], 2.0f * seen["e1.conv_a.weight"][0], 1e-5f * std::fabs(weight.f32()[0]) + 1e-12f);
}

TEST(DataParallel, RejectsMoreGroupsThanImages) {
    const resunet::Graph graph = tiny_graph();
    EXPECT_THROW(resunet::dist::DataParallelTrainer(graph, resunet::init_weights(graph, 7), tiny_options(), {.groups_per_rank = 8}),
                 resunet::Error);
}

void expect_data_parallel_equals_twin(bool overlap) {
    Comm& comm = Comm::world();
    const resunet::Graph graph = tiny_graph();
    const Batches batches = make_batches();
    resunet::dist::DataParallelTrainer trainer(graph, resunet::init_weights(graph, 7), tiny_options(), {.overlap = overlap}, &comm);
    const auto [begin, end] = trainer.local_images();
    EXPECT_EQ(std::make_pair(begin, end), shard(kGlobalBatch, comm.rank(), comm.size()));
    std::vector<float> losses;
    for (int s = 0; s < kSteps; ++s) losses.push_back(trainer.step(batches.image(s, begin), batches.mask(s, begin)));
    const resunet::TensorMap weights = trainer.trainer().weights();

    // Bit-identical on every rank, running statistics included: any rank may write the checkpoint.
    const std::vector<std::string> prints = comm.gather(fingerprint(weights) + "/" + std::to_string(trainer.trainer().step_count()));
    for (size_t r = 1; r < prints.size(); ++r) EXPECT_EQ(prints[r], prints[0]) << "rank " << r << " differs from rank 0";

    std::vector<float> twin_losses;
    resunet::TensorMap twin_weights;
    run_twin(comm.size(), &twin_losses, &twin_weights);
    for (int s = 0; s < kSteps; ++s) EXPECT_NEAR(losses[static_cast<size_t>(s)], twin_losses[static_cast<size_t>(s)], 1e-6 * std::fabs(twin_losses[static_cast<size_t>(s)]));
    std::string where;
    const std::set<std::string> dead = biases_before_batch_norm(graph);
    const double relative = max_relative_difference(weights, twin_weights, &where, dead);
    double dead_difference = 0;
    for (const std::string& name : dead)
        for (int64_t i = 0; i < weights.at(name).num_elements(); ++i)
            dead_difference = std::max(dead_difference, static_cast<double>(std::fabs(weights.at(name).f32()[i] - twin_weights.at(name).f32()[i])));
    const double lr = tiny_options().learning_rate;
    if (comm.rank() == 0)
        std::printf("data-parallel -np %d (overlap %d): after %d steps, max relative weight difference to the twin %.3g (%s); "
                    "biases before batch norm (zero true gradient) and that norm's running mean: max |difference| %.3g = %.2f lr\n",
                    comm.size(), overlap ? 1 : 0, kSteps, relative, where.c_str(), dead_difference, dead_difference / lr);
    EXPECT_LE(relative, kBound) << "worst tensor " << where;
    EXPECT_LE(dead_difference, 2.0 * kSteps * lr);
    // The per-rank BN rule matters: the twin of one group (the full batch in one BN group) differs.
    resunet::TensorMap one_group;
    run_twin(1, nullptr, &one_group);
    EXPECT_GT(max_relative_difference(weights, one_group, nullptr), 100 * kBound);
}

TEST(DataParallelMpi, WeightsEqualTwinAfterThreeSteps) {
    if (!resunet::dist::launched_by_mpirun()) GTEST_SKIP() << "run under mpirun (ctest label mpi)";
    expect_data_parallel_equals_twin(false);
}

TEST(DataParallelMpi, WeightsEqualTwinWithOverlappedAllreduce) {
    if (!resunet::dist::launched_by_mpirun()) GTEST_SKIP() << "run under mpirun (ctest label mpi)";
    expect_data_parallel_equals_twin(true);
}

// Worker of MpiJob.KilledRankEndsJobWithIntactCheckpoint: trains, rank 0 checkpoints after every step,
// and rank RESUNET_TEST_KILL_RANK kills itself (SIGKILL) at the start of step RESUNET_TEST_KILL_STEP.
TEST(DataParallelMpiWorker, TrainAndCheckpoint) {
    const char* folder = std::getenv("RESUNET_TEST_CHECKPOINT_DIR");
    if (!resunet::dist::launched_by_mpirun() || !folder) GTEST_SKIP() << "spawned by MpiJob.* only";
    const int kill_rank = std::atoi(std::getenv("RESUNET_TEST_KILL_RANK") ? std::getenv("RESUNET_TEST_KILL_RANK") : "-1");
    const int kill_step = std::atoi(std::getenv("RESUNET_TEST_KILL_STEP") ? std::getenv("RESUNET_TEST_KILL_STEP") : "-1");
    Comm& comm = Comm::world();
    const resunet::Graph graph = tiny_graph();
    const Batches batches = make_batches();
    resunet::dist::DataParallelTrainer trainer(graph, resunet::init_weights(graph, 7), tiny_options(), {}, &comm);
    const auto [begin, end] = trainer.local_images();
    for (int s = 0; s < kSteps; ++s) {
        if (comm.rank() == kill_rank && s + 1 == kill_step) kill(getpid(), SIGKILL);
        trainer.step(batches.image(s, begin), batches.mask(s, begin));
        if (comm.rank() == 0) resunet::save_checkpoint(std::string(folder) + "/last.safetensors", trainer.trainer());
    }
}

// Runs a shell command; returns its exit status (-1 when it did not exit) and its stdout + stderr.
std::pair<int, std::string> run_capture(const std::string& command) {
    FILE* pipe = popen((command + " 2>&1").c_str(), "r");
    if (!pipe) return {-1, "popen failed"};
    std::string output;
    char buffer[4096];
    while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
    const int status = pclose(pipe);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

TEST(MpiJob, TrainCommandKilledRankThenResume) {
    if (!std::getenv("RESUNET_MPI_SPAWN_TESTS")) GTEST_SKIP() << "needs RESUNET_MPI_SPAWN_TESTS=1 (ctest label mpi)";
    const std::string data = std::string(RESUNET_SHARED_DIR) + "/data/kvasir-seg";
    if (!std::filesystem::exists(data + "/images")) GTEST_SKIP() << "no Kvasir-SEG at " << data;
    const std::filesystem::path folder = std::filesystem::temp_directory_path() / ("resunet_mpi_train_" + std::to_string(getpid()));
    std::filesystem::remove_all(folder);
    const std::string resunet =
        (std::filesystem::canonical("/proc/self/exe").parent_path().parent_path() / "apps" / "resunet").string();
    // 20 pairs: 16 training images, 4 batches of 4 per epoch; 4 test images validate.
    const std::string train = std::string(RESUNET_MPIEXEC) + " --allow-run-as-root --oversubscribe -np 2 " + resunet +
                              " train --data " + data + " --limit 20 --out " + folder.string() +
                              " --width 8 --depth 3 --size 32 --batch 4 --epochs 3 --threads 1 --loader-threads 1";
    const std::string checkpoint = (folder / "last.safetensors").string();

    // Rank 1 kills itself (SIGKILL) before global step 6: epoch 2, batch 2; epoch 1's checkpoint is on disk.
    auto [killed_status, killed_output] = run_capture("env -u RESUNET_MPI_SPAWN_TESTS RESUNET_TEST_KILL_RANK_AT_STEP=1:6 " + train);
    EXPECT_NE(killed_status, 0) << killed_output;
    EXPECT_NE(killed_output.find("signal 9"), std::string::npos) << "mpirun names the killed rank:\n" << killed_output;
    const resunet::Checkpoint kept = resunet::load_checkpoint(checkpoint);  // CRC-32 checked
    EXPECT_EQ(kept.state.epoch, 1);
    // Width 8: blocked, our own Winograd applies; rank 0 measured, rank 1 ran its plan (it would have
    // stopped with one line had the plan not applied there).
    std::ifstream log_file(folder / "train.log");
    const std::string log((std::istreambuf_iterator<char>(log_file)), std::istreambuf_iterator<char>());
    EXPECT_NE(log.find("measured on rank 0, run by every rank"), std::string::npos) << log;
    EXPECT_TRUE(std::filesystem::exists(folder / "conv_plan.txt"));
    EXPECT_EQ(kept.state.step, 4);

    auto [resumed_status, resumed_output] = run_capture("env -u RESUNET_MPI_SPAWN_TESTS " + train + " --resume");
    ASSERT_EQ(resumed_status, 0) << resumed_output;
    const resunet::Checkpoint done = resunet::load_checkpoint(checkpoint);
    EXPECT_EQ(done.state.epoch, 3);
    EXPECT_EQ(done.state.step, 12);
    std::ifstream metrics(folder / "metrics.csv");
    int lines = 0;
    for (std::string line; std::getline(metrics, line);) lines += line.empty() ? 0 : 1;
    EXPECT_EQ(lines, 4) << "header + 3 epochs, written by rank 0 alone";
    std::filesystem::remove_all(folder);
}

TEST(MpiJob, KilledRankEndsJobWithIntactCheckpoint) {
    if (!std::getenv("RESUNET_MPI_SPAWN_TESTS")) GTEST_SKIP() << "needs RESUNET_MPI_SPAWN_TESTS=1 (ctest label mpi)";
    const std::filesystem::path folder = std::filesystem::temp_directory_path() / ("resunet_mpi_kill_" + std::to_string(getpid()));
    std::filesystem::remove_all(folder);
    std::filesystem::create_directories(folder);
    const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
    const std::string command =
        "env -u RESUNET_MPI_SPAWN_TESTS RESUNET_TEST_CHECKPOINT_DIR=" + folder.string() +
        " RESUNET_TEST_KILL_RANK=1 RESUNET_TEST_KILL_STEP=3 OMP_NUM_THREADS=1 " RESUNET_MPIEXEC
        " --allow-run-as-root --oversubscribe -np 2 " + self + " --gtest_filter=DataParallelMpiWorker.* 2>&1";
    FILE* pipe = popen(command.c_str(), "r");
    ASSERT_NE(pipe, nullptr);
    std::string output;
    char buffer[4096];
    while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
    const int status = pclose(pipe);
    ASSERT_TRUE(WIFEXITED(status)) << output;
    EXPECT_NE(WEXITSTATUS(status), 0) << output;
    EXPECT_NE(output.find("rank 1"), std::string::npos) << "mpirun names the killed rank:\n" << output;
    EXPECT_NE(output.find("signal 9"), std::string::npos) << output;
    const resunet::Checkpoint checkpoint = resunet::load_checkpoint((folder / "last.safetensors").string());  // CRC-32 checked
    EXPECT_EQ(checkpoint.state.step, kSteps - 1) << "the last step both ranks completed";
    std::filesystem::remove_all(folder);
}

}  // namespace
