"""KV cache bytes per device for a placement plan, before anything is allocated.

The model runner allocates ceil(cache_lens / page_size) pages plus one scratch page (CUDA-graph
padding rows), each layer's pages on the device and in the dtype of that layer's attention
(KVStorage). Here the same KVStorage is built on the meta device, so its shapes (MLA: the latent
plus the rope key per token and layer; GQA: K and V heads) come from the one place that defines
them, and its bytes are summed per planned device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ktrans.errors import KtransError
from ktrans.kv_cache.state import num_state_rows
from ktrans.kv_cache.storage import KVStorage


@dataclass(frozen=True)
class KVPlan:
    cache_lens: int             # tokens the cache holds (--cache_lens), shared by all requests
    page_size: int              # tokens per page
    num_pages: int              # pages allocated: the pool's plus one scratch page
    nbytes: dict[str, int]      # bytes per device ("cuda:0", "cpu"), recurrent-state rows included
    dtypes: tuple[str, ...]     # distinct cache dtypes, for the explain line ("bfloat16")
    # models with linear-attention layers: bytes of one running request's recurrent-state slot per
    # device (two rows of every state tensor; kv_cache/state.py), and how many slots (the engine's
    # batch size) nbytes holds, with the scratch row
    state_per_slot: dict[str, int] = field(default_factory=dict)
    state_slots: int = 1


def attention_placement(plan, layer: int) -> tuple[str, torch.dtype]:
    """Device and compute dtype of layer `layer`'s attention in `plan` (the cache's, per layer).

    NOTE: an operator that takes a `dtype` kwarg computes (and caches) in it; a kept module
    computes in the plan's dtype, else bf16 on CUDA and f32 on the CPU. A layer whose attention has
    no entry of its own (its layer was replaced whole) takes the nearest enclosing entry's place.
    """
    from ktrans.operators.linear import resolve_dtype
    from ktrans.rules.plan import auto_dtype

    e = _nearest_entry(plan, f"model.layers.{layer}.self_attn")
    if e is None:
        return plan.default_device, plan.dtype or auto_dtype(plan.default_device)
    cls = e.rule.op_class if e.rule is not None else None
    if cls is not None and "dtype" in cls.accepted_kwargs():
        return e.device, resolve_dtype(e.kwargs.get("dtype", "auto"), torch.device(e.device))
    return e.device, plan.dtype or auto_dtype(e.device)


def _nearest_entry(plan, path: str):
    while path:
        try:
            return plan.entry(path)
        except KeyError:
            path = path.rpartition(".")[0]
    return None


def plan_kv_cache(plan, *, cache_lens: int, page_size: int, state_slots: int = 1) -> KVPlan:
    """KV bytes per device that the runner would allocate for `plan` with `cache_lens` tokens and,
    in models with linear-attention layers, recurrent-state rows for `state_slots` requests at once
    (the engine reserves one slot per batch slot: --max_batch_size)."""
    if page_size <= 0:
        raise KtransError(f"--page_size {page_size}: expected a positive number of tokens")
    if cache_lens < page_size:
        raise KtransError(f"--cache_lens {cache_lens} must be at least one page ({page_size} tokens)")
    if state_slots < 1:
        raise KtransError(f"--max_batch_size {state_slots}: expected at least 1")
    config = plan.config
    num_layers = config.num_hidden_layers
    placed = [attention_placement(plan, i) for i in range(num_layers)]
    num_pages = -(-cache_lens // page_size) + 1
    # NOTE: on the meta device the tensors have shapes and dtypes but no memory.
    kv = KVStorage.for_config(config, num_pages=num_pages, page_size=page_size, dtype=placed[0][1],
                              device="meta", layer_devices=["meta"] * num_layers,
                              layer_dtypes=[dt for _, dt in placed])
    nbytes: dict[str, int] = {}
    for (device, _), tensors in zip(placed, kv.layers):
        nbytes[device] = nbytes.get(device, 0) + sum(t.numel() * t.element_size() for t in tensors)
    dtypes = tuple(dict.fromkeys(str(dt).removeprefix("torch.") for _, dt in placed))
    state: dict[str, int] = {}
    rows = num_state_rows(state_slots)
    for i in kv.recurrent_layers:
        conv_dim, conv_len, nv, dk, dv = kv.state_dims
        size = torch.empty(0, dtype=placed[i][1]).element_size()
        row = conv_dim * conv_len * size + nv * dk * dv * 4          # conv state in the layer's dtype, recurrent in f32
        state[placed[i][0]] = state.get(placed[i][0], 0) + 2 * row
        nbytes[placed[i][0]] = nbytes.get(placed[i][0], 0) + rows * row
    return KVPlan(cache_lens, page_size, num_pages, dict(sorted(nbytes.items())), dtypes, dict(sorted(state.items())),
                  state_slots)
