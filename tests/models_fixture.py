"""Session-wide tiny generated models for tests (contract 9).

`tiny_model(arch, quant="f32", with_safetensors=True, preset="tiny")` returns the directory of a
`tiny` preset model of `arch` (config.json, tokenizer files, model.gguf and, with_safetensors, the
same weights as safetensors), generated once per test session and shared by every test that asks
for it; `preset` picks another small preset (deepseek_v3's kimi-k2-tiny: Kimi-K2's tokenizer).
The weights' seed is the session seed (tests/seeds.py): fresh each run unless KTRANS_TEST_SEED
is set, which reproduces a failing run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from seeds import SESSION_SEED


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(arch, quant="f32", with_safetensors=True, preset="tiny") -> Path (cached
    per session)."""
    from ktrans.genmodel import generate_model

    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple[str, str, str], tuple[Path, bool]] = {}

    def make(arch: str, quant: str = "f32", with_safetensors: bool = True, preset: str = "tiny") -> Path:
        have = made.get((arch, quant, preset))
        if have is None or (with_safetensors and not have[1]):
            out = root / f"{arch}-{preset}-{quant}{'-st' if with_safetensors else ''}"
            generate_model(out, arch=arch, preset=preset, quant=quant, seed=SESSION_SEED,
                           with_safetensors=with_safetensors)
            made[(arch, quant, preset)] = have = (out, with_safetensors)
        return have[0]

    return make
