"""Reproducible randomness for the whole suite: one session seed, one seed per test.

The session seed is KTRANS_TEST_SEED, or a fresh random number when it is unset (so every run
draws fresh inputs). Each test's seed is derived from the session seed and the test's node id, so
a test draws the same numbers whether it runs alone or in the full suite, in any order:
`KTRANS_TEST_SEED=N python -m pytest tests/...::test_x` replays what a failing run drew (a failing
test's report carries the command, in its "ktrans test seed" section).

conftest.py seeds Python's `random`, numpy's legacy global generator and torch's default
generators (CPU and CUDA):
- before each fixture is set up: function-scoped fixtures with (test, fixture), wider-scoped ones
  with (fixture, param), so a module fixture is the same whichever test happens to create it;
- before each test body, with the test's seed; Hypothesis tests get the test's seed as their
  @seed.
Code that wants its own generator takes `np_rng()` / `py_rng()`, seeded from the global `random`
(itself seeded as above), never an unseeded `np.random.default_rng()` or `random.Random()`.
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np

# NOTE: kept in the environment so that a second import of this file (as `seeds` and as
# `tests.seeds`) and the subprocesses the tests start see the same session seed.
os.environ.setdefault("KTRANS_TEST_SEED", str(random.SystemRandom().randrange(1 << 31)))
SESSION_SEED = int(os.environ["KTRANS_TEST_SEED"])


def seed_for(key: str) -> int:
    """A 31-bit seed for `key` (a node id, a fixture name), fixed by the session seed."""
    digest = hashlib.sha256(f"{SESSION_SEED}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    """Seed every global generator the tests and the libraries under test draw from."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)          # also seeds every CUDA device's generator


def np_rng() -> np.random.Generator:
    """A numpy Generator of its own, seeded from the (per-test seeded) global `random`."""
    return np.random.default_rng(random.getrandbits(63))


def py_rng() -> random.Random:
    """A random.Random of its own, seeded from the (per-test seeded) global `random`."""
    return random.Random(random.getrandbits(63))


def reproduce_line(nodeid: str) -> str:
    return (f"KTRANS_TEST_SEED={SESSION_SEED} (this test's seed {seed_for(nodeid)}); to replay its draws:\n"
            f"  KTRANS_TEST_SEED={SESSION_SEED} python -m pytest '{nodeid}'")
