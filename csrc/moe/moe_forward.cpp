// Forward phases of the gguf MoE backend (see moe.h): activation quantization, gate/up with the
// gating (moe_gating.cpp), h quantization, down with per-thread output rows, and the NUMA-split reduction.
//
// Dot products are the quant formats' own k_vec_dot kernels (csrc/quant/), one weight row against
// one activation row; loops keep a block of weight rows hot in L1/L2 while a tile of positions
// streams past it, so each weight byte is read from DRAM once per chunk.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/convert.h"
#include "moe/moe.h"

namespace ktrans {
namespace {

constexpr int64_t kRowBlock = 32;  // gate/up rows per work item
constexpr int64_t kTokTile = 16;   // positions per pass over a block of weight rows

enum Slot { kXq0, kXq1, kH, kHq, kAcc, kScratch };

inline void split_range(int64_t len, int i, int n, int64_t* b, int64_t* e) {
  *b = len * i / n;
  *e = len * (i + 1) / n;
}

// Like split_range, with inner boundaries on multiples of 16 (one packed panel / one zmm).
inline void split_range16(int64_t len, int i, int n, int64_t* b, int64_t* e) {
  *b = i == 0 ? 0 : std::min(len, (len * i / n + 8) / 16 * 16);
  *e = i == n - 1 ? len : std::min(len, (len * (i + 1) / n + 8) / 16 * 16);
}

}  // namespace

void MoeLayer::forward_chunk(const MoeArgs& a, int64_t t0, int64_t tc) {
  const int64_t H = shape_.H, I = shape_.I;
  const int S = nslices(), n = pool_->size();
  plan_.build(a.ids, a.ids_i64, a.weights, a.k, shape_.E, t0, tc);
  const int64_t P = plan_.num_positions();
  // NOTE: f32 input with f32-activation formats is read in place: no copy of x.
  const bool direct = !a.x_bf16 && act_type_[0] == QType::f32 && act_type_[1] == QType::f32;
  c_.xq[0] = direct ? static_cast<const uint8_t*>(a.x) + t0 * H * 4 : buf_->get(kXq0, tc * act_bytes_[0]);
  c_.xq[1] = act_type_[1] == act_type_[0] ? c_.xq[0] : buf_->get(kXq1, tc * act_bytes_[1]);
  c_.h = reinterpret_cast<float*>(buf_->get(kH, std::max<int64_t>(P, 1) * I * 4));
  c_.hq = act_type_[2] == QType::f32 ? nullptr : buf_->get(kHq, S * std::max<int64_t>(P, 1) * act_bytes_[2]);
  c_.acc = reinterpret_cast<float*>(buf_->get(kAcc, S * tc * H * 4));
  c_.scratch = reinterpret_cast<float*>(buf_->get(kScratch, n * std::max(H, I) * 4));
  const bool gemm = plan_gemm();
  if (P > 0 && fused_ok(tc, gemm)) {
    // NOTE: at most fused_max_tokens_ rows: quantized here, before the one fan-out.
    if (!direct) act_rows(a, t0, 0, tc, c_.scratch);
    return forward_fused(a, t0, tc);
  }
  if (!direct) phase_act(a, t0, tc);
  if (gemm) phase_gemm_acts(a, t0);
  if (P > 0) {
    phase_gate_up();
    if (gemm)
      phase_down_act_gemm();
    else if (c_.hq)
      phase_down_act();
  }
  phase_down(a, t0, tc);
  if (S > 1) phase_reduce(a, t0, tc);
}

void MoeLayer::phase_act(const MoeArgs& a, int64_t t0, int64_t tc) {
  pool_->parallel([&](int ith, int nth) {
    int64_t b, e;
    split_range(tc, ith, nth, &b, &e);
    act_rows(a, t0, b, e, c_.scratch + ith * std::max(shape_.H, shape_.I));
  });
}

// Tokens [b, e) of the chunk into the activation format(s) of gate and up; row: f32 scratch [H].
void MoeLayer::act_rows(const MoeArgs& a, int64_t t0, int64_t b, int64_t e, float* row) {
  const int64_t H = shape_.H;
  const Bf16ToF32Fn to_f32 = k_bf16_to_f32.get(isa_);
  const int nq = act_type_[1] == act_type_[0] ? 1 : 2;
  for (int64_t t = b; t < e; ++t) {
    const float* src;
    if (a.x_bf16) {
      to_f32(static_cast<const uint16_t*>(a.x) + (t0 + t) * H, row, H);
      src = row;
    } else {
      src = static_cast<const float*>(a.x) + (t0 + t) * H;
    }
    for (int q = 0; q < nq; ++q) {
      uint8_t* dst = const_cast<uint8_t*>(c_.xq[q]) + t * act_bytes_[q];
      if (act_type_[q] == QType::f32)
        std::memcpy(dst, src, H * 4);
      else
        act_quant_[q](src, dst, H);
    }
  }
}

void MoeLayer::phase_gate_up() {
  const int G = ngroups();
  const int64_t A = plan_.num_active();
  for (int g = 0; g < G; ++g) counters_[g].store(0, std::memory_order_relaxed);
  pool_->parallel([&](int ith, int) {
    const int g = pool_->group_of(ith);
    const int64_t nrb = (row_begin_[g + 1] - row_begin_[g] + kRowBlock - 1) / kRowBlock;
    for (;;) {
      int64_t it = counters_[g].fetch_add(1, std::memory_order_relaxed);
      if (it >= A * nrb) break;
      int64_t r0 = row_begin_[g] + it % nrb * kRowBlock;
      gate_up_item(g, it / nrb, r0, std::min(r0 + kRowBlock, row_begin_[g + 1]), ith);
    }
  });
}

void MoeLayer::gate_up_item(int g, int64_t a, int64_t r0, int64_t r1, int ith) {
  if (!big_.empty() && big_[a]) return gate_up_gemm(g, a, r0, r1, ith);
  const int64_t H = shape_.H, I = shape_.I, e = plan_.active[a];
  const ProjStore& sg = store_[0][g];
  const ProjStore& su = store_[1][g];
  const int64_t lo = numa_ == NumaMode::split ? row_begin_[g] : 0;  // first row this copy holds
  const uint8_t* wg0 = sg.expert(e) + (r0 - lo) * sg.row_bytes;
  const uint8_t* wu0 = su.expert(e) + (r0 - lo) * su.row_bytes;
  const int64_t pend = plan_.offset[a + 1];
  for (int64_t pb = plan_.offset[a]; pb < pend; pb += kTokTile) {
    const int64_t pe = std::min(pb + kTokTile, pend);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wg = wg0 + (r - r0) * sg.row_bytes;
      const uint8_t* wu = wu0 + (r - r0) * su.row_bytes;
      for (int64_t p = pb; p < pe; p += kMoeDotTokens) {
        const int nt = static_cast<int>(std::min<int64_t>(kMoeDotTokens, pe - p));
        const void* xg[kMoeDotTokens];
        const void* xu[kMoeDotTokens];
        for (int j = 0; j < nt; ++j) {
          xg[j] = c_.xq[0] + plan_.tok[p + j] * act_bytes_[0];
          xu[j] = c_.xq[1] + plan_.tok[p + j] * act_bytes_[1];
        }
        float gv[kMoeDotTokens], uv[kMoeDotTokens];
        dot_tokens(0, H, wg, xg, nt, gv);
        dot_tokens(1, H, wu, xu, nt, uv);
        for (int j = 0; j < nt; ++j) c_.h[(p + j) * I + r] = gate_one(e, r, gv[j], uv[j]);  // [P, I]
      }
    }
  }
}

void MoeLayer::phase_down_act() {
  const int64_t P = plan_.num_positions();
  pool_->parallel([&](int ith, int nth) {
    int64_t b, e;
    split_range(P, ith, nth, &b, &e);
    quantize_h(b, e);
  });
}

// h rows of positions [p0, p1) into the down activation format, per NUMA slice.
void MoeLayer::quantize_h(int64_t p0, int64_t p1) {
  const int64_t I = shape_.I, P = plan_.num_positions();
  const int S = nslices();
  for (int64_t p = p0; p < p1; ++p)
    for (int s = 0; s < S; ++s) {
      const int64_t c0 = S > 1 ? row_begin_[s] : 0, len = S > 1 ? row_begin_[s + 1] - c0 : I;
      if (len > 0) act_quant_[2](c_.h + p * I + c0, c_.hq + (s * P + p) * act_bytes_[2], len);
    }
}

void MoeLayer::down_rows(int s, int copy, int64_t r0, int64_t r1, float* acc, int ith) {
  const ProjStore& sd = store_[2][copy];
  if (sd.k == 0) return;
  const int64_t H = shape_.H, I = shape_.I, P = plan_.num_positions();
  const int64_t c0 = nslices() > 1 ? row_begin_[s] : 0;
  for (int64_t a = 0; a < plan_.num_active(); ++a) {
    wait_ready(a);
    if (!big_.empty() && big_[a]) {
      down_gemm(s, copy, a, r0, r1, acc, ith);
      continue;
    }
    const uint8_t* base = sd.expert(plan_.active[a]);
    const int64_t pend = plan_.offset[a + 1];
    for (int64_t pb = plan_.offset[a]; pb < pend; pb += kTokTile) {
      const int64_t pe = std::min(pb + kTokTile, pend);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* w = base + r * sd.row_bytes;
        for (int64_t p = pb; p < pe; p += kMoeDotTokens) {
          const int nt = static_cast<int>(std::min<int64_t>(kMoeDotTokens, pe - p));
          const void* act[kMoeDotTokens];
          for (int j = 0; j < nt; ++j)
            act[j] = c_.hq ? static_cast<const void*>(c_.hq + (s * P + p + j) * act_bytes_[2])
                           : static_cast<const void*>(c_.h + (p + j) * I + c0);
          float y[kMoeDotTokens];
          dot_tokens(2, sd.k, w, act, nt, y);
          for (int j = 0; j < nt; ++j) acc[plan_.tok[p + j] * H + r] += plan_.wt[p + j] * y[j];  // [tc, H]
        }
      }
    }
  }
}

void MoeLayer::phase_down(const MoeArgs& a, int64_t t0, int64_t tc) {
  pool_->parallel([&](int ith, int nth) { down_thread(a, t0, tc, ith, nth); });
}

// Down for the output rows of thread ith of nth: start from the caller's output (slice 0) or
// zero, add w * down(h) of every active expert, write the rows back (one slice) or leave them
// for phase_reduce.
void MoeLayer::down_thread(const MoeArgs& a, int64_t t0, int64_t tc, int ith, int nth) {
  const int64_t H = shape_.H;
  const int S = nslices();
  const Bf16ToF32Fn to_f32 = k_bf16_to_f32.get(isa_);
  const F32ToBf16Fn to_bf16 = k_f32_to_bf16.get(isa_);
  const int g = pool_->group_of(ith);
  const int s = S > 1 ? g : 0, copy = g;
  int64_t r0, r1;
  if (S > 1)
    split_range16(H, ith - pool_->group_begin(g), pool_->group_size(g), &r0, &r1);
  else
    split_range16(H, ith, nth, &r0, &r1);
  if (r0 >= r1) return;
  float* acc = c_.acc + s * tc * H;
  for (int64_t t = 0; t < tc; ++t) {  // start from the caller's output (slice 0) or zero
    float* dst = acc + t * H + r0;
    if (s == 0 && a.accumulate && a.x_bf16)
      to_f32(static_cast<const uint16_t*>(a.out) + (t0 + t) * H + r0, dst, r1 - r0);
    else if (s == 0 && a.accumulate)
      std::memcpy(dst, static_cast<const float*>(a.out) + (t0 + t) * H + r0, (r1 - r0) * 4);
    else
      std::memset(dst, 0, (r1 - r0) * 4);
  }
  if (backend_ == MoeBackend::gguf)
    down_rows(s, copy, r0, r1, acc, ith);
  else
    down_rows_packed(s, copy, r0, r1, acc, ith);
  if (s == 0 && !bias_[2].empty()) add_down_bias(a, t0, tc, r0, r1, acc);
  if (S > 1) return;
  for (int64_t t = 0; t < tc; ++t) {
    if (a.x_bf16)
      to_bf16(acc + t * H + r0, static_cast<uint16_t*>(a.out) + (t0 + t) * H + r0, r1 - r0);
    else
      std::memcpy(static_cast<float*>(a.out) + (t0 + t) * H + r0, acc + t * H + r0, (r1 - r0) * 4);
  }
}

void MoeLayer::phase_reduce(const MoeArgs& a, int64_t t0, int64_t tc) {
  const int64_t H = shape_.H;
  const int S = nslices();
  const F32ToBf16Fn to_bf16 = k_f32_to_bf16.get(isa_);
  pool_->parallel([&](int ith, int nth) {
    int64_t r0, r1;
    split_range(H, ith, nth, &r0, &r1);
    for (int64_t t = 0; t < tc; ++t) {
      float* sum = c_.acc + t * H;  // slice 0 collects the others
      for (int s = 1; s < S; ++s) {
        const float* part = c_.acc + (s * tc + t) * H;
        for (int64_t r = r0; r < r1; ++r) sum[r] += part[r];
      }
      if (a.x_bf16)
        to_bf16(sum + r0, static_cast<uint16_t*>(a.out) + (t0 + t) * H + r0, r1 - r0);
      else
        std::memcpy(static_cast<float*>(a.out) + (t0 + t) * H + r0, sum + r0, (r1 - r0) * 4);
    }
  });
}

}  // namespace ktrans
