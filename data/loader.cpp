#include "data/loader.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/parallel_pipeline.h>
#include <oneapi/tbb/task_arena.h>

#include "data/random.h"

namespace resunet {

std::vector<size_t> epoch_order(const std::vector<size_t>& indices, bool shuffle, uint64_t seed, uint64_t epoch) {
    std::vector<size_t> order = indices;
    if (shuffle) {
        SplitMix64 rng(mix_seed({kShuffleStream, seed, epoch}));
        deterministic_shuffle(order, rng);
    }
    return order;
}

namespace {

// A pipeline token: a finished batch, or the error that stopped it.
struct Item {
    std::shared_ptr<Batch> batch;
    std::exception_ptr error;
};

}  // namespace

struct BatchLoader::Impl {
    Dataset dataset;
    std::vector<size_t> indices;
    LoaderOptions options;
    tbb::task_arena arena;

    // Epoch state; the mutex guards everything below that both threads touch.
    uint64_t epoch = 0;
    std::vector<size_t> order;
    bool running = false;  // consumer side only
    std::thread producer;
    mutable std::mutex mutex;
    std::condition_variable ready_cv;  // consumer waits: an item arrived or the producer finished
    std::condition_variable space_cv;  // producer waits: a slot freed or stop
    std::deque<Item> ready;
    size_t slots_in_use = 0;  // batches being built plus batches waiting in `ready`
    bool stop = false;
    bool producer_done = true;
    std::exception_ptr producer_error;  // failure outside a batch (e.g. out of memory)
    double wait_s = 0.0;

    Impl(const Dataset& data, std::vector<size_t> rows, LoaderOptions opts)
        : dataset(data),
          indices(std::move(rows)),
          options(std::move(opts)),
          arena(options.num_threads > 0 ? options.num_threads : tbb::task_arena::automatic) {}

    size_t capacity() const { return std::max<size_t>(1, options.prefetch_batches); }

    size_t num_batches() const {
        const size_t n = indices.size(), size = options.batch_size;
        return options.drop_last ? n / size : (n + size - 1) / size;
    }

    bool stopping() const {
        std::lock_guard<std::mutex> lock(mutex);
        return stop;
    }

    Batch build(size_t batch_index) const {
        const size_t begin = batch_index * options.batch_size;
        const size_t end = std::min(begin + options.batch_size, order.size());
        const size_t rows = end - begin;
        const PreprocessOptions& prep = options.preprocess;
        const int64_t height = prep.height, width = prep.width;
        const size_t image_floats = static_cast<size_t>(3 * height * width);
        const size_t mask_floats = static_cast<size_t>(height * width);

        Batch batch;
        batch.epoch = epoch;
        batch.batch_index = batch_index;
        batch.images = HostTensor::zeros({static_cast<int64_t>(rows), 3, height, width});
        batch.masks = HostTensor::zeros({static_cast<int64_t>(rows), 1, height, width});
        batch.indices.assign(order.begin() + static_cast<std::ptrdiff_t>(begin),
                             order.begin() + static_cast<std::ptrdiff_t>(end));
        batch.ids.resize(rows);
        if (prep.keep_original_mask) batch.original_masks.resize(rows);
        std::vector<std::exception_ptr> errors(rows);
        float* images = batch.images.f32();
        float* masks = batch.masks.f32();
        tbb::parallel_for(size_t(0), rows, [&](size_t row) {
            try {
                const size_t index = batch.indices[row];
                Sample sample = options.augment
                                    ? load_sample(dataset, index, prep,
                                                  draw_augment(*options.augment, options.seed, epoch, index))
                                    : load_sample(dataset, index, prep);
                std::memcpy(images + row * image_floats, sample.image.f32(), image_floats * sizeof(float));
                std::memcpy(masks + row * mask_floats, sample.mask.f32(), mask_floats * sizeof(float));
                batch.ids[row] = std::move(sample.id);
                if (prep.keep_original_mask) batch.original_masks[row] = std::move(sample.original_mask);
            } catch (...) {
                errors[row] = std::current_exception();
            }
        });
        // The first failing row in batch order, whatever thread failed first.
        for (const std::exception_ptr& error : errors)
            if (error) std::rethrow_exception(error);
        return batch;
    }

    void produce() {
        const size_t total = num_batches();
        try {
            arena.execute([&] {
                size_t next_batch = 0;
                tbb::parallel_pipeline(
                    capacity(),
                    tbb::make_filter<void, size_t>(
                        tbb::filter_mode::serial_in_order,
                        [&](tbb::flow_control& control) -> size_t {
                            if (next_batch >= total) {
                                control.stop();
                                return 0;
                            }
                            std::unique_lock<std::mutex> lock(mutex);
                            space_cv.wait(lock, [&] { return stop || slots_in_use < capacity(); });
                            if (stop) {
                                control.stop();
                                return 0;
                            }
                            ++slots_in_use;
                            return next_batch++;
                        }) &
                        tbb::make_filter<size_t, Item>(tbb::filter_mode::parallel,
                                                       [&](size_t batch_index) {
                                                           Item item;
                                                           if (stopping()) return item;
                                                           try {
                                                               item.batch = std::make_shared<Batch>(build(batch_index));
                                                           } catch (...) {
                                                               item.error = std::current_exception();
                                                           }
                                                           return item;
                                                       }) &
                        tbb::make_filter<Item, void>(tbb::filter_mode::serial_in_order, [&](Item item) {
                            std::lock_guard<std::mutex> lock(mutex);
                            if (stop) return;
                            if (!item.batch && !item.error) return;
                            if (item.error) stop = true;  // deliver what came before, then the error
                            ready.push_back(std::move(item));
                            ready_cv.notify_one();
                        }));
            });
        } catch (...) {
            std::lock_guard<std::mutex> lock(mutex);
            producer_error = std::current_exception();
        }
        std::lock_guard<std::mutex> lock(mutex);
        producer_done = true;
        ready_cv.notify_all();
    }

    void stop_producer() {
        {
            std::lock_guard<std::mutex> lock(mutex);
            stop = true;
        }
        space_cv.notify_all();
        if (producer.joinable()) producer.join();
        running = false;
    }
};

BatchLoader::BatchLoader(const Dataset& dataset, std::vector<size_t> indices, LoaderOptions options) {
    if (options.batch_size == 0) throw Error("BatchLoader: batch_size must be at least 1");
    if (options.num_threads < 0)
        throw Error(fmt::format("BatchLoader: num_threads must be >= 0 (0: all cores), got {}", options.num_threads));
    for (size_t index : indices)
        if (index >= dataset.size())
            throw Error(fmt::format("{}: BatchLoader index {} out of range (dataset has {})", dataset.root, index,
                                    dataset.size()));
    impl_ = std::make_unique<Impl>(dataset, std::move(indices), std::move(options));
}

BatchLoader::~BatchLoader() {
    if (impl_) impl_->stop_producer();
}

void BatchLoader::start_epoch(uint64_t epoch) {
    Impl& s = *impl_;
    s.stop_producer();
    s.epoch = epoch;
    s.order = resunet::epoch_order(s.indices, s.options.shuffle, s.options.seed, epoch);
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        s.ready.clear();
        s.slots_in_use = 0;
        s.stop = false;
        s.producer_error = nullptr;
        s.wait_s = 0.0;
        s.producer_done = s.num_batches() == 0;
    }
    s.running = true;
    if (!s.producer_done) s.producer = std::thread([&s] { s.produce(); });
}

bool BatchLoader::next(Batch& batch) {
    Impl& s = *impl_;
    if (!s.running) return false;
    std::unique_lock<std::mutex> lock(s.mutex);
    if (s.ready.empty() && !s.producer_done) {
        const auto start = std::chrono::steady_clock::now();
        s.ready_cv.wait(lock, [&] { return !s.ready.empty() || s.producer_done; });
        s.wait_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    if (!s.ready.empty()) {
        Item item = std::move(s.ready.front());
        s.ready.pop_front();
        --s.slots_in_use;
        s.space_cv.notify_one();
        if (item.error) {
            lock.unlock();
            s.stop_producer();
            std::rethrow_exception(item.error);
        }
        batch = std::move(*item.batch);
        return true;
    }
    std::exception_ptr error = s.producer_error;
    s.producer_error = nullptr;
    lock.unlock();
    s.stop_producer();
    if (error) std::rethrow_exception(error);
    return false;
}

double BatchLoader::wait_seconds() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->wait_s;
}

std::vector<size_t> BatchLoader::epoch_order() const { return impl_->order; }

size_t BatchLoader::num_batches() const { return impl_->num_batches(); }

size_t BatchLoader::num_samples() const { return impl_->indices.size(); }

}  // namespace resunet
