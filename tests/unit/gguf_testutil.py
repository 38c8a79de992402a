"""Test helpers for GGUF files: write a small real GGUF with gguf.GGUFWriter, re-write a GGUF
as a llama.cpp split set (`<stem>-0000i-of-0000N.gguf` with split.no / split.count /
split.tensors.count), the way `llama-gguf-split` lays it out, or without some of its tensors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_gguf(path, tensors: dict[str, np.ndarray], arch: str = "qwen2", metadata: dict | None = None,
               qtypes: dict[str, str] | None = None) -> Path:
    """Write `tensors` (float arrays, row-major HF-style shapes) to a GGUF file; `qtypes` maps a
    tensor name to f32/f16/bf16/q8_0 (gguf's own quantizers) — default f32."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        _add_kv(w, key, value)
    for name, x in tensors.items():
        qt = gguf.GGMLQuantizationType[(qtypes or {}).get(name, "f32").upper()]
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x, np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _add_kv(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def split_gguf(src, out_dir, parts: int) -> list[Path]:
    """Re-write GGUF `src` as `parts` split files in `out_dir`; metadata goes to the first part."""
    r = gguf.GGUFReader(str(src))
    arch = str(r.fields["general.architecture"].contents())
    per = -(-len(r.tensors) // parts)
    out = Path(out_dir) / (Path(src).stem + ".gguf")
    w = gguf.GGUFWriter(str(out), arch, split_max_tensors=per)
    _copy(r, w, lambda name: True)
    return sorted(Path(out_dir).glob(Path(src).stem + "-*-of-*.gguf"))


def filter_gguf(src, out, keep) -> Path:
    """Re-write GGUF `src` as `out` with the same metadata and only the tensors `keep(name)` accepts."""
    r = gguf.GGUFReader(str(src))
    _copy(r, gguf.GGUFWriter(str(out), str(r.fields["general.architecture"].contents())), keep)
    return Path(out)


def _copy(r: gguf.GGUFReader, w: gguf.GGUFWriter, keep) -> None:
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if keep(t.name):
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_to_gguf(model, path, gguf_arch: str, qtype: str = "f32", legacy: bool = False) -> Path:
    """Write a transformers model's weights as a GGUF through names.py's tables (metadata: the
    architecture and block count only — the config comes from the HF directory). `legacy` writes
    the older layouts: per-expert `ffn_gate.E` tensors and DeepSeek's unsplit `attn_kv_b`."""
    from ktrans.weights import names

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors, qtypes = {}, {}
    for hf, gnames, transform in names.expand(cfg, gguf_arch):
        if hf not in sd and hf == "lm_head.weight":
            continue
        w = sd[hf]
        if legacy and transform == "kv_b":
            gnames, arrays = (gnames[0].replace("attn_k_b", "attn_kv_b"),), [w]
        elif legacy and "_exps." in gnames[0]:
            arrays = names.hf_to_gguf(transform, w, cfg)
            gnames, arrays = zip(*[(g.replace("_exps.", f".{e}."), a[e]) for g, a in zip(gnames, arrays)
                                   for e in range(a.shape[0])])
        else:
            arrays = names.hf_to_gguf(transform, w, cfg)
        for g, a in zip(gnames, arrays):
            tensors[g] = a
            qtypes[g] = qtype if a.ndim > 1 and a.shape[-1] % 32 == 0 else "f32"
    meta = {f"{gguf_arch}.block_count": cfg.num_hidden_layers}
    return write_gguf(path, tensors, arch=gguf_arch, metadata=meta, qtypes=qtypes)
