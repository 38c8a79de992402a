"""`gqa_attention`: grouped-query attention (Qwen2/Qwen2-MoE/Qwen3-MoE/Mixtral/gpt-oss/GLM-4.5/
MiniMax-M2/Gemma 3, and the full-attention layers of Qwen3-Next / Qwen3.5-MoE) over the paged KV
cache.

Per step: project the packed tokens, apply the q/k RMSNorm where the model has one (per head:
Qwen3, GLM-4.5, Gemma 3 in its (1 + w) form; over all heads of a token: MiniMax-M2), rotate with
the model's own rotary tables of this layer's kind (Gemma 3: local and global bases)
(all of each head, or its first part: partial rotary), write K/V of the new tokens into their slots,
then let each request attend causally to its own cached + new tokens. `forward` batches all
single-token (decode) requests into one padded gather (or the paged Triton kernel on CUDA) and
runs multi-token chunks through torch's fused SDPA; `forward_native` (the oracle) walks the
requests one by one with an explicit softmax.

Gated attention (Qwen3-Next, Qwen3.5): q_proj yields each head's query followed by as many gate
values ([q_h | gate_h] per head); the attention output is multiplied by sigmoid(gate) before
o_proj.

A sliding layer (its kind in the KV cache: kv_cache/layers.py) sees only the last `window`
tokens; gpt-oss's attention sinks add one learned logit per head to the softmax. Every path
(padded, paged kernel, SDPA, oracle) applies both. The softmax scale is the HF module's own
(Gemma 3: query_pre_attn_scalar^-1/2). Softcapped attention logits (Gemma 2's
attn_logit_softcapping) are not implemented: a module that sets them is refused.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ktrans.engine.batch import current_forward
from ktrans.errors import KtransError
from ktrans.kv_cache.layers import layer_kinds
from ktrans.operators.attention_mla import _strip_batch, choose_kernels, masked_attention, sdpa_prefill
from ktrans.operators.base import Operator
from ktrans.operators.linear import (ProjectionOwner, offset_norms, resolve_dtype, rms_norm, rms_norm_for,
                                    rms_norm_offset)
from ktrans.operators.registry import register_operator
from ktrans.operators.rope import apply_rope, rope_style


@register_operator("gqa_attention")
class GQAAttention(ProjectionOwner, Operator):
    name: ClassVar[str] = "gqa_attention"
    owned_children: ClassVar[tuple[str, ...]] = ("*",)      # every projection and norm is loaded here

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", attn_backend="auto", weights="auto",
                 **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if getattr(config, "kv_lora_rank", None):
            raise KtransError(f"{key}: gqa_attention does not run DeepSeek MLA; use mla_attention")
        self.layer_idx = orig_module.layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = getattr(orig_module, "scaling", self.head_dim ** -0.5)
        self.qk_norm = hasattr(orig_module, "q_norm")                 # Qwen3: RMSNorm per head on q and k
        # MiniMax-M2 normalizes q (and k) over all heads of a token: weights [Hq * d] / [Hkv * d].
        self.qk_norm_whole = self.qk_norm and orig_module.q_norm.weight.shape[0] != self.head_dim
        self.eps = config.rms_norm_eps
        self.style = rope_style(config)
        self.has_qkv_bias = orig_module.q_proj.bias is not None        # Qwen2: biased q/k/v
        # Qwen3-Next / Qwen3.5: q_proj holds a sigmoid output gate per head beside the query.
        self.gated = orig_module.q_proj.out_features == 2 * self.num_heads * self.head_dim
        self.has_o_bias = orig_module.o_proj.bias is not None
        self.dtype = resolve_dtype(dtype, torch.device(device))
        self._set_weights_mode(key, weights)
        if getattr(orig_module, "attn_logit_softcapping", None) is not None:
            raise KtransError(f"{key}: attention logit softcapping ({orig_module.attn_logit_softcapping}) is not "
                              f"implemented in gqa_attention; only configs with attn_logit_softcapping null run")
        choose_kernels(self, key, attn_backend)
        # Gemma 3: q/k norms scale by (1 + w) in f32 (operators/linear.py rms_norm_offset).
        self.offset_norms = self.qk_norm and offset_norms(config)
        if self.offset_norms:
            self._rms = rms_norm_for(self.device, offset=True)
        self.has_sinks = getattr(orig_module, "sinks", None) is not None               # gpt-oss
        # NOTE: the window is the KV cache's layer kind (read per step); the HF module's own must
        # agree. Mixtral keeps its window on the config, the others on the module (set only for
        # layers that really slide).
        window = getattr(orig_module, "sliding_window", None) or (
            getattr(config, "sliding_window", None) if config.model_type == "mixtral" else None)
        kind = layer_kinds(config)[self.layer_idx]
        if (window or None) != kind.window:
            raise KtransError(f"{key}: the attention module slides over {window} tokens, but the config's "
                              f"layer kind is {kind.attention} (window {kind.window})")

    def _proj_shapes(self) -> dict[str, tuple[int, int]]:
        h, q, kv = self.config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": ((2 if self.gated else 1) * q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}

    def _biased(self) -> set[str]:
        return ({"q_proj", "k_proj", "v_proj"} if self.has_qkv_bias else set()) | ({"o_proj"} if self.has_o_bias else set())

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"sinks": (self.num_heads,)} if self.has_sinks else {}
        if self.qk_norm:
            hq, hkv = (self.num_heads, self.num_kv_heads) if self.qk_norm_whole else (1, 1)
            shapes.update({"q_norm.weight": (hq * self.head_dim,), "k_norm.weight": (hkv * self.head_dim,)})
        return shapes

    def load_weights(self, weights) -> None:
        self._load_owned(weights)

    def _proj(self, x: torch.Tensor, proj: str, heads: int, native: bool) -> torch.Tensor:
        return self._linear(x, proj, native).view(x.shape[0], heads, self.head_dim)

    def _attend(self, q, k, v, q_pos, window, hidden=None) -> torch.Tensor:
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

        return masked_attention(scores, q_pos, values, hidden, window=window, sinks=self._p("sinks"))

    def _decode_padded(self, q, group, kv) -> torch.Tensor:
        """Decode rows through a padded gather of the cache and torch: q [B, Hq, d] -> [B, Hq, d]."""
        slots, hidden = group.padded(kv)
        kc, vc = kv.gather_slots(self.layer_idx, slots)                                  # [B, L, Hkv, d]
        return self._attend(q[:, None], kc, vc, group.q_pos, kv.window(self.layer_idx), hidden)[:, 0]

    def _decode_paged(self, q, group, kv) -> torch.Tensor:
        """Decode rows through the paged kernel: q [B, Hq, d] -> [B, Hq, d]."""
        from ktrans.kernels.paged_decode import paged_decode_attention

        kc, vc = kv.layer_tensors(self.layer_idx)                                        # [slots, Hkv, d]
        return paged_decode_attention(q, kc, vc, group.page_table, group.seq_lens, kv.page_size, self.scale,
                                      window=kv.window(self.layer_idx), sinks=self._p("sinks"))

    def _run(self, hidden_states, position_embeddings, batch_decode: bool):
        ctx = current_forward().on(self.device)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).to(self.device, self.dtype)             # [T, hidden]
        emb = _strip_batch(position_embeddings, self.device)
        native = not batch_decode
        gate = None
        if self.gated:                       # [T, Hq, 2d]: each head's query, then its gate
            q, gate = self._linear(x, "q_proj", native).view(x.shape[0], self.num_heads, 2 * self.head_dim).chunk(2, -1)
            q, gate = q.contiguous(), gate.reshape(x.shape[0], -1)                                           # [T, Hq * d]
        else:
            q = self._proj(x, "q_proj", self.num_heads, native)                           # [T, Hq, d]
        k = self._proj(x, "k_proj", self.num_kv_heads, native)                            # [T, Hkv, d]
        v = self._proj(x, "v_proj", self.num_kv_heads, native)
        if self.qk_norm:
            norm = (rms_norm_offset if self.offset_norms else rms_norm) if native else self._rms
            t = x.shape[0]
            if self.qk_norm_whole:                 # over [T, heads * d], then back to heads
                q = norm(q.reshape(t, -1), self._p("q_norm.weight"), self.eps).view(t, self.num_heads, -1)
                k = norm(k.reshape(t, -1), self._p("k_norm.weight"), self.eps).view(t, self.num_kv_heads, -1)
            else:
                q = norm(q, self._p("q_norm.weight"), self.eps)
                k = norm(k, self._p("k_norm.weight"), self.eps)
        rope = apply_rope if native else self._rope
        q, k = rope(q, emb, self.style), rope(k, emb, self.style)
        ctx.kv.write(self.layer_idx, ctx.slot_mapping, k, v)
        out = torch.empty_like(q)                                                         # [T, Hq, d]
        qs, pos = ctx.query_start, ctx.positions
        group = ctx.decode_group() if batch_decode else None
        single = group.reqs if group is not None else frozenset()
        if group is not None:
            attend = self._decode_paged if self.decode_kernel else self._decode_padded
            if group.whole:  # decode-only step: every row, in order
                out = attend(q, group, ctx.kv)
            else:
                out[group.rows] = attend(q[group.rows], group, ctx.kv)
        for r in range(ctx.batch.num_reqs):
            if r in single:
                continue
            sl = slice(qs[r], qs[r + 1])
            kc, vc = ctx.kv.gather(self.layer_idx, ctx.page_table[r], ctx.seq_lens[r])   # [L, Hkv, d]
            window = ctx.kv.window(self.layer_idx)
            if batch_decode:
                out[sl] = sdpa_prefill(q[sl], kc, vc, pos[sl], self.scale, window=window, sinks=self._p("sinks"))
            else:
                out[sl] = self._attend(q[sl][None], kc[None], vc[None], pos[sl][None], window)[0]
        out = out.reshape(x.shape[0], -1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        o = self._linear(out, "o_proj", native)
        return o.view(*shape[:-1], -1), None

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        return self._run(hidden_states, position_embeddings, batch_decode=True)

    def forward_native(self, hidden_states, position_embeddings=None, **kwargs):
        return self._run(hidden_states, position_embeddings, batch_decode=False)
