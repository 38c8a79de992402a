"""Older GGUF layouts ktrans still reads (never writes), as data beside names.py's tables.

- Per-expert tensors: files converted before llama.cpp stacked experts (early Mixtral GGUFs)
  store `blk.N.ffn_gate.E.weight` / `ffn_up.E` / `ffn_down.E` (one [I, H] / [H, I] per expert)
  instead of `ffn_{gate,up,down}_exps` [E, I, H].
- DeepSeek MLA: files converted before llama.cpp split `attn_kv_b` into `attn_k_b` / `attn_v_b`
  store HF's `kv_b_proj` as `blk.N.attn_kv_b.weight` unchanged (some files carry both).

`alternatives()` lists, for one entry of names.expand(), the other (gguf names, transform) pairs
that hold the same HF tensor; the loader takes the first option whose tensors all exist.
`to_hf()` applies any transform (names.py's and the legacy ones) to numpy arrays whose leading
dims are rows: float arrays, or uint8 quant rows for the row-preserving transforms.
"""

from __future__ import annotations

import re

import numpy as np

from ktrans.weights import names

# Transforms that only move whole rows (never split a row): valid on quantized row bytes.
ROW_TRANSFORMS = frozenset({"copy", "gate_up", "rope_q", "rope_k", "flat", "experts_stack", "experts_gate_up",
                            "qkvz", "v_tiled", "qkv_tiled"})
# Transforms computing new values (not only moving them): float32 arithmetic on the stored values.
VALUE_TRANSFORMS = frozenset({"norm_shift", "a_log", "a_log_tiled"})

_STACKED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


def alternatives(hf: str, gguf_names: tuple[str, ...], transform: str,
                 num_experts: int) -> list[tuple[tuple[str, ...], str]]:
    """Legacy spellings of one (hf, gguf_names, transform) table entry, best first."""
    if transform == "kv_b":
        layer = gguf_names[0].split(".")[1]
        return [((f"blk.{layer}.attn_kv_b.weight",), "copy")]
    m = [_STACKED.match(g) for g in gguf_names]
    if num_experts and m and all(m):
        per = tuple(f"blk.{x[1]}.ffn_{x[2]}.{e}.weight" for x in m for e in range(num_experts))
        return [(per, "experts_gate_up" if transform == "gate_up" else "experts_stack")]
    return []


def preferred(options: list[tuple[tuple[str, ...], str]], transform: str) -> list[tuple[tuple[str, ...], str]]:
    """Order options: a stored attn_kv_b is HF's kv_b_proj as is (zero-copy, works for quantized
    files), so it goes before the k_b/v_b split when a file has both."""
    if transform == "kv_b":
        return options[1:] + options[:1]
    return options


def to_hf(transform: str, parts: list[np.ndarray], config) -> np.ndarray:
    """The HF-layout array built from stored parts (see module docstring)."""
    if transform == "experts_stack":                         # E x [rows, cols] -> [E, rows, cols]
        return np.stack(parts)
    if transform == "experts_gate_up":                       # 2E x [I, H] -> [E, 2I, H]
        half = len(parts) // 2
        return np.concatenate([np.stack(parts[:half]), np.stack(parts[half:])], axis=1)
    return names.gguf_to_hf(transform, parts, config)


def hf_shape(transform: str, shapes: list[tuple[int, ...]], config) -> tuple[int, ...]:
    """The HF shape `to_hf` produces from parts of these shapes (without touching data);
    ValueError when the parts do not fit together."""
    same = transform in ("gate_up", "experts_stack", "experts_gate_up", "gate_up_oai", "interleave")
    if same and len(set(map(tuple, shapes))) != 1 or transform in ("gate_up", "gate_up_oai", "transpose") \
            and len(shapes[0]) != 3 or transform == "interleave" and len(shapes[0]) != 2:
        raise ValueError(f"parts have shapes {[list(s) for s in shapes]}, expected equal [E, I, H] / [rows, cols]")
    if transform == "kv_b" and (len(shapes[0]) != 3 or len(shapes[1]) != 3 or shapes[0][0] != shapes[1][0]
                                or shapes[0][1] != shapes[1][2]):
        raise ValueError(f"attn_k_b / attn_v_b have shapes {[list(s) for s in shapes]}, "
                         f"expected [nH, r, nope] / [nH, v, r]")
    if transform in ("copy", "rope_q", "rope_k", "norm_shift", "a_log", "a_log_tiled", "v_tiled", "qkv_tiled",
                     "v_cols_tiled"):
        return tuple(shapes[0])
    if transform in ("conv", "conv_tiled"):                  # [C, K] -> [C, 1, K]
        if len(shapes[0]) != 2:
            raise ValueError(f"ssm_conv1d has shape {list(shapes[0])}, expected [channels, kernel]")
        return (shapes[0][0], 1, shapes[0][1])
    if transform == "qkvz":                                  # [2kd + vd, H], [vd, H] -> [2kd + 2vd, H]
        if len(shapes) != 2 or shapes[0][1:] != shapes[1][1:]:
            raise ValueError(f"attn_qkv / attn_gate have shapes {[list(x) for x in shapes]}, expected the same width")
        return (shapes[0][0] + shapes[1][0], *shapes[0][1:])
    if transform == "flat":
        return (1, int(np.prod(shapes[0])))
    if transform == "gate_up":                               # 2 x [E, I, H]
        e, i, h = shapes[0]
        return (e, i + shapes[1][1], h)
    if transform == "kv_b":                                  # [nH, r, nope], [nH, v, r]
        nh, r, nope = shapes[0]
        return (nh * (nope + shapes[1][1]), r)
    if transform == "gate_up_oai":                           # 2 x [E, I, H] -> [E, H, 2I]
        e, i, h = shapes[0]
        return (e, h, 2 * i)
    if transform == "interleave":                            # 2 x [E, I] -> [E, 2I]
        return (shapes[0][0], 2 * shapes[0][1])
    if transform == "transpose":                             # [E, H, I] -> [E, I, H]
        e, a, b = shapes[0]
        return (e, b, a)
    if transform == "experts_stack":
        return (len(shapes), *shapes[0])
    if transform == "experts_gate_up":
        half = len(shapes) // 2
        return (half, shapes[0][0] + shapes[half][0], shapes[0][1])
    raise ValueError(f"unknown tensor transform '{transform}'")
