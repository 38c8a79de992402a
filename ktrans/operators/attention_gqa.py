"""`gqa_attention`: grouped-query attention (Qwen2/Qwen2-MoE/Qwen3-MoE/Mixtral) over the paged
KV cache.

Per step: project the packed tokens, apply Qwen3's per-head q/k RMSNorm where the config has
it, rotate with the model's own rotary tables, write K/V of the new tokens into their slots,
then let each request attend causally to its own cached + new tokens. `forward` batches all
single-token (decode) requests into one padded gather and runs multi-token chunks through
torch's fused SDPA; `forward_native` (the oracle) walks the requests one by one with an explicit
softmax.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ktrans.engine.batch import current_forward
from ktrans.errors import KtransError
from ktrans.operators.attention_mla import _strip_batch, masked_attention, sdpa_prefill
from ktrans.operators.base import Operator
from ktrans.operators.linear import load_param, param_bytes, resolve_dtype, rms_norm
from ktrans.operators.registry import register_operator
from ktrans.operators.rope import apply_rope, rope_style


@register_operator("gqa_attention")
class GQAAttention(Operator):
    name: ClassVar[str] = "gqa_attention"
    owned_children: ClassVar[tuple[str, ...]] = ("*",)      # every projection and norm is loaded here

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if getattr(config, "kv_lora_rank", None):
            raise KtransError(f"{key}: gqa_attention does not run DeepSeek MLA; use mla_attention")
        self.layer_idx = orig_module.layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = getattr(orig_module, "scaling", self.head_dim ** -0.5)
        self.qk_norm = hasattr(orig_module, "q_norm")                 # Qwen3: RMSNorm per head on q and k
        self.eps = config.rms_norm_eps
        self.style = rope_style(config)
        self.has_qkv_bias = orig_module.q_proj.bias is not None        # Qwen2: biased q/k/v
        self.has_o_bias = orig_module.o_proj.bias is not None
        self.dtype = resolve_dtype(dtype, torch.device(device))
        # NOTE: Mixtral keeps its window on the config, the Qwen attentions on the module (set
        # only for layers that really slide).
        window = getattr(orig_module, "sliding_window", None) or (
            getattr(config, "sliding_window", None) if config.model_type == "mixtral" else None)
        if window:
            raise KtransError(f"{key}: sliding-window attention (window {window}) is not supported; "
                              f"set use_sliding_window/sliding_window off in the config")

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        h, q, kv = self.config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {"q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h), "o_proj.weight": (h, q)}
        if self.has_qkv_bias:
            shapes.update({"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)})
        if self.has_o_bias:
            shapes["o_proj.bias"] = (h,)
        if self.qk_norm:
            shapes.update({"q_norm.weight": (self.head_dim,), "k_norm.weight": (self.head_dim,)})
        return shapes

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        probe = cls(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        return {str(torch.device(device)): param_bytes(list(probe._shapes().values()), probe.dtype)}

    def load_weights(self, weights) -> None:
        self.params = torch.nn.ParameterDict({
            name.replace(".", "__"): load_param(weights, f"{self.key}.{name}", self.dtype, self.device, shape)
            for name, shape in self._shapes().items()})

    def _p(self, name: str) -> torch.Tensor | None:
        """A loaded parameter by its name under this module (None for an absent bias)."""
        return self.params.get(name.replace(".", "__"))

    def _linear(self, x: torch.Tensor, proj: str) -> torch.Tensor:
        return F.linear(x, self._p(f"{proj}.weight"), self._p(f"{proj}.bias"))

    def _proj(self, x: torch.Tensor, proj: str, heads: int) -> torch.Tensor:
        return self._linear(x, proj).view(x.shape[0], heads, self.head_dim)

    def _attend(self, q, k, v, q_pos, hidden=None) -> torch.Tensor:
        """B requests: q [B, n, Hq, d], k/v [B, L, Hkv, d], q_pos [B, n] -> [B, n, Hq, d].
        Query head h reads KV head h // group: q is viewed as [B, n, Hkv, group, d] so K/V are
        never repeated per query head."""
        b, n, hq, d = q.shape
        hkv = k.shape[2]
        qg = q.view(b, n, hkv, hq // hkv, d)
        scores = torch.einsum("bnkgd,blkd->bkgnl", qg, k).reshape(b, hq, n, -1) * self.scale  # [B, Hq, n, L]

        def values(p):
            p = p.to(v.dtype).view(b, hkv, hq // hkv, n, -1)
            return torch.einsum("bkgnl,blkd->bnkgd", p, v).reshape(b, n, hq, d)

        return masked_attention(scores, q_pos, values, hidden)

    def _run(self, hidden_states, position_embeddings, batch_decode: bool):
        ctx = current_forward().on(self.device)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).to(self.device, self.dtype)             # [T, hidden]
        emb = _strip_batch(position_embeddings, self.device)
        q = self._proj(x, "q_proj", self.num_heads)                                       # [T, Hq, d]
        k = self._proj(x, "k_proj", self.num_kv_heads)                                    # [T, Hkv, d]
        v = self._proj(x, "v_proj", self.num_kv_heads)
        if self.qk_norm:
            q = rms_norm(q, self._p("q_norm.weight"), self.eps)
            k = rms_norm(k, self._p("k_norm.weight"), self.eps)
        q, k = apply_rope(q, emb, self.style), apply_rope(k, emb, self.style)
        ctx.kv.write(self.layer_idx, ctx.slot_mapping, k, v)
        out = torch.empty_like(q)                                                         # [T, Hq, d]
        qs, pos = ctx.query_start, ctx.positions
        group = ctx.decode_group() if batch_decode else None
        single = group.reqs if group is not None else frozenset()
        if group is not None:
            kc, vc = ctx.kv.gather_slots(self.layer_idx, group.slots)                     # [B, L, Hkv, d]
            if group.whole:  # decode-only step: every row, in order
                out = self._attend(q[:, None], kc, vc, group.q_pos, group.hidden)[:, 0]
            else:
                rows = group.rows                                                         # [B]
                out[rows] = self._attend(q[rows, None], kc, vc, group.q_pos, group.hidden)[:, 0]
        for r in range(ctx.batch.num_reqs):
            if r in single:
                continue
            sl = slice(qs[r], qs[r + 1])
            kc, vc = ctx.kv.gather(self.layer_idx, ctx.page_table[r], ctx.seq_lens[r])   # [L, Hkv, d]
            if batch_decode:
                out[sl] = sdpa_prefill(q[sl], kc, vc, pos[sl], self.scale)
            else:
                out[sl] = self._attend(q[sl][None], kc[None], vc[None], pos[sl][None])[0]
        o = self._linear(out.reshape(x.shape[0], -1), "o_proj")
        return o.view(*shape[:-1], -1), None

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        return self._run(hidden_states, position_embeddings, batch_decode=True)

    def forward_native(self, hidden_states, position_embeddings=None, **kwargs):
        return self._run(hidden_states, position_embeddings, batch_decode=False)
