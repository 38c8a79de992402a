#!/usr/bin/env python
"""Mutation check: the test suite must fail when a part of ktrans it claims to check is disabled.

Runs the suite once per mutation (tools/mutations/sitecustomize.py: the abort path, the prefix
cache, the stop-string handling, DeepSeek-V3's routing bias, the recurrent-state commit), each
in a fresh pytest process whose
environment carries the mutation into every Python process the tests start, and reports which
tests caught it. Exits 0 only if every mutation made the suite fail (and, with --baseline, the
unmutated suite passed).

    python tools/mutation_check.py                      # all mutations, whole suite
    python tools/mutation_check.py --only abort -- tests/models tests/server
    python tools/mutation_check.py --baseline --seed 7  # KTRANS_TEST_SEED for every run
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS_DIR = ROOT / "tools" / "mutations"
sys.path.insert(0, str(MUTATIONS_DIR))
from sitecustomize import DESCRIPTIONS, MUTATIONS  # noqa: E402  (the mutation table; inert without KTRANS_MUTATION)

CHECK = """import importlib, sys
module, attr = sys.argv[1], sys.argv[2]
m = importlib.import_module(module)
obj = getattr(m, attr.split('.')[0])
for part in attr.split('.')[1:]:
    obj = getattr(obj, part)
print(getattr(obj, '__ktrans_mutation__', None))
"""
PATCHED = {"abort": "LLMEngine.abort", "prefix_cache": "PagePool.attach_prefix",
           "stop_strings": "IncrementalDetokenizer._find_stop", "routing_bias": "route_deepseek_v3",
           "state_commit": "StatePool.rows"}


def _env(mutation: str | None, seed: str | None) -> dict:
    env = dict(os.environ)
    env.pop("KTRANS_MUTATION", None)
    if mutation:
        env["KTRANS_MUTATION"] = mutation
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MUTATIONS_DIR), env.get("PYTHONPATH")]))
    if seed is not None:
        env["KTRANS_TEST_SEED"] = seed
    return env


def _assert_applied(mutation: str, seed: str | None) -> None:
    module = MUTATIONS[mutation][0]
    out = subprocess.run([sys.executable, "-c", CHECK, module, PATCHED[mutation]], env=_env(mutation, seed),
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if out != mutation:
        raise SystemExit(f"mutation {mutation} was not applied to {module}.{PATCHED[mutation]} (got {out!r})")


def _run(mutation: str | None, seed: str | None, timeout: int, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-o", f"timeout={timeout}", *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(mutation, seed), cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    summary = next((line.strip("= ") for line in reversed(out.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line)), "no summary line")
    return {"rc": proc.returncode, "failed": failed, "summary": summary, "seconds": time.monotonic() - t0,
            "seed": seed, "tail": out[-3000:]}


def _report(name: str, r: dict, show: int) -> None:
    verdict = "suite FAILED (caught)" if r["rc"] != 0 else "suite PASSED"
    print(f"\n== {name}: {verdict} — {r['summary']} [{r['seconds']:.0f} s, KTRANS_TEST_SEED={r['seed']}]")
    if r["failed"]:
        per_file = Counter(nodeid.split("::")[0] for nodeid in r["failed"])
        for path, n in sorted(per_file.items()):
            print(f"   {n:4d}  {path}")
        for nodeid in r["failed"][:show]:
            print(f"         {nodeid}")
        if len(r["failed"]) > show:
            print(f"         ... and {len(r['failed']) - show} more")
    elif r["rc"] not in (0, 1):
        print(r["tail"])
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(MUTATIONS), help="mutations to run (default: all)")
    p.add_argument("--baseline", action="store_true", help="also run the unmutated suite first (it must pass)")
    p.add_argument("--seed", help="KTRANS_TEST_SEED for every run (default: a fresh one, shown)")
    p.add_argument("--timeout", type=int, default=300, help="per-test timeout in seconds (default 300)")
    p.add_argument("--show", type=int, default=12, help="failing test ids listed per mutation (default 12)")
    p.add_argument("pytest_args", nargs="*", default=["tests"], help="what to run (default: tests)")
    a = p.parse_args(argv)
    if a.seed is None:                 # one fresh session seed for all runs, so each is reproducible
        import random

        a.seed = str(random.SystemRandom().randrange(1 << 31))
    ok = True
    if a.baseline:
        r = _run(None, a.seed, a.timeout, a.pytest_args)
        _report("baseline (no mutation)", r, a.show)
        ok &= r["rc"] == 0
    for name in a.only or list(MUTATIONS):
        _assert_applied(name, a.seed)
        r = _run(name, a.seed, a.timeout, a.pytest_args)
        _report(f"mutation {name} ({DESCRIPTIONS[name]})", r, a.show)
        ok &= r["rc"] != 0
    print("\nmutation check:", "every mutation was caught" if ok else "NOT every mutation was caught")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
