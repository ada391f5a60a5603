// XXH64 (the algorithm of https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md), over bytes
// given in pieces: the checksums of safetensors files (safetensors.cpp) and of shard files (data.cpp).
// Private to the library; the public one-call form is safetensors::xxh64.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace libllm::detail {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the checksum reads 64-bit words in host order");

// XXH64 over bytes given in any number of pieces: the same digest as one call on all of them.
class Xxh64 {
 public:
  explicit Xxh64(uint64_t seed = 0) : seed_(seed), lane_{seed + kP1 + kP2, seed + kP2, seed, seed - kP1} {}

  Xxh64& update(const void* data, size_t size) {
    const auto* p = static_cast<const uint8_t*>(data);
    total_ += size;
    if (buffered_ + size < 32) {
      if (size > 0) std::memcpy(buffer_ + buffered_, p, size);
      buffered_ += size;
      return *this;
    }
    if (buffered_ > 0) {  // complete the stripe begun by an earlier piece
      const size_t fill = 32 - buffered_;
      std::memcpy(buffer_ + buffered_, p, fill);
      stripe(buffer_);
      p += fill, size -= fill, buffered_ = 0;
    }
    uint64_t a = lane_[0], b = lane_[1], c = lane_[2], d = lane_[3];
    for (; size >= 32; p += 32, size -= 32) {
      a = mix(a, word64(p)), b = mix(b, word64(p + 8)), c = mix(c, word64(p + 16)), d = mix(d, word64(p + 24));
    }
    lane_[0] = a, lane_[1] = b, lane_[2] = c, lane_[3] = d;
    if (size > 0) std::memcpy(buffer_, p, size);
    buffered_ = size;
    return *this;
  }

  uint64_t digest() const {
    uint64_t h =
        total_ >= 32 ? rotl(lane_[0], 1) + rotl(lane_[1], 7) + rotl(lane_[2], 12) + rotl(lane_[3], 18) : seed_ + kP5;
    if (total_ >= 32)
      for (uint64_t lane : lane_) h = merge(h, lane);
    h += total_;
    const uint8_t* p = buffer_;
    size_t n = buffered_;
    for (; n >= 8; p += 8, n -= 8) h = rotl(h ^ mix(0, word64(p)), 27) * kP1 + kP4;
    if (n >= 4) {
      uint32_t k;
      std::memcpy(&k, p, 4);
      h = rotl(h ^ (uint64_t{k} * kP1), 23) * kP2 + kP3;
      p += 4, n -= 4;
    }
    for (; n > 0; ++p, --n) h = rotl(h ^ (*p * kP5), 11) * kP1;
    h ^= h >> 33;
    h *= kP2;
    h ^= h >> 29;
    h *= kP3;
    return h ^ (h >> 32);
  }

 private:
  static constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL, kP2 = 0xC2B2AE3D27D4EB4FULL, kP3 = 0x165667B19E3779F9ULL,
                            kP4 = 0x85EBCA77C2B2AE63ULL, kP5 = 0x27D4EB2F165667C5ULL;

  static uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
  static uint64_t word64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;
  }
  static uint64_t mix(uint64_t acc, uint64_t input) { return rotl(acc + input * kP2, 31) * kP1; }
  static uint64_t merge(uint64_t acc, uint64_t lane) { return (acc ^ mix(0, lane)) * kP1 + kP4; }

  void stripe(const uint8_t* p) {
    for (int i = 0; i < 4; ++i) lane_[i] = mix(lane_[i], word64(p + 8 * i));
  }

  uint64_t seed_;
  uint64_t lane_[4];
  uint64_t total_ = 0;
  uint8_t buffer_[32] = {};
  size_t buffered_ = 0;
};

// 16 lowercase hex digits of v, as xxhsum prints a digest.
inline std::string hex16(uint64_t v) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(v));
  return text;
}

}  // namespace libllm::detail
