"""GGUF <-> transformers layouts of the Gated DeltaNet layers (Qwen3-Next, Qwen3.5-MoE), as
llama.cpp's converter writes them; names.py's tables name these transforms. Shape legend: Hk key
heads of dk, Hv value heads of dv, r = Hv / Hk, kd = Hk·dk, vd = Hv·dv, C = 2kd + vd conv channels.

  qkvz          Qwen3-Next: HF `in_proj_qkvz` [Hk·(2dk + 2r·dv), H], rows [q k v z] per key head
                <-> (`attn_qkv` [2kd + vd, H]: all q rows, all k rows, all v rows; `attn_gate` [vd, H])
  conv          HF `conv1d.weight` [C, 1, K] <-> `ssm_conv1d` [C, K]
  a_log         HF `A_log` <-> `ssm_a` = -exp(A_log)  (float32)
  *_tiled       Qwen3.5 (qwen35moe): the converter reorders the value heads from grouped by key head
                (HF: head h uses key head h // r) to tiled (head j·Hk + k uses key head k) in every
                tensor indexed by value head: v_tiled (rows: in_proj_z, in_proj_b/a, dt_bias),
                qkv_tiled (the v rows of in_proj_qkv), conv_tiled (conv plus its v channels),
                a_log_tiled (a_log plus the order), v_cols_tiled (out_proj's columns)

Row moves work as well on quantized row bytes ([rows, row_bytes] uint8) as on floats; a_log
computes new values (float32 only) and v_cols_tiled moves columns (floats only).
"""

from __future__ import annotations

import numpy as np

from ktrans.errors import KtransError


def _value_heads(w: np.ndarray, config, to_tiled: bool, axis: int = 0) -> np.ndarray:
    """Reorder the value heads along `axis` of w (Hv heads of w.shape[axis] // Hv entries each)
    between grouped by key head (HF) and tiled (llama.cpp's qwen35moe files)."""
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    r = hv // hk
    n = w.shape[axis]
    outer = (hk, r) if to_tiled else (r, hk)
    shaped = w.reshape(w.shape[:axis] + outer + (n // hv,) + w.shape[axis + 1:])
    return np.ascontiguousarray(np.swapaxes(shaped, axis, axis + 1).reshape(w.shape))


def _qkv_split(config) -> tuple[int, int]:
    """(kd, vd): rows of q (and k) and of v in a DeltaNet qkv projection."""
    return (config.linear_num_key_heads * config.linear_key_head_dim,
            config.linear_num_value_heads * config.linear_value_head_dim)


def deltanet_to_gguf(transform: str, w: np.ndarray, config) -> list[np.ndarray]:
    """The GGUF array(s) holding HF array `w` (see the module docstring)."""
    kd, vd = _qkv_split(config)
    if transform == "qkvz":                             # [Hk, (q k v z) rows, H] -> [q k v], [z]
        hk = config.linear_num_key_heads
        per = w.reshape(hk, -1, *w.shape[1:])
        dk, rv = kd // hk, vd // hk
        q, k, v, z = (per[:, a:b] for a, b in ((0, dk), (dk, 2 * dk), (2 * dk, 2 * dk + rv), (2 * dk + rv, None)))
        flat = [np.ascontiguousarray(x.reshape(-1, *w.shape[1:])) for x in (q, k, v, z)]
        return [np.concatenate(flat[:3]), flat[3]]
    tiled = transform.endswith("_tiled")
    base = transform.removesuffix("_tiled")
    if base == "conv":                                  # [C, 1, K] -> [C, K] (v channels tiled)
        c = w.reshape(w.shape[0], -1)
        if tiled:
            c = np.concatenate([c[:2 * kd], _value_heads(c[2 * kd:], config, True)])
        return [np.ascontiguousarray(c)]
    if base == "a_log":
        a = -np.exp(w.astype(np.float32))
        return [_value_heads(a, config, True) if tiled else a]
    if transform == "v_tiled":
        return [_value_heads(w, config, True)]
    if transform == "qkv_tiled":
        return [np.concatenate([w[:2 * kd], _value_heads(w[2 * kd:], config, True)])]
    if transform == "v_cols_tiled":
        return [_value_heads(w, config, True, axis=1)]
    raise KtransError(f"unknown tensor transform '{transform}'")


def deltanet_to_hf(transform: str, parts: list[np.ndarray], config) -> np.ndarray:
    """The HF array from the GGUF array(s) `parts`; inverse of deltanet_to_gguf."""
    kd, vd = _qkv_split(config)
    w = parts[0]
    if transform == "qkvz":                             # [q k v], [z] -> [Hk, (q k v z) rows, H]
        hk = config.linear_num_key_heads
        qkv, z = parts
        dk, rv = kd // hk, vd // hk
        rest = qkv.shape[1:]
        per = [qkv[:kd].reshape(hk, dk, *rest), qkv[kd:2 * kd].reshape(hk, dk, *rest),
               qkv[2 * kd:].reshape(hk, rv, *rest), z.reshape(hk, rv, *rest)]
        return np.ascontiguousarray(np.concatenate(per, axis=1).reshape(-1, *rest))
    tiled = transform.endswith("_tiled")
    base = transform.removesuffix("_tiled")
    if base == "conv":                                  # [C, K] -> [C, 1, K]
        if tiled:
            w = np.concatenate([w[:2 * kd], _value_heads(w[2 * kd:], config, False)])
        return np.ascontiguousarray(w.reshape(w.shape[0], 1, -1))
    if base == "a_log":
        w = _value_heads(w, config, False) if tiled else w
        return np.log(-w.astype(np.float32))
    if transform == "v_tiled":
        return _value_heads(w, config, False)
    if transform == "qkv_tiled":
        return np.concatenate([w[:2 * kd], _value_heads(w[2 * kd:], config, False)])
    if transform == "v_cols_tiled":
        return _value_heads(w, config, False, axis=1)
    raise KtransError(f"unknown tensor transform '{transform}'")


DELTANET_TRANSFORMS = frozenset({"qkvz", "conv", "conv_tiled", "a_log", "a_log_tiled", "v_tiled", "qkv_tiled",
                                 "v_cols_tiled"})
