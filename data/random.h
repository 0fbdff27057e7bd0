// Portable, seedable randomness for data work: the same seed gives the same numbers on every
// platform and compiler (std::uniform_*_distribution and std::shuffle do not promise that).
//
// Intended usage:
//   // one generator per (purpose, seed, epoch, sample index); never a shared global RNG
//   resunet::SplitMix64 rng(resunet::mix_seed({resunet::kAugmentStream, seed, epoch, index}));
//   bool flip = rng.uniform() < 0.5;                  // uniform() is in [0, 1)
//   size_t pick = rng.below(10);                      // 0..9, unbiased
//   resunet::deterministic_shuffle(order, rng);       // Fisher-Yates driven by rng
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace resunet {

// Stream tags keep the generators of different purposes independent for the same user seed.
inline constexpr uint64_t kAugmentStream = 0x6175676d656e7431ULL;  // "augment1"
inline constexpr uint64_t kShuffleStream = 0x73687566666c6531ULL;  // "shuffle1"
inline constexpr uint64_t kSplitStream = 0x73706c6974303031ULL;    // "split001"
inline constexpr uint64_t kFoldStream = 0x666f6c6473303031ULL;     // "folds001"

// The splitmix64 finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mix with good avalanche.
inline uint64_t splitmix64_mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

// Folds several values (tag, seed, epoch, index...) into one seed; order matters.
inline uint64_t mix_seed(std::initializer_list<uint64_t> values) {
    uint64_t state = 0x243f6a8885a308d3ULL;
    for (uint64_t v : values) state = splitmix64_mix(state ^ splitmix64_mix(v));
    return state;
}

// A splitmix64 generator: tiny state, so one per sample costs nothing.
class SplitMix64 {
public:
    explicit SplitMix64(uint64_t seed) : state_(seed) {}
    // Next 64 random bits.
    uint64_t next() {
        state_ += 0x9e3779b97f4a7c15ULL;
        uint64_t z = state_;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }
    // Uniform double in [0, 1) from the top 53 bits.
    double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
    // Uniform integer in [0, n) without modulo bias; n must be > 0.
    uint64_t below(uint64_t n) {
        const uint64_t threshold = (0 - n) % n;  // 2^64 mod n
        for (;;) {
            uint64_t r = next();
            if (r >= threshold) return r % n;
        }
    }

private:
    uint64_t state_;
};

// Fisher-Yates shuffle with a fixed algorithm, so the permutation depends only on the generator.
template <typename T>
void deterministic_shuffle(std::vector<T>& items, SplitMix64& rng) {
    for (size_t i = items.size(); i > 1; --i) {
        size_t j = static_cast<size_t>(rng.below(i));
        std::swap(items[i - 1], items[j]);
    }
}

}  // namespace resunet
