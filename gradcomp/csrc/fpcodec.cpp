// Fused FP encode+pack and unpack+decode on CPU: the same integer algorithm as
// gradcomp/quant.py (_encode_bits) and gradcomp/packing.py, bit for bit, in one pass over memory.
// Elements are processed in byte-aligned chunks (a multiple of 8 codes), in parallel on torch's
// intra-op threads; inside a chunk, codes for a block are computed branch-free (vectorizable)
// and appended to a little-endian bit stream.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlock = 64;           // codes computed per inner block
constexpr int64_t kChunk = 1 << 16;      // elements per parallel task (multiple of 8 and kBlock)

struct Fmt {
  int32_t e, m, bias, emin, max_code, scale;
  bool stochastic, true_binade, left_shift;
  uint32_t k0, k1;
  int32_t zero_m;  // 1 when m == 0
};

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}

// STOCH: stochastic rounding; RARE: the format (with its scale) reaches below float32's normal
// or subnormal range, which needs the true binade of float32 subnormals and a left shift.
template <bool STOCH, bool RARE>
inline int32_t encode_one(uint32_t u, uint32_t index, const Fmt& f) {
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
    uint32_t h = index * 0x9E3779B9u + f.k0;
    h = lowbias32(h ^ f.k1);
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

}  // namespace

torch::Tensor encode_pack(torch::Tensor x, int64_t e, int64_t m, int64_t bias, int64_t scale,
                          bool stochastic, int64_t k0, int64_t k1, bool true_binade, bool left_shift) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "encode_pack: expected a contiguous float32 CPU tensor");
  const int64_t n = x.numel();
  const int bits = static_cast<int>(1 + e + m);
  auto out = torch::empty({(n * bits + 7) / 8}, x.options().dtype(torch::kUInt8));
  Fmt f{static_cast<int32_t>(e), static_cast<int32_t>(m), static_cast<int32_t>(bias),
        static_cast<int32_t>(1 - bias), static_cast<int32_t>((1 << (e + m)) - 1),
        static_cast<int32_t>(scale), stochastic, true_binade, left_shift,
        static_cast<uint32_t>(k0), static_cast<uint32_t>(k1)};
  f.zero_m = m == 0 ? 1 : 0;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const bool rare = f.true_binade || f.left_shift;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) int32_t codes[kBlock];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kChunk, stop = std::min(n, start + kChunk);
      uint8_t* o = dst + start * bits / 8;
      uint8_t* const chunk_end = dst + (stop * bits + 7) / 8;
      BitWriter w{o};
      for (int64_t b = start; b < stop; b += kBlock) {
        const int64_t len = std::min(kBlock, stop - b);
        const uint32_t* s = src + b;
        const uint32_t base = static_cast<uint32_t>(b);
        if (f.stochastic) {
          if (rare) for (int64_t i = 0; i < len; ++i) codes[i] = encode_one<true, true>(s[i], base + i, f);
          else for (int64_t i = 0; i < len; ++i) codes[i] = encode_one<true, false>(s[i], base + i, f);
        } else {
          if (rare) for (int64_t i = 0; i < len; ++i) codes[i] = encode_one<false, true>(s[i], base + i, f);
          else for (int64_t i = 0; i < len; ++i) codes[i] = encode_one<false, false>(s[i], base + i, f);
        }
        if (bits <= 8 && len == kBlock) {
          // 8 codes fill exactly `bits` bytes: pack each group into one 64-bit word. Store all 8
          // bytes (a fixed-size store, not a libc call); the next group overwrites the extra
          // zero bytes. Never past this chunk's end, which another thread owns.
          for (int64_t g = 0; g < kBlock / 8; ++g) {
            uint64_t word = 0;
            for (int j = 0; j < 8; ++j) word |= static_cast<uint64_t>(codes[g * 8 + j]) << (j * bits);
            if (o + 8 <= chunk_end) std::memcpy(o, &word, 8);
            else std::memcpy(o, &word, static_cast<size_t>(bits));
            o += bits;
          }
        } else {
          w.out = o;
          for (int64_t i = 0; i < len; ++i) w.put(static_cast<uint32_t>(codes[i]), bits);
          w.flush();
          o = w.out;
          w.acc = 0;
          w.nbits = 0;
        }
      }
    }
  });
  return out;
}

void unpack_decode(torch::Tensor packed, torch::Tensor table, int64_t bits, torch::Tensor out) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.device().is_cpu(),
              "unpack_decode: expected a contiguous uint8 CPU tensor");
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.numel() == (int64_t(1) << bits),
              "unpack_decode: table must hold 2**bits float32 values");
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous(), "unpack_decode: float32 out");
  const int64_t n = out.numel();
  TORCH_CHECK(packed.numel() == (n * bits + 7) / 8, "unpack_decode: wrong packed size");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* tab = table.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  const int64_t total_bytes = packed.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kChunk, stop = std::min(n, start + kChunk);
      int64_t pos = start * bits / 8;  // byte offset (chunks start on byte boundaries)
      int64_t i = start;
      if (bits <= 8) {
        // Whole groups of 8 codes: `bits` bytes, one 64-bit load each.
        for (; i + 8 <= stop; i += 8) {
          uint64_t word = 0;
          if (pos + 8 <= total_bytes) {  // fixed-size load; the extra bytes are masked off
            std::memcpy(&word, src + pos, 8);
          } else {
            std::memcpy(&word, src + pos, static_cast<size_t>(bits));
          }
          pos += bits;
          for (int j = 0; j < 8; ++j) dst[i + j] = tab[(word >> (j * bits)) & mask];
        }
      }
      uint64_t acc = 0;
      int nbits = 0;
      for (; i < stop; ++i) {
        while (nbits < bits) {
          uint32_t w = 0;
          const int64_t avail = std::min<int64_t>(4, total_bytes - pos);
          std::memcpy(&w, src + pos, static_cast<size_t>(avail));
          pos += avail;
          acc |= static_cast<uint64_t>(w) << nbits;
          nbits += 8 * static_cast<int>(avail);
        }
        dst[i] = tab[acc & mask];
        acc >>= bits;
        nbits -= static_cast<int>(bits);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("encode_pack", &encode_pack, "fused FP encode + bit pack (float32, CPU)");
  mod.def("unpack_decode", &unpack_decode, "fused bit unpack + FP decode (CPU)");
}
