#include "train/checkpoint.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>

#include "graph/safetensors.h"

namespace resunet {

namespace {

constexpr const char* kFirstMoment = "adam.exp_avg.";
constexpr const char* kSecondMoment = "adam.exp_avg_sq.";

std::string shape_string(const Dims& chw) { return fmt::format("{}", fmt::join(chw, " x ")); }

const std::string& field(const std::map<std::string, std::string>& metadata, const std::string& key,
                         const std::string& path) {
    auto it = metadata.find(key);
    if (it == metadata.end()) throw Error(fmt::format("checkpoint '{}': metadata '{}' is missing", path, key));
    return it->second;
}

int64_t parse_int(const std::string& text, const std::string& key, const std::string& path) {
    int64_t value = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc() || end != text.data() + text.size() || value < 0)
        throw Error(fmt::format("checkpoint '{}': metadata '{}' = '{}' is not a non-negative integer", path, key, text));
    return value;
}

uint64_t parse_uint64(const std::string& text, const std::string& key, const std::string& path) {
    uint64_t value = 0;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (ec != std::errc() || end != text.data() + text.size())
        throw Error(fmt::format("checkpoint '{}': metadata '{}' = '{}' is not an unsigned integer", path, key, text));
    return value;
}

double parse_double(const std::string& text, const std::string& key, const std::string& path) {
    size_t used = 0;
    double value = 0;
    try {
        value = std::stod(text, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used != text.size() || !(value > 0) || !std::isfinite(value))
        throw Error(fmt::format("checkpoint '{}': metadata '{}' = '{}' is not a positive number", path, key, text));
    return value;
}

Dims parse_shape(const std::string& text, const std::string& path) {
    Dims dims;
    size_t start = 0;
    while (start <= text.size()) {
        size_t end = text.find(" x ", start);
        if (end == std::string::npos) end = text.size();
        dims.push_back(parse_int(text.substr(start, end - start), "resunet.input_shape", path));
        start = end + 3;
    }
    if (dims.size() != 3)
        throw Error(fmt::format("checkpoint '{}': metadata 'resunet.input_shape' = '{}' is not 'C x H x W'", path, text));
    return dims;
}

}  // namespace

void save_checkpoint(const std::string& path, const Trainer& trainer, const CheckpointExtras& extras) {
    TrainerState state = trainer.state();
    TensorMap tensors = std::move(state.weights);
    for (auto& [name, tensor] : state.adam_first_moment) tensors[kFirstMoment + name] = std::move(tensor);
    for (auto& [name, tensor] : state.adam_second_moment) tensors[kSecondMoment + name] = std::move(tensor);
    const Dims& in = trainer.input_dims();
    std::map<std::string, std::string> metadata;
    for (const auto& [key, value] : extras.metadata) metadata["user." + key] = value;
    metadata["resunet.format"] = kCheckpointFormat;
    metadata["resunet.step"] = fmt::format("{}", state.step);
    metadata["resunet.epoch"] = fmt::format("{}", state.epoch);
    metadata["resunet.learning_rate"] = fmt::format("{}", state.learning_rate);
    metadata["resunet.rng_state"] = fmt::format("{}", extras.rng_state);
    metadata["resunet.input_shape"] = shape_string({in[1], in[2], in[3]});
    metadata["resunet.num_parameters"] = fmt::format("{}", trainer.graph().num_parameters());
    save_safetensors(path, tensors, metadata);
}

Checkpoint load_checkpoint(const std::string& path) {
    SafetensorsFile file = load_safetensors(path);
    const std::string& format = field(file.metadata, "resunet.format", path);
    if (format != kCheckpointFormat)
        throw Error(fmt::format("checkpoint '{}': format '{}' is not '{}'", path, format, kCheckpointFormat));
    Checkpoint c;
    c.state.step = parse_int(field(file.metadata, "resunet.step", path), "resunet.step", path);
    c.state.epoch = parse_int(field(file.metadata, "resunet.epoch", path), "resunet.epoch", path);
    c.state.learning_rate =
        parse_double(field(file.metadata, "resunet.learning_rate", path), "resunet.learning_rate", path);
    c.rng_state = parse_uint64(field(file.metadata, "resunet.rng_state", path), "resunet.rng_state", path);
    c.input_shape = parse_shape(field(file.metadata, "resunet.input_shape", path), path);
    for (const auto& [key, value] : file.metadata)
        if (key.starts_with("user.")) c.metadata[key.substr(5)] = value;
    const std::string first(kFirstMoment), second(kSecondMoment);
    for (auto& [name, tensor] : file.tensors) {
        if (name.starts_with(first))
            c.state.adam_first_moment[name.substr(first.size())] = std::move(tensor);
        else if (name.starts_with(second))
            c.state.adam_second_moment[name.substr(second.size())] = std::move(tensor);
        else
            c.state.weights[name] = std::move(tensor);
    }
    return c;
}

void apply_checkpoint(const Checkpoint& checkpoint, Trainer& trainer, const std::string& what) {
    const Dims& in = trainer.input_dims();
    const Dims expected_shape = {in[1], in[2], in[3]};
    if (checkpoint.input_shape != expected_shape)
        throw Error(fmt::format("{}: written for images of {} but this trainer takes {}", what,
                                shape_string(checkpoint.input_shape), shape_string(expected_shape)));
    try {
        trainer.restore(checkpoint.state);
    } catch (const Error& e) {
        throw Error(fmt::format("{}: does not match this trainer's graph (another width or depth?): {}", what, e.what()));
    }
}

Checkpoint resume_from_checkpoint(const std::string& path, Trainer& trainer) {
    Checkpoint c = load_checkpoint(path);
    apply_checkpoint(c, trainer, fmt::format("checkpoint '{}'", path));
    return c;
}

}  // namespace resunet
