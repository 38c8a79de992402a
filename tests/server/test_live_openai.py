"""The OpenAI API against a live server, through the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

from live import LiveServer, raw_post

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


H = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": "x", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
        "temperature": 1.0, "ignore_eos": True}


def _aborted(live) -> float:
    return live.service.counters.get("requests_aborted", 0)


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_aborts_and_frees_kv(live, stream):
    """With the model's forward held at the gate, the request cannot finish by itself: its KV
    pages come back only if the client's disconnect really aborts it."""
    gate = live.gate()
    engine_aborts = live.service.engine.stats()["requests_aborted"]
    before = _aborted(live)
    gate.shut()
    try:
        if stream:
            with httpx.stream("POST", live.url + "/v1/chat/completions", json={**LONG, "stream": True},
                              headers=H, timeout=60) as r:
                assert r.status_code == 200
                lines = r.iter_lines()               # NOTE: kept: a dropped iterator closes the response
                next(lines)                          # the role chunk: the request is admitted
                assert gate.blocked.wait(30)
                assert live.service.engine.stats()["kv_pages_used"] > 0
        else:
            with raw_post(live.url, "/v1/chat/completions", LONG, H):
                assert gate.blocked.wait(30)
                assert live.service.engine.stats()["kv_pages_used"] > 0
            # leaving the block closed the connection under the waiting request
        live.wait_for("the abort", lambda: _aborted(live) > before)
        stats = live.service.engine.stats()
        assert stats["kv_pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
        assert stats["requests_aborted"] == engine_aborts + 1 and _aborted(live) == before + 1
    finally:
        gate.open()
    assert live.wait_idle()["kv_pages_used"] == 0


def test_keepalive_pings_while_the_model_is_silent(live):
    gate = live.gate()
    live.service.settings.ping_interval = 0.05
    gate.shut()
    try:
        body = {**LONG, "max_tokens": 3, "stream": True}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, headers=H, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")          # role chunk
            assert gate.blocked.wait(30)
            silent = [next(lines) for _ in range(4)]         # nothing generated: only pings
            assert set(silent) <= {": ping", ""} and ": ping" in silent
            gate.open()
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    finally:
        gate.open()
        live.service.settings.ping_interval = 15.0


def test_x_api_key_header(live):
    assert httpx.get(live.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert httpx.get(live.url + "/v1/models", headers={"x-api-key": "nope"}).status_code == 401


@pytest.mark.parametrize("body,param", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, None),                      # empty: nothing asked, accepted
])
def test_unsupported_chat_parameters_are_refused(live, body, param):
    r = httpx.post(live.url + "/v1/chat/completions", headers=H, timeout=60,
                   json={"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **body})
    if param is None:
        assert r.status_code == 200
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        assert param in r.json()["error"]["message"]


@pytest.mark.parametrize("body,param", [({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"),
                                        ({"prompt": ""}, "prompt")])
def test_unsupported_completion_parameters_are_refused(live, body, param):
    r = httpx.post(live.url + "/v1/completions", headers=H, timeout=60,
                   json={"model": "x", "prompt": "Once", "max_tokens": 1, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_metrics_count_known_traffic(live, client):
    m0 = live.metrics(H)
    _chat(client, "count me", max_tokens=2)                                        # 200
    assert httpx.post(live.url + "/v1/chat/completions", headers=H,
                      json={"messages": [{"role": "user", "content": "x"}], "top_p": 7}).status_code == 400
    assert httpx.get(live.url + "/v1/nothing", headers=H).status_code == 404
    assert httpx.get(live.url + "/v1/chat/completions", headers=H).status_code == 405
    assert httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    m1 = live.metrics(H)

    def delta(name):
        return m1.get(name, 0) - m0.get(name, 0)
    for status in (400, 404, 405, 401):
        assert delta(f'ktrans_http_responses_total{{status="{status}"}}') == 1, status
    # The first /metrics answer is counted once the second is rendered.
    assert delta('ktrans_http_responses_total{status="200"}') == 2
    assert delta("ktrans_requests_total") == 1 and delta("ktrans_requests_rejected_total") == 0
    assert delta("ktrans_requests_aborted_total") == 0
    assert delta("ktrans_generation_tokens_total") == 2 or delta("ktrans_generation_tokens_total") == 1
    assert m1["ktrans_kv_pages_total"] > 0
