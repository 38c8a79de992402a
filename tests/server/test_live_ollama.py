"""The Ollama API against a live server: documented shapes, NDJSON streaming, the chat template."""

from __future__ import annotations

import json

import httpx
import pytest

from live import LiveServer


@pytest.fixture(scope="module")
def live(tiny_model):
    srv = LiveServer(tiny_model("deepseek_v3", "f32", with_safetensors=False))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def test_liveness_version_tags_ps_show(live):
    assert httpx.get(live.url + "/").text == "Ollama is running"
    assert httpx.head(live.url + "/").status_code == 200
    v = httpx.get(live.url + "/api/version").json()["version"]
    assert tuple(int(x) for x in v.split(".")) >= (0, 6, 4)  # Copilot BYOK's minimum
    models = httpx.get(live.url + "/api/tags").json()["models"]
    assert models and models[0]["model"] == models[0]["name"] and ":" in models[0]["name"]
    assert {"format", "family", "parameter_size", "quantization_level"} <= set(models[0]["details"])
    assert httpx.get(live.url + "/api/ps").json()["models"][0]["name"] == models[0]["name"]
    show = httpx.post(live.url + "/api/show", json={"model": models[0]["name"]}).json()
    assert show["model_info"]["deepseek_v3.context_length"] == 512
    assert "completion" in show["capabilities"] and "thinking" in show["capabilities"]
    assert show["template"]


def test_chat_stream_ndjson_and_non_stream(live):
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi!"}],
            "options": {"temperature": 0, "num_predict": 8}, "think": False}
    with httpx.stream("POST", live.url + "/api/chat", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert all(not d["done"] for d in lines[:-1]) and lines[-1]["done"]
    last = lines[-1]
    assert last["done_reason"] in ("stop", "length") and last["eval_count"] >= 1
    assert last["prompt_eval_count"] > 3 and last["total_duration"] > 0 and last["eval_duration"] >= 0
    streamed = "".join(d["message"]["content"] for d in lines[:-1])
    full = httpx.post(live.url + "/api/chat", json={**body, "stream": False}, timeout=120).json()
    assert full["done"] and full["message"]["role"] == "assistant"
    assert full["message"]["content"] == streamed


def test_generate_raw_and_templated(live):
    body = {"model": "m", "prompt": "Once upon", "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 5}}
    r = httpx.post(live.url + "/api/generate", json=body, timeout=120).json()
    assert r["done"] and isinstance(r["response"], str) and r["eval_count"] >= 1
    lines = [json.loads(s) for s in httpx.post(live.url + "/api/generate", json={**body, "stream": True},
                                                 timeout=120).text.splitlines() if s]
    assert "".join(d["response"] for d in lines[:-1]) == r["response"]
    load = httpx.post(live.url + "/api/generate", json={"model": "m"}).json()
    assert load["done_reason"] == "load"


def test_ollama_errors_are_plain(live):
    r = httpx.post(live.url + "/api/chat", content=b"nope")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(live.url + "/api/chat", json={"messages": [{"role": "user", "content": "x"}],
                                                 "options": {"temperature": -1}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]
