"""The Ollama API against a live server: documented shapes, NDJSON streaming, the chat template."""

from __future__ import annotations

import json
from pathlib import Path

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
    # Without raw, the prompt goes through the chat template (and it generates; it used to
    # answer done_reason "load" with nothing).
    tpl = httpx.post(live.url + "/api/generate", json={**body, "raw": False, "system": "Be brief."},
                     timeout=120).json()
    assert tpl["done"] and tpl["done_reason"] in ("stop", "length") and tpl["eval_count"] >= 1
    tok = live.service.engine.tokenizer
    templated = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Once upon"}],
                                        tokenize=False, add_generation_prompt=True)
    assert tpl["prompt_eval_count"] == len(tok.encode(templated, add_special_tokens=False))
    assert tpl["prompt_eval_count"] > r["prompt_eval_count"]
    load = httpx.post(live.url + "/api/generate", json={"model": "m"}).json()
    assert load["done_reason"] == "load"


def test_think_splits_reasoning_end_to_end(live):
    """DeepSeek's template: with think the prompt opens <think>, so what the model writes is
    reasoning up to a </think> it writes (random weights seldom close the block; the tokens it
    wrote, named by logprobs, say whether it did) and content after it; without think,
    everything is content. Both APIs, streamed and not, agree token for token."""
    msgs = [{"role": "user", "content": "Why?"}]
    opts = {"temperature": 0, "num_predict": 8}
    on = httpx.post(live.url + "/api/chat", json={"messages": msgs, "options": opts, "think": True,
                                                  "stream": False}, timeout=120).json()
    off = httpx.post(live.url + "/api/chat", json={"messages": msgs, "options": opts, "think": False,
                                                   "stream": False}, timeout=120).json()

    def written(thinking: bool) -> tuple[list[str], dict]:
        probe = httpx.post(live.url + "/v1/chat/completions", json={
            "messages": msgs, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "chat_template_kwargs": {"enable_thinking": thinking}}, timeout=120).json()["choices"][0]
        return [t["token"] for t in probe["logprobs"]["content"]], probe["message"]

    tokens_on, _ = written(True)
    thinking = on["message"].get("thinking", "")
    if "</think>" not in tokens_on:
        assert thinking and on["message"]["content"] == ""
    else:                                       # closed: the marker in neither part, each part in order
        cut = tokens_on.index("</think>")
        assert "</think>" not in thinking + on["message"]["content"]
        assert thinking.strip() == "".join(tokens_on[:cut]).strip()
    # Without think the prompt does not open the block, so everything is content, unless the
    # random model writes the opening marker itself.
    tokens_off, message_off = written(False)
    if "<think>" in tokens_off:
        assert off["message"]["thinking"] and "<think>" not in off["message"]["content"]
    else:
        assert "thinking" not in off["message"] and off["message"]["content"] == message_off["content"] != ""
    lines = [json.loads(x) for x in httpx.post(live.url + "/api/chat", json={
        "messages": msgs, "options": opts, "think": True}, timeout=120).text.splitlines() if x]
    assert "".join(d["message"].get("thinking", "") for d in lines) == thinking
    assert "".join(d["message"].get("content", "") for d in lines) == on["message"]["content"]
    oa = {"messages": msgs, "max_tokens": 8, "temperature": 0, "chat_template_kwargs": {"enable_thinking": True}}
    full = httpx.post(live.url + "/v1/chat/completions", json=oa, timeout=120).json()["choices"][0]["message"]
    assert (full.get("reasoning_content") or "") == (full.get("reasoning") or "") == thinking
    assert (full["content"] or "") == on["message"]["content"]
    raw = httpx.post(live.url + "/v1/chat/completions", json={**oa, "stream": True}, timeout=120).text
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in raw.split("\n\n") if e.startswith("data: {")]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == thinking
    assert "".join(d.get("content") or "" for d in deltas) == on["message"]["content"]


def test_ollama_errors_are_plain(live):
    r = httpx.post(live.url + "/api/chat", content=b"nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(live.url + "/api/chat", json={"messages": [{"role": "user", "content": "x"}],
                                                 "options": {"temperature": -1}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    r = httpx.post(live.url + "/api/nothing", json={})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = httpx.post(live.url + "/api/show", json={"model": "no-such-model:7b"})
    assert r.status_code == 404 and "no-such-model:7b" in r.json()["error"]
    for body, param in (({"images": ["aGVsbG8="]}, "images"), ({"suffix": "}"}, "suffix")):
        r = httpx.post(live.url + "/api/generate", json={"model": "m", "prompt": "x", "stream": False, **body})
        assert r.status_code == 400 and param in r.json()["error"]
    r = httpx.post(live.url + "/api/chat", json={"model": "m", "stream": False, "messages": [
        {"role": "user", "content": "what is this?", "images": ["aGVsbG8="]}]})
    assert r.status_code == 400 and "messages[0].images" in r.json()["error"]


def test_tags_describe_the_files(live):
    m = httpx.get(live.url + "/api/tags").json()["models"][0]
    # The session's model directory may also hold the same weights as safetensors (which are
    # then the ones loaded).
    folder = Path(live.args.model_path)
    fmt = "safetensors" if list(folder.glob("*.safetensors")) else "gguf"
    files = list(folder.glob(f"*.{fmt}"))
    assert m["size"] == sum(p.stat().st_size for p in files) > 0
    assert m["digest"].startswith("sha256:") and len(m["digest"]) == 7 + 64
    assert m["details"]["quantization_level"] == "F32" and m["details"]["format"] == fmt
    n_params = m["details"]["parameter_size"]
    assert n_params and n_params[-1] in "KMB" and float(n_params[:-1]) > 0


def test_ollama_auth_errors_are_plain(tiny_model):
    srv = LiveServer(tiny_model("deepseek_v3", "f32", with_safetensors=False), "--api-key", "k")
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + "/api/chat", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/api/version").status_code == 200      # public
    finally:
        srv.close()


def test_empty_completion_prompt_is_400_even_with_bos(live):
    """DeepSeek's tokenizer adds BOS, so "" would be a one-token prompt here and an empty one on
    other models: refused alike everywhere."""
    r = httpx.post(live.url + "/v1/completions", json={"model": "m", "prompt": "", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
