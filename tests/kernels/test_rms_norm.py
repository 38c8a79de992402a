"""The one-kernel RMSNorm (ktrans.kernels.rms_norm) and the rms_norm operator vs transformers'
own RMSNorm modules on the same weights (Llama's w · x̂ and Gemma 3's x̂ · (1 + w)): f32 rows of
odd widths (masked tail), strided input views, and bf16 (Gemma's one rounding exactly, on the
CPU through the operator; on a GPU through the kernel). Under Triton's interpreter on a CPU-only
machine."""

from __future__ import annotations

import pytest
import torch

from ktrans.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _hf_norm(width, eps, dtype, gemma=False):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = (Gemma3RMSNorm if gemma else LlamaRMSNorm)(width, eps=eps).to(DEV, dtype)
    with torch.no_grad():      # Gemma's weight is zero-centred (the scale is 1 + w)
        norm.weight.copy_(torch.randn(width) * 0.5 + (0 if gemma else 1))
    return norm


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("width", [64, 200, 576])
def test_rms_norm_kernel_matches_transformers(width, gemma):
    from ktrans.kernels.rms_norm import rms_norm, rms_norm_offset

    norm = _hf_norm(width, 1e-6, torch.float32, gemma)
    x = torch.randn(7, width * 2, device=DEV)[:, :width] * 3                 # a strided view
    with torch.no_grad():
        want = norm(x)
    kernel = rms_norm_offset if gemma else rms_norm
    torch.testing.assert_close(kernel(x, norm.weight, 1e-6), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_rms_norm_kernel_bf16_on_gpu():
    from ktrans.kernels.rms_norm import rms_norm

    norm = _hf_norm(2048, 1e-6, torch.bfloat16)
    x = torch.randn(3, 5, 2048, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        want = norm(x)
    got = rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    # one rounding step of bf16 where the f32 mean's summation order differs
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert (got != want).float().mean() < 0.01


@pytest.mark.gpu
def test_gemma_rms_norm_kernel_bf16_on_gpu():
    """x̂ · (1 + w) in f32 and one rounding: bf16 rows as Gemma3RMSNorm gives them, but where the
    f32 mean's summation order moves a value across a rounding boundary."""
    from ktrans.kernels.rms_norm import rms_norm_offset

    norm = _hf_norm(2560, 1e-6, torch.bfloat16, gemma=True)
    x = torch.randn(3, 5, 2560, device=DEV, dtype=torch.bfloat16) * 4
    with torch.no_grad():
        want = norm(x)
    got = rms_norm_offset(x, norm.weight, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert (got != want).float().mean() < 0.01


def test_gemma_rms_norm_operator_bf16_exact():
    """The rms_norm operator on a Gemma 3 config computes Gemma's form (a weight of zeros is the
    identity scale), bit for bit as transformers' module in bf16 on the CPU."""
    import transformers

    from ktrans.operators.norm import RMSNorm
    from tests.operators.hf_tiny import StateDictSource

    config = transformers.Gemma3TextConfig(hidden_size=96, num_attention_heads=4, head_dim=24,
                                           num_hidden_layers=2, vocab_size=64)
    hf = _hf_norm(96, 1e-6, torch.bfloat16, gemma=True).cpu()
    with torch.device("meta"):
        meta = type(hf)(96, eps=1e-6)
    op = RMSNorm(key="model.norm", orig_module=meta, config=config, device="cpu", dtype="bf16")
    op.load_weights(StateDictSource({"model.norm.weight": hf.weight.detach()}))
    x = torch.randn(4, 96, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        want = hf(x)
    assert torch.equal(op(x), want) and torch.equal(op.forward_native(x), want)


def test_rms_norm_operator():
    from ktrans.errors import KtransError
    from ktrans.operators.norm import RMSNorm
    from tests.operators.hf_tiny import StateDictSource

    hf = _hf_norm(96, 1e-5, torch.float32).cpu()
    with torch.device("meta"):
        meta = type(hf)(96, eps=1e-5)
    op = RMSNorm(key="model.norm", orig_module=meta, config=None, device="cpu")
    op.load_weights(StateDictSource({"model.norm.weight": hf.weight.detach()}))
    x = torch.randn(4, 96)
    with torch.no_grad():
        want = hf(x)
    torch.testing.assert_close(op(x), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(op.forward_native(x), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(KtransError, match="rms_norm replaces an RMSNorm"):
        RMSNorm(key="model.x", orig_module=torch.nn.Linear(3, 3), config=None, device="cpu")
