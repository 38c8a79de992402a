"""The Gated DeltaNet tensors in llama.cpp's layouts: names.py's transforms against the steps of
llama.cpp's converter (convert_hf_to_gguf.py: Qwen3NextModel.modify_tensors and
_LinearAttentionVReorderBase, restated here with torch ops as written there) on random tensors,
with as many value heads per key head as the real models (Hv = 2 Hk), so a wrong head order
shows; and the inverse transforms give the HF tensors back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from ktrans.weights import names

HK, HV, DK, DV, H, K = 2, 4, 8, 6, 16, 4


def _config(cls):
    return cls(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
               vocab_size=32, linear_num_key_heads=HK, linear_num_value_heads=HV, linear_key_head_dim=DK,
               linear_value_head_dim=DV, linear_conv_kernel_dim=K)


def _converter_qkvz(w: torch.Tensor):
    """Qwen3NextModel.modify_tensors for in_proj_qkvz: (attn_qkv, attn_gate)."""
    split = [DK, DK, HV // HK * DV, HV // HK * DV]
    w = w.permute(1, 0).contiguous().view(-1, HK, sum(split))
    q, k, v, z = torch.split(w, split, dim=-1)
    q, k, v, z = (x.contiguous().view(H, -1) for x in (q, k, v, z))
    return torch.cat([q, k, v], dim=-1).permute(1, 0).contiguous(), z.permute(1, 0).contiguous()


def _reorder_v_heads(tensor: torch.Tensor, dim: int, num_v_per_k: int, head_dim: int) -> torch.Tensor:
    """_LinearAttentionVReorderBase._reorder_v_heads: value heads grouped by key head -> tiled."""
    shape = list(tensor.shape)
    dim = dim + len(shape) if dim < 0 else dim
    new_shape = shape[:dim] + [HK, num_v_per_k, head_dim] + shape[dim + 1:]
    tensor = tensor.reshape(*new_shape)
    perm = list(range(len(new_shape)))
    perm[dim], perm[dim + 1] = perm[dim + 1], perm[dim]
    return tensor.permute(*perm).contiguous().reshape(*shape)


def _converter_qwen35(name: str, w: torch.Tensor) -> torch.Tensor:
    """_LinearAttentionVReorderBase.modify_tensors, then Qwen3NextModel's A_log / conv1d steps."""
    r, kd = HV // HK, HK * DK
    if name == "in_proj_qkv":
        w = torch.cat([w[:2 * kd], _reorder_v_heads(w[2 * kd:], 0, r, DV)])
    elif name == "in_proj_z":
        w = _reorder_v_heads(w, 0, r, DV)
    elif name in ("in_proj_b", "in_proj_a"):
        w = _reorder_v_heads(w, 0, r, 1)
    elif name in ("A_log", "dt_bias"):
        w = _reorder_v_heads(w.unsqueeze(-1), 0, r, 1).squeeze(-1)
    elif name == "conv1d":
        d = w.squeeze()
        w = torch.cat([d[:2 * kd], _reorder_v_heads(d[2 * kd:], 0, r, DV)])
    elif name == "out_proj":
        w = _reorder_v_heads(w, 1, r, DV)
    if name == "A_log":
        w = -torch.exp(w)
    elif name == "conv1d":
        w = w.squeeze()
    return w


def _same(name: str, back: np.ndarray, w: np.ndarray) -> bool:
    """A round trip gives the HF tensor back: exactly where values were only moved; A_log (stored
    as -exp(A_log)) to what the layer uses, exp(A_log), within a few float32 ulps (log() of a value
    near 1 loses relative precision of A_log itself)."""
    if name == "A_log":
        return np.allclose(np.exp(back.astype(np.float64)), np.exp(w.astype(np.float64)), rtol=5e-7, atol=0)
    return np.array_equal(back, w)


def _hf_weights(model) -> dict[str, np.ndarray]:
    lin = model.model.layers[0].linear_attn
    return {n: torch.randn_like(p).numpy() for n, p in lin.named_parameters()}


def test_qwen3_next_layout_is_the_converters():
    config = _config(transformers.Qwen3NextConfig)
    table = {hf.split("linear_attn.")[1]: (g, t) for hf, g, t in names.expand(config, "qwen3next")
             if ".layers.0.linear_attn." in hf}
    w = _hf_weights(transformers.Qwen3NextForCausalLM(config))
    qkv, z = _converter_qkvz(torch.from_numpy(w["in_proj_qkvz.weight"]))
    expect = {"in_proj_qkvz.weight": [qkv, z], "in_proj_ba.weight": [torch.from_numpy(w["in_proj_ba.weight"])],
              "A_log": [-torch.exp(torch.from_numpy(w["A_log"]))],
              "conv1d.weight": [torch.from_numpy(w["conv1d.weight"]).squeeze()]}
    assert table["in_proj_qkvz.weight"][0] == ("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight")
    assert table["in_proj_ba.weight"][0] == ("blk.0.ssm_ba.weight",) and table["A_log"][0] == ("blk.0.ssm_a",)
    for name, want in expect.items():
        got = names.hf_to_gguf(table[name][1], w[name], config)
        assert len(got) == len(want) and all(np.allclose(g, x.numpy(), rtol=1e-6, atol=0) and g.shape == x.shape
                                             for g, x in zip(got, want)), name
        back = names.gguf_to_hf(table[name][1], got, config)
        assert back.shape == w[name].shape and _same(name, back, w[name]), name


@pytest.mark.parametrize("name", ["in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight",
                                  "A_log", "dt_bias", "conv1d.weight", "out_proj.weight", "norm.weight"])
def test_qwen35_layout_is_the_converters(name):
    config = _config(transformers.Qwen3_5MoeTextConfig)
    table = {hf.split("linear_attn.")[1]: t for hf, g, t in names.expand(config, "qwen35moe")
             if ".layers.0.linear_attn." in hf}
    w = _hf_weights(transformers.Qwen3_5MoeForCausalLM(config))[name]
    (got,) = names.hf_to_gguf(table[name], w, config)
    want = _converter_qwen35(name.removesuffix(".weight"), torch.from_numpy(w))
    assert np.allclose(got, want.numpy(), rtol=1e-6, atol=0) and got.shape == tuple(want.shape)
    if name != "norm.weight":                       # (the one tensor not indexed by value head)
        assert not np.array_equal(got.reshape(-1), w.reshape(-1)) or name == "A_log"
    back = names.gguf_to_hf(table[name], [got], config)
    assert back.shape == w.shape and _same(name, back, w)
