"""Shared pytest set-up: hardware markers are skipped where the hardware is absent."""

from __future__ import annotations

import os

import pytest
from models_fixture import pytest_report_header, tiny_model  # noqa: F401  (shared generated models)


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
