"""The model forward over one packed ForwardBatch: embed → decoder layers → norm → lm_head.

transformers' own decoder layers run unchanged (norms, residuals, and whatever the rules put at
`self_attn` / `mlp`); this replaces only the outer `model.forward`, which in transformers builds
a padded [B, S] batch, a dense causal mask and a DynamicCache. Here the batch is the packed
tokens of every scheduled request as one row [1, T, H]; attention operators read request
boundaries and KV pages from the forward context instead of a mask, and rotary tables are
computed once per step (per device, and per layer type where the model rotates its local and
global layers differently) from the tokens' positions by the model's own rotary module.
Hidden states follow the devices the rules chose: each layer receives them on the device and
dtype of its input norm.
"""

from __future__ import annotations

import torch

from ktrans.engine.batch import ForwardContext
from ktrans.operators.rope import layer_rope_kind, rotary_embeddings


def module_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype of a module (its inputs go there): the `placement` an operator
    declares, or its own `device` and `dtype` attributes (a projection kept in a GGUF format holds
    only integer and f16 fields), else those of its first floating parameter."""
    placement = getattr(module, "placement", None)
    if placement is not None:
        return placement
    device, dtype = getattr(module, "device", None), getattr(module, "dtype", None)
    if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
        return device, dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise RuntimeError(f"{type(module).__name__} holds no floating-point parameters")


def layer_input(layer: torch.nn.Module) -> torch.nn.Module:
    """The module a decoder layer's input goes to first (its device and dtype are the layer's)."""
    return getattr(layer, "input_layernorm", layer)


def forward_packed(causal_lm: torch.nn.Module, rotary: torch.nn.Module, ctx: ForwardContext) -> torch.Tensor:
    """Logits [R', V] (float32) of the rows ctx.batch.logits_indices of the packed tokens."""
    return forward_hidden(causal_lm, rotary, ctx, embed_packed(causal_lm, ctx.batch.input_ids))


def embed_packed(causal_lm: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [1, T, H] on the embedding table's device."""
    embed = causal_lm.model.embed_tokens
    emb_dev, _ = module_placement(embed)
    return embed(input_ids.to(emb_dev))[None]                                            # [1, T, H]


def forward_hidden(causal_lm: torch.nn.Module, rotary: torch.nn.Module, ctx: ForwardContext,
                   h: torch.Tensor) -> torch.Tensor:
    """The decoder layers, final norm and lm_head over embeddings h [1, T, H]: logits [R', V]
    (float32) of the rows ctx.batch.logits_indices. A CUDA-graph decode step captures this part
    (the embedding lookup, on the CPU by default, runs before it)."""
    inner = causal_lm.model
    batch = ctx.batch
    tables: dict[tuple, object] = {}
    for i, layer in enumerate(inner.layers):
        dev, dtype = module_placement(layer_input(layer))
        positions = ctx.on(dev).positions                                                # [T] on dev
        key = (dev, dtype, layer_rope_kind(rotary, causal_lm.config, i))
        if key not in tables:
            emb = rotary_embeddings(rotary, positions, dtype, key[2])
            tables[key] = tuple(e[None] for e in emb) if isinstance(emb, tuple) else emb[None]
        out = layer(h.to(dev, dtype), attention_mask=None, position_ids=positions[None],
                    position_embeddings=tables[key])
        h = out[0] if isinstance(out, tuple) else out                                    # [1, T, H]
    norm_dev, norm_dtype = module_placement(inner.norm)
    h = inner.norm(h.to(norm_dev, norm_dtype))[0]                                        # [T, H]
    h = h.index_select(0, batch.logits_indices.to(norm_dev))                            # [R', H]
    head_dev, head_dtype = module_placement(causal_lm.lm_head)
    logits = causal_lm.lm_head(h.to(head_dev, head_dtype))                               # [R', V]
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:     # Gemma 2/3 configs may squash the logits into (-cap, cap), as transformers does
        logits = torch.tanh(logits / cap) * cap
    return logits.float()
