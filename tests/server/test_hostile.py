"""What a hostile or careless client does to a live server: huge and slow bodies, half-sent
headers, connection floods, uploads abandoned midway, cross-origin and rebinding requests.
Each must get one clear answer (or a closed connection) without holding the server's loop,
memory, or file descriptors, and without tracebacks in the log."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import socket
import threading

import httpx
import pytest

from live import LiveServer

HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 12


@pytest.fixture(scope="module")
def live(tiny_model):
    srv = LiveServer(tiny_model("qwen2", "f32", with_safetensors=False), "--max-body-mb", "1",
                     "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", "1",
                     "--max-connections", str(MAX_CONNECTIONS))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


class ErrorLog(logging.Handler):
    """Collects ERROR records of the server's and uvicorn's loggers during a test."""

    NAMES = ("ktrans.server", "uvicorn", "uvicorn.error", "asyncio")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        for n in self.NAMES:
            logging.getLogger(n).addHandler(self)
        return self

    def __exit__(self, *exc):
        for n in self.NAMES:
            logging.getLogger(n).removeHandler(self)


def _connect(live) -> socket.socket:
    host, port = live.url.rsplit("//", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        b = sock.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _chat(text: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 2}


def test_body_over_the_limit_is_413(live):
    big = json.dumps(_chat("x" * (2 << 20))).encode()
    r = httpx.post(live.url + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "1 MiB" in r.json()["error"]["message"]


def test_text_that_cannot_fit_is_refused_before_tokenizing(live, monkeypatch):
    """Under the size limit but far beyond the context: answered from the text's length alone."""
    tok = live.service.engine.tokenizer
    calls = []
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or [])
    r = httpx.post(live.url + "/v1/chat/completions", json=_chat("word " * 150_000), timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["n_ctx"] == 512
    assert err["n_prompt_tokens"] >= 512 and not calls


def test_prompts_are_prepared_off_the_event_loop(live, monkeypatch):
    """While one request's template is being rendered, the server answers everyone else."""
    tok = live.service.engine.tokenizer
    entered, release = threading.Event(), threading.Event()
    real = tok.apply_chat_template

    def slow_template(*a, **k):
        entered.set()
        release.wait(30)
        return real(*a, **k)
    monkeypatch.setattr(tok, "apply_chat_template", slow_template)
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(httpx.post, live.url + "/v1/chat/completions", json=_chat("hi"), timeout=60)
        try:
            assert entered.wait(30)
            assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        finally:
            release.set()
        assert fut.result().status_code == 200


def test_half_sent_headers_get_408_and_are_closed(live):
    socks = [_connect(live) for _ in range(3)]
    for s in socks:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")   # never finished
    try:
        for s in socks:
            reply = _read_all(s)          # the server closes it after the header deadline
            assert reply.startswith(b"HTTP/1.1 408")
    finally:
        for s in socks:
            s.close()
    assert httpx.get(live.url + "/health").status_code == 200


def test_connection_flood_is_capped(live):
    idle = [_connect(live) for _ in range(MAX_CONNECTIONS)]
    try:
        # Each idle connection is accepted in order; once they all are, the next is refused.
        live.wait_for("the idle connections", lambda: len(live.server.server_state.connections) >= MAX_CONNECTIONS)
        extra = _connect(live)
        reply = _read_all(extra)
        extra.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"Too many open connections" in reply
    finally:
        for s in idle:
            s.close()
    live.wait_for("the connections to close", lambda: len(live.server.server_state.connections) == 0)
    assert httpx.get(live.url + "/health").status_code == 200


def test_stalled_body_gets_408(live):
    s = _connect(live)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        reply = _read_all(s)
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"request body did not arrive" in reply


def test_upload_abandoned_midway_is_quiet(live):
    before = live.service.counters.get("responses_499", 0)
    with ErrorLog() as errors:
        s = _connect(live)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b"{" * 5000)
        s.close()
        live.wait_for("the abandoned upload", lambda: live.service.counters.get("responses_499", 0) > before)
        assert httpx.get(live.url + "/health").status_code == 200
    assert errors.records == []


@pytest.mark.parametrize("headers,status", [
    ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),     # a web page's simple POST
    ({"Origin": "http://evil.example", "Content-Type": "application/json"}, 403),
    ({"Host": "evil.example:80", "Content-Type": "application/json"}, 403),    # DNS rebinding
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 200),            # curl -d
])
def test_browsers_and_rebinding_cannot_reach_the_engine(live, headers, status):
    started = live.service.counters.get("requests_started", 0)
    r = httpx.post(live.url + "/v1/chat/completions", content=json.dumps(_chat("hi")), headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert live.service.counters.get("requests_started", 0) == started + (status == 200)
    if status != 200:
        assert r.json()["error"]["message"]


def test_same_origin_page_is_allowed(live):
    origin = live.url
    r = httpx.post(live.url + "/v1/chat/completions", json=_chat("hi"), headers={"Origin": origin}, timeout=60)
    assert r.status_code == 200
