// The fused CPU decode step: one call runs a whole decode-only engine step (B requests, one new
// token each) of a model whose every part is on the CPU — embedding lookup, per layer RMSNorm →
// attention over the paged KV cache (GQA or DeepSeek MLA, absorbed) → residual → RMSNorm → MLP
// (dense, or router + routed experts + shared experts) → residual, final norm, lm_head — as one
// task on the owned thread pool, with the GIL released. It replaces the ~20-90 torch ops per
// layer of the module path for T = B; the module path (the operators' forward / forward_native)
// is its oracle and still runs prefill and mixed steps.
//
// Layout: hidden states [B, H] f32; every weight matrix is a QLinear over the GGUF rows as stored
// (linear/linear.h; the router is one over its f32 rows); the KV cache is KVStorage's flat-slot
// tensors (GQA: K, V [slots, Hkv, d]; MLA: [slots, r + dr]); rotary tables cos/sin [positions,
// d/2] precomputed by the model's own rotary module (ktrans/operators/cpu_decode.py).
// Parallel work: each QLinear fans out over the pool (rows), attention over (request, head);
// the small per-token vector ops (norms, rope, residuals, routing) run on thread 0.
// Everything a plan points to is owned by Python objects the binding's decoder keeps referenced
// (bind_decode.cpp, PyDecoder::keep) or by the QLinear / MoeLayer objects it holds.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common/threadpool.h"
#include "linear/linear.h"
#include "moe/moe.h"

namespace ktrans {

enum class RopeStyle : int { half = 0, interleave = 1, complex = 2 };  // ktrans/operators/rope.py

struct RopeTable {
  const float* cos = nullptr;  // [npos, half]
  const float* sin = nullptr;
  int64_t npos = 0, half = 0;
  RopeStyle style = RopeStyle::half;
};

struct GqaAttn {
  std::shared_ptr<QLinear> q, k, v, o;
  const float* q_norm = nullptr;  // [d] Qwen3 per-head RMSNorm, [hq * d] MiniMax-M2's over all heads, or null
  const float* k_norm = nullptr;  // [d] or [hkv * d]
  bool qk_norm_whole = false;     // the norms span all heads of a token (MiniMax-M2)
  int64_t hq = 0, hkv = 0, d = 0;
  float scale = 1.f, eps = 1e-6f;
  int64_t window = 0;   // > 0: a sliding layer, the query sees its last `window` positions (itself included)
  float* kc = nullptr;  // [slots, hkv, d]
  float* vc = nullptr;
};

struct MlaAttn {
  std::shared_ptr<QLinear> q, q_a, q_b, kv_a, o;  // q, or q_a + q_b (q_lora_rank)
  const float* q_a_norm = nullptr;  // [q_lora]
  const float* kv_norm = nullptr;   // [r]
  const float* w_uk = nullptr;      // [h, dn, r]
  const float* w_uv = nullptr;      // [h, dv, r]
  int64_t h = 0, dn = 0, dr = 0, dv = 0, r = 0;
  float scale = 1.f, eps = 1e-6f;
  float* cache = nullptr;  // [slots, r + dr]
};

enum class RouteKind : int { softmax_topk = 0, deepseek_v2 = 1, deepseek_v3 = 2 };

struct Router {
  RouteKind kind = RouteKind::softmax_topk;
  std::shared_ptr<QLinear> gate;      // [E, H] logits
  const float* bias = nullptr;        // [E] DeepSeek-V3 e_score_correction_bias (choice only)
  int64_t E = 0, k = 0, n_group = 1, topk_group = 1;
  bool norm = false;                  // renormalise the k weights
  bool group_limited = false;         // DeepSeek-V2 group_limited_greedy
  float scale = 1.f;                  // routed_scaling_factor
};

struct Mlp {
  std::shared_ptr<QLinear> gate, up, down;  // dense MLP, or the shared experts of a MoE layer
  std::shared_ptr<QLinear> shared_gate;     // Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales them
  bool gelu = false;                        // dense MLP: GELU (tanh form, Gemma 3) instead of SiLU
  bool moe = false;
  Router router;
  std::shared_ptr<MoeLayer> experts;
};

struct Layer {
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  const float* post_attn_norm = nullptr;  // Gemma 3: sublayer outputs normalised before the residual add
  const float* post_ffn_norm = nullptr;
  float eps = 1e-6f;
  bool mla = false;
  int rope = 0;  // index into the plan's rope tables
  GqaAttn gqa;
  MlaAttn mla_attn;
  Mlp mlp;
};

// One decode step's inputs, checked at the binding boundary.
struct DecodeArgs {
  int64_t B = 0;
  const int64_t* ids = nullptr;        // [B]
  const int64_t* pos = nullptr;        // [B] position of the new token (= tokens already cached)
  const int32_t* pages = nullptr;      // [B, max_pages] KV page ids
  int64_t max_pages = 0;
  const int64_t* rows = nullptr;       // [R] rows whose logits are wanted
  int64_t R = 0;
  float* logits = nullptr;             // [R, V]
};

class CpuDecoder {
 public:
  CpuDecoder(std::shared_ptr<ThreadPool> pool, int64_t H, int64_t page_size, int64_t num_slots, Isa isa);

  // Build (from Python, once): embedding rows as stored, final norm, lm_head, rope tables, layers.
  // scale != 0: rows multiplied by it (Gemma 3's sqrt(H), rounded to the embedding's dtype by the caller)
  void set_embedding(QType type, const uint8_t* rows, int64_t vocab, float scale = 0.f) {
    emb_type_ = type, emb_ = rows, vocab_ = vocab, emb_scale_ = scale;
  }
  void set_head(const float* norm, float eps, std::shared_ptr<QLinear> head) { final_norm_ = norm, final_eps_ = eps, head_ = std::move(head); }
  int add_rope(const RopeTable& t) { ropes_.push_back(t); return static_cast<int>(ropes_.size()) - 1; }
  int64_t add_layer(Layer l) { layers_.push_back(std::move(l)); return num_layers() - 1; }
  Layer& layer(int64_t i) { return layers_.at(i); }
  const RopeTable& rope_table(int i) const { return ropes_.at(i); }
  int num_ropes() const { return static_cast<int>(ropes_.size()); }
  int64_t hidden() const { return H_; }
  bool has_embedding() const { return emb_ != nullptr; }
  int64_t emb_vocab() const { return vocab_; }

  // The step; call inside a pool task.
  void step(const DecodeArgs& a);
  // Keep the last step's routing (every MoE layer in order: router logits [B, E] as the gate
  // computed them, chosen ids [B, k]): what tests hold against another path's routing.
  void record_routing(bool on) { record_ = on; }
  const std::vector<float>& routed_logits() const { return rec_logits_; }
  const std::vector<int64_t>& routed_ids() const { return rec_ids_; }
  int64_t last_tokens() const { return B_; }
  // Longest position the rope tables cover (the caller checks positions against it).
  int64_t max_positions() const;
  int64_t vocab() const { return head_ ? head_->N() : 0; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t page_size() const { return page_size_; }
  int64_t num_slots() const { return num_slots_; }
  const std::shared_ptr<ThreadPool>& pool() const { return pool_; }

 private:
  float* buf(int slot, int64_t floats);
  void linear(const QLinear& l, const float* x, float* y) { l.forward(x, l.K(), B_, y, l.N()); }
  void attention_gqa(const Layer& L, const float* x, float* out, const DecodeArgs& a);
  void attention_mla(const Layer& L, const float* x, float* out, const DecodeArgs& a);
  void mlp(const Layer& L, const float* x, float* out);
  void dense(const Mlp& m, const float* x, float* out, bool accumulate);
  void route(const Router& r, const float* x, int64_t* ids, float* w);
  void rope(const RopeTable& t, float* x, int64_t heads, int64_t stride, int64_t pos) const;
  int64_t slot(const DecodeArgs& a, int64_t b, int64_t p) const {
    return static_cast<int64_t>(a.pages[b * a.max_pages + p / page_size_]) * page_size_ + p % page_size_;
  }

  std::shared_ptr<ThreadPool> pool_;
  std::shared_ptr<MoeBuffers> scratch_;
  int64_t H_, page_size_, num_slots_;
  Isa isa_;
  QType emb_type_ = QType::f32;
  const uint8_t* emb_ = nullptr;
  int64_t vocab_ = 0;
  float emb_scale_ = 0.f;
  const float* final_norm_ = nullptr;
  float final_eps_ = 1e-6f;
  std::shared_ptr<QLinear> head_;
  std::vector<RopeTable> ropes_;
  std::vector<Layer> layers_;
  int64_t B_ = 0;  // tokens of the step in flight
  bool record_ = false;
  std::vector<float> rec_logits_;
  std::vector<int64_t> rec_ids_;
};

}  // namespace ktrans
