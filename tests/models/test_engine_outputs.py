"""What the engine streams back, on a tiny generated model with its tokenizer: the text equals
decode() of the tokens; a stop string ends the request with the text cut before it; a stop token
id ends it at that token; a seeded sampled request gives the same tokens alone and in a batch."""

from __future__ import annotations

import pytest

from ktrans.engine import LLMEngine, SamplingParams
from ktrans.engine.model_runner import ModelRunner
from tests.models.test_batching_invariance import one_torch_thread  # noqa: F401
from tests.models.test_fidelity import rules_for
from tests.seeds import py_rng

ARCH = "deepseek_v3"


@pytest.fixture(scope="module")
def engine_factory(tiny_model, tmp_path_factory):
    d = tiny_model(ARCH, "f32", with_safetensors=False)
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(rules_for(ARCH))       # torch experts: no CPU thread pool in this process
    runner = ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), optimize_config_path=str(rules),
                         device="cpu", cache_lens=512, page_size=16, progress=False)
    return lambda batch=4, **kw: LLMEngine(runner, max_batch_size=batch, chunk_size=64, **kw)


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    got = {rid: {"tokens": [], "text": "", "reason": None} for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            g = got[out.request_id]
            g["tokens"] += out.new_token_ids
            g["text"] += out.new_text
            if out.finished:
                g["reason"] = out.finish_reason
    assert engine.stats()["kv_pages_used"] == 0
    return got


def test_text_stop_strings_and_stop_tokens(engine_factory):
    engine = engine_factory()
    tok = engine.tokenizer
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    greedy = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    base = _run(engine, {"base": (prompt, greedy)})["base"]
    assert base["reason"] == "length" and base["text"] == tok.decode(base["tokens"], skip_special_tokens=True)
    text = base["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop.strip()) > 0
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, stop=[stop])
    stopped = _run(engine, {"s": (prompt, params)})["s"]
    assert stopped["reason"] == "stop" and stopped["text"] == text[:text.find(stop)]
    assert stopped["tokens"] == base["tokens"][:len(stopped["tokens"])]
    stop_id = base["tokens"][5]
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, stop_token_ids=[stop_id])
    by_id = _run(engine, {"t": (prompt, params)})["t"]
    first = base["tokens"].index(stop_id)
    assert by_id["reason"] == "stop" and by_id["tokens"] == base["tokens"][:first + 1]
    assert by_id["text"] == tok.decode(by_id["tokens"][:-1], skip_special_tokens=True)


def test_eos_ends_the_generation_and_stays_out_of_the_text(engine_factory):
    """The token that ends a generation (EOS, or one of stop_token_ids) is the last of the token
    ids but not part of the text, as in vLLM, even with skip_special_tokens=False; with ignore_eos
    it does not end the generation.
    NOTE: a random tiny model emits its real EOS only by chance, so the EOS here is one more id
    named by the generation config (as Qwen's generation_config.json adds <|im_end|>), chosen
    among the tokens greedy decoding is known to produce."""
    from transformers import GenerationConfig

    engine = engine_factory()
    tok = engine.tokenizer
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    base = _run(engine, {"base": (prompt, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))})["base"]
    extra_eos = base["tokens"][7]
    engine = engine_factory(generation_config=GenerationConfig(eos_token_id=extra_eos))
    assert extra_eos in engine.eos_token_ids
    end = next(i for i, t in enumerate(base["tokens"]) if t in engine.eos_token_ids)      # <= 7
    params = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=[], skip_special_tokens=False)
    kept = _run(engine, {"k": (prompt, params)})["k"]
    assert kept["reason"] == "stop" and kept["tokens"] == base["tokens"][:end + 1]
    assert kept["text"] == tok.decode(base["tokens"][:end], skip_special_tokens=False)
    ignored = _run(engine, {"i": (prompt, SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))})["i"]
    assert ignored["reason"] == "length" and ignored["tokens"] == base["tokens"]


def test_seeded_sampling_is_the_same_alone_and_batched(engine_factory):
    engine = engine_factory()
    tok = engine.tokenizer
    # NOTE: every request is seeded from the test's seed (an unseeded one draws from OS entropy,
    # and its length, up to a sampled EOS, would change the batch from run to run).
    rng = py_rng()
    seed = rng.randrange(1 << 31)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=seed, max_new_tokens=16, ignore_eos=True)
    prompt = tok.encode("The weather today", add_special_tokens=False)
    alone = _run(engine, {"a": (prompt, seeded)})["a"]["tokens"]
    others = {f"o{i}": (tok.encode("x " * (i * 7 + 1), add_special_tokens=False),
                        SamplingParams(temperature=1.0, max_new_tokens=10 + i, seed=rng.randrange(1 << 31)))
              for i in range(3)}
    batched = _run(engine_factory(), {"a": (prompt, seeded), **others})["a"]["tokens"]
    assert batched == alone
    reseeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=seed + 1, max_new_tokens=16, ignore_eos=True)
    assert _run(engine, {"b": (prompt, reseeded)})["b"]["tokens"] != alone


def test_abort_ends_a_request_frees_its_pages_and_spares_the_others(engine_factory):
    """LLMEngine.abort between steps: the request ends with "abort" and no more tokens, its KV
    pages are released at once, a second abort (or of an unknown id) is a no-op, and the request
    batched with it generates exactly what it generates alone."""
    engine = engine_factory()
    tok = engine.tokenizer
    greedy = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    a = tok.encode("Once upon a time", add_special_tokens=False)
    b = tok.encode("The weather today " * 3, add_special_tokens=False)
    solo = _run(engine, {"b": (b, greedy)})["b"]["tokens"]
    engine.add_request("a", a, greedy)
    engine.add_request("b", b, greedy)
    got = {"a": [], "b": []}
    for _ in range(5):
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    held = engine.stats()["kv_pages_used"]
    b_pages = engine.pool.pages_for(len(b) + len(got["b"]))
    assert 0 < len(got["a"]) < 30 and held > b_pages
    out = engine.abort("a")
    assert out is not None and out.finished and out.finish_reason == "abort" and out.new_token_ids == []
    assert engine.stats()["kv_pages_used"] == b_pages
    assert engine.abort("a") is None and engine.abort("never-added") is None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "b"
            got["b"] += out.new_token_ids
    assert got["b"] == solo
    assert engine.stats()["kv_pages_used"] == 0
