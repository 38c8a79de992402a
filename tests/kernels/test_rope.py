"""The one-kernel RoPE (ktrans.kernels.rope) vs ktrans.operators.rope.apply_rope (torch, the
oracle) on the tables of each architecture's own HF rotary module: HALF (Qwen3), INTERLEAVE
(DeepSeek-V3 with rope_interleave), COMPLEX (DeepSeek-V2), partial rotary (GLM-4.5: the kernel
on the first half of each head, through rope.partial), strided inputs (a split of a wider
projection) and one-head inputs (MLA's k_pe). f32 under Triton's interpreter on a CPU-only
machine; bf16 on a GPU, where HALF/INTERLEAVE round exactly as torch does."""

from __future__ import annotations

import pytest
import torch

from ktrans.kernels import triton_available
from ktrans.operators.rope import apply_rope, materialize_rotary, partial, rope_style, rotary_embeddings
from tests.operators.hf_tiny import tiny_hf_model

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")
ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"


def _case(arch, interleave=False):
    config, model = tiny_hf_model(arch)
    if interleave:
        config.rope_interleave = True
    rotary = materialize_rotary(model.model.rotary_emb, config, DEV)
    d = getattr(config, "qk_rope_head_dim", None) or getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    return config, rotary, d


@pytest.mark.parametrize("arch,interleave", [("qwen3_moe", False), ("deepseek_v3", True), ("deepseek_v2", False),
                                             ("glm4_moe", False), ("minimax_m2", False)])
@pytest.mark.parametrize("heads", [1, 5])
def test_rope_kernel_matches_torch(arch, interleave, heads):
    from ktrans.kernels.rope import apply_rope as fused

    config, rotary, d = _case(arch, interleave)
    style = rope_style(config)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    positions = torch.randint(0, 500, (7,), device=DEV)
    emb = rotary_embeddings(rotary, positions, dtype)
    wide = torch.randn(7, heads, d + 24, device=DEV, dtype=dtype)
    x = wide[..., 24:]                                                    # a strided view
    got, want = partial(fused)(x, emb, style), apply_rope(x, emb, style)
    assert got.shape == want.shape and got.dtype == want.dtype
    if style != "complex" or not ON_GPU:
        torch.testing.assert_close(got, want, rtol=1e-6 if not ON_GPU else 0, atol=1e-6 if not ON_GPU else 0)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
