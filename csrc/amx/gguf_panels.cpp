// GGUF K-quant rows (q4_K, q5_K, q6_K) straight into bf16 panels (packed/packed.h layout): the
// expansion the gguf MoE backend's GEMM path pays for every big expert in every chunk
// (moe_gguf_gemm.cpp), and the load of GGUF experts into amx_bf16.
//
// The reference (pack_rows_gguf's row path) dequantizes each row to f32 in a scratch buffer and
// then packs 16 such rows, rounding to bf16 with integer arithmetic. Here each super-block of 16
// rows goes through registers only: per row and 32 k, the values are computed as the dequantizer
// computes them (scale products, and q4_K/q5_K's min, as separate rounded f32 operations), rounded
// to bf16 pair-words by vcvtne2ps2bf16, staged [sub-block][row], and every 32 k of the 16 rows is
// then one 16 x 16 word transpose into 16 panel lines. Bytes are the reference's exactly.
// NOTE (rounding): vcvtne2ps2bf16 rounds to nearest even like the reference and keeps NaN quiet
// the same way, but flushes f32 denormals, which cannot occur here: every value is an fp16 scale
// (a multiple of 2^-24) times small integers, so a non-zero one is at least 2^-24 in magnitude.
#include <immintrin.h>

#include <cstring>

#include "packed/pack_impl.h"
#include "quant/quant.h"

KTRANS_TARGET_AMX_BEGIN
#include "packed/transpose16.h"
#include "quant/q6k_levels.h"
namespace ktrans {
namespace {

using namespace packed;

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
// NOTE: explicit rounding, so the compiler cannot contract mul and sub into one FMA (one rounding
// instead of the reference's two).
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_round_ps(a, b, kRound); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_round_ps(a, b, kRound); }
inline __m512 u8_ps(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)); }
inline __m512 i8_ps(__m128i b) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 32 values (k 0..31 in order, as two halves) -> 16 bf16 pair-words (k 2j | k 2j+1 << 16).
inline __m512i pair_words(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

// stage [8 sub-blocks of 32 k][16 rows] pair-words -> the 8 x 16 panel lines of one super-block.
inline void stage_to_panel(const __m512i* stage, uint8_t* dst) {
  for (int j = 0; j < kQK_K / 32; ++j) transpose16(stage + j * kPanelCols, dst + j * kPanelCols * kLine);
}

// q4_K / q5_K: sub-block j (32 values) = (d * sc[j]) * q - (dmin * m[j]); q = the low (even j) or
// high (odd j) nibbles of qs[32 (j / 2) ..], plus bit j of qh[l] as bit 4 for q5_K.
template <class Block, bool kQh>
void panel_k45(const uint8_t* W, int64_t row_bytes, int64_t K, uint8_t* panel) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
  __m512i stage[8 * kPanelCols];
  for (int64_t s = 0; s < K / kQK_K; ++s) {
    for (int c = 0; c < kPanelCols; ++c) {
      const Block& b = reinterpret_cast<const Block*>(W + c * row_bytes)[s];
      alignas(16) uint8_t sm[16];
      unpack_scales_mins_k4(b.scales, sm);
      // sc[j] = d * scale j, sc[8 + j] = dmin * min j: one rounded product each, as the reference
      alignas(64) float sc[16];
      const __m512 dd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(_cvtsh_ss(b.d)), _mm512_set1_ps(_cvtsh_ss(b.dmin)));
      _mm512_store_ps(sc, mul(dd, u8_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(sm)))));
      __m256i qh = _mm256_setzero_si256();
      if constexpr (kQh) qh = load256(b.qh);
      for (int j = 0; j < 8; ++j) {
        const __m256i q = load256(b.qs + 32 * (j / 2));
        __m256i v = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(q, 4) : q, low4);
        if constexpr (kQh) v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, j), one), 4));
        const __m512 dl = _mm512_set1_ps(sc[j]), ml = _mm512_set1_ps(sc[8 + j]);
        stage[j * kPanelCols + c] = pair_words(sub(mul(dl, u8_ps(_mm256_castsi256_si128(v))), ml),
                                               sub(mul(dl, u8_ps(_mm256_extracti128_si256(v, 1))), ml));
      }
    }
    stage_to_panel(stage, panel + s * (kQK_K / 32) * kPanelCols * kLine);
  }
}

// q6_K: group g (16 values) = (d * scale[g]) * (q - 32), q = 4 low bits | 2 high bits << 4.
void panel_q6_k(const uint8_t* W, int64_t row_bytes, int64_t K, uint8_t* panel) {
  const __m256i off = _mm256_set1_epi8(32);
  __m512i stage[8 * kPanelCols];
  for (int64_t s = 0; s < K / kQK_K; ++s) {
    for (int c = 0; c < kPanelCols; ++c) {
      const BlockQ6_K& b = reinterpret_cast<const BlockQ6_K*>(W + c * row_bytes)[s];
      alignas(64) float sc[16];  // d * scale g, one rounded product each
      _mm512_store_ps(sc, mul(_mm512_set1_ps(_cvtsh_ss(b.d)), i8_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales)))));
      __m256i lv[8];
      q6k_levels(b, lv);
      for (int j = 0; j < 8; ++j) {  // values 32 j .. + 31: groups 2j, 2j + 1
        const __m256i q = _mm256_sub_epi8(lv[j], off);
        stage[j * kPanelCols + c] = pair_words(mul(_mm512_set1_ps(sc[2 * j]), i8_ps(_mm256_castsi256_si128(q))),
                                               mul(_mm512_set1_ps(sc[2 * j + 1]), i8_ps(_mm256_extracti128_si256(q, 1))));
      }
    }
    stage_to_panel(stage, panel + s * (kQK_K / 32) * kPanelCols * kLine);
  }
}

RegisterKernel<PackPanelGgufFn> reg_q4_k(k_pack_panel_gguf_bf16[qi(QType::q4_k)], Isa::amx,
                                         panel_k45<BlockQ4_K, false>);
RegisterKernel<PackPanelGgufFn> reg_q5_k(k_pack_panel_gguf_bf16[qi(QType::q5_k)], Isa::amx,
                                         panel_k45<BlockQ5_K, true>);
RegisterKernel<PackPanelGgufFn> reg_q6_k(k_pack_panel_gguf_bf16[qi(QType::q6_k)], Isa::amx, panel_q6_k);

}  // namespace
}  // namespace ktrans
KTRANS_TARGET_END
