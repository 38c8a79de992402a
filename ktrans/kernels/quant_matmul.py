"""y = x · Wᵀ with W kept in its stored format on the GPU: GGUF q8_0, q4_k, q5_k, q6_k, and
DeepSeek's FP8 (e4m3) with one f32 scale per 128 x 128 block.

Layout ("packed"): each GGUF block's fields, split into one tensor per field so that a tile of
rows loads with plain strided loads; the quantized values keep their stored bits and order.
Per row of K values (nb = K / 256 super-blocks, K / 32 blocks for q8_0):
- q8_0: qs int8 [N, K], d f16 [N, K/32]                                        (34 bytes / 32, as stored)
- q4_k: qs u8 [N, K/2] as stored (per 64 values: 32 bytes, low nibbles = values 0..31, high =
  32..63), sc u8 [N, K/32] and m u8 [N, K/32] (the 6-bit scales and mins unpacked),
  d and dmin f16 [N, nb]                                                      (148 bytes / 256; stored 144)
- q5_k: q4_k's fields plus qh u8 [N, K/8] as stored (bit g of byte j: 5th bit of value 32g + j)
                                                                              (180 bytes / 256; stored 176)
- q6_k: ql u8 [N, K/2] and qh u8 [N, K/4] as stored, sc int8 [N, K/16], d f16 [N, nb]
                                                                              (210 bytes / 256, as stored)
- f8_e4m3: w u8 [N, K] (the FP8 bits as stored), s f32 [ceil(N/128), ceil(K/128)] (weight_scale_inv)
Dequantization is llama.cpp's (and gguf-py's), in f32 and in the same order, so `dequantize`
here is bit-exact against gguf-py: q4_k/q5_k w = (d·sc)·q − dmin·m; q6_k w = (d·sc)·(q − 32);
q8_0 w = d·q; FP8 w = e4m3(bits)·s (decoded with integer ops: bit-exact vs torch's float8_e4m3fn;
e4m3fn's NaN pattern is not special-cased, DeepSeek's weights hold none).

The kernel: grid (M tiles, N tiles, K splits); each program walks its share of super-blocks,
dequantizes a whole [BN, 256] super-block tile in registers (every value's byte, bits and scales
addressed from its index; rounded to x's dtype, as a dense bf16 weight would be) and
accumulates one tl.dot with the matching [BM, 256] slice of x in f32. Decode (small M) uses narrow N tiles and splits K only for narrow outputs, summing the
partial products with one torch reduction (deterministic: no atomics, so a CUDA graph replays
bit-identically); prefill (large M) uses larger M/N tiles and no split.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

FORMATS = {"q8_0": 0, "q4_k": 1, "q5_k": 2, "q6_k": 3, "f8_e4m3": 4}
FP8_BLOCK = 128
QK = 256        # values per K-quant super-block (and per kernel step for every format)


# ---- packing (at load on the host; on the GPU for streamed expert blocks) ---------------------

def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's get_scale_min_k4 over every block: s [..., 12] u8 -> (sc, m) each [..., 8] u8."""
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], -1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], -1)
    return sc, m


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over `a` (e.g. a read-only view of a mapped weight file): the fields packed from it
    are only ever read."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _f16(a: torch.Tensor) -> torch.Tensor:
    """[..., 2] u8 (little-endian f16 bits) -> [...] float16."""
    return a.contiguous().view(torch.float16)[..., 0]


def pack(qtype: str, data, n: int, k: int, scale: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Stored bytes of an [n, k] tensor (uint8 numpy array or torch tensor, [n, row bytes] or flat)
    -> packed tensors, on the tensor's device (numpy: the CPU); FP8 also takes its f32 block
    scales [ceil(n/128), ceil(k/128)]."""
    if qtype not in FORMATS:
        raise ValueError(f"no GPU kernel for {qtype}; formats: {', '.join(FORMATS)}")
    if k % QK:
        raise ValueError(f"{qtype} on the GPU needs rows of a multiple of {QK} values, got {k}")
    if qtype == "f8_e4m3":
        grid = (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        if scale is None or tuple(scale.shape) != grid:
            raise ValueError(f"f8_e4m3 needs its block scales of shape {list(grid)}, got "
                             f"{None if scale is None else list(scale.shape)}")
        return {"w": torch.from_numpy(np.array(data, dtype=np.uint8).reshape(n, k)),     # owned: no mmap alias
                "s": torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))}
    nb = k // QK
    size = {"q8_0": 34 * 8, "q4_k": 144, "q5_k": 176, "q6_k": 210}[qtype]
    if isinstance(data, np.ndarray):
        data = _readonly_tensor(np.ascontiguousarray(data, dtype=np.uint8))
    b = data.reshape(n, nb, size)
    t = lambda a: a.contiguous().reshape(n, -1)  # noqa: E731
    if qtype == "q8_0":
        blocks = b.reshape(n, nb * 8, 34)
        return {"qs": t(blocks[..., 2:].view(torch.int8)), "d": t(_f16(blocks[..., 0:2]))}
    if qtype == "q6_k":
        return {"ql": t(b[..., 0:128]), "qh": t(b[..., 128:192]), "sc": t(b[..., 192:208].view(torch.int8)),
                "d": t(_f16(b[..., 208:210]))}
    sc, m = _scale_min_k4(b[..., 4:16])
    out = {"d": t(_f16(b[..., 0:2])), "dmin": t(_f16(b[..., 2:4])), "sc": t(sc), "m": t(m)}
    if qtype == "q5_k":
        out["qh"], out["qs"] = t(b[..., 16:48]), t(b[..., 48:176])
    else:
        out["qs"] = t(b[..., 16:144])
    return out


def dequantize(qtype: str, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Packed fields -> float32 [N, K], in torch (the kernel's oracle; bit-exact vs gguf-py)."""
    f = lambda a: a.to(torch.float32)  # noqa: E731
    if qtype == "f8_e4m3":
        w, sc = f(p["w"].view(torch.float8_e4m3fn)), p["s"]
        grid = sc.repeat_interleave(FP8_BLOCK, 0)[:w.shape[0]].repeat_interleave(FP8_BLOCK, 1)[:, :w.shape[1]]
        return w * grid
    if qtype == "q8_0":
        n = p["qs"].shape[0]
        return (f(p["d"])[:, :, None] * f(p["qs"]).view(n, -1, 32)).reshape(n, -1)
    if qtype == "q6_k":
        n, nb = p["d"].shape
        ql, qh = p["ql"].view(n, nb, 2, 2, 32).long(), p["qh"].view(n, nb, 2, 1, 32).long()   # half, pair
        lo = torch.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], 3)
        hi = torch.stack([(qh[..., 0, :] >> (2 * g)) & 3 for g in range(4)], 3)
        q = f((lo | (hi << 4)) - 32).view(n, nb, 2, 4, 2, 16)                    # .., group, 16-run
        s = f(p["sc"]).view(n, nb, 2, 4, 2, 1)
        return ((f(p["d"])[:, :, None, None, None, None] * s) * q).reshape(n, -1)
    n, nb = p["d"].shape
    qs = p["qs"].view(n, nb, 4, 1, 32).long()
    q = torch.cat([qs & 15, qs >> 4], 3)                                          # [n, nb, 4, 2, 32]
    if qtype == "q5_k":
        qh = p["qh"].view(n, nb, 1, 1, 32).long()
        bits = torch.stack([(qh[..., 0, 0, :] >> g) & 1 for g in range(8)], 2).view(n, nb, 4, 2, 32)
        q = q + 16 * bits
    scale = f(p["d"])[:, :, None] * f(p["sc"]).view(n, nb, 8)
    mins = f(p["dmin"])[:, :, None] * f(p["m"]).view(n, nb, 8)
    return (scale.view(n, nb, 4, 2, 1) * f(q) - mins.view(n, nb, 4, 2, 1)).reshape(n, -1)


# ---- the kernel --------------------------------------------------------------------------------

@triton.jit
def _e4m3(b):
    """FP8 e4m3fn bits (u8) -> f32: (8 + m)·2^(e-10), subnormals m·2^-9."""
    b = b.to(tl.int32)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (8.0 + m) * tl.exp2((e - 10).to(tl.float32)))
    return tl.where((b >> 7) != 0, -mag, mag)


@triton.jit
def _tile(A, B, C, D, E, F, rn, nmask, kb, K, FMT: tl.constexpr):
    """One super-block of BN rows dequantized: W[rn, kb*256 .. kb*256+255] -> [BN, 256] f32.
    Every value's byte, bits and scales are addressed from its index k, so a row's fields are
    read once each (repeated addresses within the tile are served by the cache)."""
    k = tl.arange(0, 256)[None, :]                                          # [1, 256]
    r = rn[:, None]
    m2 = nmask[:, None]
    g = k // 32                                                             # 32-value group
    nb = K // 256
    if FMT == 0:      # q8_0: int8 values, an f16 scale per 32
        q = tl.load(A + r * K + kb * 256 + k, mask=m2, other=0).to(tl.float32)
        d = tl.load(B + r * (K // 32) + kb * 8 + g, mask=m2, other=0.0).to(tl.float32)
        w = d * q
    elif FMT == 4:    # FP8 e4m3, an f32 scale per 128 x 128 block
        q = tl.load(A + r * K + kb * 256 + k, mask=m2, other=0)
        sc = tl.load(B + (r // 128) * tl.cdiv(K, 128) + (kb * 256 + k) // 128, mask=m2, other=0.0)
        w = sc * _e4m3(q)
    elif FMT == 3:    # q6_k: ql nibbles + qh 2-bit fields, an int8 scale per 16
        h = k // 128
        gi = (k % 128) // 32
        j = k % 32
        ql = tl.load(A + r * (K // 2) + kb * 128 + 64 * h + 32 * (gi % 2) + j, mask=m2, other=0).to(tl.int32)
        qh = tl.load(B + r * (K // 4) + kb * 64 + 32 * h + j, mask=m2, other=0).to(tl.int32)
        q = ((ql >> (4 * (gi // 2))) & 15) | (((qh >> (2 * gi)) & 3) << 4)
        sc = tl.load(C + r * (K // 16) + kb * 16 + 8 * h + 2 * gi + j // 16, mask=m2, other=0).to(tl.float32)
        d = tl.load(D + r * nb + kb, mask=m2, other=0.0).to(tl.float32)
        w = (d * sc) * (q.to(tl.float32) - 32.0)
    else:             # q4_k / q5_k: per 64 values, 32 bytes: low nibbles first, then high nibbles
        qs = tl.load(A + r * (K // 2) + kb * 128 + (k // 64) * 32 + k % 32, mask=m2, other=0).to(tl.int32)
        q = (qs >> (4 * (g % 2))) & 15
        if FMT == 2:
            qh = tl.load(F + r * (K // 8) + kb * 32 + k % 32, mask=m2, other=0).to(tl.int32)
            q += ((qh >> g) & 1) << 4
        sc = tl.load(B + r * (K // 32) + kb * 8 + g, mask=m2, other=0).to(tl.float32)
        mn = tl.load(C + r * (K // 32) + kb * 8 + g, mask=m2, other=0).to(tl.float32)
        d = tl.load(D + r * nb + kb, mask=m2, other=0.0).to(tl.float32)
        dmin = tl.load(E + r * nb + kb, mask=m2, other=0.0).to(tl.float32)
        w = (d * sc) * q.to(tl.float32) - dmin * mn
    return w


# NOTE: M (and the split stride M*N) change with every batch; unspecialized, one compiled kernel
# per format and tile class serves them all instead of one per divisibility of M.
@triton.jit(do_not_specialize=["M", "s_pk"])
def _qmm_kernel(X, P, A, B, C, D, E, F, M, N, K, s_xm, s_pk, s_pm,
                FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    # A..F: the packed fields, per format: q8_0 (qs, d); q4_k (qs, sc, m, d, dmin); q5_k (qs, sc, m,
    # d, dmin, qh); q6_k (ql, qh, sc, d); f8_e4m3 (w, s). Every field is row-major [N, per-row count].
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    xm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = xm < M
    nmask = rn < N
    k = tl.arange(0, 256)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(pid_k, K // 256, SPLIT):
        x = tl.load(X + xm[:, None] * s_xm + kb * 256 + k[None, :], mask=mmask[:, None], other=0.0)   # [BM, 256]
        w = _tile(A, B, C, D, E, F, rn, nmask, kb, K, FMT)                                             # [BN, 256]
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    # SPLIT == 1 writes the result in x's dtype; split programs write f32 partial sums.
    tl.store(P + pid_k * s_pk + xm[:, None] * s_pm + rn[None, :], acc.to(P.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


# ---- decode: a GEMV over the stored blocks (M <= 8) ----------------------------------------------
#
# The tiled kernel above dequantizes every value from its own byte address and feeds tl.dot,
# which pays off for prefill tiles; for a decode step's few rows it leaves HBM mostly idle. Here
# each program reads whole rows' fields of one super-block with wide contiguous loads (q4_k: 128
# bytes of nibbles per row), multiplies the unpacked values by the matching slice of x (gathered
# once per super-block, shared by all rows of the program) and reduces per scale group, applying
# each group's scale (and min) once to the group's sum, as llama.cpp's vec_dot does. Products and
# sums are in f32; K is split across programs (partial sums added by one torch reduction).

@triton.jit
def _gemv_superblock(X, s_xm, BM: tl.constexpr, M, A, B, C, D, E, F, s_a, s_b, s_c, s_f, rn, nmask, kb,
                     FMT: tl.constexpr, BN: tl.constexpr):
    """[BM, BN] partial products of rows rn with x over super-block kb."""
    mm = tl.arange(0, BM)
    mmask = (mm < M)[:, None]
    r = rn[:, None]
    m2 = nmask[:, None]
    nb_d = kb                                             # d/dmin index within the row (x nb)
    if FMT == 0:      # q8_0: 256 int8 values and 8 f16 scales per super-block
        j = tl.arange(0, 256)
        q = tl.load(A + r * s_a + kb * 256 + j[None, :], mask=m2, other=0).to(tl.float32)        # [BN, 256]
        x = tl.load(X + mm[:, None] * s_xm + kb * 256 + j[None, :], mask=mmask, other=0.0).to(tl.float32)
        prod = tl.reshape(q[None, :, :] * x[:, None, :], (BM, BN, 8, 32))
        part = tl.sum(prod, 3)                                                                  # [BM, BN, 8]
        g = tl.arange(0, 8)
        d = tl.load(B + r * s_b + kb * 8 + g[None, :], mask=m2, other=0.0).to(tl.float32)       # [BN, 8]
        return tl.sum(part * d[None, :, :], 2)
    j = tl.arange(0, 128)
    c = j // 32
    b = j % 32
    if FMT == 3:      # q6_k: ql 128 bytes, qh 64 bytes, 16 int8 scales, d
        h = j // 64
        p = (j % 64) // 32
        ql = tl.load(A + r * s_a + kb * 128 + j[None, :], mask=m2, other=0).to(tl.int32)         # [BN, 128]
        qh = tl.load(B + r * s_b + kb * 64 + (32 * h + b)[None, :], mask=m2, other=0).to(tl.int32)
        q_lo = ((ql & 15) | (((qh >> (2 * p[None, :])) & 3) << 4)).to(tl.float32) - 32.0
        q_hi = ((ql >> 4) | (((qh >> (2 * p[None, :] + 4)) & 3) << 4)).to(tl.float32) - 32.0
        v_lo = 128 * h + 32 * p + b                                                             # value index
        x_lo = tl.load(X + mm[:, None] * s_xm + kb * 256 + v_lo[None, :], mask=mmask, other=0.0).to(tl.float32)
        x_hi = tl.load(X + mm[:, None] * s_xm + kb * 256 + (v_lo + 64)[None, :], mask=mmask, other=0.0).to(tl.float32)
        s_lo = tl.sum(tl.reshape(q_lo[None, :, :] * x_lo[:, None, :], (BM, BN, 8, 16)), 3)     # [BM, BN, 8]
        s_hi = tl.sum(tl.reshape(q_hi[None, :, :] * x_hi[:, None, :], (BM, BN, 8, 16)), 3)
        run = tl.arange(0, 8)                                                                   # 16-value run of j
        sc_lo = tl.load(C + r * s_c + kb * 16 + (run + 4 * (run // 4))[None, :], mask=m2, other=0).to(tl.float32)
        sc_hi = tl.load(C + r * s_c + kb * 16 + (run + 4 * (run // 4) + 4)[None, :], mask=m2, other=0).to(tl.float32)
        d = tl.load(D + rn * (s_c // 16) + nb_d, mask=nmask, other=0.0).to(tl.float32)          # [BN]
        return tl.sum(s_lo * sc_lo[None, :, :] + s_hi * sc_hi[None, :, :], 2) * d[None, :]
    # q4_k / q5_k: per 64 values 32 bytes of nibbles (low = first 32 values, high = next 32)
    qs = tl.load(A + r * s_a + kb * 128 + j[None, :], mask=m2, other=0).to(tl.int32)             # [BN, 128]
    q_lo = qs & 15
    q_hi = qs >> 4
    if FMT == 2:      # q5_k: bit g of qh byte b is the 5th bit of value 32 g + b
        qh = tl.load(F + r * s_f + kb * 32 + b[None, :], mask=m2, other=0).to(tl.int32)
        q_lo += ((qh >> (2 * c[None, :])) & 1) << 4
        q_hi += ((qh >> (2 * c[None, :] + 1)) & 1) << 4
    v_lo = 64 * c + b
    x_lo = tl.load(X + mm[:, None] * s_xm + kb * 256 + v_lo[None, :], mask=mmask, other=0.0).to(tl.float32)
    x_hi = tl.load(X + mm[:, None] * s_xm + kb * 256 + (v_lo + 32)[None, :], mask=mmask, other=0.0).to(tl.float32)
    s_lo = tl.sum(tl.reshape(q_lo.to(tl.float32)[None, :, :] * x_lo[:, None, :], (BM, BN, 4, 32)), 3)   # [BM, BN, 4]
    s_hi = tl.sum(tl.reshape(q_hi.to(tl.float32)[None, :, :] * x_hi[:, None, :], (BM, BN, 4, 32)), 3)
    xs_lo = tl.sum(tl.reshape(x_lo, (BM, 4, 32)), 2)                                            # [BM, 4]
    xs_hi = tl.sum(tl.reshape(x_hi, (BM, 4, 32)), 2)
    g = 2 * tl.arange(0, 4)                                                                      # even groups
    sc_lo = tl.load(B + r * s_b + kb * 8 + g[None, :], mask=m2, other=0).to(tl.float32)           # [BN, 4]
    sc_hi = tl.load(B + r * s_b + kb * 8 + g[None, :] + 1, mask=m2, other=0).to(tl.float32)
    mn_lo = tl.load(C + r * s_b + kb * 8 + g[None, :], mask=m2, other=0).to(tl.float32)
    mn_hi = tl.load(C + r * s_b + kb * 8 + g[None, :] + 1, mask=m2, other=0).to(tl.float32)
    d = tl.load(D + rn * (s_b // 8) + nb_d, mask=nmask, other=0.0).to(tl.float32)               # [BN]
    dmin = tl.load(E + rn * (s_b // 8) + nb_d, mask=nmask, other=0.0).to(tl.float32)
    qpart = tl.sum(s_lo * sc_lo[None, :, :] + s_hi * sc_hi[None, :, :], 2)                       # [BM, BN]
    mpart = tl.sum(xs_lo[:, None, :] * mn_lo[None, :, :] + xs_hi[:, None, :] * mn_hi[None, :, :], 2)
    return qpart * d[None, :] - mpart * dmin[None, :]


@triton.jit(do_not_specialize=["M", "s_pk"])
def _gemv_kernel(X, P, A, B, C, D, E, F, M, N, K, s_xm, s_pk, s_pm, s_a, s_b, s_c, s_f,
                 FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(pid_k, K // 256, SPLIT):
        acc += _gemv_superblock(X, s_xm, BM, M, A, B, C, D, E, F, s_a, s_b, s_c, s_f, rn, nmask, kb, FMT, BN)
    mm = tl.arange(0, BM)
    tl.store(P + pid_k * s_pk + mm[:, None] * s_pm + rn[None, :], acc.to(P.dtype.element_ty),
             mask=(mm < M)[:, None] & nmask[None, :])


GEMV_MAX_M = 8
_GEMV_FORMATS = ("q8_0", "q4_k", "q5_k", "q6_k")


def _gemv_shape(m: int, n: int, k: int, sm_count: int) -> tuple[int, int, int, int]:
    """(BM, BN, K splits, warps): rows of x padded to a power of two; enough programs to give
    every multiprocessor several (K split while super-blocks remain).
    NOTE: not yet tuned on the GPU (bench/gpu_qmm.py measures it)."""
    from ktrans.kernels import next_pow2

    bm = next_pow2(m)
    bn = 16 if bm <= 2 else 8
    tiles = -(-n // bn)
    split = 1
    while tiles * split < 4 * sm_count and split * 2 <= k // QK and split < 32:
        split *= 2
    return bm, bn, split, 4


def quant_gemv(x: torch.Tensor, qtype: str, packed: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    """quant_matmul for M <= GEMV_MAX_M rows of x (decode), GGUF formats."""
    m = x.shape[0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    bm, bn, split, warps = _gemv_shape(m, n, k, sms)
    out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    fields = [packed[f] for f in _FIELDS[qtype]]
    fields += [fields[0]] * (6 - len(fields))
    strides = [f.stride(0) for f in fields[:3]] + [fields[5].stride(0)]
    grid = (triton.cdiv(n, bn), split)
    _gemv_kernel[grid](x, out, *fields, m, n, k, x.stride(0), out.stride(0), out.stride(1), *strides,
                       FMT=FORMATS[qtype], BM=bm, BN=bn, SPLIT=split, num_warps=warps)
    return (out[0] if split == 1 else out.sum(0)).to(x.dtype)


_FIELDS = {"f8_e4m3": ("w", "s"), "q8_0": ("qs", "d"), "q4_k": ("qs", "sc", "m", "d", "dmin"), "q5_k": ("qs", "sc", "m", "d", "dmin", "qh"),
           "q6_k": ("ql", "qh", "sc", "d")}


def _tiles(m: int, n: int, k: int, sm_count: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, K splits, warps, stages) for an [m, k] x [k, n] product. A program holds an
    [BN, 256] f32 weight tile and a [BM, 256] slice of x in registers, so the tiles stay small;
    decode shapes split K only when the N tiles leave most of the GPU idle (a split costs two
    more launches: partial sums, then their sum).
    NOTE: sizes chosen for register budget, not yet tuned on the GPU (docs/benchmarks.md)."""
    if m <= 16:
        bm, bn, warps = 16, 32, 4
    elif m <= 64:
        bm, bn, warps = 64, 32, 8
    else:
        bm, bn, warps = 64, 64, 8
    tiles = -(-m // bm) * -(-n // bn)
    split = 1
    while tiles * split < sm_count // 2 and split * 2 <= k // QK // 2 and split < 16:
        split *= 2
    return bm, bn, split, warps, 2


def quant_matmul(x: torch.Tensor, qtype: str, packed: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    """x [M, K] (f32/bf16/f16, unit last stride) · Wᵀ -> [M, N] in x's dtype."""
    m = x.shape[0]
    if x.shape[-1] != k or x.stride(-1) != 1:
        raise ValueError(f"quant_matmul: x must be [M, {k}] with a unit last stride, got {tuple(x.shape)}")
    if m <= GEMV_MAX_M and qtype in _GEMV_FORMATS:
        return quant_gemv(x, qtype, packed, n, k)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 8
    bm, bn, split, warps, stages = _tiles(m, n, k, sms)
    out = torch.empty(split, m, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    fields = [packed[f] for f in _FIELDS[qtype]]
    fields += [fields[0]] * (6 - len(fields))                # unused pointer slots
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _qmm_kernel[grid](x, out, *fields, m, n, k, x.stride(0), out.stride(0), out.stride(1),
                      FMT=FORMATS[qtype], BM=bm, BN=bn, SPLIT=split, num_warps=warps, num_stages=stages)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
