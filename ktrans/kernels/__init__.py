"""GPU kernels (Triton) behind ktrans's CUDA operators.

Each kernel module has a plain-torch oracle in the operator that calls it (tests compare the two).
Triton is imported only when a kernel module is; `triton_available()` tells an operator at
construction whether it can use them. On a machine without a GPU, the kernels still run under
Triton's interpreter (TRITON_INTERPRET=1, numpy on CPU tensors), which is how the test suite
checks their logic everywhere.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("ktrans.kernels")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (the CUDA operators fall back to torch, with one warning, if not)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        log.warning("Triton is not usable (%s: %s): GPU operators use their torch paths",
                    type(e).__name__, e)
        return False
    return True


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
