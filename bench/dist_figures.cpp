// bench_dist: the figures of docs/mpi.md. Run under mpirun (or alone for the 1-rank baseline):
//   allreduce  time of MPI_Allreduce (sum, fp32, in place) of --mb megabytes, median of --repeats;
//   step       data-parallel training steps (dist/data_parallel.h) of a ResUNet of --width at --size with
//              a global --batch, synthetic data: median step time, compute and reduce-wait shares.
// Rank 0 prints the layout (ranks x threads, cores of the node) and one Markdown row.
//
// Intended usage:
//   mpirun --allow-run-as-root -np 2 ./build/bench/bench_dist allreduce --mb 130 --repeats 5
//   OMP_NUM_THREADS=1 mpirun --allow-run-as-root -np 2 ./build/bench/bench_dist step --width 16 --size 128 --batch 4 --threads 1
//   ./build/bench/bench_dist step --width 16 --size 128 --batch 4 --threads 2            # 1 rank x 2 threads
#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "dist/comm.h"
#include "dist/data_parallel.h"
#include "graph/init.h"

namespace {

using Clock = std::chrono::steady_clock;
using resunet::dist::Comm;

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : (v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]));
}

int arg_int(int argc, char** argv, const char* name, int fallback) {
    for (int i = 1; i + 1 < argc; ++i)
        if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
    return fallback;
}

}  // namespace

int main(int argc, char** argv) {
    Comm& comm = Comm::world();
    const std::string mode = argc > 1 ? argv[1] : "";
    const int repeats = arg_int(argc, argv, "--repeats", 5);
    const int threads = resunet::dist::threads_per_rank(arg_int(argc, argv, "--threads", 0));
    omp_set_num_threads(threads);
    if (comm.rank() == 0)
        fmt::print("layout: {} rank(s) x {} OpenMP thread(s); {} rank(s) on this node of {} cores\n", comm.size(), threads,
                   comm.local_size(), std::thread::hardware_concurrency());
    try {
        if (mode == "allreduce") {
            const size_t count = static_cast<size_t>(arg_int(argc, argv, "--mb", 130)) * 1000 * 1000 / sizeof(float);
            std::vector<float> data(count, 1.0f);
            comm.allreduce_sum(data.data(), count);  // warm-up: connections, pages
            std::vector<double> seconds;
            for (int r = 0; r < repeats; ++r) {
                comm.barrier();
                const auto start = Clock::now();
                comm.allreduce_sum(data.data(), count);
                double s = std::chrono::duration<double>(Clock::now() - start).count();
                comm.allreduce_max(&s, 1);
                seconds.push_back(s);
            }
            if (comm.rank() == 0)
                fmt::print("| allreduce fp32 sum | {} ranks | {:.1f} MB | median {:.1f} ms (min {:.1f}, max {:.1f}, n {}) | {:.2f} GB/s algorithm bandwidth |\n",
                           comm.size(), count * 4 / 1e6, 1e3 * median(seconds), 1e3 * *std::min_element(seconds.begin(), seconds.end()),
                           1e3 * *std::max_element(seconds.begin(), seconds.end()), seconds.size(), count * 4 / 1e9 / median(seconds));
        } else if (mode == "step") {
            const int width = arg_int(argc, argv, "--width", 16), size = arg_int(argc, argv, "--size", 128);
            const int batch = arg_int(argc, argv, "--batch", 4);
            const bool overlap = arg_int(argc, argv, "--overlap", 0) != 0;
            const resunet::Graph graph = resunet::build_resunet({.width = width, .height = size, .width_px = size, .batch = batch});
            resunet::TrainOptions options;
            options.threads = threads;
            resunet::dist::DataParallelTrainer trainer(graph, resunet::init_weights(graph, 1), options, {.overlap = overlap}, &comm);
            const auto [begin, end] = trainer.local_images();
            const size_t local = end - begin, pixels = static_cast<size_t>(size) * static_cast<size_t>(size);
            std::vector<float> images(local * 3 * pixels), masks(local * pixels);
            std::mt19937 rng(static_cast<unsigned>(comm.rank()));
            std::uniform_real_distribution<float> noise(-1.0f, 1.0f);
            for (float& v : images) v = noise(rng);
            for (size_t i = 0; i < masks.size(); ++i) masks[i] = (i / static_cast<size_t>(size)) % 3 == 0 ? 1.0f : 0.0f;
            trainer.step(images.data(), masks.data());  // warm-up
            std::vector<double> step, compute, wait;
            for (int r = 0; r < repeats; ++r) {
                comm.barrier();
                const auto start = Clock::now();
                trainer.step(images.data(), masks.data());
                double values[3] = {std::chrono::duration<double>(Clock::now() - start).count(), trainer.last_compute_seconds(),
                                    trainer.last_reduce_wait_seconds()};
                comm.allreduce_max(values, 3);
                step.push_back(values[0]);
                compute.push_back(values[1]);
                wait.push_back(values[2]);
            }
            size_t gradient_floats = 0;
            for (const auto& [name, g] : trainer.trainer().gradients()) gradient_floats += static_cast<size_t>(g.num_elements());
            if (comm.rank() == 0)
                fmt::print("| step | width {} size {} batch {} | {} ranks x {} threads | overlap {} | median {:.1f} ms (min {:.1f}, max {:.1f}, n {}) "
                           "| compute {:.1f} ms | reduce wait {:.1f} ms | gradients {:.2f} MB | {:.1f} GMAC/image forward |\n",
                           width, size, batch, comm.size(), threads, overlap ? "on" : "off", 1e3 * median(step),
                           1e3 * *std::min_element(step.begin(), step.end()), 1e3 * *std::max_element(step.begin(), step.end()), step.size(),
                           1e3 * median(compute), 1e3 * median(wait), gradient_floats * 4 / 1e6,
                           static_cast<double>(graph.total_macs()) / batch / 1e9);
        } else {
            if (comm.rank() == 0) fmt::print(stderr, "usage: bench_dist allreduce|step [--mb N] [--width W --size S --batch N --threads T --overlap 0|1] [--repeats R]\n");
            return 2;
        }
    } catch (const std::exception& e) {
        comm.abort(1, e.what());
    }
    return 0;
}
