// Native kernels of the sparse codecs (gradcomp/codecs/sparse.py), bit for bit:
//
// * prune_select: stochastic pruning (gradcomp/pruning.py) fused with the compaction the encoder
//   needs -- positions of the nonzero entries, the values kept above alpha, the kept flags and
//   the signs of the +-alpha entries -- in one pass over the input, without materializing the
//   pruned tensor or the uniforms;
// * rice_encode / rice_decode: the Rice-coded gaps of sorted positions;
// * prune_scatter: decode of the PRUNE / PRUNE_FP position and flag streams into a dense shard.
//
// Elements are processed in chunks in parallel on torch's intra-op threads; each chunk collects
// its entries locally and the chunks are concatenated in order, so the result does not depend on
// the number of threads.
#include "codec_core.h"

#include <ATen/Parallel.h>

#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include <vector>

namespace gradcomp {
namespace {

constexpr int64_t kSelectChunk = 1 << 15;

// Bit i set when cls[i] == 1 (a kept value), for a full block of 64 classes.
inline uint64_t kept_mask(const uint8_t* cls) {
#if defined(__AVX512BW__)
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(cls));
  return static_cast<uint64_t>(_mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(1)));
#else
  uint64_t m = 0;
  for (int i = 0; i < 64; ++i) m |= static_cast<uint64_t>(cls[i] == 1) << i;
  return m;
#endif
}

// Bit i set when cls[i] != 0, for a full block of 64 classes.
inline uint64_t nonzero_mask(const uint8_t* cls) {
#if defined(__AVX512BW__)
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(cls));
  return static_cast<uint64_t>(_mm512_test_epi8_mask(v, v));
#else
  uint64_t m = 0;
  for (int i = 0; i < 64; ++i) m |= static_cast<uint64_t>(cls[i] != 0) << i;
  return m;
#endif
}

// Classify elements [b, b + len) of one block (len <= kBlock): cls[i] = 0 pruned, 1 kept
// (|x| > alpha, or NaN), 2 +alpha, 3 -alpha. Branch-free (vectorizable): the float32 operations
// of gradcomp.pruning.stochastic_prune, in the same order, so the same entries survive. Returns
// the mask of survivors; sets `bad` if the block holds inf or NaN.
inline uint64_t classify_block(const uint32_t* src, int64_t b, int64_t len, float a, uint32_t k0,
                               uint32_t k1, uint8_t* cls, uint32_t& bad) {
  const uint32_t* s = src + b;
  const uint32_t base = static_cast<uint32_t>(b);
  uint32_t nonfinite = 0;
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t u = s[i];
    const uint32_t au = u & 0x7FFFFFFFu;
    float ax;
    std::memcpy(&ax, &au, 4);
    const uint32_t h = hash_bits(base + static_cast<uint32_t>(i), k0, k1);
    const float eps = (static_cast<float>((h >> 8) & 0xFFFFFFu) + 0.5f) * 5.9604644775390625e-08f;
    const uint32_t keep = !(ax <= a);         // |x| > alpha, or NaN
    const uint32_t small = (eps * a <= ax);   // survives as sign(x) * alpha
    const uint32_t c2 = keep | ((small & (keep ^ 1u)) << 1);
    cls[i] = static_cast<uint8_t>(c2 | ((c2 >> 1) & (u >> 31)));
    nonfinite |= static_cast<uint32_t>(au >= 0x7F800000u);
  }
  bad |= nonfinite;
  if (len == kBlock) return nonzero_mask(cls);
  uint64_t mask = 0;
  for (int64_t i = 0; i < len; ++i) mask |= static_cast<uint64_t>(cls[i] != 0) << i;
  return mask;
}

}  // namespace

// Prune float32 `x` at float32 threshold `alpha` with uniforms from key (k0, k1) and compact it.
// Returns (positions int32 [n], kept values float32 [n_kept], kept flags packed [ceil(n/8)],
// signs of the +-alpha entries packed [ceil((n - n_kept)/8)], stats float64 [max finite |kept|,
// any non-finite input]).
//
// Two passes over x: the first only counts survivors per chunk (classification is cheap: the
// hash and two compares, vectorized), the second classifies again and writes every survivor
// straight to its final place -- no scratch the size of the input, no second copy.
std::vector<torch::Tensor> prune_select(torch::Tensor x, double alpha_d, int64_t k0_, int64_t k1_) {
  TORCH_CHECK_VALUE(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "prune_select: expected a contiguous float32 CPU tensor");
  const int64_t n = x.numel();
  TORCH_CHECK_VALUE(n < (int64_t(1) << 31), "prune_select: at most 2**31 - 1 elements");
  const float a = static_cast<float>(alpha_d);
  const uint32_t k0 = static_cast<uint32_t>(k0_), k1 = static_cast<uint32_t>(k1_);
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  const int64_t nchunks = (n + kSelectChunk - 1) / kSelectChunk;
  const size_t nc = static_cast<size_t>(nchunks);
  std::vector<int64_t> count(nc + 1, 0), count_kept(nc + 1, 0);
  std::vector<uint8_t> nonfinite(nc, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) uint8_t cls[kBlock];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kSelectChunk, stop = std::min(n, start + kSelectChunk);
      int64_t m = 0, mk = 0;
      uint32_t bad = 0;
      for (int64_t b = start; b < stop; b += kBlock) {
        const int64_t len = std::min(kBlock, stop - b);
        const uint64_t mask = classify_block(src, b, len, a, k0, k1, cls, bad);
        m += __builtin_popcountll(mask);
        if (len == kBlock) {
          mk += __builtin_popcountll(kept_mask(cls));
        } else {
          for (int64_t i = 0; i < len; ++i) mk += cls[i] == 1;
        }
      }
      count[static_cast<size_t>(c) + 1] = m;
      count_kept[static_cast<size_t>(c) + 1] = mk;
      nonfinite[static_cast<size_t>(c)] = bad ? 1 : 0;
    }
  });
  bool bad_any = false;
  for (size_t c = 0; c < nc; ++c) {
    count[c + 1] += count[c];
    count_kept[c + 1] += count_kept[c];
    bad_any = bad_any || nonfinite[c];
  }
  const int64_t total = count[nc], total_kept = count_kept[nc];
  auto opts = x.options();
  auto pos = torch::empty({total}, opts.dtype(torch::kInt32));
  // One spare slot: the branch-free store below writes every survivor's value at the next kept
  // slot; a +-alpha survivor's value is overwritten by the next kept one, or (at the end of a
  // chunk) lands on the next chunk's first slot and is restored after the loop.
  auto kept = torch::empty({total_kept + 1}, opts.dtype(torch::kFloat32));
  auto cls_all = torch::empty({total + 64}, opts.dtype(torch::kUInt8));
  int32_t* const pp = pos.data_ptr<int32_t>();
  float* const kp = kept.data_ptr<float>();
  uint8_t* const cp = cls_all.data_ptr<uint8_t>();
  std::vector<uint32_t> tops(nc, 0u);
  std::vector<uint32_t> first_kept(nc, 0u);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) uint8_t cls[kBlock];
    uint32_t bad = 0;
    int32_t* __restrict pos_out = pp;
    uint32_t* __restrict kept_out = reinterpret_cast<uint32_t*>(kp);
    uint8_t* __restrict cls_out = cp;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t start = c * kSelectChunk, stop = std::min(n, start + kSelectChunk);
      int64_t m = count[static_cast<size_t>(c)], mk = count_kept[static_cast<size_t>(c)];
      const int64_t mk0 = mk;
      uint32_t top = 0, first = 0;
      for (int64_t b = start; b < stop; b += kBlock) {
        const int64_t len = std::min(kBlock, stop - b);
        uint64_t mask = classify_block(src, b, len, a, k0, k1, cls, bad);
        // Only the survivors are visited (about 1 in 7 at sparsity 0.85), without branches.
        while (mask) {
          const int i = __builtin_ctzll(mask);
          mask &= mask - 1;
          const uint32_t k = cls[i];
          const uint32_t is_kept = k == 1;
          const uint32_t u = src[b + i];
          pos_out[m] = static_cast<int32_t>(b + i);
          cls_out[m] = static_cast<uint8_t>(k);
          ++m;
          kept_out[mk] = u;
          first = (mk == mk0) ? u : first;
          mk += is_kept;
          // Largest finite |kept|, on the bit patterns (non-negative floats order as integers).
          const uint32_t au = u & 0x7FFFFFFFu;
          const uint32_t take = 0u - (is_kept & static_cast<uint32_t>(au < 0x7F800000u));
          top = std::max(top, au & take);
        }
      }
      tops[static_cast<size_t>(c)] = top;
      first_kept[static_cast<size_t>(c)] = first;
    }
  });
  for (size_t c = 0; c < nc; ++c)  // restore each chunk's first kept value (see above)
    if (count_kept[c + 1] > count_kept[c]) std::memcpy(kp + count_kept[c], &first_kept[c], 4);
  uint32_t top_bits = 0;
  for (uint32_t t : tops) top_bits = std::max(top_bits, t);
  float top;
  std::memcpy(&top, &top_bits, 4);
  // Kept flags: one bit per survivor, 8 per byte (vectorizable). Signs: one bit per +-alpha
  // survivor, written branch-free into a buffer with a spare byte (a kept survivor ORs a zero).
  const int64_t n_alpha = total - total_kept;
  const int64_t flag_bytes = (total + 7) / 8;
  auto flags = torch::empty({flag_bytes}, opts.dtype(torch::kUInt8));
  uint8_t* fp = flags.data_ptr<uint8_t>();
  std::memset(cp + total, 0, 64);
  for (int64_t byte = 0; byte < flag_bytes; ++byte) {
    uint32_t f = 0;
    for (int j = 0; j < 8; ++j) f |= static_cast<uint32_t>(cp[byte * 8 + j] == 1) << j;
    fp[byte] = static_cast<uint8_t>(f);
  }
  auto signs = torch::empty({(n_alpha + 7) / 8}, opts.dtype(torch::kUInt8));
  {
    // Bits gather in a register and leave 8 bytes at a time (a read-modify-write of the same
    // byte per entry would serialize on store forwarding).
    uint8_t* o = signs.data_ptr<uint8_t>();
    uint64_t acc = 0;
    int nb = 0;
    for (int64_t i = 0; i < total; ++i) {
      const uint32_t k = cp[i];
      const uint32_t alpha_entry = (k >> 1) & 1u;
      acc |= static_cast<uint64_t>(k & alpha_entry) << nb;
      nb += static_cast<int>(alpha_entry);
      if (nb == 64) {
        std::memcpy(o, &acc, 8);
        o += 8;
        acc = 0;
        nb = 0;
      }
    }
    for (; nb > 0; nb -= 8, acc >>= 8) *o++ = static_cast<uint8_t>(acc);
  }
  auto stats = torch::empty({2}, opts.dtype(torch::kFloat64));
  double* st = stats.data_ptr<double>();
  st[0] = static_cast<double>(top);
  st[1] = bad_any ? 1.0 : 0.0;
  return {pos, kept.narrow(0, 0, total_kept), flags, signs, stats};
}

namespace {

template <typename T>
std::vector<torch::Tensor> rice_encode_impl(const T* p, int64_t n, const std::vector<int64_t>& ks,
                                            torch::TensorOptions opts) {
  auto u8 = opts.dtype(torch::kUInt8);
  auto info = torch::zeros({2}, opts.dtype(torch::kInt64));
  if (n == 0) return {torch::empty({0}, u8), torch::empty({0}, u8), info};
  int64_t prev = -1;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(p[i]) > prev, "rice_encode: positions must be strictly increasing and >= 0");
    prev = static_cast<int64_t>(p[i]);
  }
  // gap_i = p_i - p_{i-1} - 1, recomputed in every loop (cheaper than storing it).
  auto gap = [p](int64_t i) -> uint64_t {
    return static_cast<uint64_t>(static_cast<int64_t>(p[i]) - (i ? static_cast<int64_t>(p[i - 1]) : -1) - 1);
  };
  int64_t best_k = -1;
  uint64_t best_cost = 0;
  for (int64_t c : ks) {
    TORCH_CHECK_VALUE(c >= 0 && c <= 16, "rice_encode: parameters must be in 0..16");
    uint64_t q = gap(0) >> c;
    for (int64_t i = 1; i < n; ++i)
      q += static_cast<uint64_t>(static_cast<int64_t>(p[i]) - static_cast<int64_t>(p[i - 1]) - 1) >> c;
    const uint64_t cost = q + static_cast<uint64_t>(n) * static_cast<uint64_t>(c + 1);
    if (best_k < 0 || cost < best_cost || (cost == best_cost && c < best_k)) {
      best_k = c;
      best_cost = cost;
    }
  }
  const int k = static_cast<int>(best_k);
  const uint64_t unary_bits = best_cost - static_cast<uint64_t>(n) * static_cast<uint64_t>(k);
  auto rem = torch::empty({k ? (n * k + 7) / 8 : 0}, u8);
  if (k) {
    BitWriter w{rem.data_ptr<uint8_t>()};
    const uint64_t mask = (uint64_t(1) << k) - 1;
    for (int64_t i = 0; i < n; ++i) w.put(static_cast<uint32_t>(gap(i) & mask), k);
    w.flush();
  }
  auto unary = torch::zeros({static_cast<int64_t>((unary_bits + 7) / 8)}, u8);
  uint8_t* up = unary.data_ptr<uint8_t>();
  uint64_t bit = 0;
  for (int64_t i = 0; i < n; ++i) {
    bit += gap(i) >> k;  // q zeros (already zero), then the terminating one
    up[bit >> 3] |= static_cast<uint8_t>(1u << (bit & 7));
    ++bit;
  }
  int64_t* ip = info.data_ptr<int64_t>();
  ip[0] = static_cast<int64_t>(unary_bits);
  ip[1] = k;
  return {rem, unary, info};
}

}  // namespace

// Rice-code sorted positions (int32 or int64) of a shard with the cheapest of the candidate
// parameters `ks` (exact cost n (k + 1) + sum(gap >> k); ties to the smaller k). Returns
// (packed remainders, packed unary stream, [unary bits, k] as int64).
std::vector<torch::Tensor> rice_encode(torch::Tensor idx, std::vector<int64_t> ks) {
  TORCH_CHECK_VALUE(idx.device().is_cpu() && idx.dim() == 1, "rice_encode: 1-D CPU positions");
  TORCH_CHECK_VALUE(!ks.empty(), "rice_encode: no candidate parameters");
  auto c = idx.contiguous();
  if (c.dtype() == torch::kInt32) return rice_encode_impl(c.data_ptr<int32_t>(), c.numel(), ks, c.options());
  c = c.to(torch::kInt64);
  return rice_encode_impl(c.data_ptr<int64_t>(), c.numel(), ks, c.options());
}

namespace {

// A byte stream copied with 8 zero bytes of padding, so every 64-bit load is a fixed-size one.
struct Padded {
  std::vector<uint8_t> bytes;
  explicit Padded(const torch::Tensor& t) : bytes(static_cast<size_t>(t.numel()) + 8, 0) {
    auto c = t.contiguous();
    if (c.numel()) std::memcpy(bytes.data(), c.data_ptr<uint8_t>(), static_cast<size_t>(c.numel()));
  }
  inline uint64_t load64(int64_t byte) const {
    uint64_t w;
    std::memcpy(&w, bytes.data() + byte, 8);
    return w;
  }
};

// Reads the positions of a Rice-coded stream one at a time.
struct RiceReader {
  const Padded& unary;
  int64_t unary_bits;
  const Padded& rem;
  int k;
  int64_t bitpos = 0;  // next unread unary bit
  int64_t rem_bit = 0;
  int64_t position = -1;

  // Advance to the next position; false when the stream holds no further terminating one.
  inline bool next() {
    uint64_t q = 0;
    for (;;) {
      if (bitpos >= unary_bits) return false;
      const int shift = static_cast<int>(bitpos & 7);
      uint64_t w = unary.load64(bitpos >> 3) >> shift;
      const int64_t valid = std::min<int64_t>(64 - shift, unary_bits - bitpos);
      if (valid < 64) w &= (uint64_t(1) << valid) - 1;
      if (w) {
        const int t = __builtin_ctzll(w);
        q += static_cast<uint64_t>(t);
        bitpos += t + 1;
        break;
      }
      q += static_cast<uint64_t>(valid);
      bitpos += valid;
    }
    uint64_t r = 0;
    if (k) {
      r = (rem.load64(rem_bit >> 3) >> (rem_bit & 7)) & ((uint64_t(1) << k) - 1);
      rem_bit += k;
    }
    position += static_cast<int64_t>((q << k) | r) + 1;
    return true;
  }
};

}  // namespace

// Positions (int64 [n]) of a Rice-coded stream; status tensor [code] (0 ok, 1 count, 2 range).
std::vector<torch::Tensor> rice_decode(torch::Tensor rem, torch::Tensor unary, int64_t unary_bits,
                                       int64_t k, int64_t n, int64_t numel) {
  TORCH_CHECK_VALUE(rem.dtype() == torch::kUInt8 && unary.dtype() == torch::kUInt8, "rice_decode: uint8 streams");
  const Padded u(unary), r(rem);
  auto pos = torch::empty({n}, unary.options().dtype(torch::kInt64));
  auto status = torch::zeros({1}, unary.options().dtype(torch::kInt64));
  int64_t* pp = pos.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(unary_bits <= 8 * unary.numel() && (k == 0 || n * k <= 8 * rem.numel()),
              "rice_decode: streams shorter than their lengths");
  RiceReader rd{u, unary_bits, r, static_cast<int>(k)};
  int64_t i = 0;
  for (; i < n; ++i) {
    if (!rd.next()) { status[0] = 1; return {pos, status}; }
    pp[i] = rd.position;
  }
  // The eager decoder counts every one of the stream: more than n is corrupt as well.
  if (rd.next()) { status[0] = 1; return {pos, status}; }
  if (n && pp[n - 1] >= numel) status[0] = 2;
  return {pos, status};
}

// Decode the PRUNE / PRUNE_FP streams into `out` (zeroed first; with `accumulate`, added to
// `out` at the nonzero positions instead): kept entries take `values` in order, the others
// +-alpha by their sign bit. Returns a status code: 0 ok, 1 the unary stream
// holds a different number of codes than n, 2 a position >= numel, 3 the kept flags count
// differs from the number of values.
int64_t prune_scatter(torch::Tensor values, torch::Tensor flags, torch::Tensor signs, torch::Tensor rem,
                      torch::Tensor unary, int64_t unary_bits, int64_t k, int64_t n, double alpha_d,
                      torch::Tensor out, bool accumulate) {
  TORCH_CHECK_VALUE(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.device().is_cpu(),
              "prune_scatter: contiguous float32 CPU out");
  TORCH_CHECK_VALUE(values.dtype() == torch::kFloat32, "prune_scatter: float32 values");
  auto v = values.contiguous();
  const Padded u(unary), r(rem), f(flags), sg(signs);
  TORCH_CHECK_VALUE(unary_bits <= 8 * unary.numel() && (k == 0 || n * k <= 8 * rem.numel()) &&
              8 * flags.numel() >= n, "prune_scatter: streams shorter than their lengths");
  const int64_t numel = out.numel();
  const int64_t n_kept = v.numel();
  float* __restrict o = out.data_ptr<float>();
  if (!accumulate) std::memset(o, 0, static_cast<size_t>(numel) * 4);
  const uint32_t zero = 0;
  const uint32_t* __restrict vbits = n_kept ? reinterpret_cast<const uint32_t*>(v.data_ptr<float>()) : &zero;
  const int64_t last_kept = std::max<int64_t>(n_kept - 1, 0);
  const uint8_t* fp = f.bytes.data();
  const uint8_t* sp = sg.bytes.data();
  const int64_t sbits = 8 * signs.numel();
  const float a = static_cast<float>(alpha_d);
  uint32_t abits;
  std::memcpy(&abits, &a, 4);
  // Count the kept flags first: a mismatch must not write past `values`.
  int64_t flagged = 0;
  for (int64_t i = 0; i < n; ++i) flagged += (fp[i >> 3] >> (i & 7)) & 1;
  const bool consistent = flagged == n_kept && n - n_kept <= sbits;
  RiceReader rd{u, unary_bits, r, static_cast<int>(k)};
  int64_t kj = 0, sj = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!rd.next()) return 1;
    const int64_t p = rd.position;
    if (p >= numel) {
      // The eager decoder reports a count mismatch before a range error: keep that order.
      while (++i < n) if (!rd.next()) return 1;
      return rd.next() ? 1 : 2;
    }
    if (!consistent) continue;
    // Branch-free (on bit patterns; a select would compile to a mispredicted branch): kept
    // entries take the next value, the others +-alpha by the next sign bit.
    const uint32_t kept = (fp[i >> 3] >> (i & 7)) & 1u;
    const uint32_t neg = (sp[sj >> 3] >> (sj & 7)) & 1u;
    const uint32_t kv = vbits[std::min(kj, last_kept)];
    const uint32_t av = abits | (neg << 31);
    const uint32_t m = 0u - kept;
    const uint32_t vb = (kv & m) | (av & ~m);
    float v;
    std::memcpy(&v, &vb, 4);
    o[p] = accumulate ? o[p] + v : v;
    kj += kept;
    sj += kept ^ 1u;
  }
  if (rd.next()) return 1;
  return flagged == n_kept ? 0 : 3;
}

}  // namespace gradcomp
