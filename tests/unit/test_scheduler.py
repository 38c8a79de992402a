"""Scheduler: token budget per step, chunked prefill as "fewer tokens", decodes first, FCFS
admission bounded by batch slots and free KV pages, preemption by recompute, and the queue and
context limits. Driven by a small loop that plays the engine's part (append a token for every
sampled request, finish it at its target length)."""

from __future__ import annotations


import pytest

from ktrans.engine.request import Request, SamplingParams, Status
from ktrans.engine.scheduler import QueueFullError, Scheduler
from ktrans.errors import KtransError
from ktrans.kv_cache import PagePool
from tests.seeds import py_rng


def _req(rid, n_prompt, n_out=4):
    return Request(str(rid), list(range(1, n_prompt + 1)), SamplingParams(max_new_tokens=n_out))


def _step(sched: Scheduler, history: list | None = None):
    """One engine step without a model: check the output, then append a token per sample."""
    out = sched.schedule()
    assert out.num_tokens <= sched.chunk_size
    assert len(out.scheduled) <= sched.max_batch_size
    slots = [s.request.slot for s in out.scheduled]
    assert len(set(slots)) == len(slots) and None not in slots
    for s in out.scheduled:
        r = s.request
        assert r.status is Status.RUNNING and r.num_computed_tokens == s.num_computed + s.num_new
        assert len(sched.pool.pages(r)) * sched.pool.page_size >= r.num_computed_tokens
        sched.pool.cache_pages(r, r.num_computed_tokens, r.token_ids)    # as the engine does
        if s.sample:
            r.output_token_ids.append(1000 + len(r.output_token_ids))
            if r.num_output_tokens >= r.params.max_new_tokens or r.num_tokens >= sched.max_context:
                r.finish("length")
                sched.remove(r)
    sched.pool.check()
    if history is not None:
        history.append(out)
    return out


def _run(sched: Scheduler, max_steps=10_000):
    history = []
    while sched.has_unfinished():
        _step(sched, history)
        assert len(history) < max_steps, "scheduler made no progress"
    return history


def test_chunked_prefill_is_fewer_tokens_and_decodes_go_first():
    sched = Scheduler(PagePool(64, 16), max_batch_size=4, chunk_size=16, max_context=1024)
    a, b = _req("a", 5, n_out=20), _req("b", 100, n_out=3)
    sched.add(a)
    _step(sched)                                 # a: whole prompt, then samples
    sched.add(b)
    steps = _run(sched)
    b_chunks = [s.num_new for o in steps for s in o.scheduled if s.request is b]
    assert b_chunks[:6] == [15] * 6              # a's decode token takes 1 of the 16 each step
    assert sum(b_chunks[:7]) == 100 and b_chunks[7:] == [1, 1]
    for o in steps:                              # a decodes in every step until it is done
        names = [s.request.request_id for s in o.scheduled]
        if a.num_output_tokens and "a" in names:
            assert names[0] == "a"
    assert a.num_output_tokens == 20 and b.num_output_tokens == 3
    assert sched.pool.num_used == 0


def test_fcfs_admission_respects_batch_slots():
    sched = Scheduler(PagePool(64, 16), max_batch_size=2, chunk_size=64, max_context=1024)
    reqs = [_req(i, 3 + i, n_out=3) for i in range(5)]
    for r in reqs:
        sched.add(r)
    order = []
    while sched.has_unfinished():
        out = _step(sched)
        for s in out.scheduled:
            if s.num_computed == 0:
                order.append(s.request.request_id)
        assert len(sched.running) <= 2
    assert order == [str(i) for i in range(5)]


def test_waits_for_pages_then_preempts_and_recomputes():
    # 6 pages of 4 tokens: two requests whose prompts fit but whose outputs cannot both fit.
    # (no prefix cache: every prompt here starts 1, 2, 3, ... and would share pages)
    sched = Scheduler(PagePool(6, 4), max_batch_size=4, chunk_size=32, max_context=24, prefix_cache=False)
    a, b, c = _req("a", 8, n_out=10), _req("b", 8, n_out=10), _req("c", 20, n_out=2)
    for r in (a, b, c):
        sched.add(r)
    first = _step(sched)
    assert [s.request for s in first.scheduled] == [a, b]   # c's 20 tokens do not fit the rest
    steps = [first] + _run(sched)
    preempted = [r for o in steps for r in o.preempted]
    assert b in preempted and a not in preempted             # the later request gives way
    recompute = [s for o in steps for s in o.scheduled if s.request is b and s.num_computed == 0]
    assert len(recompute) == 2 and recompute[1].num_new > 8  # prompt + its kept outputs
    assert [r.num_output_tokens for r in (a, b, c)] == [10, 10, 2]
    assert sched.pool.num_used == 0


def test_prefix_cache_skips_the_shared_prefill():
    sched = Scheduler(PagePool(32, 8), max_batch_size=2, chunk_size=64, max_context=256)
    a = _req("a", 30, n_out=5)
    sched.add(a)
    _run(sched)
    b = Request("b", a.prompt_token_ids + a.output_token_ids[:3] + [7, 8], SamplingParams(max_new_tokens=2))
    c = Request("c", [5] + a.prompt_token_ids[1:], SamplingParams(max_new_tokens=2))   # differs at once
    sched.add(b)
    sched.add(c)
    first = _step(sched)
    got = {s.request.request_id: s.num_computed for s in first.scheduled}
    assert got == {"b": 32, "c": 0}            # b: 4 full pages of a's prompt + outputs; c: none
    assert sched.num_cached_tokens == 32
    _run(sched)
    assert sched.pool.num_used == 0
    no_cache = Scheduler(PagePool(32, 8), max_batch_size=2, chunk_size=64, max_context=256, prefix_cache=False)
    no_cache.pool = sched.pool
    d = _req("d", 30)
    no_cache.add(d)
    assert _step(no_cache).scheduled[0].num_computed == 0


def test_limits_are_reported_with_numbers():
    sched = Scheduler(PagePool(4, 16), max_batch_size=2, chunk_size=8, max_context=1000, max_queue=2)
    assert sched.max_context == 64                            # the pool is the tighter limit
    with pytest.raises(KtransError, match="prompt is 64 tokens.*at most 64 tokens"):
        sched.add(_req("long", 64))
    sched.add(_req("x", 3))
    sched.add(_req("y", 3))
    with pytest.raises(QueueFullError, match="2 waiting"):
        sched.add(_req("z", 3))
    with pytest.raises(KtransError, match="chunk_size"):
        Scheduler(PagePool(4, 16), max_batch_size=8, chunk_size=4, max_context=64)


def test_random_traffic_keeps_invariants_and_frees_everything():
    rng = py_rng()
    page_size = rng.choice([1, 4, 16])
    pool = PagePool(rng.randint(40, 80) * 16 // page_size, page_size)
    sched = Scheduler(pool, max_batch_size=rng.randint(1, 6), chunk_size=rng.choice([8, 16, 64]),
                      max_context=pool.capacity_tokens)
    pending = [_req(i, rng.randint(1, 200), n_out=rng.randint(1, 40)) for i in range(60)]
    everyone = list(pending)
    aborted, steps = set(), 0
    while pending or sched.has_unfinished():
        if pending and rng.random() < 0.3:
            sched.add(pending.pop())
        if sched.has_unfinished():
            _step(sched)
            steps += 1
        if rng.random() < 0.02 and sched.running:
            victim = rng.choice(sched.running)
            victim.finish("abort")
            sched.remove(victim)
            aborted.add(victim.request_id)
        assert steps < 20_000
    assert pool.num_used == 0 and not pool.owners()
    for r in everyone:
        assert r.finished
        if r.request_id not in aborted:
            assert r.num_output_tokens == r.params.max_new_tokens
