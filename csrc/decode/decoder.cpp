// CpuDecoder (decoder.h): the step's outer loop, embedding, norms and residuals, the MLPs
// (dense / MoE with shared experts) and the head. Attention is in decode_attn.cpp, routing in
// decode_route.cpp.
#include "decode/decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/parallel.h"
#include "decode/decode_impl.h"
#include "decode/kernels.h"

namespace ktrans {
namespace {

// g <- gelu_tanh(g) * u, in f32 as torch's gelu(approximate="tanh") computes it:
// 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
// NOTE: scalar tanh; a decode step has B * I of them per layer, far fewer than the weights read.
void gelu_tanh_mul(float* g, const float* u, int64_t n) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    g[i] = 0.5f * x * (1.0f + std::tanh(k0 * (x + k1 * x * x * x))) * u[i];
  }
}

}  // namespace

CpuDecoder::CpuDecoder(std::shared_ptr<ThreadPool> pool, int64_t H, int64_t page_size, int64_t num_slots, Isa isa)
    : pool_(std::move(pool)), H_(H), page_size_(page_size), num_slots_(num_slots), isa_(isa) {
  scratch_ = moe_scratch_for(pool_.get());
}

float* CpuDecoder::buf(int slot, int64_t floats) {
  return reinterpret_cast<float*>(scratch_->get(slot, static_cast<size_t>(std::max<int64_t>(floats, 16)) * 4));
}

int64_t CpuDecoder::max_positions() const {
  int64_t n = INT64_MAX;
  for (const RopeTable& t : ropes_) n = std::min(n, t.npos);
  return ropes_.empty() ? 0 : n;
}

void run_linears(const LinearOut* outs, int n, const float* x, int64_t T, MoeBuffers& scratch) {
  const QLinear& l0 = *outs[0].lin;
  bool fused = n > 1 && !l0.uses_gemm(T);
  for (int i = 1; i < n && fused; ++i)
    fused = outs[i].lin->K() == l0.K() && outs[i].lin->act_type() == l0.act_type() && !outs[i].lin->uses_gemm(T);
  if (!fused) {
    for (int i = 0; i < n; ++i) outs[i].lin->forward(x, outs[i].lin->K(), T, outs[i].y, outs[i].lin->N());
    return;
  }
  // One activation quantization and one fan-out for all of them: thread ith takes its share of
  // the rows of every matrix laid end to end.
  const uint8_t* xq = reinterpret_cast<const uint8_t*>(x);
  int64_t ldq = l0.K() * 4;
  if (l0.act_type() != QType::f32) {
    uint8_t* q = scratch.get(kSlotXq, T * l0.act_row_bytes());
    l0.quantize_acts(x, l0.K(), T, q);
    xq = q, ldq = l0.act_row_bytes();
  }
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += outs[i].lin->N();
  l0.pool()->parallel([&](int ith, int nth) {
    auto [r0, r1] = split_range(total, ith, nth);
    int64_t off = 0;
    for (int i = 0; i < n; ++i) {
      const int64_t N = outs[i].lin->N(), b = std::max(r0, off), e = std::min(r1, off + N);
      if (b < e) outs[i].lin->dot_rows(xq, ldq, T, outs[i].y, N, b - off, e - off);
      off += N;
    }
  });
}

void CpuDecoder::step(const DecodeArgs& a) {
  B_ = a.B;
  rec_logits_.clear();
  rec_ids_.clear();
  const int64_t H = H_;
  float* h = buf(kSlotH, B_ * H);      // [B, H] residual stream
  const DequantizeRowFn deq = k_dequantize_row[qi(emb_type_)].get(isa_);
  const int64_t emb_row = qtype_row_bytes(emb_type_, H);
  for (int64_t b = 0; b < B_; ++b) deq(emb_ + a.ids[b] * emb_row, h + b * H, H);
  if (emb_scale_ != 0.f)
    for (int64_t i = 0; i < B_ * H; ++i) h[i] *= emb_scale_;
  const RmsScaleFn rms = k_rms_scale.get(isa_);
  // Gemma 3's post-sublayer norms: y normalised in place before the residual add
  auto post_norm = [&](const float* w, float* y, float eps) {
    if (w)
      for (int64_t b = 0; b < B_; ++b) rms(y + b * H, w, y + b * H, H, eps);
  };
  for (const Layer& L : layers_) {
    float* xn = buf(kSlotXn, B_ * H);
    float* y = buf(kSlotY, B_ * H);
    for (int64_t b = 0; b < B_; ++b) rms(h + b * H, L.attn_norm, xn + b * H, H, L.eps);
    if (L.mla)
      attention_mla(L, xn, y, a);
    else
      attention_gqa(L, xn, y, a);
    post_norm(L.post_attn_norm, y, L.eps);
    for (int64_t i = 0; i < B_ * H; ++i) h[i] += y[i];
    for (int64_t b = 0; b < B_; ++b) rms(h + b * H, L.ffn_norm, xn + b * H, H, L.eps);
    mlp(L, xn, y);
    post_norm(L.post_ffn_norm, y, L.eps);
    for (int64_t i = 0; i < B_ * H; ++i) h[i] += y[i];
  }
  float* xn = buf(kSlotXn, a.R * H);
  for (int64_t r = 0; r < a.R; ++r) rms(h + a.rows[r] * H, final_norm_, xn + r * H, H, final_eps_);
  head_->forward(xn, H, a.R, a.logits, head_->N());
}

void CpuDecoder::dense(const Mlp& m, const float* x, float* out, bool accumulate) {
  const int64_t I = m.gate->N(), H = H_;
  float* g = buf(kSlotGate, B_ * I);
  float* u = buf(kSlotUp, B_ * I);
  const LinearOut gu[2] = {{m.gate.get(), g}, {m.up.get(), u}};
  run_linears(gu, 2, x, B_, *scratch_);
  if (m.gelu)
    gelu_tanh_mul(g, u, B_ * I);
  else
    k_moe_silu_mul.get(isa_)(g, u, g, B_ * I);
  if (!accumulate) return linear(*m.down, g, out);
  float* d = buf(kSlotDown, B_ * H);
  linear(*m.down, g, d);
  float sg[kMaxDecodeTokens];
  std::fill(sg, sg + B_, 1.0f);
  if (m.shared_gate) {  // Qwen2-MoE: sigmoid(shared_expert_gate(x)) per token
    linear(*m.shared_gate, x, sg);
    for (int64_t b = 0; b < B_; ++b) sg[b] = 1.0f / (1.0f + std::exp(-sg[b]));
  }
  for (int64_t b = 0; b < B_; ++b)
    for (int64_t i = 0; i < H; ++i) out[b * H + i] += sg[b] * d[b * H + i];
}

void CpuDecoder::mlp(const Layer& L, const float* x, float* out) {
  const Mlp& m = L.mlp;
  if (!m.moe) return dense(m, x, out, false);
  const int64_t k = m.router.k;
  int64_t ids[kMaxDecodeTokens * kMaxTopK];
  float w[kMaxDecodeTokens * kMaxTopK];
  route(m.router, x, ids, w);
  if (record_) rec_ids_.insert(rec_ids_.end(), ids, ids + B_ * k);
  MoeArgs args;
  args.T = B_, args.k = k, args.x = x, args.x_bf16 = false, args.ids = ids, args.ids_i64 = true;
  args.weights = w, args.out = out, args.accumulate = false;
  m.experts->forward(args);
  if (m.gate) dense(m, x, out, true);  // shared experts
}

}  // namespace ktrans
