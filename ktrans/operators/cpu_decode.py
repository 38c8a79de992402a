"""The fused all-CPU decode step: a decode-only engine step (every request one new token) of a
model whose every part runs in ktrans's CPU kernels, as one C++ call (csrc/decode/decoder.h)
instead of the module path's ~20-90 torch ops and Python calls per layer.

`CpuDecodeStep.build(model, kv, rotary)` reads the loaded operators — cpu_embedding (and its
scale), per layer the HF RMSNorms (Gemma's (1 + w) form and its post-sublayer norms too),
cpu_gqa_attention (with a sliding layer's window) / cpu_mla_attention (their stored projections,
norms, MLA's absorbed kv_b halves), and an MLP of cpu_linear projections (SiLU or GELU-tanh) or
a moe_block with cpu_experts (gguf or amx backends) and cpu_linear shared experts, the final norm
and a cpu_linear lm_head — into a plan that points at the same weights and at the KV cache
tensors; it returns None (with the reason in `why_not`) when any part is something else, and the
module path then runs every step. Rotary tables are precomputed once by the model's own rotary
module for every position the cache can hold (static rope types only; one table per layer type
where the module keeps several, as Gemma 3's local and global bases).

The module path stays the oracle: prefill and mixed steps always take it, and the tests compare
this step's logits with it (tests/operators/test_cpu_decode.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ktrans.operators import rope as rope_mod
from ktrans.operators.linear import offset_norms
from ktrans.operators.mlp import mlp_activation

_STYLES = {rope_mod.HALF: 0, rope_mod.INTERLEAVE: 1, rope_mod.COMPLEX: 2}
_STATIC_ROPE = ("default", "linear", "yarn", "llama3")
MAX_TOKENS = 64          # csrc/decode/decode_impl.h kMaxDecodeTokens
why_not: str = ""        # why the last build() returned None


class _Unsupported(Exception):
    pass


def _need(cond, what: str) -> None:
    if not cond:
        raise _Unsupported(what)


def _f32(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    _need(t.device.type == "cpu" and t.dtype == torch.float32, "a tensor is not float32 on the CPU")
    return t.contiguous().numpy()


def _norm(module, offset: bool = False) -> tuple[np.ndarray, float]:
    """(weight, eps) of an HF RMSNorm kept on the CPU; `offset`: Gemma's (1 + w) form, whose
    factor 1 + w (in f32, as transformers forms it) is what the C++ step multiplies by."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    _need(type(module).__name__.endswith("RMSNorm") and eps is not None, f"norm {type(module).__name__} is not an RMSNorm")
    return _scale_of(module.weight, offset), float(eps)


def _scale_of(weight: torch.Tensor, offset: bool) -> np.ndarray:
    return _f32(1.0 + weight.detach().float()) if offset else _f32(weight)


def _lin(module):
    from ktrans.operators.linear_cpu import CPULinear

    _need(isinstance(module, CPULinear) and module.qweight is not None, f"{getattr(module, 'key', module)} is not cpu_linear")
    return module.qweight.lin


def _rope_tables(rotary, style: str, npos: int, kind: str | None) -> tuple[int, np.ndarray, np.ndarray]:
    """One rotary table for every position the cache holds; `kind`: the layer type whose table a
    per-layer-type module (Gemma 3: local and global bases) computes."""
    rope_type = getattr(rotary, "rope_type", "default")
    if kind is not None:
        rope_type = rope_type[kind]
    _need(rope_type in _STATIC_ROPE, f"rope type '{rope_type}' depends on the sequence length")
    emb = rope_mod.rotary_embeddings(rotary, torch.arange(npos), torch.float32, kind)
    if style == rope_mod.COMPLEX:
        cos, sin = emb.real, emb.imag                                                    # [P, d/2]
    else:
        half = emb[0].shape[-1] // 2
        cos, sin = emb[0][:, :half], emb[1][:, :half]
    return _STYLES[style], _f32(cos), _f32(sin)


class CpuDecodeStep:
    """One fused decode step over a loaded all-CPU model (see the module docstring)."""

    def __init__(self, dec, kv, vocab: int, keep: list, softcap: float | None = None):
        self._dec, self._kv, self.vocab, self._keep, self.softcap = dec, kv, vocab, keep, softcap

    @classmethod
    def build(cls, model, kv, rotary, isa: str = "") -> "CpuDecodeStep | None":
        """The step for a loaded model, or None (reason in `why_not`). `isa`: level of the
        step's own vector kernels (norms, attention, rotary; default: the selected one)."""
        global why_not
        try:
            return cls._build(model, kv, rotary, isa)
        except _Unsupported as e:
            why_not = str(e)
            return None

    @classmethod
    def _build(cls, model, kv, rotary, isa: str) -> "CpuDecodeStep":
        from ktrans import _C
        from ktrans.operators.linear_cpu import CPUEmbedding

        inner, config = model.model, model.config
        emb = inner.embed_tokens
        _need(isinstance(emb, CPUEmbedding) and emb.raw is not None, "embed_tokens is not cpu_embedding")
        _check_model(config, emb)
        offset = offset_norms(config)
        head = _lin(model.lm_head)
        pool = _pool_of(model)
        num_slots = kv.num_pages * kv.page_size
        dec = _C.CpuDecoder(pool, config.hidden_size, kv.page_size, num_slots, isa)
        keep: list = []
        dec.set_embedding(emb.raw.qtype, np.ascontiguousarray(emb.raw.data).reshape(emb.num_embeddings, -1),
                          emb.num_embeddings, 0.0 if emb.scale is None else float(emb.scale))
        norm, eps = _norm(inner.norm, offset)
        dec.set_head(norm, eps, head)
        ropes: dict[tuple, int] = {}
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            style = getattr(attn, "style", None)
            _need(style in _STYLES, f"layer {i} attention is not a cpu_ attention operator")
            kind = rope_mod.layer_rope_kind(rotary, config, i)
            if (style, kind) not in ropes:
                ropes[style, kind] = dec.add_rope(*_rope_tables(rotary, style, num_slots, kind))
            _need(not getattr(attn, "has_sinks", False), f"layer {i} attention has sinks (gpt-oss)")
            idx = _add_attention(dec, layer, attn, kv.layers[i], ropes[style, kind], i, offset)
            if kv.window(i) is not None:
                dec.set_window(idx, kv.window(i))
            _add_mlp(dec, idx, layer.mlp, keep, i, pool, mlp_activation(config) or "silu")
        return cls(dec, kv, head.N, keep, getattr(config, "final_logit_softcapping", None) or None)

    def handles(self, batch) -> bool:
        """Decode-only steps (every request one new token) of at most MAX_TOKENS requests."""
        return batch.num_tokens == batch.num_reqs <= MAX_TOKENS and all(n == 1 for n in batch.num_new)

    def __call__(self, batch) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] float32 of one decode-only step.

        NOTE: instead of ForwardBatch.validate (a torch reduction per request), the C++ step
        checks every id, position and page it indexes with; the per-request lists are checked
        here in plain Python (a decode step's fixed cost is what this path exists to cut)."""
        from ktrans.errors import KtransError

        r = batch.num_reqs
        if len(batch.seq_ids) != r or len(batch.num_computed) != r or list(batch.num_computed) != \
                batch.positions.tolist():
            raise KtransError("ForwardBatch: a decode step's positions must equal num_computed, one per request")
        out = torch.empty(batch.logits_indices.shape[0], self.vocab, dtype=torch.float32)  # [R, V]
        try:
            self._dec.step(_np(batch.input_ids, torch.int64), _np(batch.positions, torch.int64),
                           _np(batch.page_table, torch.int32), _np(batch.logits_indices, torch.int64), out.numpy())
        except ValueError as e:
            raise KtransError(f"fused CPU decode step: {e}") from None
        if self.softcap:                     # Gemma 3's final softcapping, as transformers applies it
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def _check_model(config, emb) -> None:
    """The model-wide parts the C++ step computes: SiLU or GELU-tanh MLPs, embeddings read in f32
    (a scaled embedding in another dtype rounds its rows first, which the step does not), and
    softmax attention in every layer (Qwen3-Next's and Qwen3.5's linear-attention layers carry a
    recurrent state the step has no place for: their decode runs the module path, and the reason
    names it)."""
    from ktrans.config.arch import arch_from_config

    act = mlp_activation(config) or "silu"
    why = [w for w, bad in (
        (f"its MLP activation is {act}, not SiLU or GELU (tanh)", act not in _ACTS),
        (f"its scaled embeddings are {emb.dtype}, not float32", emb.scale is not None and emb.dtype != torch.float32),
        ("its linear-attention (Gated DeltaNet) layers keep a recurrent state",
         "linear_attention" in (getattr(config, "layer_types", None) or ())),
    ) if bad]
    _need(not why, f"{arch_from_config(config).name}: the fused step does not compute this model ({'; '.join(why)})")


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    """Zero-copy numpy view of `t` in `dtype` (converted only when it is not already)."""
    if t.dtype != dtype or not t.is_contiguous():
        t = t.to(dtype).contiguous()
    return t.numpy()


def _pool_of(model):
    """The pool the operators' kernels fan out on (the C++ plan checks that every part shares it)."""
    from ktrans.operators.linear_cpu import cpu_pool

    return cpu_pool(getattr(model.lm_head, "cpu_infer", None))


def _add_attention(dec, layer, attn, cache: tuple, rope: int, i: int, offset: bool) -> int:
    """The layer's norms and attention; Gemma 3's four norms: input and pre-feedforward around the
    sublayers, post-attention and post-feedforward on their outputs."""
    from ktrans.operators.attention_cpu import CPUGQAAttention, CPUMLAAttention

    an, eps = _norm(layer.input_layernorm, offset)
    post = None
    if hasattr(layer, "pre_feedforward_layernorm"):
        fn, _ = _norm(layer.pre_feedforward_layernorm, offset)
        post = (_norm(layer.post_attention_layernorm, offset)[0], _norm(layer.post_feedforward_layernorm, offset)[0])
    else:
        fn, _ = _norm(layer.post_attention_layernorm, offset)
    lins = {name: q.lin for name, q in attn.qproj.items()}
    if isinstance(attn, CPUGQAAttention):
        qn, kn = attn._p("q_norm.weight"), attn._p("k_norm.weight")
        idx = dec.add_gqa_layer(an, fn, eps, rope, lins["q_proj"], lins["k_proj"], lins["v_proj"], lins["o_proj"],
                                None if qn is None else _scale_of(qn, offset),
                                None if kn is None else _scale_of(kn, offset),
                                attn.num_heads, attn.num_kv_heads, attn.head_dim, float(attn.scale),
                                _f32(cache[0]), _f32(cache[1]))
        if post is not None:
            dec.set_post_norms(idx, *post)
        return idx
    _need(isinstance(attn, CPUMLAAttention) and post is None, f"layer {i} attention is {type(attn).__name__}")
    qa_norm = attn._p("q_a_layernorm.weight")
    return dec.add_mla_layer(an, fn, eps, rope, lins.get("q_proj"), lins.get("q_a_proj"),
                             None if qa_norm is None else _f32(qa_norm), lins.get("q_b_proj"),
                             lins["kv_a_proj_with_mqa"], _f32(attn._p("kv_a_layernorm.weight")), _f32(attn.w_uk),
                             _f32(attn.w_uv), lins["o_proj"], attn.num_heads, attn.nope_dim, attn.rope_dim,
                             attn.v_dim, attn.kv_lora_rank, float(attn.scale), _f32(cache[0]))


def _mlp_lins(mlp) -> tuple:
    _need(all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")), f"{type(mlp).__name__} is not a gated MLP")
    return _lin(mlp.gate_proj), _lin(mlp.up_proj), _lin(mlp.down_proj)


def _add_mlp(dec, idx: int, mlp, keep: list, i: int, pool, act: str) -> None:
    from ktrans import _C
    from ktrans.operators.moe_block import MoEBlock, renormalises

    if not isinstance(mlp, MoEBlock):
        dec.set_dense_mlp(idx, *_mlp_lins(mlp), _ACTS[act])
        return
    moe = getattr(mlp.experts, "_moe", None)
    _need(moe is not None, f"layer {i} experts are not cpu_experts on a C++ backend")
    _need(mlp.routing != "topk_softmax" and mlp.experts.gating.act == "silu" and mlp.experts.bias_layout is None,
          f"layer {i} routes or gates its experts as gpt-oss does")
    c, e, h = mlp.config, mlp.num_experts, mlp.config.hidden_size
    gate_w = _f32(mlp.gate_weight)                                                       # [E, H]
    router = _C.Linear(pool, "f32", e, h, gate_w.view(np.uint8).reshape(-1))
    keep.append(gate_w)
    kind, n_group, topk_group, norm, limited, scale = 0, 1, 1, False, False, 1.0
    if mlp.routing == "deepseek_v3":
        kind, n_group, topk_group, norm, scale = 2, c.n_group, c.topk_group, bool(c.norm_topk_prob), c.routed_scaling_factor
    elif mlp.routing == "sigmoid_topk":     # MiniMax-M2: DeepSeek-V3's scheme with one group, renormalised
        kind, norm = 2, True
    elif mlp.routing == "deepseek_v2":
        _need(c.topk_method in ("greedy", "group_limited_greedy"), f"topk_method {c.topk_method}")
        kind, scale, limited = 1, c.routed_scaling_factor, c.topk_method == "group_limited_greedy"
        n_group, topk_group = (c.n_group, c.topk_group) if limited else (1, 1)
    else:
        norm = renormalises(c)
    bias = None if mlp.gate_bias is None else _f32(mlp.gate_bias)
    shared = (None, None, None)
    shared_gate = None
    if hasattr(mlp, "shared_experts"):
        shared = _mlp_lins(mlp.shared_experts)
    elif hasattr(mlp, "shared_expert"):
        shared, shared_gate = _mlp_lins(mlp.shared_expert), _lin(mlp.shared_expert_gate)
    dec.set_moe(idx, kind, router, bias, mlp.top_k, n_group, topk_group, norm, limited, float(scale), moe,
                *shared, shared_gate)

