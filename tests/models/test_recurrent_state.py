"""The engine's recurrent-state slots (kv_cache/state.py) on Qwen3-Next / Qwen3.5-MoE tiny models:
requests admitted at different steps, with prefill chunks smaller than their prompts and batches
mixing those chunks with other requests' decodes, give each request its greedy tokens run alone;
the pool's free count drops by one per running request and is whole again after every request
finished or was aborted (mid-prefill and mid-decode); a batched forward that fails after its
linear-attention layers wrote new states is re-run request by request from the states before it
(the written rows were never committed), so the surviving requests' tokens do not change."""

from __future__ import annotations

import pytest
import torch

from ktrans.engine import LLMEngine, SamplingParams
from ktrans.engine.model_runner import ModelRunner
from tests.models.test_batching_invariance import one_torch_thread  # noqa: F401
from tests.models.test_fidelity import rules_for

ARCHS = ["qwen3_next", "qwen3_5_moe"]
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def runner(request, tiny_model, tmp_path_factory):
    out = tiny_model(request.param, "f32", with_safetensors=False)
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(rules_for(request.param))           # torch experts: no CPU thread pool in this process
    return ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), optimize_config_path=str(rules),
                       device="cpu", cache_lens=1024, page_size=16, progress=False)


def _alone(runner, prompt) -> list[int]:
    engine = LLMEngine(runner, max_batch_size=1, chunk_size=256)
    engine.add_request("a", prompt, GREEDY)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    return tokens


def _drain(engine, tokens, arrivals=None, on_step=None) -> int:
    """Step until done; `arrivals` {step: [(id, prompt)]} are added before that step. Returns steps."""
    step = 0
    while engine.has_unfinished() or (arrivals and any(s >= step for s in arrivals)):
        for rid, prompt in (arrivals or {}).get(step, []):
            engine.add_request(rid, prompt, GREEDY)
            tokens[rid] = []
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
        if on_step:
            on_step(step)
        step += 1
    return step


def test_staggered_arrivals_chunked_prefill_equal_alone(runner):
    vocab = runner.config.vocab_size
    prompts = {f"r{i}": torch.randint(0, vocab, (n,)).tolist() for i, n in enumerate((45, 7, 70, 20, 3))}
    alone = {rid: _alone(runner, p) for rid, p in prompts.items()}
    engine = LLMEngine(runner, max_batch_size=3, chunk_size=16)          # more requests than slots: some queue
    assert engine.states is not None and engine.states.num_slots == 3 and not engine.scheduler.prefix_cache
    arrivals = {0: [("r0", prompts["r0"]), ("r1", prompts["r1"])], 2: [("r2", prompts["r2"])],
                5: [("r3", prompts["r3"]), ("r4", prompts["r4"])]}
    used = []
    tokens: dict[str, list[int]] = {}
    _drain(engine, tokens, arrivals, on_step=lambda s: used.append(engine.states.num_used))
    assert tokens == alone
    assert max(used) == 3                                                # every slot was in use at some step
    assert engine.states.num_free == engine.states.num_slots and engine.stats()["kv_pages_used"] == 0
    engine.states.check()


def test_abort_frees_the_state_slot(runner):
    vocab = runner.config.vocab_size
    prompts = {"dec": torch.randint(0, vocab, (5,)).tolist(), "keep": torch.randint(0, vocab, (9,)).tolist(),
               "long": torch.randint(0, vocab, (60,)).tolist()}
    keep_alone = _alone(runner, prompts["keep"])
    engine = LLMEngine(runner, max_batch_size=3, chunk_size=24)
    for rid, p in prompts.items():
        engine.add_request(rid, p, GREEDY)
    tokens = {rid: [] for rid in prompts}
    for o in engine.step():                                  # "long" is mid-prefill (10 of its 60 tokens)
        tokens[o.request_id] += o.new_token_ids
    assert engine.states.num_used == 3
    long = engine.requests["long"]
    assert long.num_computed_tokens == 10 and engine.states.holds(long)
    engine.abort("long")
    assert engine.states.num_free == 1 and not engine.states.holds(long)
    while not tokens["dec"]:
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    engine.abort("dec")                                     # mid-decode
    assert engine.states.num_free == 2
    _drain(engine, tokens)
    assert tokens["keep"] == keep_alone
    assert engine.states.num_free == engine.states.num_slots == 3
    engine.states.check()


class _FailAtLastLayer:
    """A fault in the last decoder layer of any forward whose batch holds `poison` at position 0:
    the linear-attention layers before it have already written their new states."""

    def __init__(self, runner, poison: int):
        self.runner, self.poison, self.fired = runner, poison, 0

    def __enter__(self):
        from ktrans.engine.batch import current_forward

        def hook(module, args):
            b = current_forward().batch
            if bool(((b.positions == 0) & (b.input_ids == self.poison)).any()):
                self.fired += 1
                raise RuntimeError("injected fault after the linear-attention layers")

        self.handle = self.runner.model.model.layers[-1].register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_failed_batch_rerun_starts_from_the_uncommitted_states(runner):
    vocab = runner.config.vocab_size
    poison = vocab - 1
    prompts = {"a": torch.randint(0, vocab - 1, (30,)).tolist(), "b": torch.randint(0, vocab - 1, (6,)).tolist()}
    alone = {rid: _alone(runner, p) for rid, p in prompts.items()}
    assert runner.config.layer_types[0] == "linear_attention" and runner.kv.recurrent_layers
    engine = LLMEngine(runner, max_batch_size=3, chunk_size=64)
    tokens: dict[str, list[int]] = {}
    arrivals = {0: list(prompts.items()), 3: [("bad", [poison] + torch.randint(0, vocab - 1, (8,)).tolist())]}
    with _FailAtLastLayer(runner, poison) as fault:
        errors = []
        engine_step = engine.step

        def step():
            outs = engine_step()
            errors.extend(o for o in outs if o.finish_reason == "error")
            return outs

        engine.step = step
        _drain(engine, tokens, arrivals)
    assert fault.fired >= 2 and [o.request_id for o in errors] == ["bad"]   # the batch, then "bad" alone
    assert {rid: tokens[rid] for rid in prompts} == alone
    assert engine.states.num_free == engine.states.num_slots
