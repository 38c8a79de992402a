"""GGUF (llama.cpp) quant formats: quantize and dequantize whole tensors in C++.

Names are ktrans's lower-case type names (``"q4_k"``); each maps to a
``gguf.GGMLQuantizationType``. Bytes are llama.cpp's block layouts, so gguf-py and llama.cpp read
what :func:`quantize` writes, and :func:`dequantize` is bit-exact against gguf-py's numpy code.
Both run multi-threaded in C++ with the GIL released (``nthreads=0`` = every CPU this process
may use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ktrans import _C
from ktrans.errors import KtransError


@dataclass(frozen=True)
class QuantType:
    name: str  # ktrans name, e.g. "q4_k"
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int  # values per block (1 for f32/f16/bf16)
    type_size: int  # bytes per block
    vec_dot_type: str  # activation format the CPU dot products quantize inputs to


# q8_k is an activation-only format of the K-quant dot products: not a weight type.
_ACTIVATION_ONLY = {"q8_k"}

QTYPES: dict[str, QuantType] = {
    t["name"]: QuantType(t["name"], t["ggml_type"], t["block_size"], t["type_size"], t["vec_dot_type"])
    for t in _C.quant_types()
    if t["name"] not in _ACTIVATION_ONLY
}
_BY_GGML = {q.ggml_type: q.name for q in QTYPES.values()}


def _qtype(qtype: str) -> QuantType:
    q = QTYPES.get(qtype) if isinstance(qtype, str) else None
    if q is None:
        raise KtransError(f"unknown quant type {qtype!r}; expected one of {', '.join(QTYPES)}")
    return q


def qtype_from_ggml(ggml_type: int) -> str:
    """ktrans name of a ggml type id; KtransError naming the id when ktrans cannot read it."""
    name = _BY_GGML.get(int(ggml_type))
    if name is None:
        try:
            import gguf

            label = f"{gguf.GGMLQuantizationType(int(ggml_type)).name} ({int(ggml_type)})"
        except ValueError:
            label = f"id {int(ggml_type)}"
        raise KtransError(f"unsupported GGML tensor type {label}; ktrans reads {', '.join(QTYPES)}")
    return name


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `qtype`."""
    q = _qtype(qtype)
    if cols < 0 or cols % q.block_size != 0:
        raise KtransError(f"{qtype}: a row of {cols} values is not a whole number of {q.block_size}-value blocks")
    return cols // q.block_size * q.type_size


def quantize(x: np.ndarray, qtype: str, nthreads: int = 0) -> np.ndarray:
    """float32 C-contiguous [..., cols] -> uint8 [..., row_bytes(qtype, cols)] in llama.cpp layout."""
    _qtype(qtype)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise KtransError(f"quantize expects a float32 numpy array, got {_describe(x)}")
    if x.ndim == 0 or not x.flags.c_contiguous:
        raise KtransError(f"quantize expects a C-contiguous array with at least one dim, got shape {x.shape}")
    rb = row_bytes(qtype, x.shape[-1])
    out = _C.quant_quantize(qtype, x, nthreads=int(nthreads))
    return out.reshape(*x.shape[:-1], rb)


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...], nthreads: int = 0) -> np.ndarray:
    """Raw uint8 blocks (C-contiguous, any shape) -> float32 array of logical `shape`."""
    q = _qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 0 for s in shape):
        raise KtransError(f"dequantize: invalid shape {shape}")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise KtransError(f"dequantize expects a uint8 numpy array of raw {qtype} blocks, got {_describe(raw)}")
    if not raw.flags.c_contiguous:
        raise KtransError("dequantize expects C-contiguous raw bytes")
    expected = math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])
    if raw.size != expected:
        raise KtransError(f"{qtype} tensor of shape {list(shape)} needs {expected} bytes, got {raw.size}")
    out = _C.quant_dequantize(qtype, raw.reshape(-1), math.prod(shape), nthreads=int(nthreads))
    return out.reshape(shape)


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__
