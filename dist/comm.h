// One communicator for the whole program: MPI_COMM_WORLD when the process was launched by mpirun, else a
// one-process stand-in whose collectives are no-ops, so the same code runs alone or on N ranks. MPI is
// initialised on the first call to Comm::world() and only under mpirun (OMPI_COMM_WORLD_SIZE, or
// PMI_SIZE / PMIX_RANK of other launchers, in the environment): plain runs and the ordinary tests never
// touch MPI. No MPI type appears here.
//
// Intended usage:
//   resunet::dist::Comm& comm = resunet::dist::Comm::world();     // MPI_Init_thread on first use, under mpirun
//   auto [begin, end] = resunet::dist::shard(images.size(), comm.rank(), comm.size());  // my contiguous block
//   omp_set_num_threads(resunet::dist::threads_per_rank(0));      // cores of this node / ranks on it
//   ... work on [begin, end) ...
//   comm.allreduce_sum(gradients.data(), gradients.size());       // every rank gets the sum
//   std::vector<std::string> rows = comm.gather(my_csv_rows);     // rank 0: size() strings, rank order
//   if (comm.rank() == 0) write_atomically("metrics.csv", join(rows));
//   if (failed) comm.abort(1, "rank 1: image 17 unreadable");      // one line on stderr, ends every rank
//
// Threading: MPI is initialised with MPI_THREAD_SERIALIZED, so any one thread at a time may call it
// (the data-parallel trainer allreduces on a second thread while the main one runs backward
// primitives); callers must never call MPI from two threads at once. MPI_Finalize runs at exit.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace resunet::dist {

class Comm {
  public:
    // MPI_COMM_WORLD when launched by mpirun (initialises MPI on first use), else a 1-process stand-in.
    static Comm& world();
    int rank() const;         // 0-based rank in the world
    int size() const;         // number of ranks
    bool distributed() const;  // size() > 1
    int local_size() const;   // ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE), 1 when not under mpirun
    int local_rank() const;   // rank among those on this node (OMPI_COMM_WORLD_LOCAL_RANK), 0 when alone
    void barrier();
    // In-place sums over all ranks; every rank gets the same result. Counts above INT_MAX go in chunks.
    void allreduce_sum(float* data, size_t count);
    void allreduce_sum(double* data, size_t count);
    void allreduce_max(double* data, size_t count);
    // Root gets size() strings in rank order; others get {}.
    std::vector<std::string> gather(const std::string& mine, int root = 0);
    // Every rank leaves with root's text.
    void broadcast(std::string& text, int root = 0);
    // One line "resunet: rank R of N: message" on stderr, then MPI_Abort (exit(code) when alone).
    [[noreturn]] void abort(int code, const std::string& message);

    Comm(const Comm&) = delete;
    Comm& operator=(const Comm&) = delete;

  private:
    Comm();
    ~Comm();
    int rank_ = 0;
    int size_ = 1;
    int local_size_ = 1;
    int local_rank_ = 0;
    bool mpi_ = false;  // MPI_Init_thread was called (and MPI_Finalize will be)
};

// True when the environment says mpirun (or another MPI launcher) started this process; never touches MPI.
bool launched_by_mpirun();

// [begin, end) of rank's share of n items in contiguous blocks whose sizes differ by at most 1 (the first
// n % size ranks get one more).
std::pair<size_t, size_t> shard(size_t n, int rank, int size);

// requested if > 0, else the cores of this node / local_size(), at least 1: ranks x threads never
// oversubscribe a node's cores.
int threads_per_rank(int requested_threads);

}  // namespace resunet::dist
