"""CPU side facts: which ISA variant the C++ kernels run, and how to force a lower one.

The variant is chosen at run time from cpuid (never from the build machine's flags). Set
``KTRANS_ISA=generic|avx2|avx512|amx`` before start-up, or call :func:`set_isa`, to force a lower
level (for tests, or to step around a bad kernel). ``KTRANS_PREFETCH_AHEAD=<bytes>`` sets how far
ahead of each weight block the GGUF dot kernels prefetch (default 1024; 0 turns it off).
"""

from __future__ import annotations

import os

from ktrans import _C

ISA_LEVELS: tuple[str, ...] = tuple(_C.isa_levels())

# Resolve the level now so that a bad KTRANS_ISA fails at import with its message, not at the
# first kernel call deep inside a model load. The same for KTRANS_PREFETCH_AHEAD.
_C.selected_isa()
_C.prefetch_ahead()


def best_isa() -> str:
    """Highest ISA level this CPU and OS support."""
    return _C.best_isa()


def selected_isa() -> str:
    """ISA level the kernels use now."""
    return _C.selected_isa()


def set_isa(isa: str) -> None:
    """Force an ISA level at or below :func:`best_isa`; raises ValueError otherwise."""
    _C.set_isa(isa)


def supported_isas() -> list[str]:
    """Every level this machine can run, lowest first (tests run each of them)."""
    best = ISA_LEVELS.index(best_isa())
    return list(ISA_LEVELS[: best + 1])


def cpu_features() -> dict[str, bool]:
    return dict(_C.cpu_features())


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads not counted)."""
    cpus = sorted(os.sched_getaffinity(0))
    seen = set()
    for cpu in cpus:
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id"
        pkg = f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id"
        try:
            with open(path) as f, open(pkg) as g:
                seen.add((g.read().strip(), f.read().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(seen))
