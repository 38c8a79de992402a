"""act(g) · u of a fused gate/up product [T, 2I] -> [T, I] in one kernel (torch: three ops), with
torch's rounding: the activation's result rounded to the input dtype, then the product rounded.
Activations: silu (SwiGLU MLPs), gelu_tanh (GeGLU with GELU's tanh approximation: Gemma 3's
gelu_pytorch_tanh) and gelu (exact, erf). Differences from torch: exp's / erf's last f32 bit may
differ (a rare one-step rounding flip in bf16)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU, GELU_TANH, GELU = 0, 1, 2
# transformers' activation names -> the kernel's ACT
ACTIVATIONS = {"silu": SILU, "swish": SILU, "gelu_pytorch_tanh": GELU_TANH, "gelu": GELU}


@triton.jit
def _act_mul_kernel(GU, Y, s_g, s_y, I, BLOCK: tl.constexpr, ACT: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(GU + t * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + t * s_g + I + cols, mask=mask, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    if ACT == 0:
        act = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)          # sqrt(2/pi) (g + 0.044715 g^3)
        e = tl.exp(-2.0 * tl.abs(z))                                   # tanh z from exp(-2|z|): no overflow
        th = (1.0 - e) / (1.0 + e)
        act = 0.5 * g * (1.0 + tl.where(z >= 0, th, -th))
    else:
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    tl.store(Y + t * s_y + cols, (act.to(dt).to(tl.float32) * u).to(dt), mask=mask)


def act_mul(gu: torch.Tensor, act: int) -> torch.Tensor:
    """gu [T, 2I] (gate then up, unit last stride) -> act(gate) · up [T, I]; act: SILU | GELU_TANH | GELU."""
    t, two_i = gu.shape
    i = two_i // 2
    y = torch.empty(t, i, dtype=gu.dtype, device=gu.device)
    block = 1024
    _act_mul_kernel[(t, triton.cdiv(i, block))](gu, y, gu.stride(0), y.stride(0), i, BLOCK=block, ACT=act,
                                                num_warps=4)
    return y


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] (gate then up, unit last stride) -> silu(gate) · up [T, I]."""
    return act_mul(gu, SILU)
