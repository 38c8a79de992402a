"""Rotary position embeddings for packed tokens, with transformers' own frequency math.

The cos/sin (or DeepSeek-V2's complex frequencies) come from the model's HF rotary-embedding
module, re-created on the target device (it was built on the meta device, where its `inv_freq`
buffer holds no numbers) — so every rope_type transformers knows (default, linear, dynamic, YaRN
with mscale, llama3, ...) is computed exactly as transformers computes it. This module applies
them to [T, heads, dim] tensors in the three layouts the supported architectures use.
"""

from __future__ import annotations

import math

import torch

# How the rotary dims of q/k are paired.
HALF = "half"              # (x[i], x[i + d/2]) pairs: Llama/Qwen/Mixtral, DeepSeek-V3 without rope_interleave
INTERLEAVE = "interleave"  # (x[2i], x[2i+1]) pairs, output de-interleaved: DeepSeek-V3 with rope_interleave
COMPLEX = "complex"        # (x[2i], x[2i+1]) pairs as complex numbers, output interleaved: DeepSeek-V2


def rope_style(config) -> str:
    """The pairing layout transformers uses for this config's model type."""
    if config.model_type == "deepseek_v2":
        return COMPLEX
    if config.model_type == "deepseek_v3" and getattr(config, "rope_interleave", False):
        return INTERLEAVE
    return HALF


def materialize_rotary(rotary: torch.nn.Module, config, device: torch.device | str) -> torch.nn.Module:
    """A fresh copy of the HF rotary module `rotary` with its buffers computed on `device`."""
    with torch.device(device):
        return type(rotary)(config=config)


def layer_rope_kind(rotary: torch.nn.Module, config, i: int) -> str | None:
    """Which of the rotary module's tables layer i rotates with: its `config.layer_types` entry
    where the module keeps one table per layer type (Gemma 3: local layers at
    rope_local_base_freq, global ones at rope_theta with the config's scaling), else None (one
    table for every layer)."""
    if not isinstance(getattr(rotary, "rope_type", None), dict):
        return None
    return config.layer_types[i]


def rotary_embeddings(rotary: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype,
                      kind: str | None = None):
    """Per-token rotary tables for `positions` [T]: (cos, sin) each [T, d], or complex [T, d/2]
    for COMPLEX. Calls the HF module itself (with a batch dim of 1); `kind`: the layer type whose
    table a per-layer-type module computes (layer_rope_kind)."""
    probe = torch.empty(0, dtype=dtype, device=positions.device)
    ids = positions[None, :]
    if hasattr(rotary, "mrope_section"):
        # NOTE: Qwen3.5's M-RoPE module takes one row of positions per section ([3, batch, T]; text
        # tokens: the same positions in each); transformers 5.17's forward indexes that shape
        # and does not broadcast [batch, T] to it as later versions do.
        ids = ids[None].expand(3, 1, -1)
    emb = rotary(probe, ids) if kind is None else rotary(probe, ids, kind)
    if isinstance(emb, tuple):
        cos, sin = emb[0][0], emb[1][0]
        # NOTE: gpt-oss's rotary returns one value per frequency ([T, d/2]) and rotates the halves
        # with it; repeated to [T, d] it is the HALF layout's table (x1 * c - x2 * s is the same
        # float operation as x1 * c + (-x2) * s, so results are bit-identical).
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is not None and cos.shape[-1] == inv_freq.numel():
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        return cos, sin
    return emb[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _table_dims(emb) -> int:
    """Dims of a head that the tables from rotary_embeddings() rotate."""
    return emb[0].shape[-1] if isinstance(emb, tuple) else 2 * emb.shape[-1]


def partial(fn):
    """`fn` (an apply_rope) applied to the first dims its tables cover; the rest passed through."""
    def apply(x: torch.Tensor, emb, style: str) -> torch.Tensor:
        rd = _table_dims(emb)
        if rd == x.shape[-1]:
            return fn(x, emb, style)
        return torch.cat([fn(x[..., :rd], emb, style), x[..., rd:]], dim=-1)
    return apply


def _apply_full(x: torch.Tensor, emb, style: str) -> torch.Tensor:
    if style == COMPLEX:
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))     # [T, heads, d/2]
        return torch.view_as_real(xc * emb[:, None, :]).flatten(-2).type_as(x)
    cos, sin = emb
    cos, sin = cos[:, None, :], sin[:, None, :]                                  # [T, 1, d]
    if style == INTERLEAVE:
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return x * cos + _rotate_half(x) * sin


# Rotate x [T, heads, d] by the per-token tables from rotary_embeddings() (partial rotary included).
apply_rope = partial(_apply_full)


def rope_for(device, style: str = HALF):
    """The apply_rope an operator on `device` uses: one Triton kernel on CUDA (torch's rounding,
    ktrans.kernels.rope), this module's torch ops elsewhere (and as the oracle).
    NOTE: DeepSeek-V2's COMPLEX pairing stays on torch's ops inside the model: with the kernel,
    bf16 logits on CUDA drifted from transformers' with the position (measured on the tiny
    model; the kernel alone matches torch in its own test), cause not yet found."""
    if torch.device(device).type == "cuda" and style != COMPLEX:
        from ktrans.kernels import triton_available

        if triton_available():
            from ktrans.kernels.rope import apply_rope as fused

            return partial(fused)
    return apply_rope


def mla_softmax_scale(config) -> float:
    """DeepSeek's attention scale: 1/sqrt(qk_head_dim), times mscale^2 under YaRN with
    mscale_all_dim (the long-context correction the checkpoint was trained with)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        factor = params.get("factor", 1.0)
        if mscale_all_dim and factor > 1:
            m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale *= m * m
    return scale
