// Attention of the fused decode step (decoder.h) for one new token per request, over the paged
// KV cache, as ktrans/operators/attention_gqa.py and attention_mla.py compute it (their
// forward_native is the oracle):
//   GQA: q/k/v projections (one fan-out), q/k RMSNorm (per head: Qwen3; over all heads of the
//        token: MiniMax-M2), rotary (of the first dims its table covers: all of a head, or
//        GLM-4.5's / MiniMax-M2's partial rotary), K/V written to the token's slot, then per
//        (request, query head): scores over the request's keys
//        0..pos (a sliding layer: its last `window` of them), softmax, weighted sum of V (query
//        head h reads KV head h / (Hq / Hkv); the heads of one KV head share each K/V row read).
//   MLA: q (or q_a -> norm -> q_b) and kv_a; latent normalised, rope key rotated, both cached;
//        absorbed attention per (request, head): q_lat = W_UK[h]ᵀ q_nope, score_l =
//        (q_lat · c_l + q_pe · kpe_l) * scale, o_lat = Σ p_l c_l, out = W_UV[h] o_lat (the heads of
//        a request share each cached row read).
// Keys are read slot by slot through the page table (slot = page * page_size + offset).
// NOTE: softmax uses std::exp on thread 0's share of heads; it is a small part at decode context
// lengths (keys x heads per layer), the projections dominate.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "decode/decode_impl.h"
#include "decode/decoder.h"
#include "decode/kernels.h"

namespace ktrans {
namespace {

// p[0..n) <- softmax(p[0..n)) in f32 (max subtracted first, as torch does).
void softmax(float* p, int64_t n) {
  float mx = p[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, p[i]);
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += (p[i] = std::exp(p[i] - mx));
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) p[i] *= inv;
}

// Into how many sub-groups to split each KV head's `group` query heads (a divisor of it): the
// fewest that give every one of `nth` threads an item among batch x kv_heads x sub-groups, so each
// K/V (MLA: latent) row is read by as few items as the pool allows.
int64_t query_subgroups(int64_t batch, int64_t kv_heads, int64_t group, int nth) {
  int64_t nsub = 1;
  while (nsub < group && batch * kv_heads * nsub < nth) {
    do ++nsub; while (group % nsub != 0);
  }
  return nsub;
}

}  // namespace

void CpuDecoder::rope(const RopeTable& t, float* x, int64_t heads, int64_t stride, int64_t pos) const {
  const int64_t half = t.half;
  const float* c = t.cos + pos * half;
  const float* s = t.sin + pos * half;
  float tmp[512];
  for (int64_t hd = 0; hd < heads; ++hd) {
    float* v = x + hd * stride;
    switch (t.style) {
      case RopeStyle::half:  // pairs (i, i + d/2)
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c[i] - x2 * s[i];
          v[i + half] = x2 * c[i] + x1 * s[i];
        }
        break;
      case RopeStyle::interleave:  // pairs (2i, 2i + 1), output de-interleaved
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[2 * i], x2 = v[2 * i + 1];
          tmp[i] = x1 * c[i] - x2 * s[i];
          tmp[i + half] = x2 * c[i] + x1 * s[i];
        }
        std::memcpy(v, tmp, 2 * half * sizeof(float));
        break;
      case RopeStyle::complex:  // pairs (2i, 2i + 1) times e^{i theta}, output interleaved
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[2 * i], x2 = v[2 * i + 1];
          v[2 * i] = x1 * c[i] - x2 * s[i];
          v[2 * i + 1] = x1 * s[i] + x2 * c[i];
        }
        break;
    }
  }
}

void CpuDecoder::attention_gqa(const Layer& L, const float* x, float* out, const DecodeArgs& a) {
  const GqaAttn& g = L.gqa;
  const int64_t d = g.d, nq = g.hq * d, nkv = g.hkv * d, group = g.hq / g.hkv;
  float* q = buf(kSlotQ, B_ * nq);
  float* k = buf(kSlotK, B_ * nkv);
  float* v = buf(kSlotV, B_ * nkv);
  const LinearOut qkv[3] = {{g.q.get(), q}, {g.k.get(), k}, {g.v.get(), v}};
  run_linears(qkv, 3, x, B_, *scratch_);
  const RmsScaleFn rms = k_rms_scale.get(isa_);
  const RopeTable& t = ropes_[L.rope];
  int64_t max_len = 0;
  for (int64_t b = 0; b < B_; ++b) {
    float* qb = q + b * nq;
    float* kb = k + b * nkv;
    if (g.q_norm && g.qk_norm_whole) {  // MiniMax-M2: one norm over every head of the token
      rms(qb, g.q_norm, qb, nq, g.eps);
      if (g.k_norm) rms(kb, g.k_norm, kb, nkv, g.eps);
    } else {
      if (g.q_norm)
        for (int64_t hd = 0; hd < g.hq; ++hd) rms(qb + hd * d, g.q_norm, qb + hd * d, d, g.eps);
      if (g.k_norm)
        for (int64_t hd = 0; hd < g.hkv; ++hd) rms(kb + hd * d, g.k_norm, kb + hd * d, d, g.eps);
    }
    rope(t, qb, g.hq, d, a.pos[b]);
    rope(t, kb, g.hkv, d, a.pos[b]);
    const int64_t s = slot(a, b, a.pos[b]);
    std::memcpy(g.kc + s * nkv, kb, nkv * 4);
    std::memcpy(g.vc + s * nkv, v + b * nkv, nkv * 4);
    max_len = std::max(max_len, a.pos[b] + 1);
  }
  // Items: (request, KV head, sub-group of its query heads). Each K and V row is read once per
  // item for all of the item's heads (a whole GQA group where that leaves every thread an item),
  // instead of once per query head.
  const int64_t nsub = query_subgroups(B_, g.hkv, group, pool_->size());
  const int64_t gs = group / nsub, items = B_ * g.hkv * nsub;
  float* att = buf(kSlotAtt, B_ * nq);
  float* scores = buf(kSlotScores, pool_->size() * gs * max_len);
  const VecDotFn dot = k_vec_dot[qi(QType::f32)].get(isa_);
  const AxpyFn axpy = k_axpy_f32.get(isa_);
  pool_->parallel([&](int ith, int nth) {
    float* p = scores + ith * gs * max_len;
    for (int64_t it = ith; it < items; it += nth) {
      const int64_t b = it / (g.hkv * nsub), kv = it / nsub % g.hkv, h0 = kv * group + it % nsub * gs;
      // keys first..pos: all of them, or a sliding layer's last `window`
      const int64_t first = g.window > 0 ? std::max<int64_t>(0, a.pos[b] + 1 - g.window) : 0;
      const int64_t len = a.pos[b] + 1 - first;
      const float* qh = q + b * nq + h0 * d;
      for (int64_t l = 0; l < len; ++l) {
        const float* kr = g.kc + slot(a, b, first + l) * nkv + kv * d;
        for (int64_t j = 0; j < gs; ++j) p[j * len + l] = dot(d, kr, qh + j * d) * g.scale;
      }
      for (int64_t j = 0; j < gs; ++j) softmax(p + j * len, len);
      float* o = att + b * nq + h0 * d;
      std::memset(o, 0, gs * d * 4);
      for (int64_t l = 0; l < len; ++l) {
        const float* vr = g.vc + slot(a, b, first + l) * nkv + kv * d;
        for (int64_t j = 0; j < gs; ++j) axpy(p[j * len + l], vr, o + j * d, d);
      }
    }
  });
  linear(*g.o, att, out);
}

void CpuDecoder::attention_mla(const Layer& L, const float* x, float* out, const DecodeArgs& a) {
  const MlaAttn& m = L.mla_attn;
  const int64_t dqk = m.dn + m.dr, nq = m.h * dqk, width = m.r + m.dr;
  float* q = buf(kSlotQ, B_ * nq);
  float* kv = buf(kSlotKv, B_ * width);
  const RmsScaleFn rms = k_rms_scale.get(isa_);
  if (m.q_a) {
    const int64_t nl = m.q_a->N();
    float* qa = buf(kSlotQa, B_ * nl);
    const LinearOut first[2] = {{m.q_a.get(), qa}, {m.kv_a.get(), kv}};
    run_linears(first, 2, x, B_, *scratch_);
    for (int64_t b = 0; b < B_; ++b) rms(qa + b * nl, m.q_a_norm, qa + b * nl, nl, m.eps);
    linear(*m.q_b, qa, q);
  } else {
    const LinearOut first[2] = {{m.q.get(), q}, {m.kv_a.get(), kv}};
    run_linears(first, 2, x, B_, *scratch_);
  }
  const RopeTable& t = ropes_[L.rope];
  int64_t max_len = 0;
  for (int64_t b = 0; b < B_; ++b) {
    float* e = kv + b * width;
    rms(e, m.kv_norm, e, m.r, m.eps);                   // latent
    rope(t, e + m.r, 1, m.dr, a.pos[b]);                 // shared rope key
    rope(t, q + b * nq + m.dn, m.h, dqk, a.pos[b]);      // q_pe of every head
    std::memcpy(m.cache + slot(a, b, a.pos[b]) * width, e, width * 4);
    max_len = std::max(max_len, a.pos[b] + 1);
  }
  // Items: (request, sub-group of its heads). Each cache row is read once per item for all of the
  // item's heads (every head of a request where that leaves every thread an item); per head the
  // arithmetic is the same sequence of dots and axpys as one head alone.
  const int64_t nsub = query_subgroups(B_, 1, m.h, pool_->size()), gs = m.h / nsub;
  const int64_t per_thread = gs * (max_len + 2 * m.r);
  float* att = buf(kSlotAtt, B_ * m.h * m.dv);
  float* scratch = buf(kSlotScores, pool_->size() * per_thread);
  const VecDotFn dot = k_vec_dot[qi(QType::f32)].get(isa_);
  const AxpyFn axpy = k_axpy_f32.get(isa_);
  pool_->parallel([&](int ith, int nth) {
    float* p = scratch + ith * per_thread;                 // [gs, len] scores
    float* q_lat = p + gs * max_len;                       // [gs, r]
    float* o_lat = q_lat + gs * m.r;                       // [gs, r]
    for (int64_t it = ith; it < B_ * nsub; it += nth) {
      const int64_t b = it / nsub, h0 = it % nsub * gs, len = a.pos[b] + 1;
      for (int64_t j = 0; j < gs; ++j) {
        const float* qn = q + b * nq + (h0 + j) * dqk;     // q_nope of head h0 + j
        const float* wk = m.w_uk + (h0 + j) * m.dn * m.r;  // [dn, r]
        float* ql = q_lat + j * m.r;
        std::memset(ql, 0, m.r * 4);
        for (int64_t i = 0; i < m.dn; ++i) axpy(qn[i], wk + i * m.r, ql, m.r);
      }
      for (int64_t l = 0; l < len; ++l) {
        const float* c = m.cache + slot(a, b, l) * width;
        for (int64_t j = 0; j < gs; ++j)
          p[j * len + l] = (dot(m.r, c, q_lat + j * m.r) + dot(m.dr, c + m.r, q + b * nq + (h0 + j) * dqk + m.dn)) *
                           m.scale;
      }
      for (int64_t j = 0; j < gs; ++j) softmax(p + j * len, len);
      std::memset(o_lat, 0, gs * m.r * 4);
      for (int64_t l = 0; l < len; ++l) {
        const float* c = m.cache + slot(a, b, l) * width;
        for (int64_t j = 0; j < gs; ++j) axpy(p[j * len + l], c, o_lat + j * m.r, m.r);
      }
      for (int64_t j = 0; j < gs; ++j) {
        const float* wv = m.w_uv + (h0 + j) * m.dv * m.r;  // [dv, r]
        float* o = att + (b * m.h + h0 + j) * m.dv;
        for (int64_t d = 0; d < m.dv; ++d) o[d] = dot(m.r, wv + d * m.r, o_lat + j * m.r);
      }
    }
  });
  linear(*m.o, att, out);
}

}  // namespace ktrans
