"""What gen-model writes, as a list of units, and how one chunk of a unit is produced.

A unit turns generated HF-layout weights into GGUF tensor(s) and the matching safetensors
tensor(s):
  stream  a GGUF tensor whose bytes are the HF tensor's (transform "copy", or one half of the
          experts' gate_up_proj). Produced in row chunks; a 3-D expert tensor [E, R, C] goes to
          safetensors as E per-expert [R, C] tensors, as real checkpoints store experts.
  whole   a tensor that needs a reshuffle between layouts (MLA kv_b split, llama's RoPE row
          permutation, qwen2moe's flattened shared-expert gate) or a shift (Gemma's norms, stored
          as 1 + w; generated as w around 0): generated whole (all are small),
          transformed with names.hf_to_gguf, and its safetensors copy rebuilt with names.gguf_to_hf
          from the GGUF data, so both files hold the same numbers.
  stream with a `layout`: gpt-oss's experts, whose HF tensors are input-major (transpose) and
          interleave gate and up columns (gate_up_oai): the GGUF tensors stream one expert per
          chunk, and the safetensors tensor gets that expert's slab in the HF layout; for
          gate_up_oai the up half's chunk regenerates the gate half of the same expert (the
          generator depends only on seed, name, expert and rows) to build [H, 2I].

Safetensors data is the GGUF data read back: the raw bytes for f32/f16/bf16 tensors, the
dequantized float32 values for quantized ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ktrans.genmodel import init
from ktrans.genmodel.gguf_out import FLOAT_TYPES, tensor_qtype
from ktrans.weights import names, quant

_ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_NP_VIEW = {"F32": np.float32, "F16": np.uint16, "BF16": np.uint16}


@dataclass
class Unit:
    kind: str                                   # "stream" | "whole"
    key: str                                    # generation key (HF name, ":gate"/":up" for halves)
    hf_shape: tuple[int, ...]                   # shape generated (stream: == the GGUF shape)
    mean: float
    std: float
    transform: str = "copy"
    gguf: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)  # (name, shape, qtype)
    st: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)    # (name, shape, dtype)
    layout: str = ""                            # "" | "transpose" | "oai_gate" | "oai_up" (see above)
    partner: "Unit | None" = None               # oai_up: the gate half's unit


def st_dtype(qtypes: list[str]) -> str:
    """Safetensors dtype holding GGUF data of these types exactly."""
    if len(set(qtypes)) == 1 and qtypes[0] in FLOAT_TYPES:
        return _ST_DTYPE[qtypes[0]]
    return "F32"


def _expert_names(hf: str, proj: str, n: int) -> list[str]:
    layer = hf.split(".mlp.")[0]
    return [f"{layer}.mlp.experts.{e}.{proj}_proj.weight" for e in range(n)]


def _stream(key, hf_for_std, gname, shape, quant_name, config, st_names, L) -> Unit:
    mean, std = init.init_std(hf_for_std, shape[-1], L, bool(getattr(config, "tie_word_embeddings", False)))
    qt = tensor_qtype(gname, shape, quant_name, config)
    u = Unit("stream", key, shape, mean, std, gguf=[(gname, shape, qt)])
    st_shape = shape[1:] if len(st_names) > 1 else shape
    u.st = [(n, st_shape, st_dtype([qt])) for n in st_names]
    return u


def build_plan(config, gguf_arch: str, quant_name: str, shapes: dict[str, tuple[int, ...]]) -> list[Unit]:
    """Units in file order for a model with this config; `shapes` = HF name -> shape."""
    L = config.num_hidden_layers
    units = []
    # NOTE: MTP blocks too (GLM-4.5), as llama.cpp's converter writes them; transformers' model has
    # no such layers, so their shapes come from names.mtp_shape.
    for hf, gnames, transform in names.expand(config, gguf_arch, mtp=True):
        shape = shapes[hf] if hf in shapes else names.mtp_shape(config, hf, shapes)
        if transform == "gate_up":                      # [E, 2I, H] -> gate and up [E, I, H]
            e, two_i, h = shape
            for half, gname in zip(("gate", "up"), gnames):
                units.append(_stream(f"{hf}:{half}", hf, gname, (e, two_i // 2, h), quant_name, config,
                                     _expert_names(hf, half, e), L))
        elif transform == "gate_up_oai":                # [E, H, 2I] <- gate and up [E, I, H]
            e, h, two_i = shape
            gate = _stream(f"{hf}:gate", hf, gnames[0], (e, two_i // 2, h), quant_name, config, [], L)
            up = _stream(f"{hf}:up", hf, gnames[1], (e, two_i // 2, h), quant_name, config, [], L)
            gate.layout, up.layout, up.partner = "oai_gate", "oai_up", gate
            up.st = [(hf, shape, st_dtype([gate.gguf[0][2], up.gguf[0][2]]))]
            units += [gate, up]
        elif transform == "transpose":                  # [E, I, H] <- [E, H, I]
            e, i, h = shape
            u = _stream(hf, hf, gnames[0], (e, h, i), quant_name, config, [hf], L)
            u.layout, u.st = "transpose", [(hf, shape, u.st[0][2])]
            units.append(u)
        elif transform == "copy" and len(shape) == 3:   # experts.down_proj [E, H, I]
            units.append(_stream(hf, hf, gnames[0], shape, quant_name, config,
                                 _expert_names(hf, "down", shape[0]), L))
        elif transform == "copy":
            units.append(_stream(hf, hf, gnames[0], shape, quant_name, config, [hf], L))
        else:
            mean, std = init.init_std(hf, shape[-1], L)
            if transform == "norm_shift":       # Gemma: the HF weight is the scale minus one
                mean -= 1.0
            parts = names.hf_to_gguf(transform, np.zeros(shape, np.float32), config)
            u = Unit("whole", hf, shape, mean, std, transform)
            u.gguf = [(g, p.shape, tensor_qtype(g, p.shape, quant_name, config)) for g, p in zip(gnames, parts)]
            u.st = [(hf, shape, st_dtype([q for _, _, q in u.gguf]))]
            units.append(u)
    return units


def chunks(u: Unit) -> list[tuple[int, int, int]]:
    """(expert, row0, rows) pieces of a unit, in write order (expert -1: not an expert tensor)."""
    if u.kind == "whole" or len(u.hf_shape) == 1:
        return [(-1, 0, u.hf_shape[0] if u.kind == "stream" else 0)]
    if u.layout:                                        # one whole expert per chunk
        return [(e, 0, u.hf_shape[1]) for e in range(u.hf_shape[0])]
    per = init.block_rows(u.hf_shape[-1])
    experts = range(u.hf_shape[0]) if len(u.hf_shape) == 3 else [-1]
    rows = u.hf_shape[-2]
    return [(e, r, min(per, rows - r)) for e in experts for r in range(0, rows, per)]


def _readback(raw: np.ndarray, qtype: str, shape, dtype: str) -> np.ndarray:
    """The GGUF data `raw` as safetensors data of `dtype` (raw bytes when the types agree)."""
    if dtype == "F32" and qtype != "f32":
        return quant.dequantize(raw, qtype, tuple(shape))
    return raw.view(_NP_VIEW[dtype]).reshape(shape)


def produce(u: Unit, piece: tuple[int, int, int], seed: int, config,
            with_st: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
    """GGUF bytes (one array per GGUF tensor touched) and safetensors data of one chunk."""
    e, row0, rows = piece
    if u.kind == "stream":
        shape = u.hf_shape if len(u.hf_shape) == 1 else (rows, u.hf_shape[-1])
        x = init.generate(seed, u.key, e, row0, shape, u.mean, u.std)
        qt = u.gguf[0][2]
        raw = quant.quantize(x, qt, nthreads=1)
        if not with_st or u.layout == "oai_gate":
            return [raw], None
        if u.layout == "transpose":                     # GGUF [H, I] -> HF [I, H]
            return [raw], np.ascontiguousarray(_readback(raw, qt, shape, u.st[0][2]).T)
        if u.layout == "oai_up":                        # gate and up [I, H] -> HF [H, 2I], interleaved
            p = u.partner
            g = init.generate(seed, p.key, e, row0, shape, p.mean, p.std)
            gq = p.gguf[0][2]
            return [raw], names.gguf_to_hf("gate_up_oai", [
                _readback(quant.quantize(g, gq, nthreads=1), gq, shape, u.st[0][2])[None],
                _readback(raw, qt, shape, u.st[0][2])[None]], config)[0]
        return [raw], _readback(raw, qt, shape, u.st[0][2])
    x = init.generate(seed, u.key, -1, 0, u.hf_shape, u.mean, u.std)
    parts = names.hf_to_gguf(u.transform, x, config)
    raws = [quant.quantize(np.ascontiguousarray(p), qt, nthreads=1) for p, (_, _, qt) in zip(parts, u.gguf)]
    if not with_st:
        return raws, None
    dtype = u.st[0][2]
    back = [_readback(r, qt, s, dtype) for r, (_, s, qt) in zip(raws, u.gguf)]
    return raws, names.gguf_to_hf(u.transform, back, config)
