// Data-parallel training: groups of each global batch per rank, fp32 gradient allreduce (optionally
// overlapped with backward on a second thread), averaged running statistics (see data_parallel.h).
#include "dist/data_parallel.h"

#include <fmt/format.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dist/comm.h"

namespace resunet::dist {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// A second thread that allreduces buffers in the order they are queued; the main thread makes no MPI call
// between the first push and drain() (MPI_THREAD_SERIALIZED).
class ReduceThread {
  public:
    explicit ReduceThread(Comm& comm) : comm_(comm), thread_([this] { loop(); }) {}
    ~ReduceThread() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        thread_.join();
    }
    void push(float* data, size_t count) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            queue_.emplace_back(data, count);
            ++pending_;
        }
        wake_.notify_all();
    }
    // Waits until every queued buffer is reduced; rethrows the first failure.
    void drain() {
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return pending_ == 0; });
        if (failure_) {
            std::exception_ptr failure = failure_;
            failure_ = nullptr;
            std::rethrow_exception(failure);
        }
    }

  private:
    void loop() {
        std::unique_lock<std::mutex> lock(mutex_);
        for (;;) {
            wake_.wait(lock, [this] { return stop_ || !queue_.empty(); });
            if (queue_.empty()) return;
            auto [data, count] = queue_.front();
            queue_.pop_front();
            const bool skip = failure_ != nullptr;
            lock.unlock();
            std::exception_ptr failure;
            if (!skip) {
                try {
                    comm_.allreduce_sum(data, count);
                } catch (...) {
                    failure = std::current_exception();
                }
            }
            lock.lock();
            if (failure && !failure_) failure_ = failure;
            if (--pending_ == 0) done_.notify_all();
        }
    }

    Comm& comm_;
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::deque<std::pair<float*, size_t>> queue_;
    size_t pending_ = 0;
    bool stop_ = false;
    std::exception_ptr failure_;
    std::thread thread_;
};

}  // namespace

struct DataParallelTrainer::Impl {
    Comm* comm = nullptr;  // null or one rank: no reduction
    DataParallelOptions parallel;
    Graph graph;           // global batch
    TrainOptions options;
    int global_batch = 0;
    int num_groups = 0;
    int rank = 0;
    std::vector<std::pair<size_t, size_t>> groups;  // this rank's groups, images of the global batch
    std::map<int, std::unique_ptr<Trainer>> trainers;  // by group size; `main` holds the state
    Trainer* main = nullptr;
    std::vector<std::string> learnable, running;    // parameter names: learnable; running statistics
    TensorMap accumulated;                          // several groups per rank: the sum of their gradients
    std::unique_ptr<ReduceThread> reducer;
    LossValue last_loss;
    double compute_seconds = 0, reduce_wait_seconds = 0;

    bool reducing() const { return comm && comm->distributed(); }
    Trainer& trainer_for(int size, TensorMap weights_if_new);
};

Trainer& DataParallelTrainer::Impl::trainer_for(int size, TensorMap weights_if_new) {
    auto it = trainers.find(size);
    if (it != trainers.end()) return *it->second;
    auto trainer = std::make_unique<Trainer>(graph.with_batch(size), std::move(weights_if_new), options);
    Trainer& result = *trainer;
    trainers.emplace(size, std::move(trainer));
    return result;
}

DataParallelTrainer::DataParallelTrainer(const Graph& graph, TensorMap weights, const TrainOptions& options,
                                         const DataParallelOptions& parallel, Comm* comm)
    : impl_(std::make_unique<Impl>()) {
    Impl& m = *impl_;
    m.comm = comm;
    m.parallel = parallel;
    m.graph = graph;
    m.options = options;
    const int ranks = comm ? comm->size() : 1;
    m.rank = comm ? comm->rank() : 0;
    if (parallel.groups_per_rank < 1)
        throw Error(fmt::format("data-parallel: groups_per_rank must be at least 1, got {}", parallel.groups_per_rank));
    m.global_batch = static_cast<int>(graph.value(graph.input_value()).dims[0]);
    m.num_groups = ranks * parallel.groups_per_rank;
    if (m.global_batch < m.num_groups)
        throw Error(fmt::format("data-parallel: a global batch of {} images cannot feed {} groups ({} ranks x {}); "
                                "every rank needs at least one image per group",
                                m.global_batch, m.num_groups, ranks, parallel.groups_per_rank));
    for (int g = 0; g < parallel.groups_per_rank; ++g)
        m.groups.push_back(shard(static_cast<size_t>(m.global_batch), m.rank * parallel.groups_per_rank + g, m.num_groups));
    for (const ParamInfo& p : graph.parameters()) (p.learnable ? m.learnable : m.running).push_back(p.name);
    TensorMap copy = weights;  // other group sizes start from the same weights
    m.main = &m.trainer_for(static_cast<int>(m.groups[0].second - m.groups[0].first), std::move(weights));
    for (const auto& [begin, end] : m.groups) m.trainer_for(static_cast<int>(end - begin), copy);
    if (parallel.groups_per_rank > 1)
        for (const std::string& name : m.learnable) m.accumulated[name] = HostTensor::zeros(m.main->gradients().at(name).shape);
    if (parallel.overlap && parallel.groups_per_rank == 1 && m.reducing()) {
        m.reducer = std::make_unique<ReduceThread>(*comm);
        Trainer* main = m.main;
        ReduceThread* reducer = m.reducer.get();
        main->set_gradient_ready_callback([main, reducer](const std::string& name) {
            HostTensor& g = main->gradients_in_place().at(name);
            reducer->push(g.f32(), static_cast<size_t>(g.num_elements()));
        });
    }
}

DataParallelTrainer::~DataParallelTrainer() = default;

float DataParallelTrainer::step(const float* images, const float* masks) {
    Impl& m = *impl_;
    if (!images || !masks) throw Error("data-parallel: images and masks must not be null");
    const Dims& in = m.main->input_dims();
    const Dims& out = m.main->output_dims();
    const size_t image_floats = static_cast<size_t>(in[1] * in[2] * in[3]);
    const size_t mask_floats = static_cast<size_t>(out[1] * out[2] * out[3]);
    TensorMap& main_weights = m.main->weights_in_place();

    // Running statistics at the start of the step: every group starts from them.
    std::vector<std::vector<float>> start(m.running.size());
    size_t running_floats = 0;
    for (size_t i = 0; i < m.running.size(); ++i) {
        const HostTensor& t = main_weights.at(m.running[i]);
        start[i].assign(t.f32(), t.f32() + t.num_elements());
        running_floats += start[i].size();
    }
    // One buffer of doubles reduced at the end: loss total, dice, bce, then the running statistics summed over groups.
    std::vector<double> totals(3 + running_floats, 0.0);

    const auto compute_start = Clock::now();
    const size_t first = m.groups.front().first;
    for (size_t j = 0; j < m.groups.size(); ++j) {
        const auto [begin, end] = m.groups[j];
        const int size = static_cast<int>(end - begin);
        Trainer& t = *m.trainers.at(size);
        TensorMap& w = t.weights_in_place();
        if (&t != m.main)
            for (const std::string& name : m.learnable)
                std::memcpy(w.at(name).f32(), main_weights.at(name).f32(), w.at(name).byte_size());
        for (size_t i = 0; i < m.running.size(); ++i)
            std::memcpy(w.at(m.running[i]).f32(), start[i].data(), start[i].size() * sizeof(float));
        const float share = static_cast<float>(size) / static_cast<float>(m.global_batch);
        const LossValue loss = t.compute_gradients(images + (begin - first) * image_floats, masks + (begin - first) * mask_floats, share);
        t.update_running_statistics();
        totals[0] += share * loss.total;
        totals[1] += share * loss.dice;
        totals[2] += share * loss.bce;
        size_t at = 3;
        for (const std::string& name : m.running) {
            const HostTensor& r = w.at(name);
            for (int64_t k = 0; k < r.num_elements(); ++k) totals[at++] += r.f32()[k];
        }
        if (m.groups.size() > 1)
            for (const std::string& name : m.learnable) {
                float* sum = m.accumulated.at(name).f32();
                const float* g = t.gradients().at(name).f32();
                const int64_t count = m.accumulated.at(name).num_elements();
                if (j == 0) std::memcpy(sum, g, static_cast<size_t>(count) * sizeof(float));
                else for (int64_t k = 0; k < count; ++k) sum[k] += g[k];
            }
    }
    m.compute_seconds = seconds_since(compute_start);

    const auto reduce_start = Clock::now();
    TensorMap& grads = m.main->gradients_in_place();
    if (m.groups.size() > 1)
        for (const std::string& name : m.learnable)
            std::memcpy(grads.at(name).f32(), m.accumulated.at(name).f32(), grads.at(name).byte_size());
    if (m.reducing()) {
        if (m.reducer) m.reducer->drain();
        else
            for (auto it = m.learnable.rbegin(); it != m.learnable.rend(); ++it) {  // backward order, as overlap does
                HostTensor& g = grads.at(*it);
                m.comm->allreduce_sum(g.f32(), static_cast<size_t>(g.num_elements()));
            }
        m.comm->allreduce_sum(totals.data(), totals.size());
    }
    m.reduce_wait_seconds = seconds_since(reduce_start);

    LossValue global;
    global.total = totals[0];
    global.dice = totals[1];
    global.bce = totals[2];
    try {
        m.main->apply_gradients(global);
    } catch (...) {
        for (size_t i = 0; i < m.running.size(); ++i)
            std::memcpy(main_weights.at(m.running[i]).f32(), start[i].data(), start[i].size() * sizeof(float));
        throw;
    }
    size_t at = 3;
    for (const std::string& name : m.running) {
        HostTensor& r = main_weights.at(name);
        for (int64_t k = 0; k < r.num_elements(); ++k) r.f32()[k] = static_cast<float>(totals[at++] / m.num_groups);
    }
    m.last_loss = global;
    return static_cast<float>(global.total);
}

LossValue DataParallelTrainer::last_loss() const { return impl_->last_loss; }
std::pair<size_t, size_t> DataParallelTrainer::local_images() const {
    return {impl_->groups.front().first, impl_->groups.back().second};
}
int DataParallelTrainer::global_batch() const { return impl_->global_batch; }
int DataParallelTrainer::num_groups() const { return impl_->num_groups; }
Trainer& DataParallelTrainer::trainer() { return *impl_->main; }
const Trainer& DataParallelTrainer::trainer() const { return *impl_->main; }
double DataParallelTrainer::last_compute_seconds() const { return impl_->compute_seconds; }
double DataParallelTrainer::last_reduce_wait_seconds() const { return impl_->reduce_wait_seconds; }

}  // namespace resunet::dist
