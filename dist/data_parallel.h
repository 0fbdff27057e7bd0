// Data-parallel training over MPI ranks: each rank trains on its share of every global batch, the
// gradients are summed across ranks, and every rank applies the same Adam step, so the weights stay
// identical everywhere. With one process it is also the single-process twin the equality tests compare
// against (groups_per_rank = the number of ranks to imitate). No oneDNN or MPI type appears here.
//
// Intended usage:
//   resunet::dist::Comm& comm = resunet::dist::Comm::world();
//   resunet::Graph graph = resunet::build_resunet({.width = 16, .height = 128, .width_px = 128, .batch = 8});  // global batch
//   resunet::dist::DataParallelTrainer trainer(graph, resunet::init_weights(graph, 42), train_options, {}, &comm);
//   auto [begin, end] = trainer.local_images();          // this rank's images of each global batch
//   float loss = trainer.step(images + begin * image_floats, masks + begin * mask_floats);  // global loss
//   trainer.trainer().end_epoch();                       // lr, checkpoints, eval: the rank's Trainer
//   if (comm.rank() == 0) resunet::save_checkpoint("last.safetensors", trainer.trainer());  // same on every rank
//
// The split: the global batch of N images is cut by shard() into G = ranks x groups_per_rank contiguous
// groups (sizes differ by at most 1, so 7 images on 3 ranks are 3, 2, 2); rank r runs groups
// r*groups_per_rank .. (r+1)*groups_per_rank-1. Each group is one forward/backward with its own
// batch-norm statistics. The loss (train/loss.h) is a per-image mean of Dice plus a per-pixel mean of
// BCE over the global batch, so the global gradient is the sum over groups of the group's gradient
// times n_group / N: each group scales d loss / d logits by its share, and the shares are summed
// (MPI_Allreduce in fp32, in place). The reported loss is the same weighted sum.
//
// Batch norm rule: per group ("per rank"), as PyTorch DistributedDataParallel does by default (not
// SyncBatchNorm). In training, each rank normalises with the statistics of its own images. Why: oneDNN's
// batch-norm forward and backward primitives compute the statistics and their gradient terms inside
// one kernel, so synchronising them would replace those primitives with our own and add two small,
// latency-bound allreduces per BN layer in forward and backward (about 2 x 40 per step at width 64),
// where per-rank BN needs none; with the usual 4+ images per rank the statistics are good enough.
// Consequence: the result depends on how the batch is split, so the single-process twin splits it
// the same way (groups_per_rank = ranks: same groups, gradients accumulated). Running statistics are
// made identical on every rank after each step: each group updates them from the same starting value
// with its own batch statistics (momentum, unbiased variance), and the G results are averaged
// (allreduce in double), i.e. running = (1 - m) running + m * mean over groups of the group statistics.
// So a checkpoint does not depend on which rank writes it.
//
// Overlap: with one group per rank and overlap = true, a second thread allreduces each layer's
// gradient as soon as backward has made it final (Trainer::set_gradient_ready_callback), in backward
// order, while the main thread goes on with the earlier layers. It does not pay on a 2-core machine
// with one thread per rank (measured 0.48 s -> 0.68 s a step at width 16, docs/mpi.md: Open MPI's
// progress engine busy-polls on that second thread and takes half of the rank's core), so it is off
// by default; it is meant for nodes with a core to spare and a slow network.
//
// Equality bound (tests/test_dist.cpp, DataParallelMpi.*, width 4, 32x32, global batch 7, lr 1e-3):
// after 3 steps every tensor equals the twin's within 1e-5 of its largest magnitude (measured: 0, bit
// for bit, at -np 2, where a sum of two is the same in any order; 1.6e-6 at -np 3, fp32 summation
// order of the allreduce). Exception: the bias of a convolution feeding a batch norm has a true
// gradient of exactly 0, so backward gives it rounding noise, which Adam turns into steps of up to
// about lr of either sign; those biases and that norm's running mean are bounded by 2 lr per step in
// absolute terms (measured 0.73 lr after 3 steps at -np 3). Weights and running statistics are bit-
// identical on every rank.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <utility>

#include "graph/graph.h"
#include "train/trainer.h"

namespace resunet::dist {

class Comm;

struct DataParallelOptions {
    // Batch-norm groups each process runs per step. 1 under mpirun; on one process (comm == nullptr or
    // a 1-rank Comm) k > 1 makes it the twin of k ranks (same groups, gradients accumulated).
    int groups_per_rank = 1;
    // Allreduce each gradient on a second thread as soon as backward has it (one group per rank only).
    bool overlap = false;
};

class DataParallelTrainer {
  public:
    // graph: compiled batch = the global batch N. weights must be the same on every rank (same seed, or
    // a checkpoint every rank loads). comm: nullptr runs alone (no reduction). Throws resunet::Error when
    // a group would be empty (N < ranks x groups_per_rank) or the graph does not fit the Trainer.
    DataParallelTrainer(const Graph& graph, TensorMap weights, const TrainOptions& options,
                        const DataParallelOptions& parallel = {}, Comm* comm = nullptr);
    ~DataParallelTrainer();
    DataParallelTrainer(const DataParallelTrainer&) = delete;
    DataParallelTrainer& operator=(const DataParallelTrainer&) = delete;

    // One step on the global batch: images / masks hold only this rank's images, local_images() of
    // them, NCHW. Returns the global loss (the same on every rank). A non-finite loss or gradient on any
    // rank throws resunet::Error on every rank, with weights, moments and running statistics unchanged.
    float step(const float* images, const float* masks);
    LossValue last_loss() const;                 // global loss of the last step
    std::pair<size_t, size_t> local_images() const;  // [begin, end) of this rank's images in a global batch
    int global_batch() const;
    int num_groups() const;                      // ranks x groups_per_rank
    // The rank's Trainer that holds the weights, Adam moments, step count and learning rate (identical on
    // every rank): for checkpoints, end_epoch(), evaluation.
    Trainer& trainer();
    const Trainer& trainer() const;

    // Seconds of the last step: compute (forward, loss, backward on this rank) and the time the main
    // thread waited for, or itself spent in, gradient allreduces after backward.
    double last_compute_seconds() const;
    double last_reduce_wait_seconds() const;

    struct Impl;

  private:
    std::unique_ptr<Impl> impl_;
};

}  // namespace resunet::dist
