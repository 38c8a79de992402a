"""AsyncEngine on a tiny model: concurrent requests (more than the batch holds, so requests join
and leave the running batch every step) each get exactly the greedy tokens they get alone;
leaving the stream early, cancelling the task or abort() frees the KV pages (checked with the
model held mid-forward, so only the abort can have freed them); stats() answers while the engine
thread holds the scheduler's lock (and the OS knows that thread by name); queue limit,
over-long prompts and bad token ids are refused up front; a request whose forward fails ends with
an error while the requests batched with it go on unharmed."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from ktrans.engine import AsyncEngine, LLMEngine, QueueFullError, SamplingParams
from ktrans.errors import KtransError
from tests.models.test_batching_invariance import _generate, _runner, one_torch_thread  # noqa: F401
from tests.models.test_fidelity import rules_for
from tests.operators.hf_tiny import tiny_hf_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    config, model = tiny_hf_model("qwen3_moe")
    out = tmp_path_factory.mktemp("qwen3_moe")
    model.save_pretrained(out)
    (out / "rules.yaml").write_text(rules_for("qwen3_moe"))
    return _runner(out)


async def _collect(engine: AsyncEngine, rid: str, prompt, params=GREEDY):
    tokens, last = [], None
    async for out in engine.generate(rid, prompt, params):
        tokens += out.new_token_ids
        last = out
    return tokens, last


async def _until(what: str, check, timeout: float = 30.0):
    """Wait for a state the engine thread will reach (bounded: a hang fails, not blocks)."""
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class GatedRunner:
    """The real runner behind a gate: while shut, the engine thread waits inside its forward, so
    a request cannot progress (or finish) by itself and only an abort can free its pages."""

    def __init__(self, runner):
        self.runner = runner
        self.opened, self.blocked = threading.Event(), threading.Event()
        self.opened.set()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, batch):
        if not self.opened.is_set():
            self.blocked.set()
            self.opened.wait()
        return self.runner.execute(batch)

    def shut(self):
        self.blocked.clear()
        self.opened.clear()


def test_concurrent_requests_match_alone(runner):
    prompts = [torch.randint(0, runner.config.vocab_size, (n,)).tolist() for n in (9, 40, 3, 25, 17, 60)]
    alone = [_generate(runner, [p], batch=1, chunk=256)[0][0][:12] for p in prompts]

    async def main():
        engine = AsyncEngine(LLMEngine(runner, max_batch_size=2, chunk_size=32))
        await engine.start()
        results = await asyncio.gather(*(_collect(engine, f"r{i}", p) for i, p in enumerate(prompts)))
        stats = engine.stats()
        await engine.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    assert [t for t, _ in results] == alone
    assert all(last.finished and last.finish_reason == "length" and last.num_output_tokens == 12
               for _, last in results)
    assert stats["kv_pages_used"] == 0 and stats["waiting"] == stats["running"] == 0


def test_leaving_early_cancel_and_abort_free_the_kv(runner):
    """Each way of ending a request early frees its KV pages while the model is held mid-forward
    (so nothing but the abort could free them), and is counted as an abort."""
    prompt = torch.randint(0, runner.config.vocab_size, (30,)).tolist()
    gated = GatedRunner(runner)

    async def held(engine, start):
        """Start a request with the model held at its first forward; returns the task."""
        gated.shut()
        task = start()
        await _until("the forward to reach the gate", gated.blocked.is_set)
        assert engine.stats()["kv_pages_used"] > 0
        return task

    async def freed_by_abort(engine, aborts_before):
        # The engine thread is still waiting at the gate: no step can have finished the request.
        assert gated.blocked.is_set() and not gated.opened.is_set()
        stats = engine.stats()
        assert stats["kv_pages_used"] == 0 and stats["running"] == 0
        assert stats["requests_aborted"] == aborts_before + 1
        gated.opened.set()

    async def main():
        engine = AsyncEngine(LLMEngine(gated, max_batch_size=4, chunk_size=64))
        await engine.start()

        stream = engine.generate("early", prompt, LONG)
        await stream.__anext__()
        gated.shut()
        await _until("the forward to reach the gate", gated.blocked.is_set)
        await stream.aclose()                                      # leaving the stream early
        await freed_by_abort(engine, 0)

        task = await held(engine, lambda: asyncio.create_task(_collect(engine, "cancelled", prompt, LONG)))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await freed_by_abort(engine, 1)

        task = await held(engine, lambda: asyncio.create_task(_collect(engine, "aborted", prompt, LONG)))
        engine.abort("aborted")
        await _until("the abort to be delivered", task.done)
        await freed_by_abort(engine, 2)
        tokens, last = task.result()
        assert last.finished and last.finish_reason == "abort" and len(tokens) < 400
        tokens, last = await _collect(engine, "after", prompt)      # the loop keeps serving
        assert len(tokens) == 12 and engine.stats()["kv_pages_used"] == 0
        await engine.shutdown()

    asyncio.run(main())


class GatedSampler:
    """The real sampler behind a gate: while shut, the engine thread waits inside its update, with
    the scheduler's lock held (as when the OS takes it off the CPU there)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.opened, self.blocked = threading.Event(), threading.Event()
        self.opened.set()

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    def __call__(self, logits, requests):
        if not self.opened.is_set():
            self.blocked.set()
            self.opened.wait()
        return self.sampler(logits, requests)


def test_stats_never_wait_for_the_engine_thread(runner):
    """stats() (what /health reports) answers while the engine thread holds the scheduler's lock,
    with the state as that lock last left it."""
    prompt = torch.randint(0, runner.config.vocab_size, (30,)).tolist()

    async def main():
        core = LLMEngine(runner, max_batch_size=4, chunk_size=64)
        core.sampler = gated = GatedSampler(core.sampler)
        engine = AsyncEngine(core)
        await engine.start()
        gated.opened.clear()
        task = asyncio.create_task(_collect(engine, "held", prompt))
        await _until("the update to reach the gate", gated.blocked.is_set)
        comm = Path(f"/proc/self/task/{engine._thread.native_id}/comm")
        if comm.exists():                                  # Linux: the OS knows the engine thread by name
            assert comm.read_text().strip() == "ktrans-engine"
        assert not core._lock.acquire(blocking=False) or core._lock.release()   # the engine thread holds it
        held = []
        reader = threading.Thread(target=lambda: held.append(engine.stats()), daemon=True)
        reader.start()
        reader.join(30)          # bounded: a stats() that waited for the lock would still be waiting
        answered = list(held)
        gated.opened.set()
        tokens, _ = await task
        await engine.shutdown()
        return answered, tokens, engine.stats()

    answered, tokens, after = asyncio.run(main())
    assert answered, "stats() waited for the engine thread's lock"
    held = answered[0]
    # As scheduling left it: the request runs, its prompt's pages are in use, nothing sampled yet.
    assert held["running"] == 1 and held["waiting"] == 0 and held["kv_pages_used"] > 0
    assert held["generation_tokens"] == 0
    assert len(tokens) == 12 and after["kv_pages_used"] == 0 and after["generation_tokens"] == 12


def test_refusals_come_before_any_output(runner):
    vocab = runner.config.vocab_size

    async def main():
        engine = AsyncEngine(LLMEngine(runner, max_batch_size=1, chunk_size=64, max_queue=1))
        await engine.start()
        with pytest.raises(KtransError, match=f"prompt is {engine.max_context} tokens.*{engine.max_context}"):
            await _collect(engine, "long", [1] * engine.max_context)
        with pytest.raises(KtransError, match=f"token id {vocab}"):
            await _collect(engine, "bad-id", [1, vocab, 2])
        with pytest.raises(KtransError, match="top_p"):
            await _collect(engine, "bad-param", [1, 2], SamplingParams(top_p=0))
        running = asyncio.create_task(_collect(engine, "running", [1, 2, 3], LONG))
        await _until("a running request", lambda: engine.stats()["running"] > 0)
        waiting = asyncio.create_task(_collect(engine, "waiting", [4, 5], LONG))
        await _until("a waiting request", lambda: engine.stats()["waiting"] > 0)
        with pytest.raises(QueueFullError, match="1 waiting"):
            await _collect(engine, "refused", [6, 7])
        engine.abort("running")
        engine.abort("waiting")
        assert (await running)[1].finish_reason == "abort" and (await waiting)[1].finish_reason == "abort"
        await _until("the pages to be freed", lambda: engine.stats()["kv_pages_used"] == 0)
        await engine.shutdown()

    asyncio.run(main())


class FaultyRunner:
    """The real runner with one injected fault: a forward containing the poison token at
    position 0 (only a prompt can put it there) raises, as an out-of-memory prefill would."""

    def __init__(self, runner, poison: int):
        self.runner, self.poison = runner, poison

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, batch):
        if bool(((batch.positions == 0) & (batch.input_ids == self.poison)).any()):
            raise RuntimeError("injected fault")
        return self.runner.execute(batch)


def test_a_failing_request_fails_alone(runner):
    poison = runner.config.vocab_size - 1
    prompts = [torch.randint(0, poison, (n,)).tolist() for n in (7, 30, 12)]
    alone = [_generate(runner, [p], batch=1, chunk=256)[0][0] for p in prompts]
    engine = LLMEngine(FaultyRunner(runner, poison), max_batch_size=4, chunk_size=64)
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    tokens = {"g0": [], "g1": []}
    for rid, p in zip(tokens, prompts):
        engine.add_request(rid, p, params)
    outs = engine.step()                                   # both prefilled; decodes next
    engine.add_request("bad", [poison] + prompts[2], params)
    outs += engine.step()                                  # the poisoned prefill joins their decodes
    failed = [o for o in outs if o.request_id == "bad"]
    assert len(failed) == 1 and failed[0].finish_reason == "error" and "injected fault" in failed[0].error
    while engine.has_unfinished():
        outs += engine.step()
    for o in outs:
        if o.request_id in tokens:
            tokens[o.request_id] += o.new_token_ids
    assert [tokens["g0"], tokens["g1"]] == alone[:2]
    engine.add_request("after", prompts[2], params)
    after = []
    while engine.has_unfinished():
        after += [t for o in engine.step() for t in o.new_token_ids]
    assert after == alone[2]
    assert engine.stats()["requests_failed"] == 1 and engine.stats()["kv_pages_used"] == 0
