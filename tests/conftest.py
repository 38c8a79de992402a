"""Shared pytest set-up: hardware markers are skipped where the hardware is absent; every test
and fixture is seeded from the session seed (tests/seeds.py), and a failing test's report says
how to replay it."""

from __future__ import annotations

import os

import pytest
from models_fixture import tiny_model  # noqa: F401  (shared generated models)
from seeds import SESSION_SEED, reproduce_line, seed_all, seed_for


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _use_triton_interpreter() -> None:
    """Without a GPU, Triton kernels run under Triton's interpreter (numpy on CPU tensors), so
    their logic is tested on every machine; the variable must be set before any kernel module
    is imported."""
    if not _has_cuda():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_use_triton_interpreter()


def _isa_supported(level: str) -> bool:
    from ktrans import cpu

    return level in cpu.supported_isas()


def pytest_report_header(config) -> str:
    return f"ktrans: KTRANS_TEST_SEED={SESSION_SEED}"


def pytest_collection_modifyitems(config, items):
    checks = {
        "gpu": (_has_cuda, "needs a CUDA GPU"),
        "amx": (lambda: _isa_supported("amx"), "needs a CPU with AMX"),
        "avx512": (lambda: _isa_supported("avx512"), "needs a CPU with AVX-512"),
    }
    cache: dict[str, bool] = {}
    for item in items:
        for name, (probe, why) in checks.items():
            if name in item.keywords:
                if name not in cache:
                    cache[name] = probe()
                if not cache[name]:
                    item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    key = f"{fixturedef.argname}[{getattr(request, 'param', '')}]"
    if fixturedef.scope == "function":
        key = f"{request.node.nodeid}::{key}"
    seed_all(seed_for(key))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    seed = seed_for(item.nodeid)
    seed_all(seed)
    if getattr(item.obj, "is_hypothesis_test", False):
        from hypothesis import seed as hypothesis_seed

        hypothesis_seed(seed)(item.obj)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("ktrans test seed", reproduce_line(item.nodeid)))
