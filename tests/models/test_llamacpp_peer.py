"""llama.cpp, unmodified, as a peer on the GGUF files gen-model writes: it must load them, split
text into the tokens our tokenizer gives, and decode greedily the tokens ktrans decodes (with
the log-probabilities of those tokens close to ours).

The llama.cpp build is found through KTRANS_LLAMA_CPP (its bin folder), the PATH, or the
default output of /work/shared/tools/llama-cpp.sh (`build TGZ /tmp/llama`); without one these
tests are skipped. llama-server is driven over HTTP with token-id prompts (f32 KV cache, one
slot), so both engines see the same tokens; weights as stored (--no-repack: on an AMX CPU, the
llama.cpp build used here crashed in its repacked AMX path on any q8_0 tensor, of every arch).

NOTE (gpt-oss): gpt-oss's checkpoints use YaRN with the correction range not rounded
(transformers' `truncate: false`, which gen-model writes and ktrans follows); llama.cpp always
rounds it (ggml_rope_yarn_corr_dims). That moves logits by ~1e-2 here, so the comparison runs
ktrans on a copy of the config with `truncate: true` — the math llama.cpp computes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ktrans.engine.batch import ForwardBatch
from ktrans.engine.model_runner import ModelRunner
from ktrans.operators.moe_block import MoEBlock
from tests.tolerances import LLAMA_CPP_LOGPROB_ATOL, LLAMA_CPP_ROUTER_TIE, LLAMA_CPP_TIE

ARCHS = ["gpt_oss", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "llama", "glm4_moe", "minimax_m2", "gemma3",
         "qwen3_next", "qwen3_5_moe"]
NEW_TOKENS = 24
TEXT = "Hello, World! It's 2024-06-01: 3.14159 × 42 = ?\n\tIndented   spaces  你好，世界 🚀 don't"
# Kimi-K2's split keeps Han runs apart from kana, hangul and Latin letters
KIMI_TEXT = " GPU加速计算 漢字かな交じり文 中文English混合 2024年6月1日，。！한국어漢字 DON'T we're"


def llama_server_path() -> str | None:
    """llama-server of the llama.cpp build to use (KTRANS_LLAMA_CPP, the PATH, llama-cpp.sh's
    default output folder), or None."""
    if os.environ.get("KTRANS_LLAMA_CPP"):
        return shutil.which("llama-server", path=os.environ["KTRANS_LLAMA_CPP"])
    return shutil.which("llama-server") or shutil.which("llama-server", path="/tmp/llama/bin")


SERVER = llama_server_path()
pytestmark = pytest.mark.skipif(SERVER is None, reason="no llama.cpp build (set KTRANS_LLAMA_CPP to its bin folder)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, route: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


@contextlib.contextmanager
def llama_server(gguf: Path):
    """A llama-server on `gguf` (2 threads, f32 KV cache, one slot); yields its port."""
    port = _free_port()
    cmd = [SERVER, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2", "-c", "512", "-np", "1",
           "-ctk", "f32", "-ctv", "f32", "--no-warmup", "--no-repack"]
    with tempfile.TemporaryFile("w+") as log:        # (a pipe could fill up and block the server)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_healthy(proc, port, log, gguf)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc, port: int, log, gguf: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp refused {gguf.name} (exit {proc.returncode}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.load(r).get("status") == "ok":
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "llama-server did not come up in 60 s"
        time.sleep(0.2)


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-3000:]


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's character -> byte map (GPT-2's table; every generated vocabulary uses it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


def _piece_bytes(tokenizer, token: int, dec: dict[str, int] | None, added: set[str], rest: bytes) -> bytes:
    """A token's bytes in llama-server's output text, where `rest` is what is left of the piece
    being matched: llama.cpp renders some special tokens (gpt-oss's harmony markers, which it
    makes user-defined) and not others (end-of-turn tokens). `dec`: byte-level BPE's map, or
    None for a sentencepiece vocabulary ('▁' a space, <0xXX> one byte)."""
    piece = tokenizer.id_to_token(token)
    if piece in added:
        return piece.encode() if rest.startswith(piece.encode()) else b""
    if dec is None:
        m = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        return bytes([int(m[1], 16)]) if m else piece.replace("\u2581", " ").encode()
    return bytes(dec[c] for c in piece)


def _sends_text(tokenizer, tokens: list[int]) -> bool:
    """Whether the bytes of `tokens` (sentencepiece or byte-level pieces) start with a whole UTF-8
    character, so that llama-server sends a first piece of text."""
    spm = json.loads(tokenizer.to_str())["model"].get("byte_fallback", False)
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}     # (special: no text)
    data = b"".join(_piece_bytes(tokenizer, t, None if spm else _byte_decoder(), added, b"") for t in tokens)
    return any(_utf8_prefix(data[:n]) for n in range(1, min(len(data), 4) + 1))


def _utf8_prefix(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _llama_greedy(port: int, prompt: list[int], n: int, tokenizer) -> tuple[list[int], dict[int, float]]:
    """(greedy token ids, {step: log-prob of that step's token}) from llama.cpp, up to `n` tokens
    or an end-of-generation token (llama.cpp's `ignore_eos` would mask those tokens out of its
    logits, where ours keep them).

    NOTE: llama-server reports probabilities per piece of text it sends, not per token: a token
    that leaves a UTF-8 character unfinished is sent with the next, under that one's id and
    log-prob. Pieces are matched to steps by their bytes; where that fails (a piece this
    reconstruction does not predict), the log-probs of the later steps are left out."""
    res = _post(port, "/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "n_probs": 1,
                                      "return_tokens": True, "cache_prompt": False})
    tokens = [int(t) for t in res["tokens"]]
    assert len(tokens) == n or res["stop_type"] == "eos", (res["stop_type"], tokens)
    spm = json.loads(tokenizer.to_str())["model"].get("byte_fallback", False)
    dec, added = (None if spm else _byte_decoder()), {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    logprobs, step = {}, 0
    for piece in res.get("completion_probabilities", []):
        want, got, start = bytes(piece["bytes"]), b"", step
        while step < len(tokens) and (step == start or len(got) < len(want)):
            got += _piece_bytes(tokenizer, tokens[step], dec, added, want[len(got):])
            step += 1
        if got != want or tokens[step - 1] != piece["id"]:
            break
        logprobs[step - 1] = float(piece["logprob"])
    return tokens, logprobs


def _choice_gap(block: MoEBlock, x: torch.Tensor) -> float:
    """The least gap of any token's router between the k-th chosen expert's score and the next
    one's, and with group-limited routing (GLM-4.5's tiny preset) between the last chosen group's
    score and the next group's."""
    logits = F.linear(x.to(block.device, torch.float32), block.gate_weight, block.router_bias)           # [T, E]
    if block.gate_bias is not None:                              # choice scores with a correction bias
        logits = logits.sigmoid() + block.gate_bias
    gap = float("inf")
    groups = getattr(block.config, "n_group", 1) or 1
    if block.routing == "deepseek_v3" and groups > 1:
        t, e = logits.shape
        by_group = logits.view(t, groups, e // groups)
        score = by_group.topk(2, dim=-1).values.sum(-1)                                                  # [T, G]
        top, chosen = score.topk(block.config.topk_group + 1, dim=-1)
        gap = float((top[:, -2] - top[:, -1]).min())
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, chosen[:, :-1], True)              # [T, G]
        logits = by_group.masked_fill(~keep[:, :, None], float("-inf")).view(t, e)
    top = logits.topk(block.top_k + 1, dim=-1).values                                                     # [T, k+1]
    return min(gap, float((top[:, -2] - top[:, -1]).min()))


@contextlib.contextmanager
def _router_gaps(runner: ModelRunner, gaps: list[float]):
    """Append, per forward step, the least gap of any token's router (_choice_gap): below the
    engines' difference, llama.cpp may choose another expert there (a genuine near-tie; its
    outputs then part from ours)."""
    blocks = [m for m in runner.model.modules() if isinstance(m, MoEBlock)]

    def wrap(block):
        own = block.route

        def route(x):
            gaps[-1] = min(gaps[-1], _choice_gap(block, x))
            return own(x)
        return route

    for block in blocks:
        block.route = wrap(block)
    try:
        yield
    finally:
        for block in blocks:
            del block.route


def _our_greedy(runner: ModelRunner, prompt: list[int], n: int):
    """(greedy token ids, log-softmax [V] float64 at each step, least router gap of each step)
    from ktrans (the module path: every router in Python)."""
    pages = torch.arange(runner.num_pages, dtype=torch.int32)[None]
    ids, tokens, logps, gaps = list(prompt), [], [], []
    new = list(prompt)
    with _router_gaps(runner, gaps):
        for _ in range(n):
            done = len(ids) - len(new)
            batch = ForwardBatch(input_ids=torch.tensor(new), positions=torch.arange(done, len(ids)), seq_ids=[0],
                                 num_computed=[done], num_new=[len(new)], page_table=pages,
                                 logits_indices=torch.tensor([len(new) - 1]),
                                 state_rows=torch.tensor([[0, 0]]))     # (recurrent layers: in place)
            gaps.append(float("inf"))
            logp = runner.execute(batch)[0].double().log_softmax(-1)
            logps.append(logp)
            tokens.append(int(logp.argmax()))
            ids.append(tokens[-1])
            new = [tokens[-1]]
    return tokens, logps, gaps


def _as_llama_computes(model_dir: Path, out: Path) -> Path:
    """A model folder whose config.json rounds YaRN's correction range as llama.cpp does."""
    out.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    if (config.get("rope_scaling") or {}).get("rope_type") == "yarn":
        config["rope_scaling"]["truncate"] = True
    (out / "config.json").write_text(json.dumps(config))
    for f in model_dir.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            (out / f.name).symlink_to(f)
    return out


def _compare(ours, our_logps, gaps, theirs, their_logps, quant: str) -> int:
    """Tokens equal and log-probs of llama.cpp's tokens within LLAMA_CPP_LOGPROB_ATOL of ours, up
    to the first genuine near-tie of ours (a router's choice, or the greedy token itself): from
    there the two may part, and the comparison ends. Returns the number of steps compared."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if gaps[step] < LLAMA_CPP_ROUTER_TIE[quant]:
            return step
        logp = our_logps[step]
        if step in their_logps:
            assert abs(their_logps[step] - float(logp[b])) <= LLAMA_CPP_LOGPROB_ATOL[quant], \
                f"step {step}: llama.cpp log-prob {their_logps[step]:.5f} for token {b}, ours {float(logp[b]):.5f}"
        if a != b:
            gap = float(logp[a] - logp[b])
            assert gap <= LLAMA_CPP_TIE[quant], \
                f"step {step}: ours {a}, llama.cpp {b}; our log-probs differ by {gap:.4f} (no tie)"
            return step
    return min(len(ours), len(theirs))


# Kimi-K2's preset: its vocabulary with tokenizer.ggml.pre = kimi-k2 (llama.cpp's own splitter for it)
@pytest.mark.parametrize("arch", ARCHS + ["deepseek_v3/kimi-k2-tiny"])
def test_llama_cpp_tokenizes_our_gguf_as_we_do(tiny_model, arch):
    arch, _, preset = arch.partition("/")
    d = tiny_model(arch, "f32", with_safetensors=False, preset=preset or "tiny")
    full = TEXT + (KIMI_TEXT if preset else "")
    want = Tokenizer.from_file(str(d / "tokenizer.json")).encode(full, add_special_tokens=False).ids
    with llama_server(d / "model.gguf") as port:
        got = _post(port, "/tokenize", {"content": full, "add_special": False})["tokens"]
        text = _post(port, "/detokenize", {"tokens": want})["content"]
    assert got == want
    assert text == full


@pytest.mark.parametrize("quant", ["f32", "mxfp4"])             # (mxfp4: q8_0 where a model has no experts)
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_decodes_our_gguf_as_we_do(tiny_model, tmp_path, arch, quant):
    d = tiny_model(arch, quant, with_safetensors=False)
    runner = ModelRunner(model_path=str(_as_llama_computes(d, tmp_path / "model")), gguf_path=str(d / "model.gguf"),
                         device="cpu", cache_lens=256, page_size=16, progress=False, fused_decode=False)
    tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    # Past the sliding window of gpt-oss's tiny preset (8 tokens) within the prompt already; a
    # prompt whose prefill holds a router near-tie, or whose continuation llama-server cannot send
    # as text (bytes that never complete a UTF-8 character: no piece, so no log-prob), is drawn
    # again (nothing could be compared).
    for _ in range(5):
        prompt = torch.randint(9, runner.config.vocab_size, (12,)).tolist()
        ours, our_logps, gaps = _our_greedy(runner, prompt, NEW_TOKENS)
        if gaps[0] >= LLAMA_CPP_ROUTER_TIE[quant] and _sends_text(tokenizer, ours):
            break
    runner.close()
    with llama_server(d / "model.gguf") as port:
        theirs, their_logps = _llama_greedy(port, prompt, NEW_TOKENS, tokenizer)
    assert their_logps, "no log-prob of llama.cpp's could be matched to a step"
    steps = _compare(ours, our_logps, gaps, theirs, their_logps, quant)
    print(f"{arch} {quant}: {steps} of llama.cpp's {len(theirs)} greedy steps compared"
          + (" (then a near-tie)" if steps < len(theirs) else "")
          + f", log-probs at {sum(1 for k in their_logps if k < steps)} of them")
