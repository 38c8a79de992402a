"""`mla_attention`: DeepSeek-V2/V3 multi-head latent attention over the paged KV cache.

The cache holds, per token and layer, only the normalised compressed latent c (kv_lora_rank)
and the rotated shared rope key k_pe (qk_rope_head_dim): 576 values for V3 instead of
2 * 128 heads * 192. Two ways to attend over it:

- expanded (prefill, and the oracle `forward_native`): K/V of every cached token are rebuilt
  with kv_b_proj (kept as its per-head halves W_UK, W_UV), then ordinary attention with head dim
  qk_nope + qk_rope (torch's fused SDPA in `forward`, explicit softmax in `forward_native`);
- absorbed (decode): kv_b_proj = [W_UK; W_UV] per head is folded into the query and the output,
  q_lat = q_nope · W_UK  [.., H, r];  score = q_lat · c + q_pe · k_pe;  o = (p · c) · W_UVᵀ,
  so attention reads the latent cache directly and nothing per-head is materialised per token.
  On CUDA the decode tokens go through the paged Triton kernel (ktrans.kernels.paged_decode:
  reads pages and lengths on the device, so a decode step can be a CUDA graph); elsewhere, and
  as its oracle, through a padded gather and torch.

Requests in one step are packed; each attends causally to its own cached + new tokens only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ktrans.engine.batch import current_forward
from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.linear import ProjectionOwner, resolve_dtype, rms_norm, rms_norm_for
from ktrans.operators.registry import register_operator
from ktrans.operators.rope import apply_rope, mla_softmax_scale, rope_for, rope_style


def masked_attention(scores: torch.Tensor, q_pos: torch.Tensor, values_fn, hidden=None, window: int | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over keys with causal masking by position: key j is visible to a query at
    position p iff j <= p (keys are the request's tokens in position order; padded keys past
    the request's length lie beyond every query position, so they are masked too).
    scores [B, H, n, L] (already scaled), q_pos [B, n]; returns values_fn(probs). `hidden`
    [B, 1, n, L] is that mask negated, when the caller has it already (DecodeGroup.padded).
    window (sliding layers): keys j <= p - window are hidden too. sinks [H] (gpt-oss): one more
    logit per head in the softmax, which takes probability mass but adds no value."""
    L = scores.shape[-1]
    keys = torch.arange(L, device=scores.device)
    if hidden is None:
        hidden = (keys[None, None, :] > q_pos[:, :, None])[:, None]                          # [B, 1, n, L]
    if window:
        hidden = hidden | (keys[None, None, :] <= q_pos[:, :, None] - window)[:, None]
    scores = scores.float().masked_fill(hidden, float("-inf"))
    if sinks is None:
        return values_fn(torch.softmax(scores, dim=-1))
    b, h, n, _ = scores.shape
    sink = sinks.float().view(1, h, 1, 1).expand(b, h, n, 1)
    return values_fn(torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1])


def sdpa_prefill(q, k, v, q_pos, scale: float, window: int | None = None,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """One request's multi-token chunk through torch's fused attention (flash / memory-efficient
    kernels on CUDA, the fused CPU kernel otherwise): q [n, Hq, d], k [L, Hkv, d], v [L, Hkv, dv],
    q_pos [n] -> [n, Hq, dv]. A chunk that starts its sequence (L == n) is plain causal; a later
    chunk, a sliding window or sinks get the explicit mask "p - window < key position <= p".
    Sinks [Hq] (gpt-oss) enter as one more key per kv head with a zero value: queries get 8 more
    coordinates (the first one sinks[h] / scale, so that the scaled logit is sinks[h]), real keys
    zeros there and the sink key a one (8: fused kernels want head dims in multiples of 8)."""
    n, length = q.shape[0], k.shape[0]
    gqa = q.shape[1] != k.shape[1]
    if window and not q.is_cuda and int(q_pos.max()) < window:
        # NOTE: no query of the chunk is `window` tokens in, so the window hides no key: the plain
        # causal kernel (on the CPU 3x faster than the masked one for a 512-token Gemma 3 chunk;
        # on CUDA reading q_pos would be a host sync, so the mask stays)
        window = None
    plain = n == length and not window and sinks is None
    keep = None
    if not plain:
        keys = torch.arange(length, device=q.device)
        keep = keys[None, :] <= q_pos[:, None]                                              # [n, L]
        if window:
            keep = keep & (keys[None, :] > q_pos[:, None] - window)
    if sinks is not None:
        extra = q.new_zeros(n, q.shape[1], 8)
        extra[:, :, 0] = (sinks.float() / scale).to(q.dtype)
        q = torch.cat([q, extra], dim=-1)                                                   # [n, Hq, d + 8]
        sink_key = k.new_zeros(1, k.shape[1], k.shape[2] + 8)
        sink_key[..., k.shape[2]] = 1
        k = torch.cat([torch.cat([k, k.new_zeros(length, k.shape[1], 8)], dim=-1), sink_key])  # [L + 1, Hkv, d + 8]
        v = torch.cat([v, v.new_zeros(1, *v.shape[1:])])                                    # [L + 1, Hkv, dv]
        keep = torch.cat([keep, keep.new_ones(n, 1)], dim=-1)                               # [n, L + 1]
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))                          # [1, H, ., d]
    if plain:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)                                                           # [n, Hq, dv]


@register_operator("mla_attention")
class MLAAttention(ProjectionOwner, Operator):
    name: ClassVar[str] = "mla_attention"
    owned_children: ClassVar[tuple[str, ...]] = ("*",)      # every projection and norm is loaded here

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", absorb_for_prefill=False,
                 attn_backend="auto", weights="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if not getattr(config, "kv_lora_rank", None):
            raise KtransError(f"{key}: mla_attention needs a DeepSeek MLA config (kv_lora_rank), "
                              f"got model_type '{config.model_type}'")
        self.layer_idx = orig_module.layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.eps = config.rms_norm_eps
        self.scale = mla_softmax_scale(config)
        self.style = rope_style(config)
        self.absorb_for_prefill = bool(absorb_for_prefill)
        self.dtype = resolve_dtype(dtype, torch.device(device))
        self._set_weights_mode(key, weights)
        choose_kernels(self, key, attn_backend)

    def _proj_shapes(self) -> dict[str, tuple[int, int]]:
        """Projections (GGUF blocks kept on the GPU where they can be; see linear.py)."""
        h, qk = self.config.hidden_size, self.nope_dim + self.rope_dim
        shapes = {"kv_a_proj_with_mqa": (self.kv_lora_rank + self.rope_dim, h), "o_proj": (h, self.num_heads * self.v_dim)}
        if self.q_lora_rank:
            shapes.update({"q_a_proj": (self.q_lora_rank, h), "q_b_proj": (self.num_heads * qk, self.q_lora_rank)})
        else:
            shapes["q_proj"] = (self.num_heads * qk, h)
        return shapes

    def _biased(self) -> set[str]:
        if not getattr(self.config, "attention_bias", False):
            return set()
        return {"kv_a_proj_with_mqa", "o_proj"} | ({"q_a_proj"} if self.q_lora_rank else set())

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Norms, and kv_b_proj: always dense (the absorbed decode multiplies its halves by bmm)."""
        shapes = {"kv_a_layernorm.weight": (self.kv_lora_rank,),
                  "kv_b_proj.weight": (self.num_heads * (self.nope_dim + self.v_dim), self.kv_lora_rank)}
        if self.q_lora_rank:
            shapes["q_a_layernorm.weight"] = (self.q_lora_rank,)
        return shapes

    def load_weights(self, weights) -> None:
        self._load_owned(weights)
        # NOTE: kv_b_proj is kept only as its two per-head halves, each contiguous, so the
        # absorbed decode multiplies them without a per-step copy of a strided view.
        w = self.params.pop("kv_b_proj__weight").view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk = torch.nn.Parameter(w[:, : self.nope_dim].contiguous(), requires_grad=False)  # [H, dn, r]
        self.w_uv = torch.nn.Parameter(w[:, self.nope_dim:].contiguous(), requires_grad=False)   # [H, dv, r]

    def _project(self, x: torch.Tensor, emb, native: bool = False):
        """x [T, hidden] -> q_nope [T, H, dn], q_pe [T, H, dr] (rotated), cache entries [T, r + dr]."""
        norm = rms_norm if native else self._rms
        if self.q_lora_rank:
            q_a = norm(self._linear(x, "q_a_proj", native), self._p("q_a_layernorm.weight"), self.eps)  # [T, q_lora]
            q = self._linear(q_a, "q_b_proj", native)
        else:
            q = self._linear(x, "q_proj", native)
        q = q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)            # [T, H, dqk]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self._linear(x, "kv_a_proj_with_mqa", native).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = norm(latent, self._p("kv_a_layernorm.weight"), self.eps)                # [T, r]
        rope = apply_rope if native else self._rope
        q_pe = rope(q_pe, emb, self.style)                                                # [T, H, dr]
        k_pe = rope(k_pe[:, None, :], emb, self.style)[:, 0]                              # [T, dr]
        return q_nope, q_pe, torch.cat([latent, k_pe], dim=-1)

    def _attend_expanded(self, q_nope, q_pe, cached, q_pos, fused: bool) -> torch.Tensor:
        """One request: q_* [n, H, .], cached [L, r + dr], q_pos [n] -> [n, H, dv]."""
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope = torch.einsum("lr,hdr->lhd", latent, self.w_uk)                           # [L, H, dn]
        v = torch.einsum("lr,hvr->lhv", latent, self.w_uv)                                # [L, H, dv]
        if fused:
            k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)  # [L, H, dqk]
            return sdpa_prefill(torch.cat([q_nope, q_pe], dim=-1), k, v, q_pos, self.scale)
        scores = (torch.einsum("nhd,lhd->hnl", q_nope, k_nope)
                  + torch.einsum("nhe,le->hnl", q_pe, k_pe)) * self.scale                # [H, n, L]
        out = masked_attention(scores[None], q_pos[None], lambda p: torch.einsum("hnl,lhv->nhv", p[0].to(v.dtype), v))
        return out

    def _attend_absorbed(self, q_nope, q_pe, cached, q_pos, hidden=None) -> torch.Tensor:
        """B requests at once: q_* [B, n, H, .], cached [B, L, r + dr], q_pos [B, n] -> [B, n, H, dv]."""
        w_uk, w_uv = self.w_uk, self.w_uv
        latent, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_lat = torch.einsum("bnhd,hdr->bnhr", q_nope, w_uk)                              # [B, n, H, r]
        scores = (torch.einsum("bnhr,blr->bhnl", q_lat, latent)
                  + torch.einsum("bnhe,ble->bhnl", q_pe, k_pe)) * self.scale              # [B, H, n, L]
        o_lat = masked_attention(scores, q_pos, lambda p: torch.einsum("bhnl,blr->bnhr", p.to(latent.dtype), latent),
                                 hidden)
        return torch.einsum("bnhr,hvr->bnhv", o_lat, w_uv)                                # [B, n, H, dv]

    def _decode_padded(self, q_nope, q_pe, group, kv) -> torch.Tensor:
        """Decode rows through a padded gather of the cache and torch: q_* [B, H, .] -> [B, H, dv]."""
        slots, hidden = group.padded(kv)
        cached = kv.gather_slots(self.layer_idx, slots)[0]                               # [B, L, r + dr]
        return self._attend_absorbed(q_nope[:, None], q_pe[:, None], cached, group.q_pos, hidden)[:, 0]

    def _decode_paged(self, q_nope, q_pe, group, kv) -> torch.Tensor:
        """Decode rows through the paged kernel: q_* [B, H, .] -> [B, H, dv]."""
        from ktrans.kernels.paged_decode import paged_decode_attention

        r = self.kv_lora_rank
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)             # [B, H, r] (strided)
        cache = kv.layer_tensors(self.layer_idx)[0]                                      # [slots, r + dr]
        latent, k_pe = cache[:, None, :r], cache[:, None, r:]                            # views, 1 kv head
        o_lat = paged_decode_attention(q_lat, latent, latent, group.page_table, group.seq_lens, kv.page_size,
                                       self.scale, q_b=q_pe, k_b=k_pe)                   # [B, H, r]
        return torch.bmm(o_lat.transpose(0, 1), self.w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, dv]

    def _run(self, hidden_states, position_embeddings, absorb_decode: bool) -> tuple[torch.Tensor, None]:
        ctx = current_forward().on(self.device)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1]).to(self.device, self.dtype)             # [T, hidden]
        emb = _strip_batch(position_embeddings, self.device)
        q_nope, q_pe, entries = self._project(x, emb, native=not absorb_decode)
        ctx.kv.write(self.layer_idx, ctx.slot_mapping, entries)
        out = torch.empty(x.shape[0], self.num_heads, self.v_dim, dtype=x.dtype, device=x.device)  # [T, H, dv]
        qs, pos = ctx.query_start, ctx.positions
        group = ctx.decode_group() if absorb_decode else None
        single = group.reqs if group is not None else frozenset()
        if group is not None:
            attend = self._decode_paged if self.decode_kernel else self._decode_padded
            if group.whole:  # decode-only step: every row, in order
                out = attend(q_nope, q_pe, group, ctx.kv)
            else:
                out[group.rows] = attend(q_nope[group.rows], q_pe[group.rows], group, ctx.kv)
        for r in range(ctx.batch.num_reqs):
            if r in single:
                continue
            sl = slice(qs[r], qs[r + 1])
            cached = ctx.kv.gather(self.layer_idx, ctx.page_table[r], ctx.seq_lens[r])[0]  # [L, r + dr]
            if absorb_decode and self.absorb_for_prefill:
                out[sl] = self._attend_absorbed(q_nope[sl][None], q_pe[sl][None], cached[None], pos[sl][None])[0]
            else:
                out[sl] = self._attend_expanded(q_nope[sl], q_pe[sl], cached, pos[sl], fused=absorb_decode)
        o = self._linear(out.reshape(x.shape[0], -1), "o_proj", native=not absorb_decode)  # [T, hidden]
        return o.view(*shape[:-1], -1), None

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        return self._run(hidden_states, position_embeddings, absorb_decode=True)

    def forward_native(self, hidden_states, position_embeddings=None, **kwargs):
        return self._run(hidden_states, position_embeddings, absorb_decode=False)


ATTN_BACKENDS = ("auto", "triton", "torch")


def choose_kernels(op, key: str, attn_backend: str) -> None:
    """An attention operator's kernels, chosen once at construction from its device: the paged
    decode kernel (attn_backend), the RMSNorm and the rotary of its pairing (op.style)."""
    op.decode_kernel = decode_backend(key, attn_backend, op.device) == "triton"
    op._rms = rms_norm_for(op.device)
    op._rope = rope_for(op.device, op.style)


def decode_backend(key: str, backend: str, device: torch.device) -> str:
    """The decode attention backend an operator uses: auto is the paged Triton kernel on CUDA
    (torch when Triton does not import, with one warning) and torch elsewhere. triton on a CPU
    device runs only under Triton's interpreter (TRITON_INTERPRET=1: the tests' CPU runs)."""
    import os

    from ktrans.kernels import triton_available

    if backend not in ATTN_BACKENDS:
        raise KtransError(f"{key}: attn_backend '{backend}' is not one of {', '.join(ATTN_BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise KtransError(f"{key}: attn_backend triton needs a CUDA device (this operator is on {device})")
        if not triton_available():
            raise KtransError(f"{key}: attn_backend triton, but Triton does not import here")
    return backend


def _strip_batch(emb, device):
    """HF rotary output has a leading batch dim of 1 over the packed tokens; drop it."""
    if emb is None:
        raise KtransError("attention needs position_embeddings (the model forward computes them from positions)")
    if isinstance(emb, tuple):
        return tuple(e.reshape(-1, e.shape[-1]).to(device) for e in emb)
    return emb.reshape(-1, emb.shape[-1]).to(device)
