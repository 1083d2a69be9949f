// Fused FP encode+pack and unpack+decode on CPU: the same integer algorithm as
// gradcomp/quant.py (_encode_bits) and gradcomp/packing.py, bit for bit, in one pass over memory.
// Elements are processed in byte-aligned chunks (a multiple of 8 codes), in parallel on torch's
// intra-op threads; inside a chunk, codes for a block are computed branch-free (vectorizable)
// and appended to a little-endian bit stream.
#include "codec_core.h"

#include <ATen/Parallel.h>

namespace gradcomp {



torch::Tensor encode_pack(torch::Tensor x, int64_t e, int64_t m, int64_t bias, int64_t scale,
                          bool stochastic, int64_t k0, int64_t k1, bool true_binade, bool left_shift,
                          int64_t offset, std::optional<torch::Tensor> stats) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "encode_pack: expected a contiguous float32 CPU tensor");
  TORCH_CHECK(offset >= 0, "encode_pack: offset must be >= 0");
  const int64_t n = x.numel();
  const int bits = static_cast<int>(1 + e + m);
  // `offset` bytes are left free in front of the codes (a payload header, written by the caller).
  auto full = torch::empty({offset + (n * bits + 7) / 8}, x.options().dtype(torch::kUInt8));
  auto out = full.narrow(0, offset, (n * bits + 7) / 8);
  const bool want_stats = stats.has_value();
  if (want_stats)
    TORCH_CHECK(stats->dtype() == torch::kInt64 && stats->numel() == 2 && stats->is_contiguous(),
                "encode_pack: stats must be a contiguous int64 tensor of 2");
  Fmt f{static_cast<int32_t>(e), static_cast<int32_t>(m), static_cast<int32_t>(bias),
        static_cast<int32_t>(1 - bias), static_cast<int32_t>((1 << (e + m)) - 1),
        static_cast<int32_t>(scale), stochastic, true_binade, left_shift,
        static_cast<uint32_t>(k0), static_cast<uint32_t>(k1)};
  f.zero_m = m == 0 ? 1 : 0;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const bool rare = f.true_binade || f.left_shift;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  // Per chunk: the largest finite |x| (as its bit pattern: non-negative floats order as
  // integers) and whether an inf or NaN occurred -- the no-saturation check of the caller,
  // computed while the block is in L1 instead of in a second pass over memory.
  std::vector<uint32_t> chunk_max(static_cast<size_t>(want_stats ? nchunks : 0), 0u);
  std::vector<uint32_t> chunk_bad(static_cast<size_t>(want_stats ? nchunks : 0), 0u);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) int32_t codes[kBlock];
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t mx = 0, bad = 0;
      const int64_t start = c * kChunk, stop = std::min(n, start + kChunk);
      uint8_t* o = dst + start * bits / 8;
      uint8_t* const chunk_end = dst + (stop * bits + 7) / 8;
      BitWriter w{o};
      for (int64_t b = start; b < stop; b += kBlock) {
        const int64_t len = std::min(kBlock, stop - b);
        const uint32_t* s = src + b;
        const uint32_t base = static_cast<uint32_t>(b);
        if (want_stats) {
          uint32_t bmx = 0, bbad = 0;  // block-local reductions vectorize
          for (int64_t i = 0; i < len; ++i) {
            const uint32_t au = s[i] & 0x7FFFFFFFu;
            const uint32_t inf_or_nan = static_cast<uint32_t>(au >= 0x7F800000u);
            bmx = std::max(bmx, au & (inf_or_nan - 1u));
            bbad |= inf_or_nan;
          }
          mx = std::max(mx, bmx);
          bad |= bbad;
        }
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
      if (want_stats) {
        chunk_max[static_cast<size_t>(c)] = mx;
        chunk_bad[static_cast<size_t>(c)] = bad;
      }
    }
  });
  if (want_stats) {
    uint32_t mx = 0, bad = 0;
    for (size_t c = 0; c < chunk_max.size(); ++c) {
      mx = std::max(mx, chunk_max[c]);
      bad |= chunk_bad[c];
    }
    int64_t* st = stats->data_ptr<int64_t>();
    st[0] = mx;
    st[1] = bad;
  }
  return full;
}

namespace {

// Decode codes [start, stop) of a packed stream (start a multiple of 8, so on a byte boundary)
// through `tab` into dst[0 .. stop - start).
inline void decode_range(const uint8_t* src, int64_t total_bytes, const float* tab, int64_t bits,
                         int64_t start, int64_t stop, float* dst) {
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  int64_t pos = start * bits / 8;
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
      float* d = dst + (i - start);
      for (int j = 0; j < 8; ++j) d[j] = tab[(word >> (j * bits)) & mask];
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
    dst[i - start] = tab[acc & mask];
    acc >>= bits;
    nbits -= static_cast<int>(bits);
  }
}

void check_packed(const torch::Tensor& packed, const torch::Tensor& table, int64_t bits, int64_t n,
                  const char* what) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.device().is_cpu(),
              what, ": expected a contiguous uint8 CPU tensor");
  TORCH_CHECK(bits >= 1 && bits <= 16, what, ": bits must be in 1..16");
  TORCH_CHECK(table.dtype() == torch::kFloat32 && table.is_contiguous() &&
              table.numel() == (int64_t(1) << bits), what, ": table must hold 2**bits float32 values");
  TORCH_CHECK(packed.numel() == (n * bits + 7) / 8, what, ": wrong packed size");
}

}  // namespace

void unpack_decode(torch::Tensor packed, torch::Tensor table, int64_t bits, torch::Tensor out) {
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous(), "unpack_decode: float32 out");
  const int64_t n = out.numel();
  check_packed(packed, table, bits, n, "unpack_decode");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  const float* tab = table.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t total_bytes = packed.numel();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kChunk, stop = std::min(n, start + kChunk);
      decode_range(src, total_bytes, tab, bits, start, stop, dst + start);
    }
  });
}

// out = (decode(p_0) + decode(p_1) + ... + decode(p_{N-1})) / divisor, summed left to right in
// float32 and divided in float32: the same operations, in the same order, as decoding each
// payload and adding them up with torch, then dividing. One pass over `out`.
void decode_mean(std::vector<torch::Tensor> packed, std::vector<torch::Tensor> tables,
                 std::vector<int64_t> bits, double divisor, torch::Tensor out) {
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.device().is_cpu(),
              "decode_mean: contiguous float32 CPU out");
  TORCH_CHECK(!packed.empty() && packed.size() == tables.size() && packed.size() == bits.size(),
              "decode_mean: one table and width per payload");
  const int64_t n = out.numel();
  const size_t np = packed.size();
  for (size_t p = 0; p < np; ++p) check_packed(packed[p], tables[p], bits[p], n, "decode_mean");
  const float d = static_cast<float>(divisor);
  float* dst = out.data_ptr<float>();
  constexpr int64_t kSub = 2048;  // a multiple of 8: sub-blocks stay byte aligned
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) float tmp[kSub];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t cstart = c * kChunk, cstop = std::min(n, cstart + kChunk);
      for (int64_t s = cstart; s < cstop; s += kSub) {
        const int64_t e = std::min(cstop, s + kSub), len = e - s;
        float* acc = dst + s;
        decode_range(packed[0].data_ptr<uint8_t>(), packed[0].numel(), tables[0].data_ptr<float>(),
                     bits[0], s, e, acc);
        for (size_t p = 1; p < np; ++p) {
          decode_range(packed[p].data_ptr<uint8_t>(), packed[p].numel(), tables[p].data_ptr<float>(),
                       bits[p], s, e, tmp);
          for (int64_t i = 0; i < len; ++i) acc[i] += tmp[i];
        }
        for (int64_t i = 0; i < len; ++i) acc[i] /= d;
      }
    }
  });
}

}  // namespace gradcomp
