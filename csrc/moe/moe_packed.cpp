// The amx_* MoE backends: experts repacked at load into the packed panel formats of csrc/packed/
// (bf16, int8 per-channel, int4 group scales) and multiplied with packed_gemm (AMX tiles for
// M >= 16 tokens of one expert, AVX-512 below, the generic reference elsewhere).
//
// Phases (see moe.h for the common structure): 1. gather each position's x row as bf16, grouped
// per expert ([P, H]), and prepare it once per expert (packed_prepare_acts: the AMX blocked copy,
// int8: quantized) for every column block and thread; 2. per (expert, block of 64..256 I-columns):
// gate and up GEMMs into per-thread f32 scratch, h = act(g, u) stored as bf16 [P, I], then h
// prepared once per expert and NUMA slice; 3. down: each thread owns a 16-aligned range of H output
// columns, runs the GEMM of every active expert on it and adds w * y into the f32 accumulator.
// NOTE: preparing once matters most for down, where every thread multiplies every expert's h:
// per thread the preparation would cost about as much as its narrow product. Loading dequantizes each source row (any GGUF format, bf16, f32) and packs rows in
// chunks, experts split across the group's threads, so peak extra memory is one chunk per thread.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/convert.h"
#include "moe/moe.h"

namespace ktrans {
namespace {

constexpr int64_t kMaxColBlock = 256;  // I-columns of gate/up per work item, at most (16 panels)
constexpr int64_t kPackRows = 64;   // source rows dequantized per pack call

enum Slot { kXg = 10, kHb, kScr, kAccP, kActs };  // after moe_forward.cpp's slots

inline int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

}  // namespace

PackedFormat packed_format(MoeBackend b) {
  return b == MoeBackend::amx_bf16 ? PackedFormat::bf16 : b == MoeBackend::amx_int8 ? PackedFormat::int8
                                                                                   : PackedFormat::int4;
}

void MoeLayer::load_group_packed(int proj, int g, int64_t e0, int64_t e1, const uint8_t* src, int ith, int nth) {
  const ProjStore& st = store_[proj][g];
  const QType type = shape_.types[proj];
  const int64_t full_rows = proj < 2 ? shape_.I : shape_.H, full_k = proj < 2 ? shape_.H : shape_.I;
  const int64_t src_row = qtype_row_bytes(type, full_k);
  const bool sliced = numa_ == NumaMode::split;
  const int64_t r0 = sliced && proj < 2 ? row_begin_[g] : 0;
  const int64_t col_off = qtype_row_bytes(type, sliced && proj == 2 ? row_begin_[g] : 0);
  const DequantizeRowFn dq = k_dequantize_row[qi(type)].get(isa_);
  const PackedFormat pf = packed_format(backend_);
  std::vector<float> rows(kPackRows * st.k);  // [kPackRows, k] dequantized source rows
  const int64_t b = (e1 - e0) * ith / nth, e = (e1 - e0) * (ith + 1) / nth;
  for (int64_t x = e0 + b; x < e0 + e; ++x) {
    const uint8_t* s = src + (x - e0) * full_rows * src_row;
    uint8_t* d = const_cast<uint8_t*>(st.expert(x));
    for (int64_t n0 = 0; n0 < st.rows; n0 += kPackRows) {
      const int64_t n1 = std::min(n0 + kPackRows, st.rows);
      for (int64_t n = n0; n < n1; ++n) dq(s + (r0 + n) * src_row + col_off, rows.data() + (n - n0) * st.k, st.k);
      // NOTE: pack_rows_f32 reads row n at W + n * K, so W is shifted back by n0 rows.
      pack_rows_f32(pf, rows.data() - n0 * st.k, st.rows, st.k, n0, n1, d);
    }
  }
}

void MoeLayer::plan_acts(PackedFormat f) {
  const int64_t A = plan_.num_active(), H = shape_.H, I = shape_.I, P = plan_.num_positions();
  const int S = nslices();
  acts_off_.assign(static_cast<size_t>((1 + S) * A), 0);
  int64_t off = 0;
  for (int64_t a = 0; a < A; ++a) {
    if (!big_[a]) continue;
    const int64_t m = plan_.offset[a + 1] - plan_.offset[a];
    acts_off_[a] = off;
    off += align64(static_cast<int64_t>(packed_acts_bytes(isa_, f, m, H)));
    for (int s = 0; s < S; ++s) {
      const int64_t len = S > 1 ? row_begin_[s + 1] - row_begin_[s] : I;
      acts_off_[A + s * A + a] = off;
      if (len > 0) off += align64(static_cast<int64_t>(packed_acts_bytes(isa_, f, m, len)));
    }
  }
  acts_buf_ = buf_->get(kActs, std::max<int64_t>(off, 64));
  xg_ = reinterpret_cast<uint16_t*>(buf_->get(kXg, std::max<int64_t>(P, 1) * H * 2));
  hb_ = reinterpret_cast<uint16_t*>(buf_->get(kHb, std::max<int64_t>(P, 1) * I * 2));
  xacts_.resize(A);
  hacts_.resize(static_cast<size_t>(S * A));
}

// h rows of active expert a (bf16 in hb_) prepared once per down slice, for every thread's columns.
void MoeLayer::prepare_h_acts(PackedFormat f, int64_t a) {
  const int64_t A = plan_.num_active(), I = shape_.I, p0 = plan_.offset[a], m = plan_.offset[a + 1] - p0;
  const int S = nslices();
  for (int s = 0; s < S; ++s) {
    const int64_t c0 = S > 1 ? row_begin_[s] : 0, len = S > 1 ? row_begin_[s + 1] - c0 : I;
    if (len > 0)
      hacts_[s * A + a] = packed_prepare_acts(isa_, f, hb_ + p0 * I + c0, I, m, len, acts_buf_ + acts_off_[A + s * A + a]);
  }
}

void MoeLayer::forward_chunk_packed(const MoeArgs& a, int64_t t0, int64_t tc) {
  const int64_t H = shape_.H, I = shape_.I;
  const int S = nslices(), n = pool_->size();
  plan_.build(a.ids, a.ids_i64, a.weights, a.k, shape_.E, t0, tc);
  const int64_t P = plan_.num_positions();
  int64_t max_m = 1;
  for (int64_t i = 0; i < plan_.num_active(); ++i) max_m = std::max(max_m, plan_.offset[i + 1] - plan_.offset[i]);
  // Per-thread scratch: gate + up blocks [max_m, 64] each, or one expert's down columns.
  int min_group = n;
  for (int g = 0; g < ngroups(); ++g) min_group = std::min(min_group, pool_->group_size(g));
  // Wider gate/up blocks when there is plenty of work: x of an expert is re-read once per block.
  const int64_t per_thread = plan_.num_active() * I / (64 * 8 * n);
  col_block_ = 64 * std::min<int64_t>(kMaxColBlock / 64, std::max<int64_t>(1, per_thread));
  scr_floats_ = max_m * std::max<int64_t>(2 * col_block_, (S > 1 ? H / min_group : H / n) + 32);
  big_.assign(plan_.num_active(), 1);
  plan_acts(packed_format(backend_));
  scr_ = reinterpret_cast<float*>(buf_->get(kScr, n * scr_floats_ * 4));
  c_.acc = reinterpret_cast<float*>(buf_->get(kAccP, S * tc * H * 4));
  if (P > 0 && fused_ok(tc, false)) return forward_fused(a, t0, tc);
  if (P > 0) {
    phase_gather(a, t0);
    phase_gate_up_packed();
    phase_prepare_h();
  }
  phase_down(a, t0, tc);
  if (S > 1) phase_reduce(a, t0, tc);
}

void MoeLayer::phase_gather(const MoeArgs& a, int64_t t0) {
  run_per_expert([&](int64_t ai) { gather_expert(a, t0, ai); });
}

// x rows of active expert ai's positions as bf16 (xg_ [P, H]), prepared once for its products.
void MoeLayer::gather_expert(const MoeArgs& a, int64_t t0, int64_t ai) {
  const int64_t H = shape_.H, p0 = plan_.offset[ai], m = plan_.offset[ai + 1] - p0;
  const F32ToBf16Fn to_bf16 = k_f32_to_bf16.get(isa_);
  for (int64_t p = p0; p < p0 + m; ++p) {
    const int64_t t = t0 + plan_.tok[p];
    if (a.x_bf16)
      std::memcpy(xg_ + p * H, static_cast<const uint16_t*>(a.x) + t * H, H * 2);
    else
      to_bf16(static_cast<const float*>(a.x) + t * H, xg_ + p * H, H);
  }
  xacts_[ai] = packed_prepare_acts(isa_, packed_format(backend_), xg_ + p0 * H, H, m, H, acts_buf_ + acts_off_[ai]);
}

void MoeLayer::phase_prepare_h() {
  run_per_expert([&](int64_t ai) { prepare_h_acts(packed_format(backend_), ai); });
}

void MoeLayer::phase_gate_up_packed() {
  const int G = ngroups();
  const int64_t A = plan_.num_active();
  for (int g = 0; g < G; ++g) counters_[g].store(0, std::memory_order_relaxed);
  pool_->parallel([&](int ith, int) {
    const int g = pool_->group_of(ith);
    const int64_t lo = numa_ == NumaMode::split ? row_begin_[g] : 0;  // global col = local + lo
    const int64_t c0 = row_begin_[g] - lo, c1 = row_begin_[g + 1] - lo;
    const int64_t cb = col_block_, nblk = (c1 - c0 + cb - 1) / cb;
    for (;;) {
      int64_t it = counters_[g].fetch_add(1, std::memory_order_relaxed);
      if (it >= A * nblk) break;
      const int64_t n0 = c0 + it % nblk * cb;
      gate_up_block_packed(g, it / nblk, n0, std::min(n0 + cb, c1), ith);
    }
  });
}

// Gate and up columns [n0, n1) (local to group g's copy) of active expert ai: h = act(g, u)
// (gate_rows: the layer's gating and gate/up biases) as bf16 into hb_ [P, I].
void MoeLayer::gate_up_block_packed(int g, int64_t ai, int64_t n0, int64_t n1, int ith) {
  const int64_t H = shape_.H, I = shape_.I, cb = col_block_;
  const int64_t lo = numa_ == NumaMode::split ? row_begin_[g] : 0;  // global col = local + lo
  const PackedFormat pf = packed_format(backend_);
  const F32ToBf16Fn to_bf16 = k_f32_to_bf16.get(isa_);
  const int64_t e = plan_.active[ai], p0 = plan_.offset[ai], m = plan_.offset[ai + 1] - p0;
  const ProjStore& sg = store_[0][g];
  const ProjStore& su = store_[1][g];
  float* gs = scr_ + ith * scr_floats_;
  float* us = gs + m * cb;
  // NOTE: n0 is a multiple of 16 (row_begin_ and cb are), so columns [n0, n1) are whole panels:
  // the sub-matrix starting at panel n0 / 16.
  const int64_t skip = n0 / kPanelCols * static_cast<int64_t>(packed_panel_bytes(pf, H));
  packed_gemm_prepared(xacts_[ai], sg.expert(e) + skip, n1 - n0, gs, cb, 0, n1 - n0, false);
  packed_gemm_prepared(xacts_[ai], su.expert(e) + skip, n1 - n0, us, cb, 0, n1 - n0, false);
  for (int64_t i = 0; i < m; ++i) {
    gate_rows(e, n0 + lo, gs + i * cb, us + i * cb, gs + i * cb, n1 - n0);
    to_bf16(gs + i * cb, hb_ + (p0 + i) * I + n0 + lo, n1 - n0);  // [P, I]
  }
}

void MoeLayer::down_rows_packed(int s, int copy, int64_t r0, int64_t r1, float* acc, int ith) {
  const ProjStore& sd = store_[2][copy];
  if (sd.k == 0) return;
  const int64_t H = shape_.H, A = plan_.num_active(), w = r1 - r0;
  float* y = scr_ + ith * scr_floats_;  // [m, w]
  for (int64_t a = 0; a < plan_.num_active(); ++a) {
    wait_ready(a);
    const int64_t p0 = plan_.offset[a], m = plan_.offset[a + 1] - p0;
    // NOTE: r0 is a multiple of 16: rows [r0, r1) of down are the sub-matrix from panel r0 / 16.
    const uint8_t* sub = sd.expert(plan_.active[a]) + r0 / kPanelCols * packed_panel_bytes(packed_format(backend_), sd.k);
    packed_gemm_prepared(hacts_[s * A + a], sub, w, y, w, 0, w, false);
    for (int64_t i = 0; i < m; ++i) {
      float* dst = acc + plan_.tok[p0 + i] * H + r0;  // [tc, H]
      const float wt = plan_.wt[p0 + i];
      const float* src = y + i * w;
      for (int64_t r = 0; r < w; ++r) dst[r] += wt * src[r];
    }
  }
}

}  // namespace ktrans
