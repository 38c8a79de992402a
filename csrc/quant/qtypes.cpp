// Format table (names, ggml ids, block geometry, activation format) and the kernel slots; the
// generic and ISA files register their implementations into the slots.
#include <cstring>

#include "quant/quant.h"

namespace ktrans {
namespace {

const QTypeTraits kTraits[kNumQTypes] = {
    {"f32", 0, 1, 4, QType::f32},
    {"f16", 1, 1, 2, QType::f32},
    {"bf16", 30, 1, 2, QType::f32},
    {"q8_0", 8, kQK, sizeof(BlockQ8_0), QType::q8_0},
    {"q4_0", 2, kQK, sizeof(BlockQ4_0), QType::q8_0},
    {"q5_0", 6, kQK, sizeof(BlockQ5_0), QType::q8_0},
    {"q4_k", 12, kQK_K, sizeof(BlockQ4_K), QType::q8_k},
    {"q5_k", 13, kQK_K, sizeof(BlockQ5_K), QType::q8_k},
    {"q6_k", 14, kQK_K, sizeof(BlockQ6_K), QType::q8_k},
    {"q2_k", 10, kQK_K, sizeof(BlockQ2_K), QType::q8_k},
    {"q3_k", 11, kQK_K, sizeof(BlockQ3_K), QType::q8_k},
    {"iq4_xs", 23, kQK_K, sizeof(BlockIQ4_XS), QType::q8_k},
    {"mxfp4", 39, kQK, sizeof(BlockMXFP4), QType::q8_0},
    {"q8_k", 15, kQK_K, sizeof(BlockQ8_K), QType::q8_k},
};

}  // namespace

#define KT_SLOTS(prefix)                                                                          \
  {                                                                                               \
    {prefix "_f32", {}}, {prefix "_f16", {}}, {prefix "_bf16", {}}, {prefix "_q8_0", {}},         \
        {prefix "_q4_0", {}}, {prefix "_q5_0", {}}, {prefix "_q4_k", {}}, {prefix "_q5_k", {}},   \
        {prefix "_q6_k", {}}, {prefix "_q2_k", {}}, {prefix "_q3_k", {}}, {prefix "_iq4_xs", {}}, \
        {prefix "_mxfp4", {}}, {prefix "_q8_k", {}},                                              \
  }
// NOTE: constant-initialised (names only), so the static RegisterKernel calls of the generic and
// ISA files can fill them in any order.
Kernel<DequantizeRowFn> k_dequantize_row[kNumQTypes] = KT_SLOTS("dequantize_row");
Kernel<QuantizeRowFn> k_quantize_row[kNumQTypes] = KT_SLOTS("quantize_row");
Kernel<VecDotFn> k_vec_dot[kNumQTypes] = KT_SLOTS("vec_dot");
#undef KT_SLOTS

const QTypeTraits& qtype_traits(QType t) { return kTraits[qi(t)]; }

bool qtype_from_ggml_id(int ggml_type, QType* out) {
  for (int i = 0; i < kNumQTypes; ++i) {
    if (kTraits[i].ggml_type == ggml_type) {
      *out = static_cast<QType>(i);
      return true;
    }
  }
  return false;
}

bool qtype_from_name(const char* name, QType* out) {
  for (int i = 0; i < kNumQTypes; ++i) {
    if (std::strcmp(kTraits[i].name, name) == 0) {
      *out = static_cast<QType>(i);
      return true;
    }
  }
  return false;
}

}  // namespace ktrans
