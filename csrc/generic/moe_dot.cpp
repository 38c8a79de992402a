// Generic multi-token MoE dot: the reference the ISA versions are tested against. It is exactly
// the per-token generic vec_dot, so it only defines the semantics (one row, several tokens).
#include "moe/moe_dot.h"

namespace ktrans {

#define KT_SLOT(t) {"moe_dot_multi_" #t, {}}
Kernel<MoeDotMultiFn> k_moe_dot_multi[kNumQTypes] = {
    KT_SLOT(f32), KT_SLOT(f16), KT_SLOT(bf16), KT_SLOT(q8_0), KT_SLOT(q4_0), KT_SLOT(q5_0), KT_SLOT(q4_k),
    KT_SLOT(q5_k), KT_SLOT(q6_k), KT_SLOT(q2_k), KT_SLOT(q3_k), KT_SLOT(iq4_xs), KT_SLOT(mxfp4),
    KT_SLOT(q8_k),
};
#undef KT_SLOT

namespace {

template <QType kType>
void dot_multi_generic(int64_t n, const void* w, const void* const* acts, int nacts, float* out) {
  const VecDotFn dot = k_vec_dot[qi(kType)].get(Isa::generic);
  for (int j = 0; j < nacts; ++j) out[j] = dot(n, w, acts[j]);
}

RegisterKernel<MoeDotMultiFn> reg_q4_k(k_moe_dot_multi[qi(QType::q4_k)], Isa::generic, dot_multi_generic<QType::q4_k>);
RegisterKernel<MoeDotMultiFn> reg_q6_k(k_moe_dot_multi[qi(QType::q6_k)], Isa::generic, dot_multi_generic<QType::q6_k>);
RegisterKernel<MoeDotMultiFn> reg_q8_0(k_moe_dot_multi[qi(QType::q8_0)], Isa::generic, dot_multi_generic<QType::q8_0>);
RegisterKernel<MoeDotMultiFn> reg_mxfp4(k_moe_dot_multi[qi(QType::mxfp4)], Isa::generic, dot_multi_generic<QType::mxfp4>);

}  // namespace
}  // namespace ktrans
