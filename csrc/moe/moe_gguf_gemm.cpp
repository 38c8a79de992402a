// GEMM path of the gguf MoE backend: an expert that receives many positions in a chunk (at least
// gemm_min_tokens, block formats only) has its GGUF blocks dequantized on the fly into bf16 packed
// panels (csrc/packed/, in a per-thread scratch) and multiplied with packed_gemm (AMX tiles on AMX
// machines, AVX-512 / AVX2 / generic elsewhere). Dequantization then costs once per weight and
// chunk, the product once per weight and position; the vec_dot path (moe_forward.cpp) keeps the
// experts with few positions (decode).
//
// Phases, per chunk (moe.h has the common structure):
//   acts:    bf16 x rows of each big expert's positions, gathered and prepared once
//            (packed_prepare_acts) for all its gate/up column blocks and threads.
//   gate/up: a work item (expert, 32 I-rows) packs its gate rows then its up rows into one
//            [64, H] panel matrix, so one product serves both: y [m, 64] -> h = act(g, u).
//   down:    h rows of big experts rounded to bf16 and prepared per NUMA slice; each thread packs
//            kDownRows of its own H output rows at a time and adds w * y into its accumulator.
// NOTE (numerics): x and h enter the product as bf16 and the weights as bf16 roundings of their
// dequantized values, where the vec_dot path quantizes x and h to 8 bits per block: the error is
// of the same order or smaller (tests/tolerances.py MOE_NMSE holds for both paths).
#include <algorithm>
#include <cstring>

#include "common/convert.h"
#include "moe/moe.h"

namespace ktrans {
namespace {

constexpr int64_t kGateUpRows = 32;  // I-rows per gate/up work item (moe_forward.cpp's kRowBlock)
constexpr int64_t kDownRows = 64;    // H-rows of down packed per product
enum Slot { kWpk = 20, kGy };

inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

}  // namespace

bool MoeLayer::plan_gemm() {
  big_.clear();
  const int64_t A = plan_.num_active(), H = shape_.H, I = shape_.I;
  if (gemm_min_tokens_ <= 0 || A == 0 || H % kPackKAlign || I % kPackKAlign) return false;
  for (int p = 0; p < 3; ++p)
    if (qtype_traits(shape_.types[p]).block_size < kPackKAlign) return false;
  int64_t max_m = 0;
  big_.assign(A, 0);
  for (int64_t a = 0; a < A; ++a) {
    const int64_t m = plan_.offset[a + 1] - plan_.offset[a];
    if (m >= gemm_min_tokens_) big_[a] = 1, max_m = std::max(max_m, m);
  }
  if (max_m == 0) {
    big_.clear();
    return false;
  }
  plan_acts(PackedFormat::bf16);
  const int n = pool_->size();
  wpk_bytes_ = align64(static_cast<int64_t>(std::max(packed_bytes(PackedFormat::bf16, 2 * kGateUpRows, H),
                                                     packed_bytes(PackedFormat::bf16, kDownRows, I))));
  wpk_ = buf_->get(kWpk, n * wpk_bytes_);
  gy_floats_ = align64(max_m * std::max<int64_t>(2 * kGateUpRows, kDownRows));
  gy_ = reinterpret_cast<float*>(buf_->get(kGy, n * gy_floats_ * 4));
  return true;
}

void MoeLayer::phase_gemm_acts(const MoeArgs& args, int64_t t0) {
  const int64_t H = shape_.H, A = plan_.num_active();
  const F32ToBf16Fn to_bf16 = k_f32_to_bf16.get(isa_);
  counters_[0].store(0, std::memory_order_relaxed);
  pool_->parallel([&](int, int) {
    for (;;) {
      const int64_t a = counters_[0].fetch_add(1, std::memory_order_relaxed);
      if (a >= A) break;
      if (!big_[a]) continue;
      const int64_t p0 = plan_.offset[a], m = plan_.offset[a + 1] - p0;
      for (int64_t p = p0; p < p0 + m; ++p) {  // xg_ [P, H] bf16, rows of big experts only
        const int64_t t = t0 + plan_.tok[p];
        if (args.x_bf16)
          std::memcpy(xg_ + p * H, static_cast<const uint16_t*>(args.x) + t * H, H * 2);
        else
          to_bf16(static_cast<const float*>(args.x) + t * H, xg_ + p * H, H);
      }
      xacts_[a] = packed_prepare_acts(isa_, PackedFormat::bf16, xg_ + p0 * H, H, m, H, acts_buf_ + acts_off_[a]);
    }
  });
}

void MoeLayer::gate_up_gemm(int g, int64_t a, int64_t r0, int64_t r1, int ith) {
  const int64_t I = shape_.I, e = plan_.active[a], nr = r1 - r0;
  const ProjStore& sg = store_[0][g];
  const ProjStore& su = store_[1][g];
  const int64_t lo = numa_ == NumaMode::split ? row_begin_[g] : 0;  // first row this copy holds
  uint8_t* w = wpk_ + ith * wpk_bytes_;
  // NOTE: nr is a multiple of 16, so up's panels start right after gate's: one [2 nr, H] matrix.
  pack_rows_gguf(PackedFormat::bf16, qi(shape_.types[0]), sg.expert(e) + (r0 - lo) * sg.row_bytes, nr, sg.k, 0,
                 nr, w);
  pack_rows_gguf(PackedFormat::bf16, qi(shape_.types[1]), su.expert(e) + (r0 - lo) * su.row_bytes, nr, su.k, 0,
                 nr, w + packed_bytes(PackedFormat::bf16, nr, su.k));
  float* y = gy_ + ith * gy_floats_;  // [m, 2 nr]: gate columns, then up columns
  packed_gemm_prepared(xacts_[a], w, 2 * nr, y, 2 * nr, 0, 2 * nr, false);
  const int64_t p0 = plan_.offset[a], m = plan_.offset[a + 1] - p0;
  for (int64_t i = 0; i < m; ++i) gate_rows(e, r0, y + i * 2 * nr, y + i * 2 * nr + nr, c_.h + (p0 + i) * I + r0, nr);  // [P, I]
}

void MoeLayer::phase_down_act_gemm() {
  const int64_t I = shape_.I, A = plan_.num_active(), P = plan_.num_positions();
  const int S = nslices();
  const F32ToBf16Fn to_bf16 = k_f32_to_bf16.get(isa_);
  counters_[0].store(0, std::memory_order_relaxed);
  pool_->parallel([&](int, int) {
    for (;;) {
      const int64_t a = counters_[0].fetch_add(1, std::memory_order_relaxed);
      if (a >= A) break;
      const int64_t p0 = plan_.offset[a], p1 = plan_.offset[a + 1];
      if (!big_[a]) {  // the vec_dot path's 8-bit activations, per slice
        for (int64_t p = p0; p < p1; ++p)
          for (int s = 0; s < S; ++s) {
            const int64_t c0 = S > 1 ? row_begin_[s] : 0, len = S > 1 ? row_begin_[s + 1] - c0 : I;
            if (len > 0) act_quant_[2](c_.h + p * I + c0, c_.hq + (s * P + p) * act_bytes_[2], len);
          }
        continue;
      }
      to_bf16(c_.h + p0 * I, hb_ + p0 * I, (p1 - p0) * I);  // [m, I]
      prepare_h_acts(PackedFormat::bf16, a);
    }
  });
}

void MoeLayer::down_gemm(int s, int copy, int64_t a, int64_t r0, int64_t r1, float* acc, int ith) {
  const ProjStore& sd = store_[2][copy];
  const int64_t H = shape_.H, A = plan_.num_active();
  const int64_t p0 = plan_.offset[a], m = plan_.offset[a + 1] - p0;
  const uint8_t* base = sd.expert(plan_.active[a]);
  uint8_t* w = wpk_ + ith * wpk_bytes_;
  float* y = gy_ + ith * gy_floats_;  // [m, nr]
  for (int64_t b0 = r0; b0 < r1; b0 += kDownRows) {
    const int64_t nr = std::min(kDownRows, r1 - b0);
    pack_rows_gguf(PackedFormat::bf16, qi(shape_.types[2]), base + b0 * sd.row_bytes, nr, sd.k, 0, nr, w);
    packed_gemm_prepared(hacts_[s * A + a], w, nr, y, nr, 0, nr, false);
    for (int64_t i = 0; i < m; ++i) {
      float* dst = acc + plan_.tok[p0 + i] * H + b0;  // [tc, H]
      const float wt = plan_.wt[p0 + i];
      const float* src = y + i * nr;
      for (int64_t r = 0; r < nr; ++r) dst[r] += wt * src[r];
    }
  }
}

}  // namespace ktrans
