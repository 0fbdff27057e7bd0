// Training checkpoints: weights, Adam moments, step, epoch, learning rate and the caller's RNG state in
// one safetensors file (atomic write, CRC-32 checked on load), so `--resume` continues bit for bit.
//
// Intended usage:
//   resunet::save_checkpoint("run/last.safetensors", trainer, {.rng_state = seed, .metadata = {{"fold", "3"}}});
//   ...
//   resunet::Trainer trainer(graph, resunet::init_weights(graph, 0), options);    // a fresh one
//   resunet::Checkpoint c = resunet::resume_from_checkpoint("run/last.safetensors", trainer);
//   uint64_t rng = c.rng_state;                     // trainer.step_count(), epoch(), lr restored
//
// File layout: tensors "<param>" (every parameter and running statistic, PyTorch names, so the file also
// loads as a plain weight file), "adam.exp_avg.<param>" and "adam.exp_avg_sq.<param>" (learnable ones);
// metadata "resunet.format" = "resunet-train-checkpoint-1", "resunet.step", "resunet.epoch",
// "resunet.learning_rate" (shortest round-trip decimal), "resunet.rng_state" (decimal uint64),
// "resunet.input_shape" ("C x H x W" per image), "resunet.num_parameters", plus the caller's metadata
// under "user.<key>".
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "train/trainer.h"

namespace resunet {

inline constexpr const char* kCheckpointFormat = "resunet-train-checkpoint-1";

struct Checkpoint {
    TrainerState state;                           // weights, moments, step, epoch, lr
    uint64_t rng_state = 0;                       // the caller's data-pipeline RNG state, opaque here
    Dims input_shape;                             // C, H, W of one image the trainer was compiled for
    std::map<std::string, std::string> metadata;  // caller's metadata (without the "user." prefix)
};

struct CheckpointExtras {
    uint64_t rng_state = 0;                       // stored as is
    std::map<std::string, std::string> metadata;  // stored under "user.<key>"
};

void save_checkpoint(const std::string& path, const Trainer& trainer, const CheckpointExtras& extras = {});
// Reads and validates the file (format, checksum, metadata fields); throws resunet::Error naming the file.
Checkpoint load_checkpoint(const std::string& path);
// Restores `checkpoint` into `trainer`; a checkpoint of another graph (width, depth, channels) or image
// size is refused with a resunet::Error naming the first mismatch. `what` names the source in errors.
void apply_checkpoint(const Checkpoint& checkpoint, Trainer& trainer, const std::string& what = "checkpoint");
// load_checkpoint + apply_checkpoint; returns the checkpoint (for its RNG state and metadata).
Checkpoint resume_from_checkpoint(const std::string& path, Trainer& trainer);

}  // namespace resunet
