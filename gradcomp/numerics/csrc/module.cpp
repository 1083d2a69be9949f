// Python bindings of the native codec kernels (built by gradcomp/kernels.py).
#include "codec_core.h"

#include <vector>

namespace gradcomp {
std::vector<torch::Tensor> encode_codes(torch::Tensor x, int64_t e, int64_t m, int64_t bias, int64_t scale,
                                        bool stochastic, int64_t k0, int64_t k1, bool true_binade,
                                        bool left_shift, bool wide);
std::vector<torch::Tensor> pack_codes(torch::Tensor codes, int64_t bits);
torch::Tensor unpack_codes(torch::Tensor packed, int64_t bits, int64_t numel);
bool decode_codes(torch::Tensor codes, torch::Tensor table, torch::Tensor out);
void unpack_decode(torch::Tensor packed, torch::Tensor table, int64_t bits, torch::Tensor out);
void decode_mean(std::vector<torch::Tensor> packed, std::vector<torch::Tensor> tables,
                 std::vector<int64_t> bits, double divisor, torch::Tensor out);
std::vector<torch::Tensor> prune_select(torch::Tensor x, double alpha, int64_t k0, int64_t k1);
std::vector<torch::Tensor> rice_encode(torch::Tensor idx, std::vector<int64_t> ks);
std::vector<torch::Tensor> rice_decode(torch::Tensor rem, torch::Tensor unary, int64_t unary_bits,
                                       int64_t k, int64_t n, int64_t numel);
int64_t prune_scatter(torch::Tensor values, torch::Tensor flags, torch::Tensor signs, torch::Tensor rem,
                      torch::Tensor unary, int64_t unary_bits, int64_t k, int64_t n, double alpha,
                      torch::Tensor out, bool accumulate);
}  // namespace gradcomp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  using namespace gradcomp;
  mod.def("encode_pack", &encode_pack, "fused FP encode + bit pack (float32, CPU)");
  mod.def("encode_codes", &encode_codes, "FP codes of float32 values (gradcomp.encode, CPU)");
  mod.def("pack_codes", &pack_codes, "bit-pack integer codes (gradcomp.pack, CPU)");
  mod.def("unpack_codes", &unpack_codes, "unpack integer codes (gradcomp.unpack, CPU)");
  mod.def("decode_codes", &decode_codes, "values of integer codes through a table (CPU)");
  mod.def("unpack_decode", &unpack_decode, "fused bit unpack + FP decode (CPU)");
  mod.def("decode_mean", &decode_mean, "fused decode of N FP payloads, their sum and its mean (CPU)");
  mod.def("prune_select", &prune_select, "stochastic pruning fused with compaction (CPU)");
  mod.def("rice_encode", &rice_encode, "Rice-coded gaps of sorted positions");
  mod.def("rice_decode", &rice_decode, "positions of a Rice-coded stream");
  mod.def("prune_scatter", &prune_scatter, "decode PRUNE / PRUNE_FP streams into a dense shard");
}
