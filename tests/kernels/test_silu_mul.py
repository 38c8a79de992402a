"""act(gate) · up in one kernel (ktrans.kernels.silu_mul) vs torch's ops on a fused [T, 2I]
gate/up product, for SiLU and GELU (tanh-approximated and exact): f32 under Triton's
interpreter, bf16 on a GPU (one rounding step at most)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ktrans.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")
ON_GPU = torch.cuda.is_available()


@pytest.mark.parametrize("inter", [96, 1408])
def test_silu_mul_matches_torch(inter):
    from ktrans.kernels.silu_mul import silu_mul

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    gu = torch.randn(5, 2 * inter, device="cuda" if ON_GPU else "cpu", dtype=dtype) * 3
    g, u = gu.chunk(2, dim=-1)
    want = F.silu(g) * u
    tol = dict(rtol=1e-2, atol=1e-2) if ON_GPU else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(silu_mul(gu), want, **tol)


@pytest.mark.parametrize("act,fn", [("gelu_pytorch_tanh", lambda g: F.gelu(g, approximate="tanh")), ("gelu", F.gelu)])
def test_gelu_mul_matches_torch(act, fn):
    from ktrans.kernels.silu_mul import ACTIVATIONS, act_mul

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    gu = torch.randn(5, 2 * 1408, device="cuda" if ON_GPU else "cpu", dtype=dtype) * 3
    g, u = gu.chunk(2, dim=-1)
    tol = dict(rtol=1e-2, atol=1e-2) if ON_GPU else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(act_mul(gu, ACTIVATIONS[act]), fn(g) * u, **tol)
