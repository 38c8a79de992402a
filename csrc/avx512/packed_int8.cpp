// AVX-512 VNNI packed_gemm for int8 and int4 panels, the small-M (decode) path, and the per-row
// activation quantizer that the AMX int8 kernel shares.
//
// int8 layout: a panel line is one k quad of 16 columns (int8), so one vpdpbusd with the
// broadcast quad of row m's activations adds 4 products to each of the 16 column sums. vpdpbusd
// multiplies u8 x s8, so activations are stored as q + 128 and the extra 128 * sum_k w[n, k] is
// removed with the column sums packed after the data: y = (acc - 128 colsum) * sw[n] * sx[m].
// int4 layout: 4 lines per 32-group; the low / high nibbles of a line are two k quads, already the
// u8 operand (q + 8), with the signed activations as the s8 one; per group the integer sum loses
// 8 * sum(q_x over the group) and is scaled by the group's 16 bf16 scales in f32.
// Same integer sums as the reference; only the f32 scaling order differs (FMA per group).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/numeric.h"
#include "packed/kernels.h"
#include "packed/layout.h"

KTRANS_TARGET_AVX512_BEGIN
namespace ktrans {
namespace packed {

void quantize_rows_avx512(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, int64_t ldq, int8_t* q,
                          float* sx, int32_t* gsum, uint8_t xor_mask) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m128i xm = _mm_set1_epi8(static_cast<char>(xor_mask));
  auto load = [](const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  };
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * ldx;
    int8_t* qr = q + m * ldq;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) amax = _mm512_max_ps(amax, _mm512_and_ps(load(xr + k), abs_mask));
    const float a = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(act_inv_scale(a));
    sx[m] = act_scale(a);
    for (int64_t k = 0; k < K; k += 32) {
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(load(xr + k), inv));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(load(xr + k + 16), inv));
      if (gsum) gsum[m * (K / kInt4Group) + k / kInt4Group] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      _mm_storeu_si128((__m128i*)(qr + k), _mm_xor_si128(_mm512_cvtsepi32_epi8(q0), xm));
      _mm_storeu_si128((__m128i*)(qr + k + 16), _mm_xor_si128(_mm512_cvtsepi32_epi8(q1), xm));
    }
    std::memset(qr + K, xor_mask, ldq - K);
  }
}

}  // namespace packed

namespace {

using namespace packed;

constexpr int64_t kPrefetch = 1024;  // bytes ahead on each panel stream

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void store_cols(float* yrow, int64_t n0, __mmask16 mask, __m512 v, bool accumulate) {
  if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, yrow + n0));
  _mm512_mask_storeu_ps(yrow + n0, mask, v);
}

// Shared shape of both formats: panel pairs outer, rows in groups of up to kMaxRows inner (the
// pair stays in L2 while the groups re-read it); Body<MR, NT>::run does one group. int4 keeps
// 4 rows (two accumulator sets per row would not fit the 32 registers at 8).
template <template <int, int> class Body, int kMaxRows, class Ctx>
void for_blocks(const Ctx& ctx, const uint8_t* packed, int64_t pb, int64_t M, int64_t n_begin, int64_t n_end) {
  const int64_t p_end = (n_end + kPanelCols - 1) / kPanelCols;
  for (int64_t p = n_begin / kPanelCols; p < p_end; p += 2) {
    const uint8_t* panels[2] = {packed + p * pb, packed + (p + 1) * pb};
    const bool two = p + 1 < p_end;
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t mr = std::min<int64_t>(kMaxRows, M - m);
#define KT_CASE(R) \
  case R: two ? Body<R, 2>::run(ctx, panels, m, p * kPanelCols) : Body<R, 1>::run(ctx, panels, m, p * kPanelCols); break;
      switch (mr) {
        KT_CASE(1) KT_CASE(2) KT_CASE(3) KT_CASE(4)
        default:
          if constexpr (kMaxRows == 8) {
            switch (mr) { KT_CASE(5) KT_CASE(6) KT_CASE(7) KT_CASE(8) }
          }
      }
#undef KT_CASE
    }
  }
}

struct Ctx {
  int64_t K, ldq;
  const int8_t* q;
  const float* sx;
  const int32_t* gsum;  // int4 only
  float* y;
  int64_t ldy, n_begin, n_end;
  bool accumulate;
};

template <int MR, int NT>
struct Int8Body {
  static void run(const Ctx& c, const uint8_t* const* panels, int64_t m, int64_t n0) {
    __m512i acc[MR * NT];
    for (int i = 0; i < MR * NT; ++i) acc[i] = _mm512_setzero_si512();
    const int8_t* q = c.q + m * c.ldq;
    for (int64_t j = 0; j < c.ldq / 4; ++j) {
      __m512i xb[MR];
      for (int r = 0; r < MR; ++r) xb[r] = bcast4(q + r * c.ldq + 4 * j);
      for (int t = 0; t < NT; ++t) {
        const uint8_t* line = panels[t] + j * kLine;
        _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetch), _MM_HINT_T0);
        const __m512i w = _mm512_loadu_si512(line);
        for (int r = 0; r < MR; ++r) acc[r * NT + t] = _mm512_dpbusd_epi32(acc[r * NT + t], xb[r], w);
      }
    }
    for (int t = 0; t < NT; ++t) {
      const uint8_t* meta = panels[t] + int8_data_bytes(c.K);
      const __m512 sw = _mm512_loadu_ps(meta);
      const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512(meta + kLine), 7);  // 128 * colsum
      const int64_t c0 = n0 + t * kPanelCols;
      const __mmask16 mask = panel_col_mask(c0, c.n_begin, c.n_end);
      for (int r = 0; r < MR; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r * NT + t], off));
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(dot, sw), _mm512_set1_ps(c.sx[m + r]));
        store_cols(c.y + (m + r) * c.ldy, c0, mask, v, c.accumulate);
      }
    }
  }
};

template <int MR, int NT>
struct Int4Body {
  static void run(const Ctx& c, const uint8_t* const* panels, int64_t m, int64_t n0) {
    const __m512i nib = _mm512_set1_epi8(0x0f);
    const int64_t ng = c.K / kInt4Group;
    __m512 acc[MR * NT];
    for (int i = 0; i < MR * NT; ++i) acc[i] = _mm512_setzero_ps();
    const int8_t* q = c.q + m * c.ldq;
    for (int64_t g = 0; g < ng; ++g) {
      __m512i dot[MR * NT];
      for (int i = 0; i < MR * NT; ++i) dot[i] = _mm512_setzero_si512();
      for (int64_t l = 0; l < 4; ++l) {
        for (int t = 0; t < NT; ++t) {
          const uint8_t* line = panels[t] + (g * 4 + l) * kLine;
          _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetch), _MM_HINT_T0);
          const __m512i w = _mm512_loadu_si512(line);
          const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
          for (int r = 0; r < MR; ++r) {
            const int8_t* qk = q + r * c.ldq + g * kInt4Group + l * 8;
            dot[r * NT + t] = _mm512_dpbusd_epi32(dot[r * NT + t], lo, bcast4(qk));
            dot[r * NT + t] = _mm512_dpbusd_epi32(dot[r * NT + t], hi, bcast4(qk + 4));
          }
        }
      }
      for (int t = 0; t < NT; ++t) {
        const __m256i sb = _mm256_loadu_si256((const __m256i*)(panels[t] + int4_data_bytes(c.K) + g * 32));
        const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sb), 16));
        for (int r = 0; r < MR; ++r) {
          const __m512i corr = _mm512_set1_epi32(8 * c.gsum[(m + r) * ng + g]);
          acc[r * NT + t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r * NT + t], corr)), s,
                                            acc[r * NT + t]);
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      const int64_t c0 = n0 + t * kPanelCols;
      const __mmask16 mask = panel_col_mask(c0, c.n_begin, c.n_end);
      for (int r = 0; r < MR; ++r)
        store_cols(c.y + (m + r) * c.ldy, c0, mask, _mm512_mul_ps(acc[r * NT + t], _mm512_set1_ps(c.sx[m + r])),
                   c.accumulate);
    }
  }
};

void gemm_int8_avx512(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M,
                      float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const int64_t kp = int8_kpad(K);
  int8_t* q = reinterpret_cast<int8_t*>(scratch(kScratchA, M * kp + M * 4));
  float* sx = reinterpret_cast<float*>(q + M * kp);
  quantize_rows_avx512(x, ldx, M, K, kp, q, sx, nullptr, 0x80);
  const Ctx ctx{K, kp, q, sx, nullptr, y, ldy, n_begin, n_end, accumulate};
  for_blocks<Int8Body, 8>(ctx, packed, static_cast<int64_t>(packed_panel_bytes(PackedFormat::int8, K)), M, n_begin,
                       n_end);
}

void gemm_int4_avx512(const uint8_t* packed, int64_t, int64_t K, const uint16_t* x, int64_t ldx, int64_t M,
                      float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  const int64_t ng = K / kInt4Group;
  int8_t* q = reinterpret_cast<int8_t*>(scratch(kScratchA, M * K + M * 4 + M * ng * 4));
  float* sx = reinterpret_cast<float*>(q + M * K);
  int32_t* gsum = reinterpret_cast<int32_t*>(sx + M);
  quantize_rows_avx512(x, ldx, M, K, K, q, sx, gsum, 0);
  const Ctx ctx{K, K, q, sx, gsum, y, ldy, n_begin, n_end, accumulate};
  for_blocks<Int4Body, 4>(ctx, packed, static_cast<int64_t>(packed_panel_bytes(PackedFormat::int4, K)), M, n_begin,
                       n_end);
}

RegisterKernel<PackedGemmFn> reg_int8(k_packed_gemm_int8, Isa::avx512, gemm_int8_avx512);
RegisterKernel<PackedGemmFn> reg_int4(k_packed_gemm_int4, Isa::avx512, gemm_int4_avx512);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
