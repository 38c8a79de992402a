"""CUDA-graph decode steps (ktrans.engine.cuda_graphs) give the logits of the eager step.

Two runners load the same tiny generated model; one runs every step eagerly, the other runs
its decode-only steps through DecodeGraphs, and both see the same requests: prefill of three
prompts (page tables in shuffled order, page 0 included, so a padding row that wrote outside
the scratch page would corrupt a real request), then decode steps of 3 requests (bucket 4: one
padding row), 2 (bucket 2) and 1. The later steps read KV the graph steps wrote, so a wrong
slot or length shows up as diverging logits. Models with linear-attention layers (Qwen3-Next)
carry each request's recurrent state in its two state rows, read one / write the other per step
as the engine does: a captured step (run once to warm up, then replayed) must not advance it twice,
and a padding row must not touch a request's rows.
- everywhere (CI): the static-buffer step without capture, on the CPU, attention through the
  paged kernel under Triton's interpreter (one architecture per attention/MLP kind: the
  interpreter is slow);
- on a GPU (marked): captured and replayed graphs vs eager, with the shipped rule files, on f32
  weights and on a q4_k_m file (projections kept in their GGUF formats by the shipped rules).
"""

from __future__ import annotations

import pytest
import torch
import yaml

from ktrans.engine.batch import ForwardBatch
from ktrans.engine.cuda_graphs import DecodeGraphs
from ktrans.engine.model_runner import ModelRunner, default_rule_file
from ktrans.kernels import triton_available
from tests.tolerances import FIDELITY_F32_ATOL, FIDELITY_F32_RTOL

ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "llama", "glm4_moe", "minimax_m2",
         "gemma3", "qwen3_next", "qwen3_5_moe"]
PAGE = 16
PROMPTS = (21, 5, 40)


def _kernel_rules(arch: str, path) -> str:
    """The shipped rules with the attention operators on their paged decode kernel."""
    data = yaml.safe_load(default_rule_file(arch).read_text())
    for rule in data["rules"]:
        if rule.get("replace", {}).get("class") in ("mla_attention", "gqa_attention"):
            rule["replace"].setdefault("kwargs", {})["attn_backend"] = "triton"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _batch(reqs, tokens, done, tables, new, steps):
    """One step: request r adds new[r] tokens (its next ones in tokens[r]); its recurrent state
    (if any) is read from one of its rows 2r, 2r + 1 and written to the other, alternating with
    steps[r], the steps it has run (the engine's commit)."""
    ids, pos = [], []
    for r in reqs:
        ids += tokens[r][done[r]:done[r] + new[r]]
        pos += range(done[r], done[r] + new[r])
    rows = torch.cumsum(torch.tensor([new[r] for r in reqs]), 0) - 1
    state = torch.tensor([[2 * r + steps[r] % 2, 2 * r + 1 - steps[r] % 2] for r in reqs])
    return ForwardBatch(input_ids=torch.tensor(ids), positions=torch.tensor(pos), seq_ids=list(reqs),
                        num_computed=[done[r] for r in reqs], num_new=[new[r] for r in reqs],
                        page_table=tables[list(reqs)], logits_indices=rows, state_rows=state)


def _reserve(*runners):
    """State rows for the three requests (and the scratch row), where the model has recurrent layers."""
    for r in runners:
        r.reserve_states(3)


def _compare(eager_runner, graph_step, vocab, num_pages, check):
    """Feed both the same steps; check(graph_logits, eager_logits) after every decode step."""
    tokens = [torch.randint(0, vocab, (n,)).tolist() for n in PROMPTS]
    tables = torch.randperm(num_pages)[:3 * 4].int().view(3, 4)        # 4 pages of 16 per request
    done, steps = [0, 0, 0], [0, 0, 0]
    logits = eager_runner.execute(_batch([0, 1, 2], tokens, done, tables, list(PROMPTS), steps))
    graph_step(_batch([0, 1, 2], tokens, done, tables, list(PROMPTS), steps), prefill=True)
    done, steps, rows_of = list(PROMPTS), [1, 1, 1], (0, 1, 2)
    for reqs in [(0, 1, 2)] * 2 + [(0, 2), (1,)]:
        for r, row in zip(rows_of, logits):                             # greedy next token of each
            tokens[r].append(int(row.argmax()))
        batch = _batch(reqs, tokens, done, tables, {r: 1 for r in reqs}, steps)
        logits = eager_runner.execute(batch)
        check(graph_step(batch), logits)
        rows_of = reqs
        for r in reqs:
            done[r] += 1
            steps[r] += 1


@pytest.mark.skipif(not triton_available(), reason="needs Triton (the paged kernel, interpreted on the CPU)")
@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe", "llama", "qwen3_next"])   # MLA, GQA + MoE, dense, hybrid
def test_static_decode_step_matches_eager_on_cpu(tiny_model, tmp_path, arch):
    out = tiny_model(arch, "f32")
    rules = _kernel_rules(arch, tmp_path / "rules.yaml")

    def runner():
        return ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cpu",
                           optimize_config_path=rules, cache_lens=256, page_size=PAGE, progress=False)

    eager, other = runner(), runner()
    _reserve(eager, other)
    graphs = DecodeGraphs(other.model, other.rotary, other.kv, num_pages=other.num_pages, page_size=PAGE,
                          capture=False)

    def step(batch, prefill=False):
        with torch.inference_mode():
            return other.execute(batch) if prefill else graphs.run(batch)

    _compare(eager, step, other.config.vocab_size, other.num_pages,
             lambda g, e: torch.testing.assert_close(g, e, rtol=FIDELITY_F32_RTOL, atol=FIDELITY_F32_ATOL))


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])          # q4_k_m: projections in their GGUF format
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_decode_matches_eager(tiny_model, arch, quant):
    out = tiny_model(arch, quant)

    def runner(graphs):
        return ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cuda",
                           cache_lens=256, page_size=PAGE, progress=False, cuda_graphs=graphs)

    eager, graphed = runner(False), runner(True)
    _reserve(eager, graphed)
    assert graphed.graphs.enabled, graphed.graphs.reason

    def step(batch, prefill=False):
        return graphed.execute(batch)

    def check(g, e):
        # Same kernels on the same inputs: bit-identical where the batch fills its bucket; a
        # padded bucket runs its GEMMs over more rows, which may pick other cuBLAS tile shapes.
        if g.shape[0] in (1, 2, 4):
            assert torch.equal(g, e), (g - e).abs().max()
        else:
            torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)

    _compare(eager, step, graphed.config.vocab_size, graphed.num_pages, check)
    assert graphed.graphs.enabled and sorted(graphed.graphs.graphs) == [1, 2, 4], graphed.graphs.reason


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_memop_handoff_graph_and_eager_match_host_functions(tiny_model, arch, monkeypatch):
    """KTRANS_HANDOFF=memop (stream writes/waits on pinned flags, tasks armed before each replay):
    graph and eager decode steps give the host-function hand-off's logits, bit for bit."""
    out = tiny_model(arch, "q4_k_m")

    def runner(graphs):
        return ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cuda",
                           cache_lens=256, page_size=PAGE, progress=False, cuda_graphs=graphs)

    reference = runner(False)
    monkeypatch.setenv("KTRANS_HANDOFF", "memop")
    eager, graphed = runner(False), runner(True)
    _reserve(reference, eager, graphed)
    assert graphed.graphs.enabled, graphed.graphs.reason

    def step(batch, prefill=False):
        e = eager.execute(batch)
        g = graphed.execute(batch)
        assert torch.equal(e, g) or batch.num_reqs not in (1, 2, 4)
        return g

    def check(g, e):
        if g.shape[0] in (1, 2, 4):
            assert torch.equal(g, e), (g - e).abs().max()
        else:
            torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)

    _compare(reference, step, graphed.config.vocab_size, graphed.num_pages, check)
    ops = [m for m in graphed.model.modules() if type(m).__name__ == "CPUExperts"]
    assert ops and all(op._handoff == "memop" for op in ops)
