"""The server's life before it is ready: /health and every API answer 503 "loading" (with
Retry-After, in each API's shape) while the model loads, then serve; a load that fails stops the
server with the reason. Also CORS for a configured origin."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest

from ktrans.engine import AsyncEngine
from live import LiveServer
from test_serve_cli import ignore_safetensors


def test_requests_while_loading_get_503_then_served(tiny_model, monkeypatch):
    release = threading.Event()
    entered = threading.Event()
    real = AsyncEngine.from_args

    def slow_load(**kwargs):
        entered.set()
        release.wait(60)
        return real(**kwargs)
    monkeypatch.setattr(AsyncEngine, "from_args", staticmethod(slow_load))
    srv = LiveServer(tiny_model("qwen2", "f32", with_safetensors=False))
    try:
        assert entered.wait(60)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["error"]["code"] == "model_loading"
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "model_loading"
        o = httpx.post(srv.url + "/api/chat", json={"messages": [{"role": "user", "content": "x"}]})
        assert o.status_code == 503 and o.json() == {"error": "Loading model"}
        assert httpx.get(srv.url + "/api/ps").json() == {"models": []}
        assert httpx.get(srv.url + "/metrics").text.count("ktrans_ready 0") == 1
        release.set()
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        release.set()
        srv.close()


def test_failed_load_stops_the_server(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("qwen2", "f32", with_safetensors=False), broken, ignore=ignore_safetensors)
    (broken / "model.gguf").write_bytes((broken / "model.gguf").read_bytes()[:4096])
    srv = LiveServer(broken)
    try:
        srv.thread.join(60)                       # the server stops by itself
        assert not srv.thread.is_alive()
        assert len(srv.load_failures) == 1 and "GGUF" in srv.load_failures[0]
        assert srv.service.load_error == srv.load_failures[0]
    finally:
        srv.close()


@pytest.fixture(scope="module")
def cors(tiny_model):
    srv = LiveServer(tiny_model("qwen2", "f32", with_safetensors=False), "--cors-origins", "http://app.example")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def test_cors_preflight_and_request(cors):
    pre = httpx.options(cors.url + "/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    r = httpx.post(cors.url + "/v1/chat/completions", headers={"Origin": "http://app.example"}, timeout=60,
                   json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.post(cors.url + "/v1/chat/completions", headers={"Origin": "http://other.example"},
                       json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
