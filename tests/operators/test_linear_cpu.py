"""The all-CPU operators that keep GGUF weights as stored (cpu_linear, cpu_embedding,
cpu_gqa_attention, cpu_mla_attention, cpu_gated_deltanet) on gen-model's tiny quantized models: each against its
plain-torch oracle on the gguf-py-dequantized weights, loading without copying, the byte plan,
and whole models under the shipped all-CPU rules against the same model with every dense weight
dequantized to f32 (the previous all-CPU placement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ktrans.engine.batch import ForwardBatch
from ktrans.engine.model_runner import ModelRunner, default_rule_file
from ktrans.errors import KtransError
from ktrans.operators.linear_cpu import CPUEmbedding, CPULinear
from ktrans.weights import names, names_legacy
from tests.routing import Reference, force_reference_routing
from tests.tolerances import (QUANT_LOGITS_NMSE, QUANT_LOGITS_NMSE_DELTANET, QUANT_LOGITS_NMSE_POST_NORM,
                              ROUTING_LOGIT_DRIFT, VEC_DOT_NMSE)

ARCHS = ["qwen2", "qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "minimax_m2", "gemma3", "qwen3_next",
         "qwen3_5_moe"]
STATE = torch.tensor([[0, 0]])     # the one request's recurrent-state rows (hybrids), updated in place


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))


def _runner(d, rules=None, fused_decode=True) -> ModelRunner:
    return ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cpu", cache_lens=128,
                       page_size=16, progress=False, optimize_config_path=rules and str(rules),
                       fused_decode=fused_decode)


def _logits(runner, ids: list[int], step_rows: list | None = None) -> torch.Tensor:
    """Prefill ids[:-4], then four decode steps: logits of every position [len(ids), V].
    `step_rows` is set to the (request, position) of each token of the step about to run."""
    pages = torch.arange(runner.num_pages, dtype=torch.int32)
    n = len(ids) - 4
    if step_rows is not None:
        step_rows[:] = [(0, i) for i in range(n)]
    rows = [runner.execute(ForwardBatch(input_ids=torch.tensor(ids[:n]), positions=torch.arange(n), seq_ids=[0],
                                        num_computed=[0], num_new=[n], page_table=pages[None],
                                        logits_indices=torch.arange(n), state_rows=STATE))]
    for p in range(n, len(ids)):
        if step_rows is not None:
            step_rows[:] = [(0, p)]
        rows.append(runner.execute(ForwardBatch(input_ids=torch.tensor([ids[p]]), positions=torch.tensor([p]),
                                                seq_ids=[0], num_computed=[p], num_new=[1], page_table=pages[None],
                                                logits_indices=torch.tensor([0]), state_rows=STATE)))
    return torch.cat(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_cpu_rules_keep_weights_as_stored_and_match_oracles(tiny_model, arch):
    d = tiny_model(arch, "q4_k", with_safetensors=False)
    runner = _runner(d)
    assert runner.rule_file == str(default_rule_file(arch, "cpu")) and runner.rule_file.endswith("-cpu.yaml")
    mapping = runner.weights.reader.files[0]._buf
    ops = {n: m for n, m in runner.model.named_modules() if getattr(m, "name", "").startswith("cpu_")}
    linears = [m for m in ops.values() if isinstance(m, CPULinear)]
    assert linears and any(isinstance(m, CPUEmbedding) for m in ops.values())
    x = torch.randn(5, runner.config.hidden_size)
    for m in linears:
        assert np.shares_memory(m.qweight.raw.data, mapping) or m.qweight.raw.qtype == "f32"
        if m.in_features == x.shape[1]:
            assert nmse(m(x), m.forward_native(x)) < VEC_DOT_NMSE["q4_k"], m.key
    emb = runner.model.model.embed_tokens
    ids = torch.randint(0, runner.config.vocab_size, (7,))
    assert torch.equal(emb(ids), emb.forward_native(ids))
    layers = runner.model.model.layers
    attn = next(layer.self_attn for layer in layers if hasattr(layer, "self_attn"))
    assert attn.name == ("cpu_mla_attention" if arch.startswith("deepseek") else "cpu_gqa_attention")
    linear = [layer.linear_attn for layer in layers if hasattr(layer, "linear_attn")]
    assert all(m.name == "cpu_gated_deltanet" for m in linear)
    assert bool(linear) == (arch in ("qwen3_next", "qwen3_5_moe"))
    assert all(np.shares_memory(q.raw.data, mapping) for q in attn.qproj.values() if q.raw.qtype != "f32")
    transform = {hf: (g, tr) for hf, g, tr in names.expand(runner.config, runner.weights.arch)}
    for op in linear:
        for proj, q in op.qproj.items():
            gnames, tr = transform[f"{op.key}.{proj}.weight"]
            stored = {runner.weights.reader.tensors[g].qtype for g in gnames}
            if tr == "copy":                            # as stored, from the file mapping
                assert np.shares_memory(q.raw.data, mapping) or q.raw.qtype == "f32", (op.key, proj)
            elif tr in names_legacy.ROW_TRANSFORMS and len(stored) == 1:
                assert {q.raw.qtype} == stored, (op.key, proj)      # whole quant rows moved (qkvz, v_tiled)
            else:                                       # columns reordered (Qwen3.5's out_proj): f32
                assert q.raw.qtype == "f32" and tr == "v_cols_tiled", (op.key, proj, tr)
    planned = sum(runner.plan.bytes_per_device().values())
    assert planned < 1.5 * (d / "model.gguf").stat().st_size      # no f32 copies of the dense weights


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_model_close_to_the_dequantized_f32_placement(tiny_model, tmp_path, arch):
    """Shipped all-CPU rules vs the default rules mapped to the CPU (dense weights dequantized
    to f32, torch ops): the activation quantization of the kernels stays within the bound of
    quantized weights (but for rare routing near-ties)."""
    d = tiny_model(arch, "q4_k", with_safetensors=False)
    # NOTE: the module path (the fused decode step has its own test against it), so that every
    # step's routing can be held to the reference's (tests/routing.py).
    ours = _runner(d, fused_decode=False)
    ref = _runner(d, default_rule_file(arch, "cuda"))
    ids = torch.randint(0, ours.config.vocab_size, (24,)).tolist()
    rows = []

    def rows_of_step():
        return rows

    routing, flips, drift = Reference(ours.config), [], [0.0]
    with routing.recording_ktrans(ref.model, rows_of_step):
        b = _logits(ref, ids, rows)
    with force_reference_routing(ours.model, routing, rows_of_step, flips, drift):
        a = _logits(ours, ids, rows)
    # a flipped expert must be a genuine near-tie of the reference's router, and then every
    # token is held to the bound of quantized activations
    assert drift[0] < ROUTING_LOGIT_DRIFT, drift
    assert all(f.gap <= f.drift for f in flips), flips
    errors = [nmse(a[i], b[i]) for i in range(len(ids))]
    bound = {"gemma3": QUANT_LOGITS_NMSE_POST_NORM, "qwen3_next": QUANT_LOGITS_NMSE_DELTANET,
             "qwen3_5_moe": QUANT_LOGITS_NMSE_DELTANET}.get(arch, QUANT_LOGITS_NMSE)
    assert max(errors) < bound, errors


def test_cpu_operators_refuse_other_devices_and_modules():
    with torch.device("meta"):
        lin, emb = torch.nn.Linear(32, 8), torch.nn.Embedding(10, 32)
    with pytest.raises(KtransError, match="runs on the CPU"):
        CPULinear(key="lm_head", orig_module=lin, config=None, device="cuda:0")
    with pytest.raises(KtransError, match="replaces torch.nn.Linear"):
        CPULinear(key="x", orig_module=emb, config=None, device="cpu")
    with pytest.raises(KtransError, match="cpu_infer must be a positive"):
        CPULinear(key="x", orig_module=lin, config=None, device="cpu", cpu_infer=0)
    with pytest.raises(KtransError, match="keeps its table in CPU RAM"):
        CPUEmbedding(key="model.embed_tokens", orig_module=emb, config=None, device="cuda:0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_embedding_scales_as_gemma_does(dtype):
    """Gemma 3's embedding multiplies each row by sqrt(hidden_size) rounded to the model's dtype
    (bf16: sqrt(3072) = 55.4256 becomes 55.5): cpu_embedding with that dtype gives transformers'
    module's rows bit for bit, from the same table."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    from tests.operators.hf_tiny import StateDictSource

    hf = Gemma3TextScaledWordEmbedding(50, 3072, 0, embed_scale=3072 ** 0.5).to(dtype)
    with torch.no_grad():
        hf.weight.normal_()
    with torch.device("meta"):
        meta = Gemma3TextScaledWordEmbedding(50, 3072, 0, embed_scale=3072 ** 0.5)
    op = CPUEmbedding(key="model.embed_tokens", orig_module=meta, config=None, device="cpu",
                      dtype="bf16" if dtype == torch.bfloat16 else "f32")
    op.load_weights(StateDictSource({"model.embed_tokens.weight": hf.weight.detach()}))
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want = hf(ids)
    assert float(op.scale) == (55.5 if dtype == torch.bfloat16 else float(torch.tensor(3072 ** 0.5)))
    for got in (op(ids), op.forward_native(ids)):
        assert got.dtype == dtype and torch.equal(got, want)
