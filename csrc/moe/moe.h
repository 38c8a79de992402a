// CPU MoE layer: out[T, H] (+)= sum_j w[t, j] * (down_e(act(gate_e(x_t), up_e(x_t))) + b_down_e),
// e = ids[t, j], act being SiLU gating or gpt-oss's clamped SwiGLU (MoeGating), biases optional.
//
// Tokens are grouped per expert: a "position" p is one (token, slot) pair routed to an active
// expert, and the positions of one expert are contiguous (moe_plan.h). One forward call runs
// these phases on the pool, each one parallel() fan-out:
//   1. activations: x rows -> the activation format of the weights (f32 / q8_0 / q8_K, or bf16
//      rows gathered per expert for the packed AMX formats)
//   2. gate/up: work items (active expert, block of I rows), h[p, i] = act(g, u)
//   3. h rows -> the down projection's activation format
//   4. down: each thread owns a range of the H output rows for every active expert, so it adds
//      w * down(h) into its own columns of the f32 accumulator: no reduction pass, no atomics.
// At small T on one thread group (decode) phases 2-4 run in one fan-out instead (moe_fused.cpp):
// the thread that finishes an expert's last gate/up item prepares its h and flags it ready, and
// each thread's down pass waits for the experts' flags in turn: no pool-wide barrier between.
// T is processed in chunks of at most `max_chunk` tokens; scratch buffers grow to the largest
// chunk seen and are reused (no allocation per call once warm). The scratch belongs to the pool,
// not the layer: every layer on one pool shares it (moe_scratch_for, see the NOTE there), so a
// model's scratch is that of its largest chunk once, not once per MoE layer.
//
// NUMA layouts (thread groups of the pool, see threadpool.h):
//   replicate: every group holds a full copy of the experts; gate/up rows and down output rows
//              are split across groups, each group reading its own copy.
//   split:     group g holds I-slice g of every expert (gate/up rows, down columns; cut at block
//              boundaries); each group computes a partial down output, summed at the end.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/threadpool.h"
#include "packed/packed.h"
#include "moe/moe_buffers.h"
#include "moe/moe_dot.h"
#include "moe/moe_plan.h"
#include "quant/quant.h"

namespace ktrans {

enum class NumaMode { replicate, split };
// gguf: dot products straight from the stored blocks. amx_*: weights repacked at load into the
// packed formats of csrc/packed/ (bf16, int8 per-channel, int4 group scales).
enum class MoeBackend { gguf, amx_bf16, amx_int8, amx_int4 };

// The gating h = act(g, u) of the expert MLP, g and u with their biases added where loaded:
//   silu        h = silu(g) * u                                        (every arch but gpt-oss)
//   swiglu_oai  g' = min(g, limit), u' = clamp(u, -limit, limit),      (gpt-oss)
//               h = g' * sigmoid(alpha * g') * (u' + 1)
enum class MoeAct { silu, swiglu_oai };
struct MoeGating {
  MoeAct act = MoeAct::silu;
  float alpha = 1.702f;
  float limit = 7.0f;
};

inline float moe_gate(const MoeGating& m, float g, float u) {
  if (m.act == MoeAct::silu) return g / (1.0f + std::exp(-g)) * u;
  g = std::min(g, m.limit);
  u = std::min(std::max(u, -m.limit), m.limit);
  return g / (1.0f + std::exp(-m.alpha * g)) * (u + 1.0f);
}

struct MoeShape {
  int64_t E = 0, H = 0, I = 0;
  std::array<QType, 3> types{QType::bf16, QType::bf16, QType::bf16};  // gate, up, down as loaded
  MoeGating gating;
};

// One forward call: raw pointers, checked at the binding boundary.
struct MoeArgs {
  int64_t T = 0, k = 0;
  const void* x = nullptr;   // [T, H] bf16 (x_bf16) or f32
  bool x_bf16 = true;        // the output has the same dtype
  const void* ids = nullptr;  // [T, k] int32 or int64; negative = skip
  bool ids_i64 = true;
  const float* weights = nullptr;  // [T, k]
  void* out = nullptr;             // [T, H]
  bool accumulate = false;         // out += result instead of out = result
};

// The stored experts of one projection for one thread group.
struct ProjStore {
  Region mem;
  int64_t rows = 0;        // rows per expert held by this group
  int64_t row_bytes = 0;   // bytes per row (gguf) ...
  int64_t expert_bytes = 0;  // ... and per expert (gguf: rows * row_bytes; packed: packed_bytes)
  int64_t k = 0;           // values per row (the reduction length)
  const uint8_t* expert(int64_t e) const { return mem.data() + e * expert_bytes; }
};

class MoeLayer {
 public:
  MoeLayer(std::shared_ptr<ThreadPool> pool, const MoeShape& shape, MoeBackend backend, NumaMode numa,
           Isa isa, int64_t max_chunk);

  // Loads experts [e_begin, e_end) of projection proj (0 gate, 1 up, 2 down) from `src`
  // ([e_end - e_begin, rows, row_bytes] in shape.types[proj]); repacks for the amx backends.
  // Runs fan-outs on the pool: call from inside a pool task.
  void load(int proj, int64_t e_begin, int64_t e_end, const uint8_t* src);
  // Biases of projection proj for every expert: float32 [E, I] (gate, up) or [E, H] (down),
  // copied. A layer without them computes none.
  void load_bias(int proj, const float* src);
  // One forward; call from inside a pool task.
  void forward(const MoeArgs& a);

  // Experts with at least this many positions in a chunk take the GEMM path of the gguf backend
  // (block formats only; 0 = never): see moe_gguf_gemm.cpp.
  void set_gemm_min_tokens(int64_t n) { gemm_min_tokens_ = n; }
  int64_t gemm_min_tokens() const { return gemm_min_tokens_; }
  // Chunks of at most this many tokens run in one fan-out (moe_fused.cpp; 0 = never); results
  // are bit-identical either way.
  void set_fused_max_tokens(int64_t n) { fused_max_tokens_ = n; }
  int64_t fused_max_tokens() const { return fused_max_tokens_; }
  int64_t weight_bytes() const;
  // Bytes of the scratch shared by every layer on this layer's pool.
  int64_t buffer_bytes() const { return buf_->bytes(); }
  const MoeShape& shape() const { return shape_; }
  std::shared_ptr<ThreadPool> pool() const { return pool_; }

 private:
  int ngroups() const { return pool_->num_groups(); }
  int nslices() const { return numa_ == NumaMode::split ? ngroups() : 1; }
  void forward_chunk(const MoeArgs& a, int64_t t0, int64_t tc);
  void phase_act(const MoeArgs& a, int64_t t0, int64_t tc);
  void phase_gate_up();
  void phase_down_act();
  void phase_down(const MoeArgs& a, int64_t t0, int64_t tc);
  void phase_reduce(const MoeArgs& a, int64_t t0, int64_t tc);
  void gate_up_item(int g, int64_t a, int64_t r0, int64_t r1, int ith);
  void down_rows(int slice, int copy, int64_t r0, int64_t r1, float* acc, int ith);
  // gguf GEMM path for experts with many positions (moe_gguf_gemm.cpp)
  bool plan_gemm();
  // Buffers of the prepared activations (x, and h per slice) of the experts with big_[a] set
  // (moe_packed.cpp); also sizes xg_ and hb_.
  void plan_acts(PackedFormat f);
  void prepare_h_acts(PackedFormat f, int64_t a);
  void phase_gemm_acts(const MoeArgs& a, int64_t t0);
  void phase_down_act_gemm();
  void gate_up_gemm(int g, int64_t a, int64_t r0, int64_t r1, int ith);
  void down_gemm(int slice, int copy, int64_t a, int64_t r0, int64_t r1, float* acc, int ith);
  void load_group(int proj, int g, int64_t e0, int64_t e1, const uint8_t* src, int ith, int nth);
  // amx_* backends (moe_packed.cpp)
  void load_group_packed(int proj, int g, int64_t e0, int64_t e1, const uint8_t* src, int ith, int nth);
  void forward_chunk_packed(const MoeArgs& a, int64_t t0, int64_t tc);
  void phase_gather(const MoeArgs& a, int64_t t0);
  void phase_gate_up_packed();
  void phase_prepare_h();
  // fn(a) for every active expert a, spread over the pool (a shared work counter).
  template <class Fn>
  void run_per_expert(Fn&& fn) {
    const int64_t A = plan_.num_active();
    counters_[0].store(0, std::memory_order_relaxed);
    pool_->parallel([&](int, int) {
      for (int64_t a; (a = counters_[0].fetch_add(1, std::memory_order_relaxed)) < A;) fn(a);
    });
  }
  void down_rows_packed(int slice, int copy, int64_t r0, int64_t r1, float* acc, int ith);
  // Gating (moe_gating.cpp): h of gate/up row r of expert e, and of n consecutive rows r0.. of
  // one position (out may alias g); the down biases of output rows [r0, r1) into acc [tc, H].
  float gate_one(int64_t e, int64_t r, float g, float u) const {
    if (!bias_[0].empty()) {
      g += bias_[0][e * shape_.I + r];
      u += bias_[1][e * shape_.I + r];
    }
    return moe_gate(shape_.gating, g, u);
  }
  void gate_rows(int64_t e, int64_t r0, const float* g, const float* u, float* out, int64_t n) const;
  void add_down_bias(const MoeArgs& a, int64_t t0, int64_t tc, int64_t r0, int64_t r1, float* acc) const;
  // Pieces of the phases, shared by the phased and the fused forward.
  void act_rows(const MoeArgs& a, int64_t t0, int64_t b, int64_t e, float* row);
  void quantize_h(int64_t p0, int64_t p1);
  void gather_expert(const MoeArgs& a, int64_t t0, int64_t ai);
  void gate_up_block_packed(int g, int64_t ai, int64_t n0, int64_t n1, int ith);
  void down_thread(const MoeArgs& a, int64_t t0, int64_t tc, int ith, int nth);
  // One fan-out for a chunk (moe_fused.cpp): used when fused_ok.
  bool fused_ok(int64_t tc, bool gemm) const;
  void forward_fused(const MoeArgs& a, int64_t t0, int64_t tc);
  // Blocks until active expert a's h is ready (fused forward; no-op otherwise).
  void wait_ready(int64_t a) const;
  static constexpr int64_t kFusedMaxExperts = 64;  // fused chunks touch at most this many experts
  int64_t fused_max_tokens_ = 8;                    // chunks of up to this many tokens run fused
  bool fused_ = false;                              // the chunk in flight runs fused
  std::atomic<int> items_done_[kFusedMaxExperts];   // gate/up items finished, per active expert
  std::atomic<int> state_[kFusedMaxExperts];        // packed x: 0 todo, 1 in progress, 2 ready
  std::atomic<int> ready_[kFusedMaxExperts];        // 1: h of the expert is ready for down

  std::shared_ptr<ThreadPool> pool_;
  MoeShape shape_;
  MoeBackend backend_;
  NumaMode numa_;
  Isa isa_;
  int64_t max_chunk_;
  std::vector<int64_t> row_begin_;  // [G+1] I-rows of group g's gate/up work (slice in split mode)
  std::vector<ProjStore> store_[3];  // [proj][group]
  std::vector<float> bias_[3];       // [E, I] gate, [E, I] up, [E, H] down; empty: no bias
  VecDotFn dot_[3] = {};
  MoeDotMultiFn multi_[3] = {};      // several tokens per weight row, where the format has one
  // out[j] = dot(k, w, acts[j]) for j < nt, with the multi-token kernel when there is one.
  void dot_tokens(int proj, int64_t k, const uint8_t* w, const void* const* acts, int nt, float* out) const {
    // NOTE: the multi-token kernel also for one token: its per-token arithmetic does not depend
    // on how many tokens share the call, so a position's result is the same whatever tile,
    // chunk or thread layout it lands in (the single-row k_vec_dot rounds differently).
    if (multi_[proj]) return multi_[proj](k, w, acts, nt, out);
    for (int j = 0; j < nt; ++j) out[j] = dot_[proj](k, w, acts[j]);
  }
  QuantizeRowFn act_quant_[3] = {};  // f32 -> activation format of each projection
  QType act_type_[3] = {};
  int64_t act_bytes_[3] = {};        // bytes of one activation row of each projection
  MoePlan plan_;
  std::shared_ptr<MoeBuffers> buf_;  // the pool's shared scratch; pointers below are valid per chunk
  // Buffers of the chunk in flight (set by forward_chunk).
  struct Chunk {
    const uint8_t* xq[2] = {};  // [tc, act_bytes] activations of gate (0) and up (1)
    float* h = nullptr;         // [P, I] act(gate, up)
    uint8_t* hq = nullptr;      // [slices][P, act_bytes_[2]] h in the down activation format
    float* acc = nullptr;       // [slices][tc, H] f32 accumulators
    float* scratch = nullptr;   // [nthreads][max(H, I)] per-thread f32 row
  } c_;
  uint16_t* xg_ = nullptr;  // [P, H] bf16 x rows grouped per expert (amx_*)
  uint16_t* hb_ = nullptr;  // [P, I] bf16 h (amx_*)
  float* scr_ = nullptr;    // [nthreads][scr_floats_] per-thread GEMM outputs (amx_*)
  int64_t scr_floats_ = 0;
  int64_t col_block_ = 64;  // gate/up columns per work item of this chunk (amx_*)
  std::vector<std::atomic<int64_t>> counters_;  // one work counter per group
  // Prepared activations of the chunk in flight (plan_acts; gguf GEMM path: plan_gemm)
  // Measured break-even ~16 (q4_k, Qwen3 shape, AMX core). Without AMX the bf16 panel GEMM is
  // slower than vec_dot at any size (q4_k, T 512: 2.9x on AVX2, 1.1x on AVX-512), so it is off
  // (0) there unless set explicitly.
  int64_t gemm_min_tokens_ = 24;
  bool gemm_ok_ = false;             // block formats, H and I multiples of kPackKAlign
  std::vector<uint8_t> big_;         // [A] 1: this active expert takes the GEMM path (amx_*: all)
  std::vector<PackedActs> xacts_;    // [A] prepared x rows of each big expert
  std::vector<PackedActs> hacts_;    // [S * A] prepared h (down-slice columns) of each big expert
  std::vector<int64_t> acts_off_;    // [2 * S * A] byte offsets of those into the acts buffer
  uint8_t* acts_buf_ = nullptr;
  uint8_t* wpk_ = nullptr;           // [nthreads][wpk_bytes_] weights repacked to bf16 panels
  int64_t wpk_bytes_ = 0;
  float* gy_ = nullptr;              // [nthreads][gy_floats_] GEMM outputs
  int64_t gy_floats_ = 0;
};

PackedFormat packed_format(MoeBackend b);

// Bytes the experts of one layer take, all NUMA copies included (for planned_bytes).
int64_t moe_weight_bytes(const MoeShape& s, MoeBackend b, NumaMode numa, int ngroups);

}  // namespace ktrans
