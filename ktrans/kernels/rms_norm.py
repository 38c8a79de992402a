"""RMSNorm of rows in one kernel: y = w · (x · rsqrt(mean(x²) + eps)), as transformers computes it
(statistics in f32, the normalised row rounded to x's dtype before the weight multiplies it);
`rms_norm_offset`: Gemma's form, x̂ · (1 + w) in f32 and rounded to x's dtype once.

One program per row; the row is loaded whole (BLOCK = next power of two >= H). Differences from
torch: the mean's summation order (f32), so a row can differ by one rounding step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktrans.kernels import next_pow2


@triton.jit
def _rms_norm_kernel(X, W, Y, s_x, s_y, H, eps, BLOCK: tl.constexpr, OFFSET: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * s_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / H + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:      # Gemma: f32 throughout, one rounding
        y = xf * inv * (1.0 + w)
    else:
        y = w * (xf * inv).to(x.dtype).to(tl.float32)
    tl.store(Y + row * s_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype, offset: bool) -> torch.Tensor:
    h = x.shape[-1]
    x2 = x.reshape(-1, h)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    block = next_pow2(h)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), h, float(eps), BLOCK=block,
                                     OFFSET=offset, num_warps=max(1, min(16, block // 256)))
    return y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H] (unit last stride) -> same shape, in the dtype torch gives weight * x."""
    return _launch(x, weight, eps, torch.promote_types(weight.dtype, x.dtype), False)


def rms_norm_offset(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's form, x [..., H] -> x̂ · (1 + weight) in x's dtype (weight zero-centred)."""
    return _launch(x, weight, eps, x.dtype, True)
