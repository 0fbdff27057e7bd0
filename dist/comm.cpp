// Comm on Open MPI: MPI_COMM_WORLD when launched by mpirun, else a one-process stand-in (see comm.h).
#include "dist/comm.h"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "graph/tensor.h"

namespace resunet::dist {

namespace {

// Largest count one MPI call takes (its count is an int); bigger buffers go in chunks.
constexpr size_t kMaxChunk = size_t{1} << 30;

void check(int status, const char* what) {
    if (status == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(status, text, &length);
    throw Error(fmt::format("mpi: {} failed: {}", what, std::string(text, static_cast<size_t>(length))));
}

// The integer value of an environment variable when it is one >= 0, else fallback.
int env_int(const char* name, int fallback) {
    const char* text = std::getenv(name);
    if (!text || !*text) return fallback;
    char* end = nullptr;
    const long value = std::strtol(text, &end, 10);
    return (end && *end == '\0' && value >= 0 && value < INT_MAX) ? static_cast<int>(value) : fallback;
}

template <typename T>
void allreduce(bool mpi, T* data, size_t count, MPI_Datatype type, MPI_Op op, const char* what) {
    if (!mpi || count == 0) return;
    for (size_t done = 0; done < count; done += kMaxChunk) {
        const int chunk = static_cast<int>(std::min(kMaxChunk, count - done));
        check(MPI_Allreduce(MPI_IN_PLACE, data + done, chunk, type, op, MPI_COMM_WORLD), what);
    }
}

}  // namespace

bool launched_by_mpirun() {
    for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"})
        if (const char* value = std::getenv(name); value && *value) return true;
    return false;
}

Comm& Comm::world() {
    static Comm comm;
    return comm;
}

Comm::Comm() {
    if (!launched_by_mpirun()) return;
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
        int provided = 0;
        check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
        if (provided < MPI_THREAD_SERIALIZED) {
            std::fprintf(stderr, "resunet: MPI provides thread level %d, below MPI_THREAD_SERIALIZED\n", provided);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    mpi_ = true;
    check(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(MPI_COMM_WORLD, &size_), "MPI_Comm_size");
    local_size_ = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 0);
    local_rank_ = env_int("OMPI_COMM_WORLD_LOCAL_RANK", -1);
    // Every rank takes the same branch: Open MPI's mpirun sets both variables for all ranks, other
    // launchers set neither (the split below is collective).
    if (local_size_ <= 0 || local_rank_ < 0) {  // other launchers: ask MPI which ranks share this node
        MPI_Comm node;
        check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
        MPI_Comm_size(node, &local_size_);
        MPI_Comm_rank(node, &local_rank_);
        MPI_Comm_free(&node);
    }
}

Comm::~Comm() {
    if (!mpi_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
}

int Comm::rank() const { return rank_; }
int Comm::size() const { return size_; }
bool Comm::distributed() const { return size_ > 1; }
int Comm::local_size() const { return local_size_; }
int Comm::local_rank() const { return local_rank_; }

void Comm::barrier() {
    if (mpi_) check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
}

void Comm::allreduce_sum(float* data, size_t count) { allreduce(mpi_, data, count, MPI_FLOAT, MPI_SUM, "MPI_Allreduce(sum, float)"); }
void Comm::allreduce_sum(double* data, size_t count) { allreduce(mpi_, data, count, MPI_DOUBLE, MPI_SUM, "MPI_Allreduce(sum, double)"); }
void Comm::allreduce_max(double* data, size_t count) { allreduce(mpi_, data, count, MPI_DOUBLE, MPI_MAX, "MPI_Allreduce(max, double)"); }

std::vector<std::string> Comm::gather(const std::string& mine, int root) {
    if (root < 0 || root >= size_) throw Error(fmt::format("mpi: gather root {} outside 0..{}", root, size_ - 1));
    if (!mpi_) return {mine};
    if (mine.size() > static_cast<size_t>(INT_MAX)) throw Error(fmt::format("mpi: gather: {} bytes is over 2 GiB", mine.size()));
    const int length = static_cast<int>(mine.size());
    std::vector<int> lengths(rank_ == root ? static_cast<size_t>(size_) : 0);
    check(MPI_Gather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, root, MPI_COMM_WORLD), "MPI_Gather");
    std::vector<int> offsets(lengths.size());
    std::string all;
    if (rank_ == root) {
        long long total = 0;
        for (size_t r = 0; r < lengths.size(); ++r) {
            offsets[r] = static_cast<int>(total);
            total += lengths[r];
            if (total > INT_MAX) throw Error(fmt::format("mpi: gather: {} bytes in all is over 2 GiB", total));
        }
        all.resize(static_cast<size_t>(total));
    }
    check(MPI_Gatherv(mine.data(), length, MPI_CHAR, all.data(), lengths.data(), offsets.data(), MPI_CHAR, root, MPI_COMM_WORLD),
          "MPI_Gatherv");
    if (rank_ != root) return {};
    std::vector<std::string> texts;
    texts.reserve(lengths.size());
    for (size_t r = 0; r < lengths.size(); ++r)
        texts.push_back(all.substr(static_cast<size_t>(offsets[r]), static_cast<size_t>(lengths[r])));
    return texts;
}

void Comm::broadcast(std::string& text, int root) {
    if (root < 0 || root >= size_) throw Error(fmt::format("mpi: broadcast root {} outside 0..{}", root, size_ - 1));
    if (!mpi_) return;
    unsigned long long length = text.size();
    check(MPI_Bcast(&length, 1, MPI_UNSIGNED_LONG_LONG, root, MPI_COMM_WORLD), "MPI_Bcast");
    text.resize(static_cast<size_t>(length));
    for (size_t done = 0; done < text.size(); done += kMaxChunk) {
        const int chunk = static_cast<int>(std::min(kMaxChunk, text.size() - done));
        check(MPI_Bcast(text.data() + done, chunk, MPI_CHAR, root, MPI_COMM_WORLD), "MPI_Bcast");
    }
}

void Comm::abort(int code, const std::string& message) {
    std::string line = message;
    std::replace(line.begin(), line.end(), '\n', ' ');
    if (mpi_) std::fprintf(stderr, "resunet: rank %d of %d: %s\n", rank_, size_, line.c_str());
    else std::fprintf(stderr, "resunet: %s\n", line.c_str());
    std::fflush(stderr);
    if (mpi_) MPI_Abort(MPI_COMM_WORLD, code == 0 ? 1 : code);
    std::exit(code);
}

std::pair<size_t, size_t> shard(size_t n, int rank, int size) {
    if (size < 1 || rank < 0 || rank >= size) throw Error(fmt::format("shard: rank {} of {} is out of range", rank, size));
    const size_t ranks = static_cast<size_t>(size), r = static_cast<size_t>(rank);
    const size_t base = n / ranks, extra = n % ranks;
    const size_t begin = r * base + std::min(r, extra);
    return {begin, begin + base + (r < extra ? 1 : 0)};
}

int threads_per_rank(int requested_threads) {
    if (requested_threads > 0) return requested_threads;
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    return std::max(1, cores / std::max(1, Comm::world().local_size()));
}

}  // namespace resunet::dist
