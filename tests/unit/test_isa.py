"""Run-time ISA dispatch: every variant this CPU has gives bit-identical results, a lower level
can be forced (API and KTRANS_ISA), and a level the CPU lacks is refused with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ktrans import _C, cpu
from tests.seeds import np_rng


def _random_f32(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32) * rng.choice([1e-30, 1e-3, 1.0, 1e30], n)
    x[rng.integers(0, n, 8)] = np.nan
    x[rng.integers(0, n, 4)] = np.inf
    x[rng.integers(0, n, 4)] = -np.inf
    return x.astype(np.float32)


def test_levels_are_ordered_and_best_is_supported():
    assert cpu.ISA_LEVELS == ("generic", "avx2", "avx512", "amx")
    assert cpu.supported_isas()[0] == "generic"
    assert cpu.supported_isas()[-1] == cpu.best_isa()


@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 1000, 4099])
def test_every_variant_matches_torch_bit_for_bit(n):
    rng = np_rng()
    x = _random_f32(n, rng)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    back_ref = torch.from_numpy(ref.view(np.int16)).view(torch.bfloat16).float().numpy()
    finite = ~np.isnan(x)
    for isa in cpu.supported_isas():
        y = _C.f32_to_bf16(x, isa=isa)
        # NaN payloads are not specified; every other value must be identical to torch's.
        assert np.array_equal(y[finite], ref[finite]), isa
        assert np.all(np.isnan(_C.bf16_to_f32(y[~finite], isa=isa)))
        assert np.array_equal(_C.bf16_to_f32(ref, isa=isa)[finite], back_ref[finite]), isa


def test_variants_identical_including_nan():
    x = _random_f32(3001, np_rng())
    outs = {isa: _C.f32_to_bf16(x, isa=isa) for isa in cpu.supported_isas()}
    first = outs["generic"]
    for isa, y in outs.items():
        assert np.array_equal(y, first), isa


def test_set_isa_lowers_and_refuses_unsupported():
    best = cpu.best_isa()
    try:
        for isa in cpu.supported_isas():
            cpu.set_isa(isa)
            assert cpu.selected_isa() == isa
            assert _C.kernel_isa("f32_to_bf16") in cpu.ISA_LEVELS[: cpu.ISA_LEVELS.index(isa) + 1]
        with pytest.raises(ValueError, match="expected one of"):
            cpu.set_isa("sse9")
        unsupported = [i for i in cpu.ISA_LEVELS if i not in cpu.supported_isas()]
        for isa in unsupported:
            with pytest.raises(ValueError, match="not supported"):
                cpu.set_isa(isa)
    finally:
        cpu.set_isa(best)


def _run_with_env(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KTRANS_ISA=value)
    code = "from ktrans import cpu; print(cpu.selected_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_env_var_forces_lower_level():
    r = _run_with_env("generic")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "generic"


def test_env_var_bad_value_is_a_clear_error():
    r = _run_with_env("fastest")
    assert r.returncode != 0
    assert "KTRANS_ISA" in r.stderr or "expected one of" in r.stderr


_PREFETCH_DOTS = """
import sys, numpy as np
from ktrans import _C, cpu
rng = np.random.default_rng(int(sys.argv[1]))
out = []
for qt in ("q4_k", "q6_k", "q8_0", "bf16"):
    w = rng.standard_normal(64 * 1024).astype(np.float32)
    raw = np.asarray(_C.quant_quantize(qt, w, 1)).reshape(64, -1)
    out.append(np.asarray(_C.quant_vec_dot(qt, raw, rng.standard_normal(1024).astype(np.float32), "", 1)))
print(_C.prefetch_ahead(), np.concatenate(out).tobytes().hex())
"""


def _prefetch_run(value: str, seed: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, KTRANS_PREFETCH_AHEAD=value)
    return subprocess.run([sys.executable, "-c", _PREFETCH_DOTS, str(seed)], env=env, capture_output=True, text=True)


def test_prefetch_distance_changes_no_result():
    """The dot kernels' software prefetch is a hint: off, the default and a far distance give the
    same bits (and the distance set is the one reported)."""
    seed = int(np_rng().integers(1 << 30))
    runs = {v: _prefetch_run(v, seed) for v in ("0", "", "4096")}
    for v, r in runs.items():
        assert r.returncode == 0, (v, r.stderr)
    dist = {v: int(r.stdout.split()[0]) for v, r in runs.items()}
    assert dist == {"0": 0, "": 1024, "4096": 4096}
    assert len({r.stdout.split()[1] for r in runs.values()}) == 1


@pytest.mark.parametrize("value", ["abc", "100", "-64", "99999999"])
def test_prefetch_bad_value_is_a_clear_error(value):
    r = _prefetch_run(value, 0)
    assert r.returncode != 0
    assert f"KTRANS_PREFETCH_AHEAD='{value}'" in r.stderr and "multiple of 64" in r.stderr
    assert "terminate called" not in r.stderr
