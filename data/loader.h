// Batches for training and evaluation, prepared a few batches ahead of the consumer by oneTBB inside
// a task arena that caps the threads the loader may use.
//
// Intended usage:
//   resunet::LoaderOptions opts;
//   opts.batch_size = 8;
//   opts.shuffle = true;                                  // training: order from (seed, epoch)
//   opts.augment = resunet::AugmentOptions{};             // training only; leave empty to evaluate
//   opts.num_threads = 4;                                 // thread budget (0: all cores)
//   resunet::BatchLoader loader(dataset, resunet::indices_of(dataset, split.train_ids), opts);
//   for (uint64_t epoch = 0; epoch < epochs; ++epoch) {
//       loader.start_epoch(epoch);
//       resunet::Batch batch;
//       while (loader.next(batch)) { /* batch.images [N,3,H,W], batch.masks [N,1,H,W] */ }
//       double starved_s = loader.wait_seconds();          // time the consumer waited for data
//   }
//
// Determinism: a sample's pixels depend only on (seed, epoch, dataset index), never on the thread
// count or which thread built it, so 1 and 16 threads give byte-identical batches. Load errors
// (a corrupt file) surface from next() as resunet::Error after the batches before it.
// OpenCV in Debian is built on TBB, so its internal parallel loops also stay inside the arena.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <opencv2/core.hpp>

#include "data/augment.h"
#include "data/dataset.h"
#include "graph/tensor.h"

namespace resunet {

// How BatchLoader builds and orders batches.
struct LoaderOptions {
    size_t batch_size = 8;                 // samples per batch (the last one may be smaller)
    bool drop_last = false;                // drop a final incomplete batch
    bool shuffle = false;                  // true: per-epoch order from (seed, epoch); false: given order
    std::optional<AugmentOptions> augment;  // set for training; draws from (seed, epoch, dataset index)
    uint64_t seed = 0;                     // seeds shuffling and augmentation
    int num_threads = 0;                   // max concurrency of the loader's task arena; 0: TBB default
    size_t prefetch_batches = 3;           // batches being built or waiting for the consumer, at most
    PreprocessOptions preprocess;          // model size, normalisation, original masks
};

// One batch, rows in epoch order.
struct Batch {
    HostTensor images;                   // [N, 3, H, W] f32, normalised RGB
    HostTensor masks;                    // [N, 1, H, W] f32, {0, 1}
    std::vector<size_t> indices;         // dataset index of each row
    std::vector<std::string> ids;        // sample id of each row
    std::vector<cv::Mat> original_masks;  // CV_8U {0, 1} at original size, if preprocess.keep_original_mask
    uint64_t epoch = 0;                  // epoch it belongs to
    size_t batch_index = 0;              // position within the epoch
    // Rows in the batch.
    size_t size() const { return indices.size(); }
};

// Background batch producer; one epoch at a time, one consumer thread.
class BatchLoader {
public:
    // Loads the given dataset indices (copied, as is the dataset). Throws resunet::Error on an index
    // out of range, batch_size 0 or negative num_threads.
    BatchLoader(const Dataset& dataset, std::vector<size_t> indices, LoaderOptions options);
    // Stops the producer and waits for it.
    ~BatchLoader();
    BatchLoader(const BatchLoader&) = delete;
    BatchLoader& operator=(const BatchLoader&) = delete;

    // Starts producing `epoch` (abandoning any epoch still running) and resets wait_seconds().
    void start_epoch(uint64_t epoch);
    // Moves the next batch into `batch`; false at the end of the epoch or before start_epoch.
    // Rethrows a load error (resunet::Error naming the file) once the batches before it are consumed.
    bool next(Batch& batch);
    // Seconds next() spent blocked waiting for data since start_epoch.
    double wait_seconds() const;
    // Dataset indices in the order of the current epoch (after shuffling).
    std::vector<size_t> epoch_order() const;
    // Batches per epoch.
    size_t num_batches() const;
    // Samples per epoch (before drop_last).
    size_t num_samples() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// Sample order of an epoch: `indices` as given, or shuffled from (seed, epoch) when shuffle is true.
std::vector<size_t> epoch_order(const std::vector<size_t>& indices, bool shuffle, uint64_t seed, uint64_t epoch);

}  // namespace resunet
