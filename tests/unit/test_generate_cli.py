"""`ktrans generate` on a tiny generated model: --json gives the prompt and completion token ids
and text and timings, and the greedy tokens are what transformers generates on the same weights;
plain mode prints only the completion (stats on stderr), reads stdin and applies the chat template
with --chat; bad flags fail with a message naming the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from ktrans.cli.main import main
from tests.tolerances import GREEDY_TIE_ATOL

ARCH = "qwen3_moe"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _model_flags(model_dir) -> list[str]:
    return ["--model_path", str(model_dir), "--gguf_path", str(model_dir / "model.gguf"), "--device", "cpu",
            "--cache_lens", "512"]


def _generate(model_dir, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `ktrans generate`; stdout/stderr decoded as UTF-8 as written.
    NOTE: not text=True: its universal newlines would turn a generated "\r" into "\n"."""
    cmd = [sys.executable, "-m", "ktrans", "generate", *_model_flags(model_dir), *args]
    r = subprocess.run(cmd, input=None if stdin is None else stdin.encode(), capture_output=True, timeout=300, env=ENV)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model(ARCH, "f32", with_safetensors=True)


@pytest.fixture(scope="module")
def hf(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def _check_greedy(model, prompt_ids: list[int], tokens: list[int]) -> None:
    """Each token is transformers' argmax at its position (teacher forcing), up to a near-tie."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1]   # [n, V]
    for i, t in enumerate(tokens):
        assert logits[i, t] >= logits[i].max() - GREEDY_TIE_ATOL, f"token {i}: {t} is not the argmax"


def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], int]:
    """transformers' greedy tokens (n of them, end-of-sequence tokens included, as --ignore_eos
    generates them) and how many lead the rest by more than a near-tie (beyond that point a
    different, equally valid, continuation is possible).
    NOTE: a plain argmax loop over the model's forward, not generate(): its min_new_tokens
    masks the end-of-sequence tokens, which --ignore_eos does not."""
    seq, out, decided = list(ids), [], n
    with torch.no_grad():
        for i in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            top2 = logits.topk(2).values
            if decided == n and top2[0] - top2[1] <= GREEDY_TIE_ATOL:
                decided = i
            out.append(int(logits.argmax()))
            seq.append(out[-1])
    return out, decided


def test_json_greedy_matches_transformers(model_dir, hf):
    tok, model = hf
    prompt = "The capital of France is"
    r = _generate(model_dir, "--json", "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "12",
                  "--ignore_eos")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt"] == prompt and out["prompt_token_ids"] == tok.encode(prompt)
    assert len(out["completion_token_ids"]) == 12 and out["finish_reason"] == "length"
    assert out["completion"] == tok.decode(out["completion_token_ids"], skip_special_tokens=True)
    assert out["ttft_s"] > 0 and out["total_s"] >= out["ttft_s"] and out["decode_tok_s"] > 0
    _check_greedy(model, out["prompt_token_ids"], out["completion_token_ids"])


def test_plain_output_from_stdin_with_chat_template(model_dir, hf):
    tok, model = hf
    question = "What is 2+2?"
    r = _generate(model_dir, "--chat", "--temperature", "0", "--max_new_tokens", "6", "--ignore_eos",
                  stdin=question)
    assert r.returncode == 0, r.stderr
    templated = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=False)
    expected, decided = _hf_greedy(model, tok.encode(templated, add_special_tokens=False), 6)
    assert r.stdout.endswith("\n")                                  # only the completion, then a newline
    if decided == len(expected):
        assert r.stdout == tok.decode(expected, skip_special_tokens=True) + "\n"
    else:
        assert r.stdout.startswith(tok.decode(expected[:decided], skip_special_tokens=True).rstrip("\ufffd"))
    assert "prefill" in r.stderr and "decode" in r.stderr and "TTFT" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--top_p", "0"], "--top_p"),
    (["--prompt_file", "/nonexistent/prompt.txt"], "--prompt_file /nonexistent/prompt.txt"),
    (["--prompt", "x", "--cache_lens", "0"], "--cache_lens"),
    (["--prompt", "x", "--prompt_file", "p.txt"], "either --prompt or --prompt_file"),
])
def test_bad_flags_name_the_flag(model_dir, args, message, capsys):
    assert main(["generate", *_model_flags(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
