"""The `ktrans` commands as a user starts them (real processes): a model that fails to load makes
`serve` exit non-zero with the reason (not answer 503 forever); bad flags and environment give
one message, never a traceback; `generate` refuses an empty prompt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def _ktrans(*args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "ktrans", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def broken_model(tiny_model, tmp_path_factory):
    """A tiny model whose GGUF file is cut short: found and parsed far enough to start, fails to load."""
    out = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model("qwen2", "f32", with_safetensors=False), out, ignore=ignore_safetensors)
    gguf = out / "model.gguf"
    gguf.write_bytes(gguf.read_bytes()[:4096])
    return out


def ignore_safetensors(folder, names):
    """The session's model directory may also hold the weights as safetensors: leave them out,
    so the broken GGUF is what gets loaded."""
    return [n for n in names if ".safetensors" in n]


def test_serve_exits_when_the_model_fails_to_load(broken_model):
    r = _ktrans("serve", "--model_path", str(broken_model), "--device", "cpu", "--port", "0")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "the model failed to load" in r.stderr and "GGUF" in r.stderr
    # It listened (on a real port, said only once bound) before the load failed.
    assert "listening on http://127.0.0.1:" in r.stderr and ":0 " not in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--max-connections", "0"], "--max-connections must be an integer >= 1"),
    (["--header-timeout", "0"], "--header-timeout must be a positive number"),
    (["--chat-template", "/nonexistent/t.jinja"], "--chat-template /nonexistent/t.jinja"),
])
def test_serve_bad_flags_are_one_message(tiny_model, args, needle):
    r = _ktrans("serve", "--model_path", str(tiny_model("qwen2", "f32", with_safetensors=False)),
                "--device", "cpu", *args, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_bad_isa_variable_is_one_message():
    r = _ktrans("info", env={"KTRANS_ISA": "foo"}, timeout=120)
    assert r.returncode == 2 and "unknown ISA 'foo'" in r.stderr and "Traceback" not in r.stderr


def test_generate_refuses_an_empty_stdin(tiny_model):
    r = _ktrans("generate", "--model_path", str(tiny_model("qwen2", "f32", with_safetensors=False)),
                "--device", "cpu", stdin="", timeout=120)
    assert r.returncode == 2 and "stdin is empty" in r.stderr and r.stdout == ""
