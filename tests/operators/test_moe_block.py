"""moe_block vs the transformers sparse-MoE block it replaces (same weights, HF's own experts
module as the routed experts): routing of every architecture, shared experts, Qwen2's shared
gate; and the routing functions against the HF routers' (weights, indices) directly."""

from __future__ import annotations

import pytest
import torch

from ktrans.operators.moe_block import MoEBlock
from tests.operators.hf_tiny import model_source, tiny_hf_model
from tests.tolerances import F32_ATOL, F32_RTOL

MOE_ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "glm4_moe", "minimax_m2",
             "qwen3_next", "qwen3_5_moe"]


def _hf_route(arch, mlp, x, bias=None):
    """The HF router's (logits, weights, ids); MiniMax-M2's takes its block's correction bias."""
    if arch == "gpt_oss":
        return mlp.router(x)
    if arch == "minimax_m2":
        return mlp.gate(x, mlp.e_score_correction_bias if bias is None else bias)
    return mlp.gate(x)


def _block(arch):
    config, model = tiny_hf_model(arch)
    mlp = model.model.layers[1].mlp
    op = MoEBlock(key="model.layers.1.mlp", orig_module=mlp, config=config, device="cpu")
    op.load_weights(model_source(model))
    return config, mlp, op


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routing_matches_hf_router(arch):
    config, mlp, op = _block(arch)
    x = torch.randn(256, config.hidden_size)
    with torch.no_grad():
        _, ref_w, ref_idx = _hf_route(arch, mlp, x)
        w, idx = op.route(x)
        if arch in ("deepseek_v3", "glm4_moe", "minimax_m2"):   # the draw exercises the score bias
            if arch == "minimax_m2":
                unbiased = _hf_route(arch, mlp, x, torch.zeros_like(mlp.e_score_correction_bias))[2]
            else:
                bias = mlp.gate.e_score_correction_bias.clone()
                mlp.gate.e_score_correction_bias.zero_()
                unbiased = mlp.gate(x)[2]
                mlp.gate.e_score_correction_bias.copy_(bias)
            assert (unbiased.sort(-1).values != ref_idx.sort(-1).values).any(-1).sum() >= 5
    # order within the top-k is unspecified (sorted=False): compare as sets per token
    ref_order, order = ref_idx.argsort(-1), idx.argsort(-1)
    assert torch.equal(ref_idx.gather(1, ref_order), idx.gather(1, order))
    torch.testing.assert_close(w.gather(1, order), ref_w.float().gather(1, ref_order), rtol=F32_RTOL, atol=F32_ATOL)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("native", [False, True])
def test_moe_block_matches_hf_block(arch, native):
    config, mlp, op = _block(arch)
    x = torch.randn(1, 23, config.hidden_size)
    with torch.no_grad():
        ref = mlp(x)
        got = op.forward_native(x) if native else op(x)
    if arch == "gpt_oss":          # its decoder layer takes (output, router scores) from the block
        (ref, ref_w), (got, w) = ref, got
        torch.testing.assert_close(w, ref_w, rtol=F32_RTOL, atol=F32_ATOL)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.parametrize("arch", ["deepseek_v3", "glm4_moe"])
def test_sigmoid_group_limit_excludes_other_groups(arch):
    """Every chosen expert lies in one of the topk_group best groups (what the bias-corrected
    grouped top-k guarantees), and weights sum to routed_scaling_factor when normalised."""
    config, mlp, op = _block(arch)
    x = torch.randn(64, config.hidden_size)
    with torch.no_grad():
        w, idx = op.route(x)
    per_group = config.n_routed_experts // config.n_group
    groups = (idx // per_group).tolist()
    assert all(len(set(g)) <= config.topk_group for g in groups)
    torch.testing.assert_close(w.sum(-1), torch.full((64,), config.routed_scaling_factor), rtol=1e-5, atol=1e-5)
