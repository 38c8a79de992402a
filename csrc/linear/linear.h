// Dense linear layer on GGUF rows as stored: y[T, N] = x[T, K] · W[N, K]ᵀ (+ bias[N]), x and y
// f32, W one row of `type` blocks per output channel (any format with a k_vec_dot: f32/f16/bf16,
// q4_0/q5_0/q8_0, the K-quants, iq4_xs), read in place (a file mapping; nothing converted at load).
//
// Two paths, chosen per call by T:
//   dots: x rows quantized once to the format's activation type (q8_0 / q8_K; f32 kept as is),
//         then every thread takes a contiguous range of output rows and, per block of kRowBlock
//         rows, streams token tiles past them with the multi-token dots where the format has
//         one (moe_dot.h), else k_vec_dot per token. The weights are read from memory once per
//         call. Decode (T = 1) is this path: memory-bound, like the experts.
//   gemm: T >= gemm_min_tokens on an AMX CPU (block formats, K % 32 == 0): x rounded to bf16 and
//         prepared once, then each work item dequantizes kGemmRows weight rows into bf16 panels
//         (a per-thread scratch) and multiplies them with every token on AMX tiles (prefill).
// Threads split work explicitly (ith, nth) on the owned pool; forward() must run inside a pool
// task (it fans out with ThreadPool::parallel). Scratch is the pool's shared MoE scratch (slots
// 40+), safe because pool tasks run one at a time.
// NOTE (numerics): the dots path gives a token the same result whatever T is (the multi-token
// kernels' per-token arithmetic does not depend on the tile), as the experts do; the gemm path
// rounds x and the weights to bf16 instead of quantizing x to 8 bits (same order of error).
#pragma once
#include <cstdint>
#include <memory>

#include "common/threadpool.h"
#include "moe/moe_buffers.h"
#include "moe/moe_dot.h"
#include "quant/quant.h"

namespace ktrans {

class QLinear {
 public:
  // w: N rows of qtype_row_bytes(type, K) bytes, valid for the object's life (the caller owns
  // it); bias: N floats or null, same. isa: the level the kernels run at.
  QLinear(std::shared_ptr<ThreadPool> pool, QType type, int64_t N, int64_t K, const uint8_t* w, const float* bias,
          Isa isa);

  // y [T, N] = x [T, K] · Wᵀ (+ bias); ldx / ldy: row strides in floats. Call inside a pool task.
  void forward(const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy) const;
  // Same, for x already in the activation format (quantize_acts); ldq: bytes between rows.
  void forward_quantized(const uint8_t* xq, int64_t ldq, int64_t T, float* y, int64_t ldy) const;
  // forward() on the calling thread alone, outside the pool (no task hand-off: small layers,
  // where the hand-off costs more than the work). xq: T * act_row_bytes() bytes of scratch.
  void forward_serial(const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy, uint8_t* xq) const;
  // Below this much work (multiply-adds) the Python binding runs forward_serial.
  static constexpr int64_t kSerialWork = 1 << 18;
  // Inside a pool task, forward() keeps work below this on the task's thread.
  static constexpr int64_t kInlineWork = 1 << 16;
  // x rows -> activation format, split over the pool's threads (inside a pool task).
  void quantize_acts(const float* x, int64_t ldx, int64_t T, uint8_t* xq) const;
  // The pool threads' share of forward_quantized, for callers that already fan out: rows
  // [r0, r1) of y for every token.
  void dot_rows(const uint8_t* xq, int64_t ldq, int64_t T, float* y, int64_t ldy, int64_t r0, int64_t r1) const;

  bool uses_gemm(int64_t T) const { return gemm_ok_ && gemm_min_tokens_ > 0 && T >= gemm_min_tokens_; }
  void set_gemm_min_tokens(int64_t n) { gemm_min_tokens_ = n; }
  int64_t gemm_min_tokens() const { return gemm_min_tokens_; }
  QType type() const { return type_; }
  QType act_type() const { return act_type_; }
  int64_t act_row_bytes() const { return act_bytes_; }
  int64_t N() const { return N_; }
  int64_t K() const { return K_; }
  const std::shared_ptr<ThreadPool>& pool() const { return pool_; }

 private:
  void forward_gemm(const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy) const;

  std::shared_ptr<ThreadPool> pool_;
  std::shared_ptr<MoeBuffers> buf_;
  QType type_, act_type_;
  int64_t N_, K_, row_bytes_, act_bytes_;
  const uint8_t* w_;
  const float* bias_;
  Isa isa_;
  VecDotFn dot_ = nullptr;
  MoeDotMultiFn multi_ = nullptr;
  QuantizeRowFn quant_ = nullptr;
  bool gemm_ok_ = false;
  // Measured on the 2-core AMX dev machine (bench/linear.py, 0.5B shapes): the bf16 tile GEMM
  // and the dots break even around 16 tokens (q8_0 head: GEMM 3.4x faster at 16), the GEMM wins
  // 2.7-12x at 512. Off (0) without AMX, where the bf16 panel product is slower than the dots (moe.h).
  int64_t gemm_min_tokens_ = 0;
};

}  // namespace ktrans
