"""Batching invariance of the engine: a prompt's greedy tokens are the same whether it runs
alone, in one batch with three other prompts of different lengths, with chunked prefill forced
small (chunk 16), squeezed by a KV pool so small that requests get preempted and recomputed, or
starting from prefix-cache pages another request computed. Run on tiny random models (MLA and
GQA attention, gpt-oss's sliding layers and sinks, GLM-4.5's partial rotary, Gemma 3's local
and global layers, Qwen3-Next's and Qwen3.5-MoE's Gated DeltaNet layers, whose recurrent state
follows each request through chunks and preemptions in its state slot; the prefix cache is off
for them) through the real ModelRunner."""

from __future__ import annotations

import pytest
import torch

from ktrans.engine import LLMEngine, SamplingParams
from ktrans.engine.model_runner import ModelRunner
from tests.models.test_fidelity import rules_for
from tests.operators.hf_tiny import tiny_hf_model

NEW_TOKENS = 20
LENGTHS = (37, 5, 61, 18)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI machine torch's
    spinning OpenMP threads slow each step 50x (0.9 s instead of 16 ms, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe", "gpt_oss", "glm4_moe", "minimax_m2", "gemma3",
                                        "qwen3_next", "qwen3_5_moe"])
def saved(request, tmp_path_factory):
    arch = request.param
    config, model = tiny_hf_model(arch)
    out = tmp_path_factory.mktemp(arch)
    model.save_pretrained(out)
    (out / "rules.yaml").write_text(rules_for(arch))
    return config, out


def _runner(out, cache_lens=1024, page_size=16, device="cpu"):
    return ModelRunner(model_path=str(out), optimize_config_path=str(out / "rules.yaml"), device=device,
                       cache_lens=cache_lens, page_size=page_size, progress=False)


def _generate(runner, prompts, *, batch: int, chunk: int, engine=None) -> tuple[list[list[int]], dict]:
    engine = engine or LLMEngine(runner, max_batch_size=batch, chunk_size=chunk)
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.finish_reason in (None, "length")
            tokens[out.request_id] += out.new_token_ids
    stats = engine.stats()
    assert stats["kv_pages_used"] == 0, "pages leaked"
    if engine.states is not None:
        assert engine.states.num_free == engine.states.num_slots, "recurrent-state slots leaked"
    return [tokens[str(i)] for i in range(len(prompts))], stats


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_alone_batched_and_chunked_give_the_same_greedy_tokens(saved, device):
    config, out = saved
    runner = _runner(out, device=device)
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in LENGTHS]
    alone = [_generate(runner, [p], batch=1, chunk=256)[0][0] for p in prompts]
    assert all(len(t) == NEW_TOKENS for t in alone)
    batched, _ = _generate(runner, prompts, batch=4, chunk=256)
    assert batched == alone
    chunked, stats = _generate(runner, prompts[:1], batch=1, chunk=16)
    assert chunked[0] == alone[0] and stats["steps"] > NEW_TOKENS     # prefill took several steps
    mixed, _ = _generate(runner, prompts, batch=4, chunk=16)             # decodes + prefill chunks mixed
    assert mixed == alone


def test_preemption_and_recompute_give_the_same_greedy_tokens(saved):
    config, out = saved
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in (30, 31, 17)]
    alone = [_generate(_runner(out), [p], batch=1, chunk=256)[0][0] for p in prompts]
    # 6 pages of 16 tokens: all three prompts fit (2 pages each), but they need 4 + 4 + 3 pages
    # by their end, so the later ones are preempted and recompute prompt + tokens so far.
    squeezed, stats = _generate(_runner(out, cache_lens=96), prompts, batch=3, chunk=128)
    assert stats["preemptions"] > 0
    assert squeezed == alone


def test_prefix_cache_hits_give_the_same_greedy_tokens(saved):
    config, out = saved
    runner = _runner(out)                                              # pages of 16 tokens
    base = torch.randint(0, config.vocab_size, (50,)).tolist()
    first = _generate(runner, [base], batch=1, chunk=256)[0][0]
    tail = torch.randint(0, config.vocab_size, (10,)).tolist()
    # The same prompt; one sharing 40 tokens; a next "turn" holding base + 10 generated tokens.
    prompts = [base, base[:40] + tail, base + first[:10] + tail[:5]]
    fresh = [_generate(runner, [p], batch=1, chunk=256)[0][0] for p in prompts]
    engine = LLMEngine(runner, max_batch_size=1, chunk_size=256)
    assert _generate(runner, [base], batch=1, chunk=256, engine=engine)[0][0] == first
    cached = []
    # NOTE: no page is reused where a model keeps a recurrent state (its pages carry none).
    hybrid = engine.states is not None
    for p, expect_cached in zip(prompts, (0, 0, 0) if hybrid else (48, 32, 48)):
        before = engine.stats()["prefix_cached_tokens"]
        cached.append(_generate(runner, [p], batch=1, chunk=256, engine=engine)[0][0])
        assert engine.stats()["prefix_cached_tokens"] - before == expect_cached
    assert cached == fresh
    engine.add_request("again", base, SamplingParams(temperature=0, max_new_tokens=2))
    outs = [o for _ in range(3) for o in engine.step()]
    assert outs[-1].finished and outs[-1].num_cached_tokens == (0 if hybrid else 48)  # reported with the output
