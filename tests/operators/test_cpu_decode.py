"""The fused all-CPU decode step (csrc/decode/, ktrans/operators/cpu_decode.py) against its oracle,
the module path (the operators' own forward over the same weights and KV cache): every
architecture, f32 and q4_k GGUF weights, one request and a batch of requests at different
lengths with scattered KV pages; when it declines to build; bad input named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ktrans import cpu
from ktrans.engine.batch import ForwardBatch
from ktrans.engine.model_runner import ModelRunner
from ktrans.errors import KtransError
from ktrans.operators import cpu_decode
from ktrans.operators.cpu_decode import CpuDecodeStep
from ktrans.operators.moe_block import MoEBlock
from tests.routing import Reference, flip_gap
from tests.tolerances import FIDELITY_F32_ATOL, FIDELITY_F32_RTOL, QUANT_LOGITS_NMSE, QUANT_TOKEN_TIE_RMS

ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "llama", "glm4_moe",
         "minimax_m2", "gemma3"]


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))


def _runner(d, fused: bool, rules=None) -> ModelRunner:
    return ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cpu", cache_lens=256,
                       page_size=16, progress=False, fused_decode=fused, optimize_config_path=rules and str(rules))


def _run(runner, prompts: list[list[int]], tables: torch.Tensor, steps: int, after_step=None) -> list[torch.Tensor]:
    """Prefill every prompt (one request per step), then `steps` decode steps of all of them at
    once, feeding back fixed tokens; logits [B, V] of each decode step (after_step(s, lens) is
    called after decode step s with the requests' positions in it)."""
    for r, p in enumerate(prompts):
        runner.execute(ForwardBatch(input_ids=torch.tensor(p), positions=torch.arange(len(p)), seq_ids=[r],
                                    num_computed=[0], num_new=[len(p)], page_table=tables[r:r + 1],
                                    logits_indices=torch.tensor([len(p) - 1])))
    lens = [len(p) for p in prompts]
    out = []
    for s in range(steps):
        b = len(prompts)
        ids = torch.tensor([(7 * s + 3 * r) % runner.config.vocab_size for r in range(b)])
        out.append(runner.execute(ForwardBatch(input_ids=ids, positions=torch.tensor(lens), seq_ids=list(range(b)),
                                               num_computed=list(lens), num_new=[1] * b, page_table=tables,
                                               logits_indices=torch.arange(b))))
        if after_step is not None:
            after_step(s, list(lens))
        lens = [n + 1 for n in lens]
    return out


class _ModuleRouting:
    """The module path's routing of its decode steps: each MoE block's router logits and choice,
    by (layer, step)."""

    def __init__(self, runner):
        self.blocks = [(n, m) for n, m in runner.model.named_modules() if isinstance(m, MoEBlock)]
        self.logits, self.ids, self.step = {}, {}, None
        for name, block in self.blocks:
            block.route = self._wrap(block, int(name.split("layers.")[1].split(".")[0]))

    def _wrap(self, block, layer):
        own = block.route

        def route(x):
            w, idx = own(x)
            if self.step is not None:
                self.logits[(layer, self.step)] = F.linear(x.float(), block.gate_weight).detach()
                self.ids[(layer, self.step)] = idx.detach().clone()
            return w, idx
        return route


def _run_recorded(runner, prompts, tables, steps: int, routing: _ModuleRouting) -> list[torch.Tensor]:
    """_run with the module path's routing recorded for each decode step (step index s)."""
    routing.step = None
    original = runner.execute
    count = {"prefills": 0, "decodes": 0}

    def execute(batch):
        if all(n == 1 for n in batch.num_new) and batch.num_reqs == len(prompts):
            routing.step = count["decodes"]
            count["decodes"] += 1
        else:
            routing.step = None
        return original(batch)

    runner.execute = execute
    try:
        return _run(runner, prompts, tables, steps)
    finally:
        del runner.execute


def _routing_flips(config, module: _ModuleRouting, fused_routing, step: int, lens: list[int]) -> dict[int, bool]:
    """Requests whose experts differ between the fused step and the module path at `step`:
    request -> whether every such difference is a genuine near-tie (tests/routing.py: the least
    router-logit change that explains it is within how far the two paths' logits really were)."""
    logits, ids = fused_routing                                                     # [L, B, E], [L, B, k]
    out: dict[int, bool] = {}
    for li, (name, block) in enumerate(module.blocks):
        layer = int(name.split("layers.")[1].split(".")[0])
        ref = Reference(config)
        if block.gate_bias is not None:
            ref.bias[layer] = block.gate_bias.float()
        for b in range(ids.shape[1]):
            row = (b, lens[b])
            want = module.ids[(layer, step)][b]
            ref.logits[(layer, row)], ref.ids[(layer, row)] = module.logits[(layer, step)][b], want
            ours = torch.from_numpy(ids[li, b])
            if sorted(ours.tolist()) != sorted(want.tolist()):
                drift = float((torch.from_numpy(logits[li, b]) - module.logits[(layer, step)][b]).abs().max())
                tie = flip_gap(ref, layer, row, ours) <= drift
                out[b] = out.get(b, True) and tie
    return out


@pytest.mark.parametrize("quant", ["f32", "q4_k"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_step_matches_the_module_path(tiny_model, arch, quant):
    """f32: the same logits at f32 tolerance. q4_k: both paths quantize activations to 8 bits the
    same way, but where one block's rounding differs a router's near-tie may pick another expert:
    every such flip (the fused step's routing against the module path's, layer by layer) must
    be a genuine near-tie, and its request leaves the comparison from that step on; every
    other request is held to the bound of quantized activations and the same greedy token, up
    to a top-2 near-tie that the row's measured rounding noise explains (QUANT_TOKEN_TIE_RMS)."""
    d = tiny_model(arch, quant, with_safetensors=False)
    fused, ref = _runner(d, True), _runner(d, False)
    assert fused.cpu_step is not None, cpu_decode.why_not
    assert ref.cpu_step is None
    vocab = fused.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (9, 23, 1)]
    tables = torch.randperm(fused.num_pages)[:12].int().view(3, 4)                        # scattered pages
    moe = any(isinstance(m, MoEBlock) for m in ref.model.modules())
    fused_routing = []
    if moe:
        fused.cpu_step._dec.record_routing(True)
        got = _run(fused, prompts, tables, 6, lambda s, lens: fused_routing.append(fused.cpu_step._dec.last_routing()))
        want_routing = _ModuleRouting(ref)
        want = _run_recorded(ref, prompts, tables, 6, want_routing)
    else:
        got, want = _run(fused, prompts, tables, 6), _run(ref, prompts, tables, 6)
    left = set(range(len(prompts)))                                                       # requests still compared
    for s, (g, w) in enumerate(zip(got, want)):
        if moe:
            lens = [len(p) + s for p in prompts]
            for b, tie in _routing_flips(fused.config, want_routing, fused_routing[s], s, lens).items():
                assert tie, f"step {s} request {b}: the fused step's experts differ from the module path's " \
                            f"where the router logits do not nearly tie"
                left.discard(b)
        rows = sorted(left)
        if quant == "f32":
            torch.testing.assert_close(g[rows], w[rows], rtol=FIDELITY_F32_RTOL, atol=FIDELITY_F32_ATOL)
        else:
            assert max((nmse(g[i], w[i]) for i in rows), default=0.0) < QUANT_LOGITS_NMSE
        for i in rows:
            ours, theirs = int(g[i].argmax()), int(w[i].argmax())
            if quant == "f32" or ours == theirs:
                assert ours == theirs, f"step {s} request {i}: greedy token {ours}, module path {theirs}"
                continue
            lead, rms = float(w[i][theirs] - w[i][ours]), float((g[i] - w[i]).pow(2).mean().sqrt())
            assert lead <= QUANT_TOKEN_TIE_RMS * rms, \
                f"step {s} request {i}: greedy token {ours}, module path {theirs} leads by {lead:.4g} " \
                f"(RMS difference of the logits {rms:.3g})"


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "gemma3"])
def test_every_isa_level_of_the_step_kernels(tiny_model, arch):
    """The step's own vector kernels (RMSNorm, attention dots / axpy, SiLU, embedding rows) at
    every ISA level this machine runs give the module path's logits (Gemma 3: also its (1 + w)
    and post-sublayer norms, GELU, scaled embeddings, two rope bases, and its sliding layers'
    window of 8, which the 12-token prompt outgrows)."""
    d = tiny_model(arch, "f32", with_safetensors=False)
    fused, ref = _runner(d, True), _runner(d, False)
    vocab = fused.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 12)]
    tables = torch.randperm(fused.num_pages)[:8].int().view(2, 4)
    want = _run(ref, prompts, tables, 3)
    for isa in cpu.supported_isas():
        fused.cpu_step = CpuDecodeStep.build(fused.model, fused.kv, fused.rotary, isa)
        for g, w in zip(_run(fused, prompts, tables, 3), want):
            torch.testing.assert_close(g, w, rtol=FIDELITY_F32_RTOL, atol=FIDELITY_F32_ATOL)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v2"])
def test_query_heads_split_on_a_wide_pool(tiny_model, arch, batch):
    """Attention items are (request, KV head, sub-group of its query heads), each reading a K/V
    row once for its heads: with 8 threads, qwen2 small's 4 KV heads of 4 query heads are split in
    halves (1 request) or kept whole (2 requests); deepseek_v2 small's 16 heads over the one latent
    cache go in groups of 2 (1 request) or 4 (2 requests). The logits stay the module path's."""
    d = tiny_model(arch, "f32", with_safetensors=False, preset="small")
    fused, ref = (ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cpu", cache_lens=256,
                              page_size=16, progress=False, fused_decode=f, cpu_infer=8) for f in (True, False))
    assert fused.cpu_step is not None, cpu_decode.why_not
    assert fused.config.num_attention_heads == 16
    assert arch != "qwen2" or fused.config.num_key_value_heads == 4
    prompts = [torch.randint(0, fused.config.vocab_size, (n,)).tolist() for n in (9, 20)[:batch]]
    tables = torch.randperm(fused.num_pages)[:4 * batch].int().view(batch, 4)
    for g, w in zip(_run(fused, prompts, tables, 3), _run(ref, prompts, tables, 3)):
        torch.testing.assert_close(g, w, rtol=FIDELITY_F32_RTOL, atol=FIDELITY_F32_ATOL)


def test_declines_when_a_part_is_not_in_the_cpu_kernels(tiny_model, tmp_path):
    d = tiny_model("qwen3_moe", "f32", with_safetensors=False)
    rules = tmp_path / "rules.yaml"
    rules.write_text("default_device: cpu\nrules:\n  - match: {name: '\\.self_attn$'}\n"
                     "    replace: {class: gqa_attention}\n    recursive: false\n")
    assert _runner(d, True, rules).cpu_step is None
    assert "cpu_embedding" in cpu_decode.why_not or "cpu_" in cpu_decode.why_not


def test_softcapped_logits(tiny_model):
    """Final logit softcapping (Gemma 3 2B-style configs set it; the tiny preset does not): the
    fused step's logits capped as the module path caps them, none past the cap."""
    d = tiny_model("gemma3", "f32", with_safetensors=False)
    fused, ref = _runner(d, True), _runner(d, False)
    for r in (fused, ref):
        r.model.config.final_logit_softcapping = 0.05
    fused.cpu_step = CpuDecodeStep.build(fused.model, fused.kv, fused.rotary)
    prompts = [torch.randint(0, fused.config.vocab_size, (n,)).tolist() for n in (6, 11)]
    tables = torch.randperm(fused.num_pages)[:8].int().view(2, 4)
    for g, w in zip(_run(fused, prompts, tables, 3), _run(ref, prompts, tables, 3)):
        assert g.abs().max() <= 0.05
        torch.testing.assert_close(g, w, rtol=FIDELITY_F32_RTOL, atol=FIDELITY_F32_ATOL)


def test_declines_by_name(tiny_model):
    """gpt-oss's attention sinks, and an MLP activation the step does not compute (here a Gemma 3
    with exact GELU), are declined with the reason named (its decode steps then run the module
    path, held to transformers by tests/models/test_fidelity.py)."""
    assert _runner(tiny_model("gpt_oss", "f32", with_safetensors=False), True).cpu_step is None
    assert "sinks" in cpu_decode.why_not, cpu_decode.why_not
    runner = _runner(tiny_model("gemma3", "f32", with_safetensors=False), True)
    assert runner.cpu_step is not None, cpu_decode.why_not
    runner.model.config.hidden_activation = "gelu"
    assert CpuDecodeStep.build(runner.model, runner.kv, runner.rotary) is None
    assert all(w in cpu_decode.why_not for w in ("gemma3:", "gelu", "not SiLU or GELU (tanh)")), cpu_decode.why_not


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe"])
def test_declines_recurrent_layers_by_name(tiny_model, arch):
    """Qwen3-Next's and Qwen3.5's linear-attention layers keep a recurrent state the fused step has
    no place for: the model is declined with that reason named (its decode steps run the module
    path, held to transformers by tests/models/test_fidelity.py)."""
    assert _runner(tiny_model(arch, "f32", with_safetensors=False), True).cpu_step is None
    assert all(w in cpu_decode.why_not for w in (f"{arch}:", "linear-attention (Gated DeltaNet) layers keep a "
                                                 "recurrent state")), cpu_decode.why_not


def test_bad_steps_are_named(tiny_model):
    d = tiny_model("qwen2", "f32", with_safetensors=False)
    runner = _runner(d, True)
    step = runner.cpu_step
    tables = torch.arange(4, dtype=torch.int32)[None]
    ok = dict(input_ids=torch.tensor([1]), positions=torch.tensor([3]), seq_ids=[0], num_computed=[3], num_new=[1],
              page_table=tables, logits_indices=torch.tensor([0]))
    assert step(ForwardBatch(**ok)).shape == (1, runner.config.vocab_size)
    with pytest.raises(KtransError, match="KV page id 9999 out of range"):
        step(ForwardBatch(**{**ok, "page_table": torch.tensor([[9999, 0]], dtype=torch.int32)}))
    with pytest.raises(KtransError, match="outside the rotary tables"):
        step(ForwardBatch(**{**ok, "positions": torch.tensor([10 ** 6]), "num_computed": [10 ** 6],
                             "page_table": torch.zeros(1, 10 ** 6 // 16 + 2, dtype=torch.int32)}))
    with pytest.raises(KtransError, match="token id"):
        step(ForwardBatch(**{**ok, "input_ids": torch.tensor([10 ** 7])}))
