"""The suite's seeding (tests/seeds.py, tests/conftest.py), run on a throw-away test file in a
fresh pytest process: the same KTRANS_TEST_SEED gives the same draws from every generator, another
seed other draws, and a failing test's report names the seed and the command that replays it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import random, numpy as np, torch
from tests.seeds import np_rng, py_rng

def test_draw():
    print("DRAW", random.random(), np.random.rand(), torch.rand(1).item(), np_rng().random(), py_rng().random())
    assert False
"""


def _run(path: Path, seed: int) -> str:
    env = dict(os.environ, KTRANS_TEST_SEED=str(seed),
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr          # the probe fails on purpose
    return proc.stdout


def test_session_seed_replays_every_generator_and_is_reported(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    first, again, other = _run(probe, 5), _run(probe, 5), _run(probe, 6)
    draw = lambda out: re.search(r"^DRAW .*$", out, re.M).group(0)  # noqa: E731
    assert draw(first) == draw(again) != draw(other)
    assert len(set(draw(first).split()[1:])) == 5                    # five different generators
    assert "ktrans test seed" in first
    assert re.search(r"KTRANS_TEST_SEED=5 \(this test's seed \d+\)", first)
    assert re.search(r"KTRANS_TEST_SEED=5 python -m pytest '\S*test_probe\.py::test_draw'", first)
