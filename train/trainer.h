// Training on oneDNN: compiles a Graph (with its batch N) once into forward-training and backward
// primitives, then runs forward, loss, backward and an Adam update per step. No oneDNN type appears here.
//
// Intended usage:
//   resunet::Graph graph = resunet::build_resunet({.width = 16, .height = 224, .width_px = 224, .batch = 4});
//   resunet::TrainOptions options;                       // Dice + BCE, Adam lr 1e-4, StepLR 30 / 0.1
//   resunet::Trainer trainer(graph, resunet::init_weights(graph, 42), options);  // primitives: once
//   for (int epoch = 0; epoch < epochs; ++epoch) {
//       for (auto& [images, masks] : batches)            // N x 3 x H x W and N x 1 x H x W floats, NCHW
//           float loss = trainer.step(images, masks);    // throws resunet::Error on NaN/Inf, weights kept
//       trainer.end_epoch();                             // StepLR
//   }
//   trainer.forward(images, logits, /*training=*/false); // running statistics, as model.eval()
//   resunet::save_safetensors("model.safetensors", trainer.weights());  // PyTorch state_dict names
//
// Split steps (dist/data_parallel.h builds data-parallel training from these):
//   trainer.set_gradient_ready_callback([&](const std::string& name) { reduce(trainer.gradients_in_place().at(name)); });
//   trainer.compute_gradients(images, masks, /*gradient_scale=*/share);  // callback: each gradient once final
//   trainer.update_running_statistics();                 // from this forward's batch statistics
//   trainer.apply_gradients(global_loss);                // finite checks, then one Adam step on gradients()
//
// Semantics follow PyTorch: BatchNorm in training mode normalises with the batch statistics (biased
// variance) and updates running_mean / running_var with momentum 0.1 and the unbiased variance.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "graph/graph.h"
#include "train/loss.h"
#include "train/optimizer.h"

namespace resunet {

// Memory layout of activations and their gradients inside the trainer. One layout serves every value
// (the graph input stays nchw under a blocked layout), so concat slices are views of one buffer.
//   nchw, nhwc: plain; nhwc lets oneDNN 2.6 use its jit kernels, nchw falls back to gemm-based ones.
//   blocked:    the widest channel block (nChw16c, nChw8c) whose convolution is not oneDNN's reference
//               kernel on this CPU and that every concat offset is a multiple of; throws if none.
//   automatic:  the block oneDNN's convolution asks for with format_tag::any when the concat offsets allow
//               it, else nhwc. On AVX2 the blocked kernels are 1.5-2x faster forward and backward-data
//               and 2-5x faster backward-weights than nhwc (docs/training.md has the figures).
enum class ActivationLayout { nchw, nhwc, blocked, automatic };

// How each 3x3 stride-1 convolution runs its forward, backward-data and backward-weights (chosen apart):
//   direct:   oneDNN's direct kernel everywhere (the default here: two trainers built alike compute alike).
//   measured: oneDNN's direct kernel and, where the CPU has AVX2 and FMA, our own Winograd F(4x4,3x3) and
//             F(2x2,3x3) are timed on the layer's real shape when the trainer is built (with the weights
//             transform every step needs), each checked against
//             direct within kOwnWinogradRelativeBound (1e-4 of the result's range); the fastest that passes
//             runs. Forward and backward-data: engine/winograd_own.h (weights transformed again every step);
//             backward-weights: engine/winograd_own_bwd_weights.h (d weights and d bias).
//   winograd: our own F(4x4,3x3) wherever it applies and passes the check (tests).
// A measured choice depends on timings, so two trainers may choose apart (and differ by rounding):
// `resunet train` measures once and keeps the choices in RUN/conv_plan.txt for --resume (conv_plan below).
enum class TrainConvAlgorithm { direct, measured, winograd };

// What ran where: one row per 3x3 convolution and pass, for logs and reports.
struct TrainConvChoice {
    std::string layer;      // graph node
    std::string pass;       // "forward", "backward_data" or "backward_weights"
    std::string algorithm;  // "direct", "winograd_f43" or "winograd_f23"
    std::string summary;    // candidates and times: "direct 12.3 ms, winograd_f43 7.1 ms (err 3e-06)", or why not
};

struct TrainOptions {
    double learning_rate = 1e-4;     // lr of epoch 0
    int lr_step_size = 30;           // StepLR: epochs between decays (see end_epoch())
    double lr_gamma = 0.1;           // StepLR: factor per decay
    AdamOptions adam;                // betas, eps, weight decay (L2 or decoupled)
    LossKind loss = LossKind::dice_bce;
    double dice_smooth = kDiceSmooth;  // Dice smoothing constant s
    LossFunction custom_loss;        // when set, replaces `loss`
    double bn_momentum = 0.1;        // running = (1 - m) running + m batch (unbiased variance)
    ActivationLayout layout = ActivationLayout::automatic;
    int threads = 0;                 // OpenMP threads for oneDNN and the host loops; 0 keeps the default
    bool input_gradient = false;     // also compute d loss / d images (tests, saliency); costs one more conv bwd
    bool check_finite = true;        // step(): throw on a NaN/Inf loss or gradient before touching the weights
    // A batch norm whose only reader is a ReLU runs as one oneDNN primitive forward and backward
    // (fuse_norm_relu, with a 1-bit workspace): the ReLU's passes and the batch norm's output buffer go.
    // activation() of such a batch norm then returns the ReLU's output.
    bool fuse_batch_norm_relu = true;
    // Values no backward primitive reads (a residual add's operands and output, a transposed
    // convolution's output that only feeds a concat) share buffers by forward liveness, as in the
    // inference arena; the ReLU after an add takes its backward from its output. activation() refuses them.
    bool share_forward_buffers = true;
    TrainConvAlgorithm conv_algorithm = TrainConvAlgorithm::direct;
    // Choices made before ("layer/pass" -> algorithm, as conv_choices() gives them): a pass named here runs
    // that algorithm without timing (still checked against direct; resunet::Error if it fails the check or
    // does not apply), so a resumed run computes what the first one did. Passes not named follow conv_algorithm.
    std::map<std::string, std::string> conv_plan;
};

// Everything a checkpoint needs to continue a run bit-for-bit.
struct TrainerState {
    TensorMap weights;             // every parameter and running statistic, PyTorch names
    TensorMap adam_first_moment;   // learnable parameters only, same names and shapes
    TensorMap adam_second_moment;  // learnable parameters only
    int64_t step = 0;              // Adam updates done
    int64_t epoch = 0;             // end_epoch() calls done
    double learning_rate = 1e-4;   // lr the next step uses
};

class Trainer {
  public:
    // `weights` must hold exactly the graph's parameters (names and shapes); throws resunet::Error otherwise.
    Trainer(const Graph& graph, TensorMap weights, const TrainOptions& options = {});
    ~Trainer();
    Trainer(const Trainer&) = delete;
    Trainer& operator=(const Trainer&) = delete;

    // One training step on a batch of the graph's N: forward (batch statistics), loss, backward, Adam.
    // images: N x C x H x W, masks: N x outC x H x W, both NCHW floats. Returns the loss. With
    // check_finite, a non-finite loss or gradient throws resunet::Error naming the step and the layer,
    // and leaves weights, running statistics, moments and the step count as they were.
    float step(const float* images, const float* masks);
    // Forward, loss and backward without any update (weights and running statistics untouched);
    // gradients() and input_gradient() hold the result. Returns the loss in double.
    // gradient_scale multiplies d loss / d logits, hence every gradient (a rank's share of a global batch).
    LossValue compute_gradients(const float* images, const float* masks, float gradient_scale = 1.0f);
    // Called on this thread during compute_gradients/step, after the backward primitive that makes the
    // host gradient of learnable parameter `name` final (backward order; each name once per backward).
    // The callback may hand the tensor to another thread, which may read and rewrite its values until
    // the next backward; nothing later in this backward touches it. An empty function removes it.
    void set_gradient_ready_callback(std::function<void(const std::string& name)> callback);
    // Running statistics from the batch statistics of the last training forward (momentum, unbiased
    // variance), as step() does; compute_gradients leaves them untouched.
    void update_running_statistics();
    // The rest of step() after compute_gradients: with check_finite, throws resunet::Error on a non-finite
    // `loss` or gradient (nothing changed); then one Adam update with gradients() as they are now.
    void apply_gradients(const LossValue& loss);
    // Forward only. training: batch statistics, and running statistics are updated as in PyTorch's
    // train() mode; otherwise running statistics (eval()). logits: N x outC x H x W.
    void forward(const float* images, float* logits, bool training);
    // StepLR: counts an epoch and sets the learning rate to lr * gamma ^ floor(epoch / step_size).
    void end_epoch();

    TensorMap weights() const;               // copy; parameters and running statistics
    void set_weights(const TensorMap& weights);  // same names and shapes as the graph's
    const TensorMap& gradients() const;      // learnable parameters, from the last backward
    // The trainer's own tensors, for in-place changes of values only (never of names, shapes or sizes:
    // oneDNN memories point into them). Data-parallel training sums gradients and averages running
    // statistics across ranks through these.
    TensorMap& gradients_in_place();
    TensorMap& weights_in_place();
    const std::vector<float>& input_gradient() const;  // NCHW d loss / d images (needs input_gradient)
    // NCHW copy of a node's output from the last forward (debugging, tests); throws on an unknown name and
    // on a value whose buffer the forward shares (see TrainOptions::share_forward_buffers).
    std::vector<float> activation(const std::string& node_name) const;
    LossValue last_loss() const;             // of the last step or compute_gradients
    TrainerState state() const;
    void restore(const TrainerState& state);  // checks names and shapes; throws resunet::Error

    int64_t step_count() const;       // Adam updates done
    int64_t epoch() const;            // end_epoch() calls done
    double learning_rate() const;     // lr of the next step
    void set_learning_rate(double learning_rate);  // until the next end_epoch()
    const Graph& graph() const;
    const TrainOptions& options() const;
    int batch() const;                // N of the compiled graph
    const Dims& input_dims() const;   // N x C x H x W
    const Dims& output_dims() const;  // N x outC x H x W
    int num_primitives() const;       // forward-training + backward + weight reorders
    double compile_ms() const;        // primitive creation and buffer allocation
    size_t activation_bytes() const;  // activations, their gradients and per-op buffers (workspaces, statistics)
    std::string activation_layout() const;  // the layout in use: "nChw16c", "nChw8c", "nhwc" or "nchw"
    const std::vector<TrainConvChoice>& conv_choices() const;  // graph order, forward before backward_data

    // One step's time per executed step (weights preparation, forward, backward), in execution order,
    // each followed by a stream wait: compute_gradients() once with a clock around every step. The
    // step name is the graph node's, with ".bwd_weights", ".bwd_data", ".reorder" and such after it.
    struct StepTime {
        std::string name;
        std::string phase;  // "prepare", "forward", "backward"
        double ms = 0;
    };
    std::vector<StepTime> profile_gradients(const float* images, const float* masks);

    struct Impl;

  private:
    std::unique_ptr<Impl> impl_;
};

}  // namespace resunet
