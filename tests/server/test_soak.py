"""Overload and soak: a bounded queue answers 503 + Retry-After, and a few hundred mixed requests
(valid, invalid, cancelled) leave the server healthy, the KV pool empty and no request lost."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from live import LiveServer


@pytest.fixture(scope="module")
def live(tiny_model):
    srv = LiveServer(tiny_model("qwen2", "f32", with_safetensors=False), "--max_batch_size", "2",
                     "--max-queue", "3")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def _body(i: int, kind: str) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": f"soak {i} " + "x " * (i % 7)}],
            "max_tokens": 1 + i % 6, "temperature": 0.7, "seed": i, "stream": kind == "stream"}
    if kind == "invalid":
        body["temperature"] = 9
    return body


async def _one(client: httpx.AsyncClient, i: int, kind: str) -> str:
    """Outcome of one request: 'ok', 'invalid', 'busy' or 'cancelled'."""
    url = "/v1/chat/completions"
    for attempt in range(200):
        if kind == "cancel":
            try:
                await asyncio.wait_for(client.post(url, json={**_body(i, kind), "max_tokens": 64}), 0.05)
            except asyncio.TimeoutError:
                return "cancelled"
            return "ok"
        if kind == "stream":
            async with client.stream("POST", url, json=_body(i, kind)) as r:
                if r.status_code == 503:
                    await asyncio.sleep(0.05)
                    continue
                text = (await r.aread()).decode()
                assert r.status_code == 200 and text.endswith("data: [DONE]\n\n"), text[-200:]
                return "ok"
        r = await client.post(url, json=_body(i, kind))
        if r.status_code == 503:
            assert r.headers.get("retry-after") and r.json()["error"]["code"] == "overloaded"
            await asyncio.sleep(0.05)
            continue
        if kind == "invalid":
            assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
            return "invalid"
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return "ok"
    return "busy"


def test_queue_limit_gives_503(live):
    async def burst():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as c:
            body = {"model": "m", "messages": [{"role": "user", "content": "long"}], "max_tokens": 40,
                    "ignore_eos": True}
            rs = await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(12)])
            return [r.status_code for r in rs]
    codes = asyncio.run(burst())
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    assert live.wait_idle()["kv_pages_used"] == 0


def test_soak_mixed_requests(live):
    kinds = ["plain"] * 5 + ["stream"] * 3 + ["invalid", "cancel"]
    plan = [(i, random.choice(kinds)) for i in range(240)]

    async def run_all():
        async with httpx.AsyncClient(base_url=live.url, timeout=300,
                                     limits=httpx.Limits(max_connections=24)) as c:
            sem = asyncio.Semaphore(12)

            async def guarded(i, kind):
                async with sem:
                    return await _one(c, i, kind)
            return await asyncio.gather(*[guarded(i, k) for i, k in plan])

    outcomes = asyncio.run(run_all())
    assert len(outcomes) == len(plan) and "busy" not in outcomes
    for (i, kind), out in zip(plan, outcomes):
        assert out == {"plain": "ok", "stream": "ok", "invalid": "invalid"}.get(kind, out)
    stats = live.wait_idle()
    assert stats["kv_pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert httpx.get(live.url + "/health").status_code == 200
