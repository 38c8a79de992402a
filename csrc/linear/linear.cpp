// QLinear (linear.h): activation quantization, the dots path (contiguous output-row ranges per
// thread, token tiles streamed past blocks of weight rows held in L1) and the AMX gemm path
// (weight rows dequantized into bf16 panels per work item, all tokens per panel).
#include "linear/linear.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/convert.h"
#include "common/parallel.h"
#include "packed/packed.h"

namespace ktrans {
namespace {

constexpr int64_t kRowBlock = 16;  // weight rows kept hot while a token tile streams past
constexpr int64_t kTokTile = 32;   // tokens per pass over a block of rows
constexpr int64_t kGemmRows = 64;  // weight rows dequantized per gemm work item
enum Slot { kXq = 40, kXb, kActs, kWpk };

inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

}  // namespace

QLinear::QLinear(std::shared_ptr<ThreadPool> pool, QType type, int64_t N, int64_t K, const uint8_t* w,
                 const float* bias, Isa isa)
    : pool_(std::move(pool)), type_(type), N_(N), K_(K), w_(w), bias_(bias), isa_(isa) {
  const QTypeTraits& tr = qtype_traits(type);
  if (N <= 0 || K <= 0 || K % tr.block_size != 0)
    throw std::invalid_argument(std::string(tr.name) + " linear: need N > 0 and K a positive multiple of " +
                                std::to_string(tr.block_size) + ", got N=" + std::to_string(N) +
                                ", K=" + std::to_string(K));
  act_type_ = vec_dot_type(type);
  if (K % qtype_traits(act_type_).block_size != 0)
    throw std::invalid_argument(std::string(tr.name) + " linear: K=" + std::to_string(K) + " is not a multiple of " +
                                "the activation block size " + std::to_string(qtype_traits(act_type_).block_size));
  dot_ = k_vec_dot[qi(type)].get(isa);
  if (!dot_) throw std::invalid_argument(std::string(tr.name) + " linear: no vec_dot kernel for this format");
  multi_ = k_moe_dot_multi[qi(type)].get(isa);
  if (act_type_ != QType::f32) quant_ = k_quantize_row[qi(act_type_)].get(isa);
  row_bytes_ = qtype_row_bytes(type, K);
  act_bytes_ = qtype_row_bytes(act_type_, K);
  buf_ = moe_scratch_for(pool_.get());
  // NOTE: block formats only: f32 / f16 rows would lose precision as bf16 panels.
  gemm_ok_ = tr.block_size >= kPackKAlign && K % kPackKAlign == 0 && K <= 65536 &&
             k_dequantize_row[qi(type)].get(isa) != nullptr;
  gemm_min_tokens_ = isa == Isa::amx ? 16 : 0;
}

void QLinear::quantize_acts(const float* x, int64_t ldx, int64_t T, uint8_t* xq) const {
  // NOTE: one row is cheaper to quantize than a fan-out costs; the caller's thread does it.
  if (T < pool_->size()) {
    for (int64_t t = 0; t < T; ++t) quant_(x + t * ldx, xq + t * act_bytes_, K_);
    return;
  }
  pool_->parallel([&](int ith, int nth) {
    auto [t0, t1] = split_range(T, ith, nth);
    for (int64_t t = t0; t < t1; ++t) quant_(x + t * ldx, xq + t * act_bytes_, K_);
  });
}

void QLinear::dot_rows(const uint8_t* xq, int64_t ldq, int64_t T, float* y, int64_t ldy, int64_t r0,
                       int64_t r1) const {
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(rb + kRowBlock, r1);
    for (int64_t tb = 0; tb < T; tb += kTokTile) {
      const int64_t te = std::min(tb + kTokTile, T);
      for (int64_t r = rb; r < re; ++r) {
        const uint8_t* w = w_ + r * row_bytes_;
        const float b = bias_ ? bias_[r] : 0.f;
        for (int64_t t = tb; t < te; t += kMoeDotTokens) {
          const int nt = static_cast<int>(std::min<int64_t>(kMoeDotTokens, te - t));
          float out[kMoeDotTokens];
          if (multi_) {  // NOTE: also for one token, so a token's result never depends on T
            const void* acts[kMoeDotTokens];
            for (int j = 0; j < nt; ++j) acts[j] = xq + (t + j) * ldq;
            multi_(K_, w, acts, nt, out);
          } else {
            for (int j = 0; j < nt; ++j) out[j] = dot_(K_, w, xq + (t + j) * ldq);
          }
          for (int j = 0; j < nt; ++j) y[(t + j) * ldy + r] = out[j] + b;
        }
      }
    }
  }
}

void QLinear::forward_quantized(const uint8_t* xq, int64_t ldq, int64_t T, float* y, int64_t ldy) const {
  pool_->parallel([&](int ith, int nth) {
    auto [r0, r1] = split_range(N_, ith, nth);
    dot_rows(xq, ldq, T, y, ldy, r0, r1);
  });
}

void QLinear::forward(const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy) const {
  if (T <= 0) return;
  if (uses_gemm(T)) return forward_gemm(x, ldx, T, y, ldy);
  if (T * N_ * K_ <= kInlineWork) {  // e.g. a router's few rows: a fan-out costs more than the work
    uint8_t* xq = act_type_ == QType::f32 ? nullptr : buf_->get(kXq, T * act_bytes_);
    return forward_serial(x, ldx, T, y, ldy, xq);
  }
  if (act_type_ == QType::f32)  // f32 / f16 / bf16 weights dot f32 activations in place
    return forward_quantized(reinterpret_cast<const uint8_t*>(x), ldx * 4, T, y, ldy);
  uint8_t* xq = buf_->get(kXq, T * act_bytes_);
  quantize_acts(x, ldx, T, xq);
  forward_quantized(xq, act_bytes_, T, y, ldy);
}

void QLinear::forward_serial(const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy, uint8_t* xq) const {
  if (act_type_ == QType::f32) return dot_rows(reinterpret_cast<const uint8_t*>(x), ldx * 4, T, y, ldy, 0, N_);
  for (int64_t t = 0; t < T; ++t) quant_(x + t * ldx, xq + t * act_bytes_, K_);
  dot_rows(xq, act_bytes_, T, y, ldy, 0, N_);
}

void QLinear::forward_gemm(const float* x, int64_t ldx, int64_t T, float* y, int64_t ldy) const {
  const int n = pool_->size();
  uint16_t* xb = reinterpret_cast<uint16_t*>(buf_->get(kXb, T * K_ * 2));  // [T, K] bf16
  const int64_t wpk_bytes = align64(static_cast<int64_t>(packed_bytes(PackedFormat::bf16, kGemmRows, K_)));
  uint8_t* wpk = buf_->get(kWpk, n * wpk_bytes);
  uint8_t* acts_buf = buf_->get(kActs, std::max<size_t>(64, packed_acts_bytes(isa_, PackedFormat::bf16, T, K_)));
  const F32ToBf16Fn to_bf16 = k_f32_to_bf16.get(isa_);
  pool_->parallel([&](int ith, int nth) {
    auto [t0, t1] = split_range(T, ith, nth);
    for (int64_t t = t0; t < t1; ++t) to_bf16(x + t * ldx, xb + t * K_, K_);
  });
  const PackedActs acts = packed_prepare_acts(isa_, PackedFormat::bf16, xb, K_, T, K_, acts_buf);
  const int64_t items = (N_ + kGemmRows - 1) / kGemmRows;
  std::atomic<int64_t> next{0};
  pool_->parallel([&](int ith, int) {
    uint8_t* w = wpk + ith * wpk_bytes;
    for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t n0 = it * kGemmRows, nr = std::min(kGemmRows, N_ - n0);
      pack_rows_gguf(PackedFormat::bf16, qi(type_), w_ + n0 * row_bytes_, nr, K_, 0, nr, w);
      packed_gemm_prepared(acts, w, nr, y + n0, ldy, 0, nr, false);
      if (bias_)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t r = 0; r < nr; ++r) y[t * ldy + n0 + r] += bias_[n0 + r];
    }
  });
}

}  // namespace ktrans
