// Fused FP encode+pack and unpack+decode on CPU: the same integer algorithm as
// gradcomp/quant.py (_encode_bits) and gradcomp/packing.py, bit for bit, in one pass over memory.
// Elements are processed in byte-aligned chunks (a multiple of 8 codes), in parallel on torch's
// intra-op threads; inside a chunk, codes for a block are computed branch-free (vectorizable)
// and appended to a little-endian bit stream.
#include "codec_core.h"

#include <ATen/Parallel.h>

#include <array>
#include <atomic>

namespace gradcomp {

namespace {

Fmt make_fmt(int64_t e, int64_t m, int64_t bias, int64_t scale, bool stochastic, int64_t k0,
             int64_t k1, bool true_binade, bool left_shift) {
  Fmt f{static_cast<int32_t>(e), static_cast<int32_t>(m), static_cast<int32_t>(bias),
        static_cast<int32_t>(1 - bias), static_cast<int32_t>((1 << (e + m)) - 1),
        static_cast<int32_t>(scale), stochastic, true_binade, left_shift,
        static_cast<uint32_t>(k0), static_cast<uint32_t>(k1)};
  f.zero_m = m == 0 ? 1 : 0;
  f.b_off = static_cast<int32_t>(128 + scale - bias);
  f.d0 = static_cast<int32_t>(23 - m);
  return f;
}

// Elements ahead of the block being encoded whose cache lines are prefetched (4 KB): the encode
// loop is compute-bound, so without it each block's first loads wait on memory (measured on 16M
// FP6 codes, one thread: 14.3 -> 11.9 ms stochastic, 12.4 -> 9.2 ms nearest). A prefetch past
// the input's end is harmless (prefetches do not fault).
constexpr int64_t kPrefetch = 1024;

// i * 0x9E3779B9 (mod 2**32) for i < kBlock.
constexpr auto kGoldenSteps = [] {
  std::array<uint32_t, kBlock> t{};
  for (int64_t i = 0; i < kBlock; ++i) t[static_cast<size_t>(i)] = static_cast<uint32_t>(i) * 0x9E3779B9u;
  return t;
}();

// Codes of the len (<= kBlock) float32 bit patterns s[0..len), element indices base + i.
template <bool STOCH, bool RARE>
inline void encode_block_t(const uint32_t* __restrict s, uint32_t base, int64_t len, const Fmt& fmt,
                           int32_t* __restrict codes) {
  const Fmt f = fmt;  // a local copy: `codes` cannot alias it, so the loops vectorize
  if (len == kBlock) {  // a trip count known at compile time: no remainder loop
    // The hash's index * 0x9E3779B9 + k0 as one addition per element: (base + i) * g + k0 =
    // (base * g + k0) + i * g (mod 2**32), with i * g from a constant table (one multiply per
    // vector fewer; the stochastic encode is bound by the vector ports).
    const uint32_t pre0 = base * 0x9E3779B9u + f.k0;
    if (RARE) {
      for (int64_t i = 0; i < kBlock; ++i) codes[i] = encode_one_pre<STOCH, true>(s[i], pre0 + kGoldenSteps[i], f);
    } else {
      for (int64_t i = 0; i < kBlock; ++i) codes[i] = encode_common<STOCH>(s[i], pre0 + kGoldenSteps[i], f);
    }
  } else {
    for (int64_t i = 0; i < len; ++i) codes[i] = encode_one<STOCH, RARE>(s[i], base + static_cast<uint32_t>(i), f);
  }
}

inline void encode_block(const uint32_t* __restrict s, uint32_t base, int64_t len, const Fmt& f,
                         int32_t* __restrict codes) {
  const bool rare = f.true_binade || f.left_shift;
  if (f.stochastic) {
    if (rare) encode_block_t<true, true>(s, base, len, f, codes);
    else encode_block_t<true, false>(s, base, len, f, codes);
  } else {
    if (rare) encode_block_t<false, true>(s, base, len, f, codes);
    else encode_block_t<false, false>(s, base, len, f, codes);
  }
}

// A full block (kBlock codes) of the common path with the no-saturation statistics of
// encode_pack computed in the same loop: the largest finite |x| bit pattern and whether an inf
// or NaN occurred (one load of each element instead of two passes).
template <bool STOCH>
inline void encode_block_stats(const uint32_t* __restrict s, uint32_t base, const Fmt& fmt,
                               int32_t* __restrict codes, uint32_t& mx, uint32_t& bad) {
  const Fmt f = fmt;
  const uint32_t pre0 = base * 0x9E3779B9u + f.k0;
  uint32_t bmx = 0, bbad = 0;  // block-local reductions vectorize
  for (int64_t i = 0; i < kBlock; ++i) {
    const uint32_t u = s[i];
    const uint32_t au = u & 0x7FFFFFFFu;
    const uint32_t inf_or_nan = static_cast<uint32_t>(au >= 0x7F800000u);
    bmx = std::max(bmx, au & (inf_or_nan - 1u));
    bbad |= inf_or_nan;
    codes[i] = encode_common<STOCH>(u, pre0 + kGoldenSteps[i], f);
  }
  mx = std::max(mx, bmx);
  bad |= bbad;
}

// Pack kBlock (64) codes of `bits` <= 8 bits into 8 little-endian words of 8 codes each
// (word g holds codes 8g .. 8g+7, code 8g+j at bit j * bits): the layout of
// gradcomp/packing.py, since 8 codes fill exactly `bits` bytes. Neighbours are merged in a tree
// (pairs, quads, octets) on whole vectors: each level is lane-wise shifts and ors plus one
// even/odd shuffle. The scalar loop that shifted 8 codes into each word took about a third of
// the encode time.
inline void pack_block8(const int32_t* __restrict codes, int bits, uint64_t* __restrict words) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  typedef uint64_t u64x8 __attribute__((vector_size(64)));
  u64x8 v[4];
  std::memcpy(v, codes, sizeof(v));  // 64-bit lane k of v[i] holds codes 16i+2k (low) and 16i+2k+1
  const u64x8 low = {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu,
                     0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu};
  for (int i = 0; i < 4; ++i) v[i] = (v[i] & low) | ((v[i] >> 32) << bits);
  u64x8 q[2];
  for (int j = 0; j < 2; ++j) {
    const u64x8 even = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 2, 4, 6, 8, 10, 12, 14);
    const u64x8 odd = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 1, 3, 5, 7, 9, 11, 13, 15);
    q[j] = even | (odd << (2 * bits));
  }
  const u64x8 even = __builtin_shufflevector(q[0], q[1], 0, 2, 4, 6, 8, 10, 12, 14);
  const u64x8 odd = __builtin_shufflevector(q[0], q[1], 1, 3, 5, 7, 9, 11, 13, 15);
  const u64x8 w = even | (odd << (4 * bits));
  std::memcpy(words, &w, sizeof(w));
#else
  for (int64_t g = 0; g < kBlock / 8; ++g) {
    uint64_t word = 0;
    for (int j = 0; j < 8; ++j) word |= static_cast<uint64_t>(static_cast<uint32_t>(codes[g * 8 + j])) << (j * bits);
    words[g] = word;
  }
#endif
}

}  // namespace



torch::Tensor encode_pack(torch::Tensor x, int64_t e, int64_t m, int64_t bias, int64_t scale,
                          bool stochastic, int64_t k0, int64_t k1, bool true_binade, bool left_shift,
                          int64_t offset, std::optional<torch::Tensor> stats) {
  TORCH_CHECK_VALUE(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "encode_pack: expected a contiguous float32 CPU tensor");
  TORCH_CHECK_VALUE(offset >= 0, "encode_pack: offset must be >= 0");
  const int64_t n = x.numel();
  const int bits = static_cast<int>(1 + e + m);
  // `offset` bytes are left free in front of the codes (a payload header, written by the caller).
  auto full = torch::empty({offset + (n * bits + 7) / 8}, x.options().dtype(torch::kUInt8));
  auto out = full.narrow(0, offset, (n * bits + 7) / 8);
  const bool want_stats = stats.has_value();
  if (want_stats)
    TORCH_CHECK_VALUE(stats->dtype() == torch::kInt64 && stats->numel() == 2 && stats->is_contiguous(),
                "encode_pack: stats must be a contiguous int64 tensor of 2");
  const Fmt f = make_fmt(e, m, bias, scale, stochastic, k0, k1, true_binade, left_shift);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  // Per chunk: the largest finite |x| (as its bit pattern: non-negative floats order as
  // integers) and whether an inf or NaN occurred -- the no-saturation check of the caller,
  // computed while the block is in L1 instead of in a second pass over memory.
  std::vector<uint32_t> chunk_max(static_cast<size_t>(want_stats ? nchunks : 0), 0u);
  std::vector<uint32_t> chunk_bad(static_cast<size_t>(want_stats ? nchunks : 0), 0u);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) int32_t codes[kBlock];
    // A local copy: through the captured reference, every store below would force a reload.
    const int nbits = bits;
    for (int64_t c = c0; c < c1; ++c) {
      uint32_t mx = 0, bad = 0;
      const int64_t start = c * kChunk, stop = std::min(n, start + kChunk);
      uint8_t* o = dst + start * nbits / 8;
      uint8_t* const chunk_end = dst + (stop * nbits + 7) / 8;
      BitWriter w{o};
      for (int64_t b = start; b < stop; b += kBlock) {
        const int64_t len = std::min(kBlock, stop - b);
        const uint32_t* s = src + b;
        const uint32_t base = static_cast<uint32_t>(b);
        for (int64_t p = 0; p < kBlock; p += 16) __builtin_prefetch(s + kPrefetch + p);
        if (len == kBlock && !(f.true_binade || f.left_shift)) {
          if (f.stochastic) encode_block_stats<true>(s, base, f, codes, mx, bad);
          else encode_block_stats<false>(s, base, f, codes, mx, bad);
        } else {
          uint32_t bmx = 0, bbad = 0;
          for (int64_t i = 0; i < len; ++i) {
            const uint32_t au = s[i] & 0x7FFFFFFFu;
            const uint32_t inf_or_nan = static_cast<uint32_t>(au >= 0x7F800000u);
            bmx = std::max(bmx, au & (inf_or_nan - 1u));
            bbad |= inf_or_nan;
          }
          mx = std::max(mx, bmx);
          bad |= bbad;
          encode_block(s, base, len, f, codes);
        }
        if (nbits <= 8 && len == kBlock) {
          // 8 codes fill exactly `bits` bytes: pack the block into 8 words of 8 codes each.
          alignas(64) uint64_t words[kBlock / 8];
          pack_block8(codes, nbits, words);
          // Store all 8 bytes of each word (a fixed-size store, not a libc call); the next word
          // overwrites the extra zero bytes. Never past this chunk's end, which another thread owns.
          for (int64_t g = 0; g < kBlock / 8; ++g) {
            if (o + 8 <= chunk_end) std::memcpy(o, &words[g], 8);
            else std::memcpy(o, &words[g], static_cast<size_t>(nbits));
            o += nbits;
          }
        } else {
          w.out = o;
          for (int64_t i = 0; i < len; ++i) w.put(static_cast<uint32_t>(codes[i]), nbits);
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

// Read codes [start, stop) of a packed stream (start a multiple of 8, so on a byte boundary)
// and hand each to emit(i - start, code).
template <typename Emit>
inline void read_codes(const uint8_t* src, int64_t total_bytes, int64_t bits, int64_t start,
                       int64_t stop, Emit emit) {
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
      for (int j = 0; j < 8; ++j) emit(i - start + j, static_cast<uint32_t>((word >> (j * bits)) & mask));
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
    emit(i - start, static_cast<uint32_t>(acc & mask));
    acc >>= bits;
    nbits -= static_cast<int>(bits);
  }
}

// Decode codes [start, stop) through `tab` into dst[0 .. stop - start).
inline void decode_range(const uint8_t* src, int64_t total_bytes, const float* tab, int64_t bits,
                         int64_t start, int64_t stop, float* dst) {
  read_codes(src, total_bytes, bits, start, stop, [&](int64_t j, uint32_t c) { dst[j] = tab[c]; });
}

void check_packed(const torch::Tensor& packed, const torch::Tensor& table, int64_t bits, int64_t n,
                  const char* what) {
  TORCH_CHECK_VALUE(packed.dtype() == torch::kUInt8 && packed.is_contiguous() && packed.device().is_cpu(),
              what, ": expected a contiguous uint8 CPU tensor");
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 16, what, ": bits must be in 1..16");
  TORCH_CHECK_VALUE(table.dtype() == torch::kFloat32 && table.is_contiguous() &&
              table.numel() == (int64_t(1) << bits), what, ": table must hold 2**bits float32 values");
  TORCH_CHECK_VALUE(packed.numel() == (n * bits + 7) / 8, what, ": wrong packed size");
}

}  // namespace

void unpack_decode(torch::Tensor packed, torch::Tensor table, int64_t bits, torch::Tensor out) {
  TORCH_CHECK_VALUE(out.dtype() == torch::kFloat32 && out.is_contiguous(), "unpack_decode: float32 out");
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
  TORCH_CHECK_VALUE(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.device().is_cpu(),
              "decode_mean: contiguous float32 CPU out");
  TORCH_CHECK_VALUE(!packed.empty() && packed.size() == tables.size() && packed.size() == bits.size(),
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

// Codes of float32 `x` (gradcomp.quant.encode): uint8 when `wide` is false (formats of at most
// 8 bits), int32 otherwise.
// Returns (codes, [any NaN in x] as uint8): the NaN check of the caller, from the same pass.
std::vector<torch::Tensor> encode_codes(torch::Tensor x, int64_t e, int64_t m, int64_t bias, int64_t scale,
                                        bool stochastic, int64_t k0, int64_t k1, bool true_binade,
                                        bool left_shift, bool wide) {
  TORCH_CHECK_VALUE(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "encode_codes: expected a contiguous float32 CPU tensor");
  const int64_t n = x.numel();
  auto out = torch::empty(x.sizes(), x.options().dtype(wide ? torch::kInt32 : torch::kUInt8));
  const Fmt f = make_fmt(e, m, bias, scale, stochastic, k0, k1, true_binade, left_shift);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  int32_t* o32 = wide ? out.data_ptr<int32_t>() : nullptr;
  uint8_t* o8 = wide ? nullptr : out.data_ptr<uint8_t>();
  std::atomic<bool> any_nan{false};
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) int32_t codes[kBlock];
    uint32_t nan = 0;
    for (int64_t b = c0 * kChunk; b < std::min(n, c1 * kChunk); b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
      for (int64_t p = 0; p < kBlock; p += 16) __builtin_prefetch(src + b + kPrefetch + p);
      for (int64_t i = 0; i < len; ++i) nan |= static_cast<uint32_t>((src[b + i] & 0x7FFFFFFFu) > 0x7F800000u);
      encode_block(src + b, static_cast<uint32_t>(b), len, f, codes);
      if (wide) std::memcpy(o32 + b, codes, static_cast<size_t>(len) * 4);
      else for (int64_t i = 0; i < len; ++i) o8[b + i] = static_cast<uint8_t>(codes[i]);
    }
    if (nan) any_nan = true;
  });
  auto flag = torch::full({1}, any_nan.load() ? 1 : 0, x.options().dtype(torch::kUInt8));
  return {out, flag};
}

// Pack integer codes (uint8 or int32, each in 0 .. 2**bits - 1) into the little-endian bit
// stream of gradcomp.packing. Returns (bytes, [all codes in range] as uint8); out-of-range
// codes leave the bytes unspecified.
std::vector<torch::Tensor> pack_codes(torch::Tensor codes, int64_t bits) {
  TORCH_CHECK_VALUE(codes.device().is_cpu() && (codes.dtype() == torch::kUInt8 || codes.dtype() == torch::kInt32),
              "pack_codes: uint8 or int32 CPU codes");
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 16, "pack_codes: bits must be in 1..16");
  auto c = codes.contiguous().reshape({-1});
  const int64_t n = c.numel();
  auto out = torch::empty({(n * bits + 7) / 8}, c.options().dtype(torch::kUInt8));
  uint8_t* dst = out.data_ptr<uint8_t>();
  const bool wide = c.dtype() == torch::kInt32;
  const int32_t* c32 = wide ? c.data_ptr<int32_t>() : nullptr;
  const uint8_t* c8 = wide ? nullptr : c.data_ptr<uint8_t>();
  const uint32_t limit = uint32_t(1) << bits;
  std::atomic<bool> ok{true};
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t k0, int64_t k1) {
    uint32_t bad = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t start = k * kChunk, stop = std::min(n, start + kChunk);
      BitWriter w{dst + start * bits / 8};  // chunks start on byte boundaries
      for (int64_t i = start; i < stop; ++i) {
        const uint32_t code = wide ? static_cast<uint32_t>(c32[i]) : static_cast<uint32_t>(c8[i]);
        bad |= static_cast<uint32_t>(code >= limit);  // a negative int32 is huge as uint32
        w.put(code & (limit - 1), static_cast<int>(bits));
      }
      w.flush();
    }
    if (bad) ok = false;
  });
  auto flag = torch::full({1}, ok.load() ? 1 : 0, c.options().dtype(torch::kUInt8));
  return {out, flag};
}

// Unpack `numel` codes of `bits` bits (uint8 for bits <= 8, int32 otherwise).
torch::Tensor unpack_codes(torch::Tensor packed, int64_t bits, int64_t numel) {
  TORCH_CHECK_VALUE(packed.dtype() == torch::kUInt8 && packed.device().is_cpu(), "unpack_codes: uint8 CPU bytes");
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 16 && packed.numel() == (numel * bits + 7) / 8,
              "unpack_codes: wrong packed size");
  auto p = packed.contiguous();
  const bool wide = bits > 8;
  auto out = torch::empty({numel}, p.options().dtype(wide ? torch::kInt32 : torch::kUInt8));
  const uint8_t* src = p.data_ptr<uint8_t>();
  int32_t* o32 = wide ? out.data_ptr<int32_t>() : nullptr;
  uint8_t* o8 = wide ? nullptr : out.data_ptr<uint8_t>();
  at::parallel_for(0, (numel + kChunk - 1) / kChunk, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t start = k * kChunk, stop = std::min(numel, start + kChunk);
      if (wide) read_codes(src, p.numel(), bits, start, stop,
                           [&](int64_t j, uint32_t c) { o32[start + j] = static_cast<int32_t>(c); });
      else read_codes(src, p.numel(), bits, start, stop,
                      [&](int64_t j, uint32_t c) { o8[start + j] = static_cast<uint8_t>(c); });
    }
  });
  return out;
}

// Values of integer codes through `table` (gradcomp.quant.decode); false (nothing usable
// written) if a code is outside the table.
bool decode_codes(torch::Tensor codes, torch::Tensor table, torch::Tensor out) {
  TORCH_CHECK_VALUE(codes.device().is_cpu() && (codes.dtype() == torch::kUInt8 || codes.dtype() == torch::kInt32),
              "decode_codes: uint8 or int32 CPU codes");
  TORCH_CHECK_VALUE(table.dtype() == torch::kFloat32 && table.is_contiguous(), "decode_codes: float32 table");
  TORCH_CHECK_VALUE(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == codes.numel(),
              "decode_codes: float32 out of the codes' size");
  auto c = codes.contiguous();
  const int64_t n = c.numel();
  const uint32_t size = static_cast<uint32_t>(table.numel());
  const float* tab = table.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const bool wide = c.dtype() == torch::kInt32;
  const int32_t* c32 = wide ? c.data_ptr<int32_t>() : nullptr;
  const uint8_t* c8 = wide ? nullptr : c.data_ptr<uint8_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, kChunk, [&](int64_t b0, int64_t b1) {
    uint32_t bad = 0;
    for (int64_t i = b0; i < b1; ++i) {
      const uint32_t code = wide ? static_cast<uint32_t>(c32[i]) : c8[i];  // negative -> huge
      const uint32_t in = code < size;
      bad |= in ^ 1u;
      dst[i] = tab[in ? code : 0];
    }
    if (bad) ok = false;
  });
  return ok.load();
}

}  // namespace gradcomp
