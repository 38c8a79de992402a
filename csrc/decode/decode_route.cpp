// Routers of the fused decode step (decoder.h), as ktrans/operators/moe_block.py computes them
// in f32 (that file's torch code is the oracle):
//   softmax_topk (Qwen2/3-MoE, Mixtral): softmax, top-k, renormalised when `norm`;
//   deepseek_v2: softmax, greedy top-k, or group-limited (groups ranked by their best score,
//                the others zeroed), weights x routed_scaling_factor;
//   deepseek_v3: sigmoid; the choice adds e_score_correction_bias, groups ranked by the sum of
//                their two best biased scores, top-k among the kept groups; weights are the
//                unbiased scores, renormalised when `norm`, x routed_scaling_factor.
// Logits come from the gate's f32 rows through a QLinear; the rest is a few hundred scalar
// operations per token on thread 0.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "decode/decode_impl.h"
#include "decode/decoder.h"

namespace ktrans {
namespace {

// Indices of the k largest of v[0..n) (first index wins a tie), largest first.
void top_k(const float* v, int64_t n, int64_t k, int64_t* idx) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      bool taken = false;
      for (int64_t q = 0; q < j && !taken; ++q) taken = idx[q] == i;
      if (!taken && (best < 0 || v[i] > v[best])) best = i;
    }
    idx[j] = best;
  }
}

// Experts outside the topk_group best groups get `fill`.
void keep_groups(float* choice, const float* group_score, int64_t E, int64_t G, int64_t topk_group, float fill) {
  int64_t keep[64];
  top_k(group_score, G, topk_group, keep);
  const int64_t per = E / G;
  for (int64_t g = 0; g < G; ++g) {
    if (std::find(keep, keep + topk_group, g) != keep + topk_group) continue;
    for (int64_t e = g * per; e < (g + 1) * per; ++e) choice[e] = fill;
  }
}

void softmax_row(float* p, int64_t n) {
  float mx = p[0], sum = 0.f;
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, p[i]);
  for (int64_t i = 0; i < n; ++i) sum += (p[i] = std::exp(p[i] - mx));
  for (int64_t i = 0; i < n; ++i) p[i] /= sum;
}

}  // namespace

void CpuDecoder::route(const Router& r, const float* x, int64_t* ids, float* w) {
  const int64_t E = r.E, k = r.k, G = r.n_group;
  float* logits = buf(kSlotLogits, B_ * E);
  linear(*r.gate, x, logits);
  if (record_) rec_logits_.insert(rec_logits_.end(), logits, logits + B_ * E);
  std::vector<float> choice(E), group(G);
  for (int64_t b = 0; b < B_; ++b) {
    float* s = logits + b * E;
    int64_t* idx = ids + b * k;
    float* wb = w + b * k;
    if (r.kind == RouteKind::deepseek_v3) {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.0f / (1.0f + std::exp(-s[e]));
      for (int64_t e = 0; e < E; ++e) choice[e] = s[e] + r.bias[e];
      const int64_t per = E / G;
      for (int64_t g = 0; g < G; ++g) {
        int64_t two[2];
        top_k(choice.data() + g * per, per, 2, two);
        group[g] = choice[g * per + two[0]] + choice[g * per + two[1]];
      }
      keep_groups(choice.data(), group.data(), E, G, r.topk_group, -std::numeric_limits<float>::infinity());
      top_k(choice.data(), E, k, idx);
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += (wb[j] = s[idx[j]]);
      for (int64_t j = 0; j < k; ++j) wb[j] = (r.norm ? wb[j] / (sum + 1e-20f) : wb[j]) * r.scale;
      continue;
    }
    softmax_row(s, E);
    if (r.kind == RouteKind::deepseek_v2 && r.group_limited) {
      const int64_t per = E / G;
      for (int64_t g = 0; g < G; ++g) group[g] = *std::max_element(s + g * per, s + (g + 1) * per);
      keep_groups(s, group.data(), E, G, r.topk_group, 0.0f);
    }
    top_k(s, E, k, idx);
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += (wb[j] = s[idx[j]]);
    for (int64_t j = 0; j < k; ++j) {
      if (r.kind == RouteKind::deepseek_v2) wb[j] *= r.scale;
      else if (r.norm) wb[j] /= sum;
    }
  }
}

}  // namespace ktrans
