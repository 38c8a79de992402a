// AMX packed_gemm for bf16, int8 and int4 panels, the large-M (prefill) path; M below the
// per-format thresholds (kAmxMinRows*) goes to the AVX-512 kernels.
//
// Tiles (one config for all formats, every tile 16 rows x 64 bytes): tmm0-3 = a 2x2 block of C
// (32 rows x 32 columns, f32 or int32), tmm4-5 = two A tiles (16 rows of x each), tmm6-7 = two B
// tiles. A packed panel line IS a B tile row, so panel p's k-block kb is the 1 KB at
// panel + kb * 1024 and B tiles load with a 64-byte stride. A (x, or for int8 its per-row
// quantization) is copied once per call into the same kind of 1 KB tiles (block_a).
// Blocking (see drive): super-blocks of 256 columns x chunks of 256 rows x K slices, so the B
// and A blocks in use stay in L2; B is read from memory once per row chunk, A once per
// super-block.
// NOTE: 1x4 passes for row blocks of <= 16 rows (one A tile reused by four B tiles, 1.25 tile
// loads per TDP instead of 1.5) measured 0.82-0.89x of the 1x2 passes at M 8-16 on one core
// (2026-12-08): there the product is bound by the B stream from L3, which four concurrent panel
// streams fetch worse than two; they are not used.
// int4: each super-block is first expanded to a bf16 panel in a thread-local buffer (q * scale,
// rounded to bf16) and then runs as bf16, so the group scales cost nothing inside the tile loop
// and x stays bf16 (more exact than the int8-activation reference; tests bound the difference).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/numeric.h"
#include "packed/kernels.h"
#include "packed/layout.h"

KTRANS_TARGET_AMX_BEGIN
namespace ktrans {
namespace {

using namespace packed;

// Below these M the AVX-512 kernels are faster (measured at N 2048, K 7168, one core): they
// stream the weights at memory speed up to 4 (bf16) / 8 (int8) rows per pass, then turn
// compute-bound (bf16 from 5 rows: one vdpbf16ps per line and row); int4 pays for expanding each
// super-block to bf16, which needs more rows to amortize.
constexpr int64_t kAmxMinRowsBf16 = 8;
constexpr int64_t kAmxMinRows = 16;
constexpr int64_t kAmxMinRowsInt4 = 24;
constexpr int64_t kTileBytes = 1024;       // one B tile: 16 rows x 64 bytes
constexpr int64_t kSuperPanels = 16;       // panels per super-block (256 columns)
constexpr int64_t kChunkRows = 256;        // rows per M chunk
constexpr int64_t kSliceKb = 32;           // k-blocks per K slice (B block = 16 panels x 32 KB)
// k-blocks per piece (A piece 16 KB, in L1); bf16 tiles from kWideChunkRows rows on: 16 (half
// the C tile spills per k, A piece 32 KB). NOTE: measured on one core (2026-12-07, each build in
// its own process, alternating, best of 4-6, four runs; qwen3 and dsv3 gate+up and down): bf16 at
// M 128-256 1.03-1.28x in 23 of 24 cases (0.96x once), M 64 within the noise (0.91-1.20x, as
// for identical code), int4 (expanded to bf16 tiles) at M 256 0.96-1.05x; int8 with 16 moved
// 0.79-1.16x between runs, so it keeps 8.
constexpr int64_t kKChunk = 8, kKChunkWide = 16, kWideChunkRows = 128;
constexpr int64_t kPrefetchMinKb = 112;    // panels of >= 112 KB (bf16 K >= 3584): B from L3/DRAM

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void load_tile_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // NOTE: GCC does not treat ldtilecfg as a read of cfg and may sink the stores above below it
  // (seen: a #GP from a half-written config once the tile loops inlined differently); the
  // compiler barrier keeps them first.
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

#define KT_TDP(d, a, b)            \
  if constexpr (kInt8)             \
    _tile_dpbssd(d, a, b);         \
  else                             \
    _tile_dpbf16ps(d, a, b)

// Software prefetch (into L2) of B tile kb of the next piece of each panel: the row block that
// reads B first (from L3/DRAM) asks for the next piece of its panels while it multiplies this one.
inline void prefetch_tile(const uint8_t* t) {
  for (int l = 0; l < 16; ++l) _mm_prefetch(reinterpret_cast<const char*>(t + l * 64), _MM_HINT_T1);
}

// C (32 x 32, row stride 128 bytes) = A block x B panels over nkb k-blocks, all in tiles. The A
// block is blocked (block_a): k-block kb of its rows 0-15 is the 1 KB at a + kb * 2048, rows
// 16-31 the next 1 KB. Panel 1 lies bs bytes after panel 0; the first npf k-blocks also
// prefetch the tiles nkb k-blocks further on.
template <bool kInt8, int MT, int NT>
void tile_block(const uint8_t* a, const uint8_t* b0, int64_t bs, int64_t nkb, uint8_t* c, bool load_c, int64_t npf) {
  const uint8_t* b1 = b0 + bs;
  if (load_c) {
    _tile_loadd(0, c, 128);
    if constexpr (NT == 2) _tile_loadd(1, c + 64, 128);
    if constexpr (MT == 2) _tile_loadd(2, c + 16 * 128, 128);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, c + 16 * 128 + 64, 128);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
  // NOTE: B tiles load with the streaming hint (tileloaddt1): each is used once per 32-row block,
  // so keeping it out of L1 leaves L1 to the A chunk that every panel pair re-reads.
  for (int64_t kb = 0; kb < nkb; ++kb) {
    if (kb < npf) {
      prefetch_tile(b0 + (nkb + kb) * kTileBytes);
      if constexpr (NT == 2) prefetch_tile(b1 + (nkb + kb) * kTileBytes);
    }
    _tile_stream_loadd(6, b0 + kb * kTileBytes, 64);
    _tile_loadd(4, a + kb * 2 * kTileBytes, 64);
    KT_TDP(0, 4, 6);
    if constexpr (NT == 2) {
      _tile_stream_loadd(7, b1 + kb * kTileBytes, 64);
      KT_TDP(1, 4, 7);
    }
    if constexpr (MT == 2) {
      _tile_loadd(5, a + kb * 2 * kTileBytes + kTileBytes, 64);
      KT_TDP(2, 5, 6);
      if constexpr (NT == 2) KT_TDP(3, 5, 7);
    }
  }
  _tile_stored(0, c, 128);
  if constexpr (NT == 2) _tile_stored(1, c + 64, 128);
  if constexpr (MT == 2) _tile_stored(2, c + 16 * 128, 128);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c + 16 * 128 + 64, 128);
}
#undef KT_TDP

template <bool kInt8>
void run_block(int mt, int nt, const uint8_t* a, const uint8_t* b, int64_t bs, int64_t nkb, uint8_t* c, bool load_c,
               int64_t npf) {
  if (mt == 2 && nt == 2) return tile_block<kInt8, 2, 2>(a, b, bs, nkb, c, load_c, npf);
  if (mt == 2) return tile_block<kInt8, 2, 1>(a, b, bs, nkb, c, load_c, npf);
  if (nt == 2) return tile_block<kInt8, 1, 2>(a, b, bs, nkb, c, load_c, npf);
  tile_block<kInt8, 1, 1>(a, b, bs, nkb, c, load_c, npf);
}

// Row-major A (M rows of row_bytes, lda bytes apart) -> dst (blocked_bytes) as 32-row blocks of
// 64-byte k-slices,
// [m_block][kb][32 rows][64 bytes], rows past M zero. Tile loads then read 1 KB contiguously
// instead of 16 rows a power-of-two stride apart (which thrashes a few L1/L2 sets).
int64_t blocked_bytes(int64_t M, int64_t row_bytes) { return (M + 31) / 32 * (row_bytes / 64) * 2 * kTileBytes; }

void block_a(const uint8_t* src, int64_t lda, int64_t M, int64_t row_bytes, uint8_t* dst) {
  const int64_t nkb = row_bytes / 64, mb = (M + 31) / 32;
  for (int64_t m = 0; m < mb * 32; ++m) {
    uint8_t* d = dst + (m / 32) * nkb * 2 * kTileBytes + (m % 32) * 64;
    for (int64_t kb = 0; kb < nkb; ++kb)
      _mm512_storeu_si512(d + kb * 2 * kTileBytes,
                          m < M ? _mm512_loadu_si512(src + m * lda + kb * 64) : _mm512_setzero_si512());
  }
}

// One 32 x 32 C block into y: rows [m0, m0 + mv), panel columns masked to [n_begin, n_end);
// int8 blocks are int32 sums scaled by sw (per column, from the panel) * sx (per row).
struct Epilogue {
  float* y;
  int64_t ldy, n_begin, n_end;
  bool accumulate;
  const float* sx;  // int8 only
  void operator()(const uint8_t* c, int64_t m0, int64_t mv, int64_t n0, int nt, const float* const* sw) const {
    for (int t = 0; t < nt; ++t) {
      const int64_t c0 = n0 + t * kPanelCols;
      const __mmask16 mask = panel_col_mask(c0, n_begin, n_end);
      for (int64_t r = 0; r < mv; ++r) {
        const uint8_t* src = c + r * 128 + t * 64;
        __m512 v = sx ? _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(src)),
                                                    _mm512_loadu_ps(sw[t])),
                                      _mm512_set1_ps(sx[m0 + r]))
                      : _mm512_loadu_ps(src);
        float* yrow = y + (m0 + r) * ldy + c0;
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, yrow));
        _mm512_mask_storeu_ps(yrow, mask, v);
      }
    }
  }
};

// Three-level blocking: super-blocks of sb <= kSuperPanels panels (b_prep(ps, pe) prepares one
// and returns the base of its first panel; panels lie b_stride apart), chunks of kChunkRows rows,
// and K slices of kSliceKb k-blocks, so one slice's B block (<= 512 KB), the chunk's A block
// (<= 512 KB) and its C blocks (256 KB, in cbuf between slices) stay in L2 together. Inside,
// every 32-row block walks its slice in kKChunk pieces against each panel pair: the A piece
// (16-32 KB) is read from L1 by all pairs. Without the K slices A or B would be re-read from L3
// for every super-block / row block once M * K or N * K outgrows L2 (measured: bf16 at M 2048,
// K 7168 fell to half the M 512 rate).
template <bool kInt8, class BPrep>
void drive(int64_t M, int64_t nkb, int64_t p_begin, int64_t p_end, int64_t sb, int64_t b_stride, BPrep&& b_prep,
           const uint8_t* a, const Epilogue& epi, const uint8_t* meta_base, int64_t meta_stride) {
  constexpr int64_t kPairBytes = 32 * 128;  // one 32 x 32 C block
  uint8_t* cbuf = scratch(kScratchC, kChunkRows / 32 * kSuperPanels / 2 * kPairBytes);
  const int64_t kc = !kInt8 && M >= kWideChunkRows ? kKChunkWide : kKChunk;
  for (int64_t ps = p_begin; ps < p_end; ps += sb) {
    const int64_t pe = std::min(ps + sb, p_end), npairs = (pe - ps + 1) / 2;
    const uint8_t* b = b_prep(ps, pe);
    for (int64_t mc0 = 0; mc0 < M; mc0 += kChunkRows) {
      const int64_t mc1 = std::min(mc0 + kChunkRows, M);
      // NOTE: with long panels (B of a super-block beyond L2, so it comes from L3/DRAM on every
      // call) and more than one row block to feed, the chunk's first row block prefetches the next
      // piece of its panels into L2 while it multiplies this one. Measured on one core (dsv3 gate
      // + up, bf16): M 64 0.76 -> 0.93 TFLOP/s; at M <= 32 the hardware streamers do as well.
      const bool prefetch = nkb >= kPrefetchMinKb && mc1 - mc0 > 32;
      for (int64_t ks = 0; ks < nkb; ks += kSliceKb) {
        const int64_t ke = std::min(ks + kSliceKb, nkb);
        for (int64_t m0 = mc0; m0 < mc1; m0 += 32) {
          const int mt = M - m0 > 16 ? 2 : 1;
          const uint8_t* am = a + (m0 / 32) * nkb * 2 * kTileBytes;
          uint8_t* cm = cbuf + (m0 - mc0) / 32 * npairs * kPairBytes;
          for (int64_t k0 = ks; k0 < ke; k0 += kc) {
            const int64_t nk = std::min(kc, ke - k0);
            const int64_t npf = prefetch && m0 == mc0 ? std::min(nk, nkb - k0 - nk) : 0;
            for (int64_t p = ps; p < pe; p += 2)
              run_block<kInt8>(mt, p + 1 < pe ? 2 : 1, am + k0 * 2 * kTileBytes,
                               b + (p - ps) * b_stride + k0 * kTileBytes, b_stride, nk,
                               cm + (p - ps) / 2 * kPairBytes, k0 > 0, npf);
          }
        }
      }
      for (int64_t m0 = mc0; m0 < mc1; m0 += 32)
        for (int64_t p = ps; p < pe; p += 2) {
          const int nt = p + 1 < pe ? 2 : 1;
          const float* sw[2] = {nullptr, nullptr};
          if (meta_base)
            for (int t = 0; t < nt; ++t) sw[t] = reinterpret_cast<const float*>(meta_base + (p + t) * meta_stride);
          epi(cbuf + ((m0 - mc0) / 32 * npairs + (p - ps) / 2) * kPairBytes, m0, std::min<int64_t>(32, M - m0),
              p * kPanelCols, nt, sw);
        }
    }
  }
}

void run_bf16(const uint8_t* a, int64_t M, int64_t K, const uint8_t* packed, float* y, int64_t ldy, int64_t n_begin,
              int64_t n_end, bool accumulate) {
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::bf16, K));
  load_tile_config();
  Epilogue epi{y, ldy, n_begin, n_end, accumulate, nullptr};
  drive<false>(M, K / 32, n_begin / kPanelCols, (n_end + kPanelCols - 1) / kPanelCols, kSuperPanels, pb,
               [&](int64_t ps, int64_t) { return packed + ps * pb; }, a, epi, nullptr, 0);
  _tile_release();
}

// a: blocked int8 activations followed by their M f32 row scales (prepare_acts).
void run_int8(const uint8_t* a, int64_t M, int64_t K, const uint8_t* packed, float* y, int64_t ldy, int64_t n_begin,
              int64_t n_end, bool accumulate) {
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::int8, K)), kp = int8_kpad(K);
  const float* sx = reinterpret_cast<const float*>(a + blocked_bytes(M, kp));
  load_tile_config();
  Epilogue epi{y, ldy, n_begin, n_end, accumulate, sx};
  drive<true>(M, kp / 64, n_begin / kPanelCols, (n_end + kPanelCols - 1) / kPanelCols, kSuperPanels, pb,
              [&](int64_t ps, int64_t) { return packed + ps * pb; }, a, epi, packed + int8_data_bytes(K), pb);
  _tile_release();
}

// int4 panel -> bf16 panel (packed/packed.h layouts). Output line (k pair 2j, 2j+1 of a group
// line) lane 2c + jj (f32, c < 8; c + 8 in the second half) is the nibble of input byte
// 4c + 2j + jj: vpermw puts word 2c + j (both bytes) in each lane, a per-lane shift (0 / 8, plus 4
// for the high nibbles) and a mask leave the nibble n, and or-ing in the exponent of 2^23 makes
// the float 2^23 + n exactly, so q = that - (2^23 + 8) with no int -> float conversion. Then
// q * scale and one round to bf16 per pair of halves: the same values as the reference's
// cvt(q) * scale, bit for bit. Measured on one core: see docs/amx.md.
void int4_panel_to_bf16(const uint8_t* src, int64_t K, uint8_t* dst) {
  const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  // word index (2c + j) in the low word of dword lane 2c + jj, for the columns of each half
  const __m512i w_idx[2][2] = {{_mm512_slli_epi32(_mm512_slli_epi32(lo_idx, 1), 0),
                                _mm512_add_epi32(_mm512_slli_epi32(lo_idx, 1), _mm512_set1_epi32(1))},
                               {_mm512_slli_epi32(hi_idx, 1),
                                _mm512_add_epi32(_mm512_slli_epi32(hi_idx, 1), _mm512_set1_epi32(1))}};
  const __m512i shift = _mm512_set_epi32(8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0);
  const __m512i shift_hi = _mm512_add_epi32(shift, _mm512_set1_epi32(4));
  const __m512i nib = _mm512_set1_epi32(0x0f), magic = _mm512_set1_epi32(0x4B000000);
  const __m512 bias = _mm512_set1_ps(8388608.0f + 8.0f);
  const uint8_t* scales = src + int4_data_bytes(K);
  auto half = [&](__m512i w, int h, int j, __m512i sh, __m512 s) {
    const __m512i n = _mm512_srlv_epi32(_mm512_permutexvar_epi16(w_idx[h][j], w), sh);
    const __m512 f = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(n, nib, magic, 0xEA));  // (n & nib) | magic
    return _mm512_mul_ps(_mm512_sub_ps(f, bias), s);
  };
  for (int64_t g = 0; g < K / kInt4Group; ++g) {
    const __m256i sb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kPanelCols * 2));
    const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sb), 16));
    const __m512 s_lo = _mm512_permutexvar_ps(lo_idx, s), s_hi = _mm512_permutexvar_ps(hi_idx, s);
    for (int64_t l = 0; l < 4; ++l) {
      const __m512i w = _mm512_loadu_si512(src + (g * 4 + l) * kLine);
      uint8_t* out = dst + (g * 16 + l * 4) * kLine;  // bf16 lines of k = 32g + 8l .. 32g + 8l + 7
      for (int o = 0; o < 4; ++o) {  // o = 0, 1: low nibbles (k pairs 0-1, 2-3); 2, 3: high (4-5, 6-7)
        const __m512i sh = o < 2 ? shift : shift_hi;
        const __m512 f_lo = half(w, 0, o & 1, sh, s_lo), f_hi = half(w, 1, o & 1, sh, s_hi);
        _mm512_storeu_si512(out + o * kLine, (__m512i)_mm512_cvtne2ps_pbh(f_hi, f_lo));
      }
    }
  }
}

void run_int4(const uint8_t* a, int64_t M, int64_t K, const uint8_t* packed, float* y, int64_t ldy, int64_t n_begin,
              int64_t n_end, bool accumulate) {
  const int64_t pb = static_cast<int64_t>(packed_panel_bytes(PackedFormat::int4, K));
  const int64_t pb16 = static_cast<int64_t>(packed_panel_bytes(PackedFormat::bf16, K));
  // NOTE: int4 super-blocks are expanded to bf16 whole, so they are sized to stay in L2 (~1 MB)
  // rather than kSuperPanels wide; the expansion is then paid once per call, not per row chunk.
  const int64_t sb = std::min<int64_t>(kSuperPanels, std::max<int64_t>(2, (1 << 20) / pb16 / 2 * 2));
  uint8_t* wbuf = scratch(kScratchB, sb * pb16);
  auto prep = [&](int64_t ps, int64_t pe) {
    for (int64_t p = ps; p < pe; ++p) int4_panel_to_bf16(packed + p * pb, K, wbuf + (p - ps) * pb16);
    return static_cast<const uint8_t*>(wbuf);
  };
  load_tile_config();
  Epilogue epi{y, ldy, n_begin, n_end, accumulate, nullptr};
  drive<false>(M, K / 32, n_begin / kPanelCols, (n_end + kPanelCols - 1) / kPanelCols, sb, pb16, prep, a, epi,
               nullptr, 0);
  _tile_release();
}

int64_t min_rows(PackedFormat f) {
  return f == PackedFormat::bf16 ? kAmxMinRowsBf16 : f == PackedFormat::int8 ? kAmxMinRows : kAmxMinRowsInt4;
}

// The plain entry points: below the threshold AVX-512, else prepare into scratch and run.
template <PackedFormat F>
void gemm_amx(const uint8_t* packed, int64_t N, int64_t K, const uint16_t* x, int64_t ldx, int64_t M, float* y,
              int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  if (M < min_rows(F))
    return packed_gemm_kernel(F).get(Isa::avx512)(packed, N, K, x, ldx, M, y, ldy, n_begin, n_end, accumulate);
  uint8_t* a = scratch(kScratchA, amx_acts_bytes(F, M, K));
  amx_prepare_acts(F, x, ldx, M, K, a);
  amx_gemm_prepared(F, a, M, K, packed, N, y, ldy, n_begin, n_end, accumulate);
}

RegisterKernel<PackedGemmFn> reg_bf16(k_packed_gemm_bf16, Isa::amx, gemm_amx<PackedFormat::bf16>);
RegisterKernel<PackedGemmFn> reg_int8(k_packed_gemm_int8, Isa::amx, gemm_amx<PackedFormat::int8>);
RegisterKernel<PackedGemmFn> reg_int4(k_packed_gemm_int4, Isa::amx, gemm_amx<PackedFormat::int4>);

}  // namespace

namespace packed {

int64_t amx_acts_bytes(PackedFormat f, int64_t M, int64_t K) {
  if (M < min_rows(f)) return 0;
  if (f != PackedFormat::int8) return blocked_bytes(M, K * 2);
  return blocked_bytes(M, int8_kpad(K)) + (M * 4 + 63) / 64 * 64;
}

void amx_prepare_acts(PackedFormat f, const uint16_t* x, int64_t ldx, int64_t M, int64_t K, uint8_t* buf) {
  if (f != PackedFormat::int8) return block_a(reinterpret_cast<const uint8_t*>(x), ldx * 2, M, K * 2, buf);
  const int64_t kp = int8_kpad(K);
  int8_t* q = reinterpret_cast<int8_t*>(scratch(kScratchB, M * kp));
  quantize_rows_avx512(x, ldx, M, K, kp, q, reinterpret_cast<float*>(buf + blocked_bytes(M, kp)), nullptr, 0);
  block_a(reinterpret_cast<const uint8_t*>(q), kp, M, kp, buf);
}

void amx_gemm_prepared(PackedFormat f, const uint8_t* a, int64_t M, int64_t K, const uint8_t* packed, int64_t,
                       float* y, int64_t ldy, int64_t n_begin, int64_t n_end, bool accumulate) {
  switch (f) {
    case PackedFormat::bf16: return run_bf16(a, M, K, packed, y, ldy, n_begin, n_end, accumulate);
    case PackedFormat::int8: return run_int8(a, M, K, packed, y, ldy, n_begin, n_end, accumulate);
    case PackedFormat::int4: return run_int4(a, M, K, packed, y, ldy, n_begin, n_end, accumulate);
  }
}

}  // namespace packed
}  // namespace ktrans
KTRANS_TARGET_END
