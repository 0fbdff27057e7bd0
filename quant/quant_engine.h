// The int8 inference engine (DQ-ResUNet): s8 per-channel weights, u8 activations whose scale and zero
// point are computed at run time from the values themselves (dynamic) or fixed by calibration (static).
// Lowers the same fused graph as the fp32 engine onto oneDNN's u8 x s8 convolutions.
//
// Intended usage:
//   resunet::QuantOptions options;                           // dynamic, micro-batch 1
//   resunet::QuantEngine engine(graph, fp32_weights, options);
//   engine.run(images, 16, logits);                          // NCHW fp32 in and out
//   engine.calibrate(calibration_images, 32);                // optional: switch to static scales
//   resunet::save_safetensors("model.int8.safetensors", resunet::quantize_model_weights(graph, fp32_weights));
//   resunet::QuantEngine again(graph, resunet::load_safetensors(path).tensors, options);  // int8 file
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "graph/graph.h"
#include "quant/quantize.h"

namespace resunet {

enum class ScaleMode { dynamic, static_calibrated };

// The int8 layers' 3x3 convolutions. `direct`: oneDNN's u8 x s8 kernel (the default: exact integer
// arithmetic on the quantized network). `winograd_f23`: our own int8 Winograd F(2x2,3x3) wherever it applies
// (quant/winograd_int8.h), faster but it requantizes inside the Winograd domain: on the peers' network it
// moves mask Dice against PyTorch fp32 from 0.986 to 0.983 (docs/design.md). `automatic` ("auto"): with `tune`
// rule (the default), our int8 Winograd on the layers the CPU-class rule names (quant/int8_conv_choice.h: only
// with 127-level weights, never timed); with `tune` fast or full, each layer measured, the Winograd where it
// passes its check against direct and is faster; `tune` off keeps direct. `mixed`: mixed precision, each layer measured: oneDNN's u8 x s8 direct kernel against the
// fastest fp32 candidate of the planner (engine/conv_choice.h, e.g. our own fp32 Winograd), and the layer runs
// fp32 where that is at least kMixedPrecisionMargin faster (quant/int8_conv_choice.h): never less exact than
// direct, and on CPUs without VNNI faster (README). An int8 file still decides its own layers; `tune` off keeps
// every layer int8.
enum class Int8ConvAlgorithm { automatic, direct, winograd_f23, mixed };

// "auto", "direct", "winograd" or "mixed" (the words of the programs' --int8-conv flag); any other word is
// a resunet::Error. int8_conv_name() is the reverse.
Int8ConvAlgorithm int8_conv_from_name(const std::string& name);
std::string int8_conv_name(Int8ConvAlgorithm algorithm);

struct QuantOptions {
    int micro_batch = 1;  // images per pass; dynamic scales are computed per pass (1 = per image)
    int threads = 0;      // OpenMP threads for oneDNN and the quantize passes (the caller's setting is
                          // restored after each call); 0 = runtime default
    // Informational: an engine starts static when its int8 weights file carries a calibrated scale for
    // every quantized input (quantize_model_weights + static_scales()), otherwise dynamic; calibrate()
    // switches it to static. mode() says which is in effect.
    ScaleMode mode = ScaleMode::dynamic;
    // Layers (head node names, e.g. "e1.conv_a") kept in fp32. Convolutions with fewer than 8 input or
    // output channels (the RGB stem, the 1-channel head) stay fp32 regardless: they are memory-bound.
    std::set<std::string> keep_fp32;
    // The fp32 layers' 3x3 convolutions (layers kept fp32 by request): each one's algorithm chosen as the
    // fp32 engine chooses (EngineOptions::tune, engine/conv_choice.h): direct, oneDNN's Winograd, our own.
    Tuning tune = Tuning::rule;
    ConvAlgorithm conv_algorithm = ConvAlgorithm::tuned;  // or one algorithm for them all (tests, comparisons)
    // The int8 layers' 3x3 convolutions (see Int8ConvAlgorithm).
    Int8ConvAlgorithm int8_algorithm = Int8ConvAlgorithm::direct;
    bool keep_values = false;    // keep every activation for read_value() (per-layer reports)
    bool count_saturation = false;  // count clipped values in each quantize pass (report mode; slower)
    // With int8_algorithm tuned (measured) and tune on: a folder of int8 plans (engine/plan_cache.h: each int8
    // 3x3 layer's choice, keyed by CPU, ISA, oneDNN, graph shapes, threads, micro-batch and the measuring
    // rules), reused by the next engine instead of measuring again; a stale or damaged file is measured again
    // and replaced. Empty: measured at each start.
    std::string plan_cache;
    // A plan to run exactly (engine/plan.h: an int8 plan whose micro-batch is `micro_batch`): each layer's
    // precision and algorithm, nothing measured. It must name exactly the model's convolutions; with an int8
    // file, the precisions the file stores. Null: planned by `int8_algorithm` and `tune`.
    std::shared_ptr<const Plan> plan;
};

// One int8 layer's input quantization as last used.
struct LayerQuantInfo {
    std::string name;        // head node of the fused op, e.g. "e2.conv_a"
    std::string precision;   // "u8s8" or "f32"
    float input_scale = 0;   // activation scale s (0 for fp32 layers)
    int32_t input_zero_point = 0;
    double saturated_share = 0;  // share of input values clipped at 0 or 255 (needs count_saturation)
};

// Threading contract, as for Engine (engine/engine.h): several engines, one per thread, may run at the
// same time; one engine must not be used from two threads at once, because run(), profile() and
// calibrate() write its arena, scratchpad and per-pass scale, multiplier and bias buffers. In builds
// without NDEBUG a second concurrent call throws resunet::Error. With QuantOptions::threads > 0 the
// constructor, run(), profile() and calibrate() set omp_set_num_threads(threads) for their own duration
// and restore the caller's omp_get_max_threads() on return, also when they throw.
class QuantEngine {
  public:
    // `weights`: fp32 PyTorch-style weights (quantized here), or an int8 file made by int8_weights().
    QuantEngine(const Graph& graph, const TensorMap& weights, const QuantOptions& options = {});
    ~QuantEngine();
    QuantEngine(const QuantEngine&) = delete;
    QuantEngine& operator=(const QuantEngine&) = delete;

    void run(const float* src, int batch, float* dst);
    std::vector<LayerProfile> profile(const float* src, int batch, float* dst);
    // Runs `batch` images in dynamic mode, records each quantized input's min and max over all of
    // them, and fixes those scales (static mode) from then on.
    void calibrate(const float* src, int batch);
    ScaleMode mode() const;

    // Per fused op: precision, activation scale and zero point of the last pass, saturation share.
    std::vector<LayerQuantInfo> layer_info() const;
    std::vector<float> read_value(const std::string& name);  // needs keep_values; NCHW
    std::vector<std::string> materialized_values() const;

    // Static input scales after calibrate(): "<name>.input_scale" (F32 [1]) and
    // "<name>.input_zero_point" (I32 [1]) per int8 layer; merge into an int8 file to keep them.
    TensorMap static_scales() const;

    EngineMemory memory_usage() const;
    double compile_ms() const;
    int num_primitives() const;
    int weight_levels() const;  // |q| bound of the weights as this CPU runs them (files store +-127, narrowed to this)
    // The int8 3x3 convolutions' algorithms, for reports: "int8 3x3 convolutions: 11 winograd_int8_f23
    // (e2.conv_b, ...), 7 direct", and under `mixed` "; 4 run fp32, measured faster here (e1.conv_b, ...)"
    // (which layers `measured` and `mixed` choose depends on the timings of that start). With
    // `with_source`, where the choices came from is added: " (from the plan cache (plan-u8s8-....json))" or
    // " (measured: ...; saved as ...)"; reports that must not depend on a warm cache leave it out.
    std::string conv_summary(bool with_source = true) const;
    // The plan this engine runs (engine/plan.h): save it to run the same numbers elsewhere.
    const Plan& plan() const;

    struct Impl;

  private:
    std::unique_ptr<Impl> impl_;
};

// The int8 model as tensors, per fused op (named by its head node): "<name>.weight_q" (I8, OIHW, BN
// folded, +-kStoredWeightLevels on every CPU: the engine narrows them at load where the CPU has fewer
// levels, so the file is portable), "<name>.weight_scale" (F32 [O]) and "<name>.bias" (F32 [O], folded) for int8 layers;
// "<name>.weight" and "<name>.bias" (F32, folded) for fp32 ones. About a quarter of the fp32 file.
TensorMap quantize_model_weights(const Graph& graph, const TensorMap& fp32_weights, const QuantOptions& options = {});
// True if `tensors` is such an int8 model (has "*.weight_q" tensors).
bool is_int8_weights(const TensorMap& tensors);

}  // namespace resunet
