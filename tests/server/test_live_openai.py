"""The OpenAI API against a live server, through the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading

import httpx
import openai
import pytest

from live import LiveServer

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def live(tiny_model):
    srv = LiveServer(tiny_model("qwen3_moe", "f32", with_safetensors=False), "--api-key", KEY,
                     "--max_batch_size", "4", "--served-model-name", "tiny", "gpt-4o")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, text, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                          temperature=0, **kw)


def test_models_list(client, live):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "gpt-4o"]
    raw = httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert raw["data"][0]["max_model_len"] == 512


def test_chat_non_stream(client):
    r = _chat(client, "Hello there", max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 8


def test_chat_stream_matches_non_stream(client):
    full = _chat(client, "Tell me a story", max_tokens=10)
    chunks = list(_chat(client, "Tell me a story", max_tokens=10, stream=True))
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_stream_include_usage_and_exact_framing(live):
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 4, "temperature": 0, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert raw.endswith("data: [DONE]\n\n")
    assert all(e.startswith("data: ") for e in events)
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    usage = payloads[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_stream_and_echo(client):
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=6, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    e = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=6, temperature=0, echo=True)
    assert e.choices[0].text == "The quick brown" + r.choices[0].text


def _events(live, path, body):
    with httpx.stream("POST", live.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    return [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_return_token_ids(live, path):
    # Every generated token is reported when streaming (even one whose text is held back), and the
    # ids are the ones the non-streamed answer reports; decoding them gives the text.
    body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Count with me"}]
    else:
        body["prompt"] = "Count with me"
    full = httpx.post(live.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120).json()
    choice = full["choices"][0]
    assert len(choice["token_ids"]) == full["usage"]["completion_tokens"] == 12
    assert len(choice["prompt_token_ids"]) == full["usage"]["prompt_tokens"]
    events = _events(live, path, {**body, "stream": True})
    assert events[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]
    assert streamed == choice["token_ids"]
    plain = httpx.post(live.url + path, json={**body, "return_token_ids": False},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120).json()
    assert "token_ids" not in plain["choices"][0]


def test_concurrent_equals_alone(client):
    prompts = [f"Request number {i}: " + "word " * (i % 5) for i in range(16)]
    alone = {p: _chat(client, p, max_tokens=6).choices[0].message.content for p in prompts[:4]}
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: _chat(client, p, max_tokens=6), prompts))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    for p, r in zip(prompts, results):
        if p in alone:
            assert r.choices[0].message.content == alone[p]


def test_errors_are_openai_shaped(live, client):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", top_p=7)
    assert e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "word " * 700)
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and err["n_ctx"] == 512 and err["n_prompt_tokens"] > 512
    assert "512" in err["message"] and str(err["n_prompt_tokens"]) in err["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.post(live.url + "/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200  # public
    r = httpx.get(live.url + "/v1/nothing", headers=h)
    assert r.status_code == 404 and "error" in r.json()


def test_cancel_stream_and_non_stream_frees_kv(live):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "x", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
            "temperature": 1.0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, headers=h, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # leave mid-stream: closing the connection must abort the request
    body["stream"] = False
    # NOTE: the fused all-CPU decode step generates the tiny model's 400 tokens in ~0.3 s: the
    # client gives up after 50 ms of waiting for the answer (connecting may take longer).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, headers=h, timeout=httpx.Timeout(5.0, read=0.05))
    stats = live.wait_idle()
    assert stats["kv_pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


def test_metrics(live, client):
    _chat(client, "count me", max_tokens=2)
    text = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "ktrans_requests_total" in text and "ktrans_kv_pages_total" in text
    assert "ktrans_generation_tokens_total" in text
