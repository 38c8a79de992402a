"""MLA and GQA attention operators vs the transformers attention modules they replace, on the
same random weights: packed requests, chunked prefill and decode steps over the paged cache
must reproduce each request's full-sequence HF output (gpt-oss: its sliding layer too, whose
window the KV cache's layer kind gives, and its attention sinks; GLM-4.5: rotary on half of each
head, q/k norms, q/k/v biases; MiniMax-M2: q/k norms over all heads; Gemma 3: its local layer's
window and rope base, the global layer's scaled rope, (1 + w) q/k norms, query_pre_attn_scalar;
Qwen3-Next and Qwen3.5-MoE: the sigmoid output gate q_proj carries beside each head's query,
(1 + w) q/k norms, rotary on a quarter of each head)."""

from __future__ import annotations

import pytest
import torch

from ktrans.engine.batch import ForwardBatch, forward_context
from ktrans.kv_cache.storage import KVStorage
from ktrans.operators.attention_gqa import GQAAttention
from ktrans.operators.attention_mla import MLAAttention
from ktrans.operators.rope import layer_rope_kind, materialize_rotary, rotary_embeddings
from tests.operators.hf_tiny import model_source, tiny_hf_model
from tests.tolerances import F32_ATOL, F32_RTOL

ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "llama", "gpt_oss", "glm4_moe",
         "minimax_m2", "gemma3", "qwen3_next", "qwen3_5_moe"]
PAGE = 4
# Each request's tokens, split into the chunks scheduled at each of three steps (0 = idle).
SCHEDULE = {0: [5, 1, 1], 1: [3, 4, 1], 2: [0, 6, 2]}


def _hf_reference(model, attn, x):
    """HF attention over one whole sequence x [S, H] (causal, no cache) -> [S, H]."""
    s = x.shape[0]
    pos = torch.arange(s)[None]
    kind = layer_rope_kind(model.model.rotary_emb, model.config, attn.layer_idx)
    emb = model.model.rotary_emb(x[None], pos) if kind is None else model.model.rotary_emb(x[None], pos, kind)
    mask = torch.full((s, s), float("-inf")).triu(1)
    window = getattr(attn, "sliding_window", None)
    if window:                                                  # key j visible iff i - window < j <= i
        mask = mask + torch.full((s, s), float("-inf")).tril(-window)
    mask = mask[None, None]
    with torch.no_grad():
        return attn(hidden_states=x[None], position_embeddings=emb, attention_mask=mask)[0][0]


def split_packed(y, reqs, chunks, outs, done) -> None:
    """A packed step's output y [sum of chunks, ...] back to its requests (outs[r] gets its rows,
    done[r] counts them)."""
    start = 0
    for r, c in zip(reqs, chunks):
        outs[r].append(y[start:start + len(c)])
        start += len(c)
        done[r] += len(c)


def _run_schedule(op, model, config, xs, native):
    kv = KVStorage.for_config(config, num_pages=32, page_size=PAGE, dtype=torch.float32, device="cpu")
    rotary = materialize_rotary(model.model.rotary_emb, config, "cpu")
    pages = torch.randperm(32)[:18].int().view(len(xs), 6)  # 6 pages of 4 per request, any order
    done = [0] * len(xs)
    outs = [[] for _ in xs]
    for step in range(3):
        reqs = [r for r in range(len(xs)) if SCHEDULE[r][step] > 0]
        chunks = [xs[r][done[r]:done[r] + SCHEDULE[r][step]] for r in reqs]
        positions = torch.cat([torch.arange(done[r], done[r] + SCHEDULE[r][step]) for r in reqs])
        batch = ForwardBatch(input_ids=torch.zeros(len(positions), dtype=torch.long), positions=positions,
                             seq_ids=reqs, num_computed=[done[r] for r in reqs],
                             num_new=[SCHEDULE[r][step] for r in reqs], page_table=pages[reqs],
                             logits_indices=torch.zeros(0, dtype=torch.long))
        with forward_context(batch, kv), torch.no_grad():
            emb = rotary_embeddings(rotary, positions, torch.float32, layer_rope_kind(rotary, config, op.layer_idx))
            emb = tuple(e[None] for e in emb) if isinstance(emb, tuple) else emb[None]
            fn = op.forward_native if native else op.forward
            y = fn(torch.cat(chunks)[None], position_embeddings=emb)[0][0]
        split_packed(y, reqs, chunks, outs, done)
    return [torch.cat(o) for o in outs]


def _has_triton() -> bool:
    from ktrans.kernels import triton_available

    return triton_available()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("native,backend", [(False, "torch"), (False, "triton"), (True, "torch")])
def test_attention_matches_hf_over_packed_chunked_steps(arch, native, backend):
    if backend == "triton" and not _has_triton():
        pytest.skip("needs Triton")
    config, model = tiny_hf_model(arch)
    layer = 1
    attn = model.model.layers[layer].self_attn
    cls = MLAAttention if arch.startswith("deepseek") else GQAAttention
    op = cls(key=f"model.layers.{layer}.self_attn", orig_module=attn, config=config, device="cpu",
             attn_backend=backend)
    assert op.decode_kernel == (backend == "triton")
    op.load_weights(model_source(model))
    xs = [torch.randn(sum(SCHEDULE[r]), config.hidden_size) for r in range(3)]
    got = _run_schedule(op, model, config, xs, native)
    for r in range(3):
        torch.testing.assert_close(got[r], _hf_reference(model, attn, xs[r]), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.parametrize("arch", ["gpt_oss", "gemma3"])
@pytest.mark.parametrize("native,backend", [(False, "torch"), (False, "triton"), (True, "torch")])
def test_sliding_layer_matches_hf(arch, native, backend):
    """Layer 0 of the tiny gpt-oss and Gemma 3 slides over 3 tokens (requests of 7 and 8 tokens
    leave it); gpt-oss's sinks are scaled up so that they take a visible share of the softmax,
    Gemma 3's local layer rotates with its own base."""
    if backend == "triton" and not _has_triton():
        pytest.skip("needs Triton")
    config, model = tiny_hf_model(arch)
    attn = model.model.layers[0].self_attn
    assert attn.sliding_window == 3
    if arch == "gpt_oss":
        with torch.no_grad():
            attn.sinks.mul_(20)
    op = GQAAttention(key="model.layers.0.self_attn", orig_module=attn, config=config, device="cpu",
                      attn_backend=backend)
    op.load_weights(model_source(model))
    xs = [torch.randn(sum(SCHEDULE[r]), config.hidden_size) for r in range(3)]
    got = _run_schedule(op, model, config, xs, native)
    for r in range(3):
        torch.testing.assert_close(got[r], _hf_reference(model, attn, xs[r]), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_mla_absorbed_prefill_matches_hf(arch):
    """absorb_for_prefill: the absorbed form for multi-token chunks too (long contexts)."""
    config, model = tiny_hf_model(arch)
    attn = model.model.layers[1].self_attn
    op = MLAAttention(key="model.layers.1.self_attn", orig_module=attn, config=config, device="cpu",
                      absorb_for_prefill=True)
    op.load_weights(model_source(model))
    xs = [torch.randn(sum(SCHEDULE[r]), config.hidden_size) for r in range(3)]
    got = _run_schedule(op, model, config, xs, native=False)
    for r in range(3):
        torch.testing.assert_close(got[r], _hf_reference(model, attn, xs[r]), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_attention_with_gguf_projections_matches_dense(tiny_model, arch):
    """weights: stored keeps the projections in their GGUF formats (the quant matmul kernel,
    interpreted on a CPU-only machine): same outputs as the operator with the same weights
    dequantized, over a prefill chunk and a decode step."""
    if not _has_triton():
        pytest.skip("needs Triton")
    from ktrans.config.arch import build_meta_model
    from ktrans.operators.linear import QuantProjection
    from ktrans.weights.source import open_weights

    src = open_weights(None, str(tiny_model(arch, "q4_k_m", with_safetensors=False) / "model.gguf"))
    config = src.config()
    model = build_meta_model(config)
    attn = model.model.layers[1].self_attn
    cls = MLAAttention if arch.startswith("deepseek") else GQAAttention
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ops = {}
    for mode in ("stored", "dense"):
        ops[mode] = cls(key="model.layers.1.self_attn", orig_module=attn, config=config, device=dev,
                        dtype="f32", weights=mode, attn_backend="torch")
        ops[mode].load_weights(src)
    assert all(isinstance(p, QuantProjection) for p in ops["stored"].projs.values())
    rotary = materialize_rotary(model.model.rotary_emb, config, dev)
    kv = {m: KVStorage.for_config(config, num_pages=4, page_size=PAGE, dtype=torch.float32, device=dev) for m in ops}
    pages = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    x = torch.randn(6, config.hidden_size, device=dev)
    for start, n in ((0, 5), (5, 1)):
        positions = torch.arange(start, start + n)
        batch = ForwardBatch(input_ids=torch.zeros(n, dtype=torch.long), positions=positions, seq_ids=[0],
                             num_computed=[start], num_new=[n], page_table=pages,
                             logits_indices=torch.zeros(0, dtype=torch.long))
        got = {}
        for mode, op in ops.items():
            with forward_context(batch, kv[mode]), torch.no_grad():
                emb = rotary_embeddings(rotary, positions.to(dev), torch.float32)
                emb = tuple(e[None] for e in emb) if isinstance(emb, tuple) else emb[None]
                got[mode] = op(x[start:start + n][None], position_embeddings=emb)[0][0]
        tol = 2e-3 if dev == "cuda" else 1e-5           # tf32 dots on CUDA
        torch.testing.assert_close(got["stored"], got["dense"], rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [None, 1, 7, 12, 15, 16, 40])
@pytest.mark.parametrize("start, n", [(0, 16), (0, 1), (9, 7), (20, 12)])
def test_sdpa_prefill_against_an_explicit_mask(window, start, n):
    """One request's chunk (positions start..start+n-1 over keys 0..start+n-1) through
    sdpa_prefill, with a window the chunk outgrows, reaches exactly, or never reaches, against
    softmax over an explicit "p - window < key <= p" mask in float64 (GQA: 4 query heads per kv
    head)."""
    from ktrans.operators.attention_mla import sdpa_prefill

    length, hq, hkv, d = start + n, 8, 2, 16
    q, k, v = torch.randn(n, hq, d), torch.randn(length, hkv, d), torch.randn(length, hkv, d)
    pos = torch.arange(start, start + n)
    got = sdpa_prefill(q, k, v, pos, 0.3, window=window)
    keys = torch.arange(length)
    keep = (keys[None, :] <= pos[:, None]) & ((keys[None, :] > pos[:, None] - window) if window else True)
    kk, vv = (t.double().repeat_interleave(hq // hkv, dim=1) for t in (k, v))               # [L, Hq, d]
    scores = torch.einsum("nhd,lhd->hnl", q.double(), kk) * 0.3
    want = torch.einsum("hnl,lhd->nhd", scores.masked_fill(~keep, float("-inf")).softmax(-1), vv)
    torch.testing.assert_close(got.double(), want, rtol=F32_RTOL, atol=F32_ATOL)
