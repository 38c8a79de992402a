"""silu(g) · u of a fused gate/up product [T, 2I] -> [T, I] in one kernel (torch: three ops), with
torch's rounding: silu's result rounded to the input dtype, then the product rounded.
Differences from torch: exp's last f32 bit may differ (a rare one-step rounding flip in bf16)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(GU, Y, s_g, s_y, I, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(GU + t * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + t * s_g + I + cols, mask=mask, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(Y + t * s_y + cols, (act * u).to(dt), mask=mask)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] (gate then up, unit last stride) -> [T, I]."""
    t, two_i = gu.shape
    i = two_i // 2
    y = torch.empty(t, i, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(i, block))](gu, y, gu.stride(0), y.stride(0), i, BLOCK=block, num_warps=4)
    return y
