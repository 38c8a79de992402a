"""Paged KV tensors on the device: one pool of pages shared by all requests, per layer.

A page holds `page_size` consecutive token slots of one request; slot s of the pool is
(page = s // page_size, offset = s % page_size). The scheduler's page allocator hands page ids to
requests; this module only stores and reads the tensors.

Layouts (flat over slots, so a write is one index_copy_ per layer):
- MLA (DeepSeek): one tensor per layer [num_slots, kv_lora_rank + qk_rope_head_dim] holding the
  normalised compressed latent then the rotated rope key (576 values per token for V3).
- GQA: K [num_slots, n_kv_heads, head_dim] and V [num_slots, n_kv_heads, v_head_dim] per layer.

Each layer also has a kind (kv_cache/layers.py: full, sliding with its window, or linear), which
the attention operators read from here. A linear (recurrent) layer holds no pages; instead, once
`reserve_states(num_slots)` ran, it holds per-request state rows (kv_cache/state.py):
- conv state [rows, conv_dim, kernel - 1] in the layer's dtype: the last inputs of its causal conv1d;
- recurrent state [rows, v_heads, k_dim, v_dim] in float32 (the delta rule accumulates into it
  over the whole sequence; transformers keeps it in f32 too).
"""

from __future__ import annotations

import torch

from ktrans.errors import KtransError
from ktrans.kv_cache.layers import FULL, LayerKind, layer_kinds
from ktrans.kv_cache.state import num_state_rows


class KVStorage:
    def __init__(self, *, num_layers: int, num_pages: int, page_size: int, mla: bool,
                 dims: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 layer_devices: list | None = None, layer_dtypes: list | None = None,
                 kinds: list[LayerKind] | None = None, state_dims: tuple[int, ...] | None = None):
        if num_pages <= 0 or page_size <= 0:
            raise KtransError(f"KV cache needs a positive page count and page size, got {num_pages} x {page_size}")
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.mla = mla
        self.dtype = dtype
        self.device = torch.device(device)   # where the per-step metadata lives (the first layer's)
        # NOTE: each layer's pages sit on the device of that layer's attention (rules may split
        # layers across GPUs); page ids are shared, so one page table serves every layer.
        devs = [torch.device(d) for d in layer_devices] if layer_devices else [self.device] * num_layers
        if len(devs) != num_layers:
            raise KtransError(f"KV cache: {len(devs)} layer devices for {num_layers} layers")
        # NOTE: and in the dtype of that layer's attention: a layer kept on the CPU computes in f32
        # while the GPU layers compute in bf16.
        dts = list(layer_dtypes) if layer_dtypes else [dtype] * num_layers
        if len(dts) != num_layers:
            raise KtransError(f"KV cache: {len(dts)} layer dtypes for {num_layers} layers")
        self.kinds = list(kinds) if kinds else [LayerKind(FULL)] * num_layers
        if len(self.kinds) != num_layers:
            raise KtransError(f"KV cache: {len(self.kinds)} layer kinds for {num_layers} layers")
        if any(k.recurrent for k in self.kinds) and state_dims is None:
            raise KtransError("KV cache: linear (recurrent) layers need their state dims")
        self.state_dims = state_dims          # (conv_dim, conv_len, v_heads, k_dim, v_dim)
        self._devs, self._dts = devs, dts                 # (state rows follow their layer's)
        self.num_state_rows = 0
        self.states: list[tuple[torch.Tensor, ...]] = [() for _ in range(num_layers)]
        slots = num_pages * page_size
        if mla:
            (width,) = dims                   # kv_lora_rank + qk_rope_head_dim
            make = lambda d, t: (torch.zeros(slots, width, dtype=t, device=d),)   # noqa: E731
        else:
            n_kv, head_dim, v_dim = dims
            make = lambda d, t: (torch.zeros(slots, n_kv, head_dim, dtype=t, device=d),   # noqa: E731
                                 torch.zeros(slots, n_kv, v_dim, dtype=t, device=d))
        self.layers = [() if k.recurrent else make(d, t) for k, d, t in zip(self.kinds, devs, dts)]

    @classmethod
    def for_config(cls, config, *, num_pages: int, page_size: int, dtype: torch.dtype, device,
                   layer_devices: list | None = None, layer_dtypes: list | None = None) -> "KVStorage":
        """Shapes from a transformers config (MLA when it has kv_lora_rank)."""
        common = dict(num_layers=config.num_hidden_layers, num_pages=num_pages, page_size=page_size,
                      dtype=dtype, device=device, layer_devices=layer_devices, layer_dtypes=layer_dtypes,
                      kinds=layer_kinds(config))
        if getattr(config, "kv_lora_rank", None):
            return cls(mla=True, dims=(config.kv_lora_rank + config.qk_rope_head_dim,), **common)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(mla=False, dims=(n_kv, head_dim, head_dim), state_dims=linear_state_dims(config), **common)

    @property
    def recurrent_layers(self) -> list[int]:
        """Layers that keep a per-request state instead of KV pages."""
        return [i for i, k in enumerate(self.kinds) if k.recurrent]

    def reserve_states(self, num_slots: int) -> None:
        """Hold state rows for `num_slots` requests (kv_cache/state.py's row layout); a smaller
        reservation than the current one keeps the current tensors. Call it while no request runs:
        a larger one starts from fresh tensors."""
        rows = num_state_rows(num_slots)
        if not self.recurrent_layers or rows <= self.num_state_rows:
            return
        conv_dim, conv_len, nv, dk, dv = self.state_dims
        for i in self.recurrent_layers:
            d, t = self._devs[i], self._dts[i]
            self.states[i] = (torch.zeros(rows, conv_dim, conv_len, dtype=t, device=d),
                              torch.zeros(rows, nv, dk, dv, dtype=torch.float32, device=d))
        self.num_state_rows = rows

    def state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv state [rows, conv_dim, kernel - 1], recurrent state [rows, v_heads, k_dim, v_dim]) of a
        linear layer."""
        if not self.states[layer]:
            raise KtransError(f"layer {layer} has no recurrent-state rows: reserve them first "
                              f"(KVStorage.reserve_states / ModelRunner.reserve_states)")
        return self.states[layer]

    def window(self, layer: int) -> int | None:
        """How many most recent tokens a query of `layer` sees (None: all of them)."""
        return self.kinds[layer].window

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token occupies over all layers."""
        return sum(t[0].numel() * t.element_size() for lay in self.layers for t in lay)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers for t in lay)

    def write(self, layer: int, slot_mapping: torch.Tensor, *values: torch.Tensor) -> None:
        """Store the new tokens' entries: values[i] [T, ...] go to slots slot_mapping [T]."""
        for buf, val in zip(self.layers[layer], values):
            buf.index_copy_(0, slot_mapping, val.to(buf.dtype))

    def gather(self, layer: int, pages: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, ...]:
        """The first `seq_len` entries of one request, in position order: each [seq_len, ...]."""
        n_pages = -(-seq_len // self.page_size)
        slots = (pages[:n_pages, None] * self.page_size
                 + torch.arange(self.page_size, device=pages.device)).reshape(-1)[:seq_len]  # [L]
        return tuple(buf.index_select(0, slots) for buf in self.layers[layer])

    def padded_slots(self, page_table: torch.Tensor, max_len: int) -> torch.Tensor:
        """Slots [R, max_len] of the first `max_len` entries of every request; slots past a
        request's pages read page 0 (garbage) — callers mask by sequence length."""
        n_pages = -(-max_len // self.page_size)
        pages = page_table[:, :n_pages].clamp(min=0)                                   # [R, P]
        return (pages[:, :, None] * self.page_size
                + torch.arange(self.page_size, device=pages.device)).reshape(pages.shape[0], -1)[:, :max_len]

    def layer_tensors(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The layer's whole cache tensors (paged kernels index them by slot themselves)."""
        return self.layers[layer]

    def gather_slots(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Entries at `slots` (any shape S): each [*S, ...]."""
        return tuple(buf[slots] for buf in self.layers[layer])

    def gather_padded(self, layer: int, page_table: torch.Tensor, max_len: int) -> tuple[torch.Tensor, ...]:
        """Entries of every request padded to `max_len`: each [R, max_len, ...] (see padded_slots)."""
        return self.gather_slots(layer, self.padded_slots(page_table, max_len))


def linear_state_dims(config) -> tuple[int, ...] | None:
    """(conv_dim, conv_len, v_heads, k_dim, v_dim) of a config's Gated DeltaNet layers, or None."""
    nv = getattr(config, "linear_num_value_heads", None)
    if not nv:
        return None
    nk, dk, dv = config.linear_num_key_heads, config.linear_key_head_dim, config.linear_value_head_dim
    return 2 * nk * dk + nv * dv, config.linear_conv_kernel_dim - 1, nv, dk, dv
