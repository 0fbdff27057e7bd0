// Running the trainer (forward, loss, backward, Adam, running statistics) and its public API; building
// it is in trainer_compile.cpp and trainer_lowering.cpp (train/trainer_impl.h).
#include "train/trainer_impl.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "graph/safetensors.h"

namespace resunet {

void Trainer::Impl::forward(const float* images, bool training) {
    if (!images) throw Error("trainer: images must not be null");
    user_images.set_data_handle(const_cast<float*>(images));
    try {
        profile_phase = "prepare";
        run(prepare_steps);
        profile_phase = "forward";
        run(training ? forward_train_steps : forward_eval_steps);
        strm.wait();
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("trainer: oneDNN forward failed: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
}

LossValue Trainer::Impl::loss_and_backward(const float* masks, float gradient_scale) {
    if (!masks) throw Error("trainer: masks must not be null");
    const int batch = static_cast<int>(output_dims[0]);
    const int64_t pixels = num_elements(output_dims) / output_dims[0];
    LossValue loss;
    if (options.custom_loss)
        loss.total = options.custom_loss(logits.data(), masks, batch, pixels, dlogits.data());
    else
        loss = compute_loss(options.loss, logits.data(), masks, batch, pixels, dlogits.data(), options.dice_smooth);
    if (gradient_scale != 1.0f)
        for (float& d : dlogits) d *= gradient_scale;
    try {
        profile_phase = "backward";
        run_backward();
        strm.wait();
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("trainer: oneDNN backward failed: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
    last_loss = loss;
    return loss;
}

void Trainer::Impl::update_running_statistics() {
    const double m = options.bn_momentum;
    for (int n : batch_norm_nodes) {
        const Node& node = graph.node(n);
        const Dims& dims = graph.value(node.output).dims;
        const double count = static_cast<double>(dims[0] * dims[2] * dims[3]);
        const double unbias = count / (count - 1.0);  // PyTorch stores the unbiased variance
        float* running_mean = weights.at(node.name + ".running_mean").f32();
        float* running_var = weights.at(node.name + ".running_var").f32();
        const float* mean = static_cast<const float*>(plans[index(n)].mean.get_data_handle());
        const float* variance = static_cast<const float*>(plans[index(n)].variance.get_data_handle());
        for (int64_t c = 0; c < dims[1]; ++c) {
            running_mean[c] = static_cast<float>((1.0 - m) * running_mean[c] + m * mean[c]);
            running_var[c] = static_cast<float>((1.0 - m) * running_var[c] + m * variance[c] * unbias);
        }
    }
}

// Name of the first node (forward order) whose output holds a NaN or an infinity, or "".
static std::string first_non_finite_activation(const Trainer::Impl& m) {
    for (const Node& node : m.graph.nodes()) {
        if (m.forward_only[index(node.output)]) continue;  // its buffer holds a later value by now
        const memory& value = m.values[index(node.output)];
        if (!all_finite(static_cast<const float*>(value.get_data_handle()),
                        static_cast<int64_t>(m.value_desc[index(node.output)].get_size() / sizeof(float))))
            return node.name;
    }
    return "";
}

// Throws before anything is updated, naming the first layer where a non-finite number appeared. ReLU
// maps NaN to 0 in oneDNN, so a NaN input can leave the loss finite and show up in gradients only; the
// first non-finite activation (forward order) is named too when there is one.
void Trainer::Impl::check_finite_step(const LossValue& loss) const {
    const int64_t this_step = step + 1;
    auto activation_note = [&] {
        const std::string name = first_non_finite_activation(*this);
        return name.empty() ? std::string("no activation is non-finite")
                            : fmt::format("first non-finite activation in forward order: '{}'", name);
    };
    if (!std::isfinite(loss.total))
        throw Error(fmt::format("trainer: step {}: loss is {} ({}); weights left as before the step", this_step,
                                loss.total, activation_note()));
    auto gradient_error = [&](const std::string& layer, const std::string& tensor) {
        return Error(fmt::format("trainer: step {}: non-finite gradient, first in backward order at layer '{}' ({}); {}; "
                                 "weights left as before the step",
                                 this_step, layer, tensor, activation_note()));
    };
    if (!all_finite(dlogits.data(), static_cast<int64_t>(dlogits.size()))) throw gradient_error("loss", "d loss / d logits");
    for (auto it = graph.nodes().rbegin(); it != graph.nodes().rend(); ++it)
        for (const ParamInfo& p : it->params) {
            if (!p.learnable) continue;
            const HostTensor& g = grads.at(p.name);
            if (!all_finite(g.f32(), g.num_elements())) throw gradient_error(it->name, "tensor '" + p.name + "'");
        }
}

Trainer::Trainer(const Graph& graph, TensorMap weights, const TrainOptions& options) : impl_(std::make_unique<Impl>()) {
    const auto start = Clock::now();
    Impl& m = *impl_;
    if (graph.input_value() < 0 || graph.output_value() < 0) throw Error("trainer: graph has no input or no output");
    if (options.threads < 0) throw Error(fmt::format("trainer: threads must be >= 0, got {}", options.threads));
    if (!(options.learning_rate > 0)) throw Error(fmt::format("trainer: learning rate must be positive, got {}", options.learning_rate));
    if (!(options.bn_momentum >= 0 && options.bn_momentum <= 1))
        throw Error(fmt::format("trainer: bn_momentum must be in [0, 1], got {}", options.bn_momentum));
    StepLR{options.learning_rate, options.lr_step_size, options.lr_gamma}.learning_rate(0);  // validates
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(weights, expected, "trainer weights");
    for (const Node& node : graph.nodes())
        if (node.kind == OpKind::batch_norm) {
            const Dims& d = graph.value(node.output).dims;
            if (d[0] * d[2] * d[3] < 2)
                throw Error(fmt::format("trainer: batch norm '{}' sees {} value per channel ({}); training needs at least 2",
                                        node.name, d[0] * d[2] * d[3], dims_to_string(d)));
        }
    m.graph = graph;
    m.options = options;
    m.lr = options.learning_rate;
    for (const ParamInfo& p : graph.parameters()) {
        m.weights[p.name] = std::move(weights.at(p.name));
        if (!p.learnable) continue;
        m.learnable.push_back(p.name);
        m.grads[p.name] = HostTensor::zeros(p.dims);
        m.adam_m[p.name] = HostTensor::zeros(p.dims);
        m.adam_v[p.name] = HostTensor::zeros(p.dims);
    }
    m.set_threads();
    try {
        m.compile();
    } catch (const dnnl::error& e) {
        throw Error(fmt::format("trainer: oneDNN could not compile the graph: {} (status {})", e.what(), static_cast<int>(e.status)));
    }
    m.compile_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

Trainer::~Trainer() = default;

LossValue Trainer::compute_gradients(const float* images, const float* masks, float gradient_scale) {
    Impl& m = *impl_;
    m.set_threads();
    m.forward(images, true);
    return m.loss_and_backward(masks, gradient_scale);
}

std::vector<Trainer::StepTime> Trainer::profile_gradients(const float* images, const float* masks) {
    Impl& m = *impl_;
    std::vector<StepTime> times;
    m.profile = &times;
    try {
        compute_gradients(images, masks);
    } catch (...) {
        m.profile = nullptr;
        throw;
    }
    m.profile = nullptr;
    return times;
}

void Trainer::set_gradient_ready_callback(std::function<void(const std::string& name)> callback) {
    impl_->gradient_ready = std::move(callback);
}

void Trainer::update_running_statistics() { impl_->update_running_statistics(); }

void Trainer::Impl::adam_step() {
    ++step;
    for (const std::string& name : learnable) {
        HostTensor& w = weights.at(name);
        adam_update(options.adam, w.f32(), grads.at(name).f32(), adam_m.at(name).f32(), adam_v.at(name).f32(),
                    w.num_elements(), lr, step);
    }
}

void Trainer::apply_gradients(const LossValue& loss) {
    Impl& m = *impl_;
    m.set_threads();
    if (m.options.check_finite) m.check_finite_step(loss);
    m.adam_step();
}

float Trainer::step(const float* images, const float* masks) {
    Impl& m = *impl_;
    m.set_threads();
    m.forward(images, true);
    const LossValue loss = m.loss_and_backward(masks);
    if (m.options.check_finite) m.check_finite_step(loss);
    m.update_running_statistics();
    m.adam_step();
    return static_cast<float>(loss.total);
}

void Trainer::forward(const float* images, float* logits, bool training) {
    Impl& m = *impl_;
    if (!logits) throw Error("trainer: logits must not be null");
    m.set_threads();
    m.forward(images, training);
    if (training) m.update_running_statistics();
    std::memcpy(logits, m.logits.data(), m.logits.size() * sizeof(float));
}

void Trainer::end_epoch() {
    Impl& m = *impl_;
    ++m.epoch;
    m.lr = StepLR{m.options.learning_rate, m.options.lr_step_size, m.options.lr_gamma}.learning_rate(m.epoch);
}

TensorMap Trainer::weights() const { return impl_->weights; }

static void copy_into(TensorMap& destination, const TensorMap& source) {
    for (auto& [name, tensor] : destination) std::memcpy(tensor.bytes.data(), source.at(name).bytes.data(), tensor.byte_size());
}

void Trainer::set_weights(const TensorMap& weights) {
    std::vector<std::pair<std::string, Dims>> expected;
    for (const ParamInfo& p : impl_->graph.parameters()) expected.emplace_back(p.name, p.dims);
    check_tensors(weights, expected, "trainer weights");
    copy_into(impl_->weights, weights);
}

const TensorMap& Trainer::gradients() const { return impl_->grads; }
TensorMap& Trainer::gradients_in_place() { return impl_->grads; }
TensorMap& Trainer::weights_in_place() { return impl_->weights; }

const std::vector<float>& Trainer::input_gradient() const {
    if (!impl_->options.input_gradient) throw Error("trainer: input_gradient() needs TrainOptions::input_gradient = true");
    return impl_->input_grad;
}

std::vector<float> Trainer::activation(const std::string& node_name) const {
    Impl& m = *impl_;
    const Node* node = m.graph.find_node(node_name);
    if (!node) throw Error(fmt::format("trainer: no node named '{}'", node_name));
    if (m.forward_only[index(node->output)])
        throw Error(fmt::format("trainer: '{}' is not kept after the forward: its buffer is shared "
                                "(TrainOptions::share_forward_buffers)",
                                node_name));
    const Dims& dims = m.graph.value(node->output).dims;
    std::vector<float> out(index(num_elements(dims)));
    memory to({to_dnnl_dims(dims), dt::f32, tag::nchw}, m.eng, out.data());
    memory& from = m.values[index(node->output)];
    reorder(from, to).execute(m.strm, from, to);
    m.strm.wait();
    return out;
}

LossValue Trainer::last_loss() const { return impl_->last_loss; }

TrainerState Trainer::state() const {
    const Impl& m = *impl_;
    return TrainerState{m.weights, m.adam_m, m.adam_v, m.step, m.epoch, m.lr};
}

void Trainer::restore(const TrainerState& state) {
    Impl& m = *impl_;
    std::vector<std::pair<std::string, Dims>> expected, expected_learnable;
    for (const ParamInfo& p : m.graph.parameters()) {
        expected.emplace_back(p.name, p.dims);
        if (p.learnable) expected_learnable.emplace_back(p.name, p.dims);
    }
    check_tensors(state.weights, expected, "trainer state weights");
    check_tensors(state.adam_first_moment, expected_learnable, "trainer state Adam first moment");
    check_tensors(state.adam_second_moment, expected_learnable, "trainer state Adam second moment");
    if (state.step < 0 || state.epoch < 0 || !(state.learning_rate > 0))
        throw Error(fmt::format("trainer state: bad step {}, epoch {} or learning rate {}", state.step, state.epoch,
                                state.learning_rate));
    copy_into(m.weights, state.weights);
    copy_into(m.adam_m, state.adam_first_moment);
    copy_into(m.adam_v, state.adam_second_moment);
    m.step = state.step;
    m.epoch = state.epoch;
    m.lr = state.learning_rate;
}

int64_t Trainer::step_count() const { return impl_->step; }
int64_t Trainer::epoch() const { return impl_->epoch; }
double Trainer::learning_rate() const { return impl_->lr; }
void Trainer::set_learning_rate(double learning_rate) {
    if (!(learning_rate > 0)) throw Error(fmt::format("trainer: learning rate must be positive, got {}", learning_rate));
    impl_->lr = learning_rate;
}
const Graph& Trainer::graph() const { return impl_->graph; }
const TrainOptions& Trainer::options() const { return impl_->options; }
int Trainer::batch() const { return static_cast<int>(impl_->input_dims[0]); }
const Dims& Trainer::input_dims() const { return impl_->input_dims; }
const Dims& Trainer::output_dims() const { return impl_->output_dims; }
int Trainer::num_primitives() const {
    const Impl& m = *impl_;
    return static_cast<int>(m.prepare_steps.size() + m.forward_train_steps.size() + m.backward_steps.size());
}
double Trainer::compile_ms() const { return impl_->compile_ms; }
size_t Trainer::activation_bytes() const { return impl_->activation_bytes; }
const std::vector<TrainConvChoice>& Trainer::conv_choices() const { return impl_->conv_choices; }

std::string Trainer::activation_layout() const {
    switch (impl_->act_tag) {
        case tag::nChw16c: return "nChw16c";
        case tag::nChw8c: return "nChw8c";
        case tag::nhwc: return "nhwc";
        default: return "nchw";
    }
}

}  // namespace resunet
