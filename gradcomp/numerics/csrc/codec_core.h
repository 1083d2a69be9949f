// Shared pieces of the native codec kernels: the FP encoder of one float32 element (the integer
// algorithm of gradcomp/quant.py, bit for bit), the counter-based hash of gradcomp/rng.py, and a
// little-endian bit writer (the layout of gradcomp/packing.py).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

namespace gradcomp {

constexpr int64_t kBlock = 64;           // codes computed per inner block
constexpr int64_t kChunk = 1 << 16;      // elements per parallel task (multiple of 8 and kBlock)

struct Fmt {
  int32_t e, m, bias, emin, max_code, scale;
  bool stochastic, true_binade, left_shift;
  uint32_t k0, k1;
  int32_t zero_m;  // 1 when m == 0
  // Folded constants of the common (not RARE) path, see encode_common: 128 + scale - bias, 23 - m.
  int32_t b_off, d0;
};

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}

// STOCH: stochastic rounding; RARE: the format (with its scale) reaches below float32's normal
// or subnormal range, which needs the true binade of float32 subnormals and a left shift.
// `pre` is the hash's first step for this element, index * 0x9E3779B9 + k0 (mod 2**32), passed
// in so that a block can form it by one addition per element (see encode_one below).
template <bool STOCH, bool RARE>
inline int32_t encode_one_pre(uint32_t u, uint32_t pre, const Fmt& f) {
  const int32_t sign = static_cast<int32_t>(u >> 31);
  const int32_t a = static_cast<int32_t>(u & 0x7FFFFFFFu);
  const int32_t ef = a >> 23;
  const int32_t ef1 = std::max(ef, 1);
  int32_t sig = (a & 0x7FFFFF) + (((ef1 - ef) ^ 1) << 23);
  const int32_t lsb = ef1 - (127 + 23 + f.scale);
  int32_t binade = ef1 - (127 + f.scale);
  // Zero has no binade: like the eager code (float exponent of 0.0 is -127), push it far down.
  if (RARE && f.true_binade && ef == 0)
    binade = lsb + (sig ? 31 - __builtin_clz(static_cast<uint32_t>(sig)) : -127);
  const int32_t top = std::max(binade, f.emin);
  int32_t drop = top - f.m - lsb;
  if (RARE && f.left_shift) {
    const int32_t left = std::max(1 - drop, 0);
    sig <<= left;
    drop += left;
  }
  int32_t q;
  if (STOCH) {
    const int32_t dc = std::min(drop, 30);
    sig >>= std::min(drop - dc, 24);
    const uint32_t h = lowbias32(pre ^ f.k1);
    const int32_t noise = static_cast<int32_t>((h >> 1) >> (31 - dc));
    q = (sig + noise) >> dc;
  } else {
    const int32_t dc = std::min(drop, 25);
    // Ties to the even code: with m == 0 the code's last bit is the exponent's.
    const int32_t odd = (sig >> dc) + f.zero_m * (top + (f.bias - 1));
    q = (sig + ((1 << (dc - 1)) - 1) + (odd & 1)) >> dc;
  }
  int32_t code = ((top + (f.bias - 1)) << f.m) + q;
  code = std::min(code, f.max_code);
  return code | (sign << (f.e + f.m));
}

// encode_one_pre<STOCH, false> with the exponent arithmetic folded (the same codes, fewer vector
// ops; the stochastic encode is bound by the vector ports). Without RARE, scale - bias >= -127,
// so b_off = 128 + scale - bias >= 1, and with t = max(ef, 1) - b_off:
//   top + bias - 1 = max(binade, emin) + bias - 1 = max(t, 0)      (emin + bias - 1 == 0)
//   drop = top - m - lsb = 23 - m + max(t, 0) - t                    (lsb = binade - 23)
template <bool STOCH>
inline int32_t encode_common(uint32_t u, uint32_t pre, const Fmt& f) {
  const int32_t a = static_cast<int32_t>(u & 0x7FFFFFFFu);
  const int32_t ef = a >> 23;
  int32_t sig = (a & 0x7FFFFF) | (static_cast<int32_t>(ef != 0) << 23);
  const int32_t t = std::max(ef, 1) - f.b_off;
  const int32_t expo = std::max(t, 0);
  const int32_t drop = f.d0 + expo - t;
  int32_t q;
  if (STOCH) {
    const int32_t dc = std::min(drop, 30);
    sig >>= std::min(drop - dc, 24);
    const uint32_t h = lowbias32(pre ^ f.k1);
    const int32_t noise = static_cast<int32_t>((h >> 1) >> (31 - dc));
    q = (sig + noise) >> dc;
  } else {
    const int32_t dc = std::min(drop, 25);
    const int32_t odd = (sig >> dc) + f.zero_m * expo;
    q = (sig + ((1 << (dc - 1)) - 1) + (odd & 1)) >> dc;
  }
  const int32_t code = std::min((expo << f.m) + q, f.max_code);
  return code | static_cast<int32_t>((u >> 31) << (f.e + f.m));
}

template <bool STOCH, bool RARE>
inline int32_t encode_one(uint32_t u, uint32_t index, const Fmt& f) {
  return encode_one_pre<STOCH, RARE>(u, index * 0x9E3779B9u + f.k0, f);
}

// Append `n` codes of `bits` bits to a little-endian bit stream starting at `out` (byte aligned).
struct BitWriter {
  uint8_t* out;
  uint64_t acc = 0;
  int nbits = 0;
  inline void put(uint32_t code, int bits) {
    acc |= static_cast<uint64_t>(code) << nbits;
    nbits += bits;
    if (nbits >= 32) {
      const uint32_t w = static_cast<uint32_t>(acc);
      std::memcpy(out, &w, 4);
      out += 4;
      acc >>= 32;
      nbits -= 32;
    }
  }
  inline void flush() {
    while (nbits > 0) { *out++ = static_cast<uint8_t>(acc); acc >>= 8; nbits -= 8; }
  }
};


// 32 random bits of element `index` under key (k0, k1): gradcomp.rng.hash_bits.
inline uint32_t hash_bits(uint32_t index, uint32_t k0, uint32_t k1) {
  return lowbias32((index * 0x9E3779B9u + k0) ^ k1);
}

// Packed FP codes of n contiguous float32 values (gradcomp.quant + gradcomp.packing); element i
// draws its rounding noise at index i.
// `offset` bytes are left free in front of the codes; `stats`, when given (int64 [2]), receives
// the bit pattern of the largest finite |x| and whether x holds an inf or NaN.
torch::Tensor encode_pack(torch::Tensor x, int64_t e, int64_t m, int64_t bias, int64_t scale,
                          bool stochastic, int64_t k0, int64_t k1, bool true_binade, bool left_shift,
                          int64_t offset, std::optional<torch::Tensor> stats);

}  // namespace gradcomp
