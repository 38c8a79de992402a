"""Rotary position embedding of [T, heads, d] in one kernel (torch runs 3-6 ops for it), in the
three pairings of ktrans.operators.rope, with torch's rounding:
- HALF (Llama/Qwen/Mixtral): y = x·cos + rotate_half(x)·sin, each product and the sum rounded
  to x's dtype as torch's ops on bf16 tensors round them;
- INTERLEAVE (DeepSeek-V3 rope_interleave): pairs (x[2i], x[2i+1]) rotated by cos/sin[i], output
  de-interleaved (first elements, then second elements), rounded the same way;
- COMPLEX (DeepSeek-V2): pairs as complex numbers times the complex table, in f32, rounded once
  (torch may contract the complex product into FMAs differently: last-bit differences).

One program per (token, block of heads); tables are per token (cos/sin [T, d], or the complex
table [T, d/2] read as (re, im) float pairs). The input may be a strided view (a split of a
wider projection); the output is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktrans.kernels import next_pow2

STYLES = {"half": 0, "interleave": 1, "complex": 2}


@triton.jit
def _r(x, dtype: tl.constexpr):
    """Round an f32 value to `dtype` and back (torch's rounding of one op's result)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope_kernel(X, Y, C, S, s_xt, s_xh, s_ct, H, HALF_D: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_P: tl.constexpr, STYLE: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                # [BH]
    p = tl.arange(0, BLOCK_P)                                                # pair index < d/2
    pm = p < HALF_D
    mask = (h[:, None] < H) & pm[None, :]
    dt = Y.dtype.element_ty
    row = X + t * s_xt + h[:, None] * s_xh
    out = Y + (t * H + h[:, None]) * (2 * HALF_D)
    if STYLE == 0:                        # pairs (i, i + d/2)
        a = tl.load(row + p[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(row + p[None, :] + HALF_D, mask=mask, other=0.0).to(tl.float32)
    else:                                 # pairs (2i, 2i + 1)
        a = tl.load(row + 2 * p[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(row + 2 * p[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
    if STYLE == 2:                        # C: the complex table as (re, im) pairs, S unused
        c = tl.load(C + t * s_ct + 2 * p, mask=pm, other=0.0)[None, :]
        s = tl.load(C + t * s_ct + 2 * p + 1, mask=pm, other=0.0)[None, :]
        tl.store(out + 2 * p[None, :], (a * c - b * s).to(dt), mask=mask)
        tl.store(out + 2 * p[None, :] + 1, (a * s + b * c).to(dt), mask=mask)
    else:
        c = tl.load(C + t * s_ct + p, mask=pm, other=0.0).to(tl.float32)[None, :]
        s = tl.load(S + t * s_ct + p, mask=pm, other=0.0).to(tl.float32)[None, :]
        if STYLE == 0:                    # the second half's own cos/sin (equal to the first in HF)
            c2 = tl.load(C + t * s_ct + HALF_D + p, mask=pm, other=0.0).to(tl.float32)[None, :]
            s2 = tl.load(S + t * s_ct + HALF_D + p, mask=pm, other=0.0).to(tl.float32)[None, :]
        else:
            c2 = c
            s2 = s
        lo = _r(a * c, dt) - _r(b * s, dt)
        hi = _r(b * c2, dt) + _r(a * s2, dt)
        tl.store(out + p[None, :], lo.to(dt), mask=mask)
        tl.store(out + p[None, :] + HALF_D, hi.to(dt), mask=mask)


def apply_rope(x: torch.Tensor, emb, style: str) -> torch.Tensor:
    """x [T, heads, d] rotated by rotary_embeddings()' per-token tables -> [T, heads, d] (x's dtype)."""
    t, heads, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if style == "complex":
        c = s = torch.view_as_real(emb)                                      # [T, d/2, 2] f32
        s_ct = c.stride(0)
    else:
        c, s = emb                                                           # [T, d] each
        if c.stride(-1) != 1 or s.stride(-1) != 1 or c.stride(0) != s.stride(0):
            c, s = c.contiguous(), s.contiguous()
        s_ct = c.stride(0)
    y = torch.empty(t, heads, d, dtype=x.dtype, device=x.device)
    block_h = min(16, next_pow2(heads))
    _rope_kernel[(t, triton.cdiv(heads, block_h))](
        x, y, c, s, x.stride(0), x.stride(1), s_ct, heads, HALF_D=d // 2, BLOCK_H=block_h,
        BLOCK_P=next_pow2(d // 2), STYLE=STYLES[style], num_warps=1 if block_h * d <= 1024 else 4)
    return y
