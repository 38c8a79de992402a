"""GGUFSource: llama.cpp GGUF weights (file, split set or directory) by transformers-5 name.

The HF config comes from `hf_dir` (--model_path) when given — it then must agree with the GGUF
metadata — else it is rebuilt from the GGUF metadata (single-file mode, see single_file.py).
names.py says which GGUF tensor(s) hold each parameter and how to transform them;
names_legacy.py adds older layouts. Row-preserving transforms (copy, expert stacking, RoPE row
permutation) work on the quantized bytes, so raw() keeps the stored quant type and is zero-copy
for plain copies; a transform that splits rows (DeepSeek's attn_k_b/attn_v_b -> kv_b_proj on a
quantized file) gives float32 instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ktrans.errors import KtransError
from ktrans.weights import names, names_legacy
from ktrans.weights.gguf_reader import GGUFReader, GGUFTensor
from ktrans.weights.source import (_PLAIN_TYPES, RawTensor, TensorInfo, WeightSource, load_hf_config,
                                   raw_to_torch)


@dataclass(frozen=True)
class _Resolved:
    hf: str
    parts: tuple[GGUFTensor, ...]
    transform: str


def raw_format(transform: str, qtypes: set[str]) -> str:
    """The format GGUFSource.raw() hands out for a parameter stored as parts of `qtypes` under
    `transform`: the stored one where rows move whole or plain floats are moved or shifted, else
    float32 (values moved within quant blocks, e.g. Qwen3.5's out_proj columns, or parts in
    different formats). Planning (genmodel/planned.py) uses the same rule."""
    qtype = next(iter(qtypes)) if len(qtypes) == 1 else None
    if qtype and (transform in names_legacy.ROW_TRANSFORMS or (
            qtype in _PLAIN_TYPES and (transform not in names_legacy.VALUE_TRANSFORMS or qtype == "f32"))):
        return qtype
    return "f32"


class GGUFSource(WeightSource):
    """Weights from GGUF file(s); config/tokenizer from `hf_dir` or from the GGUF metadata."""

    def __init__(self, path: str, hf_dir: str | None = None):
        self.path = str(path)
        self.hf_dir = hf_dir
        self.reader = GGUFReader(self.path)
        self.file = self.reader.files[0].path
        self.arch = self.reader.arch
        if self.arch not in names.TENSORS:
            raise KtransError(f"{self.file}: GGUF architecture '{self.arch}' is not supported; "
                              f"ktrans reads: {', '.join(names.TENSORS)}")
        self._cfg = None
        self._tok = None
        self._map: dict[str, _Resolved] | None = None
        self._absent: dict[str, tuple[str, ...]] = {}   # hf name -> GGUF names it was looked up under

    # ---- config / tokenizer ----

    def config(self):
        if self._cfg is None:
            if self.hf_dir:
                self._cfg = load_hf_config(self.hf_dir)
                self._check_metadata(self._cfg)
            else:
                from ktrans.weights.single_file import config_from_gguf

                self._cfg = config_from_gguf(self.reader)
        return self._cfg

    def tokenizer(self):
        if self._tok is None:
            if self.hf_dir and any(os.path.exists(os.path.join(self.hf_dir, f))
                                   for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.hf_dir)
            else:
                from ktrans.weights.single_file import tokenizer_from_gguf

                self._tok = tokenizer_from_gguf(self.reader)
        return self._tok

    def _check_metadata(self, cfg) -> None:
        """The GGUF must describe the same model as config.json (layers, widths, experts)."""
        for mk in names.metadata_table(self.arch):
            key = f"{self.arch}.{mk.key}"
            stored, want = self.reader.get(key), names.metadata_value(cfg, self.arch, mk)
            if stored is None or want is None or isinstance(want, (list, dict)):
                continue
            same = math.isclose(float(stored), float(want), rel_tol=1e-5) if mk.vtype == "f32" else stored == want
            what = f"{mk.attr} = {want}"
            if mk.key == "block_count":           # with or without the MTP blocks (a converter may drop them)
                mtp = int(self.reader.get(f"{self.arch}.nextn_predict_layers", 0) or 0)
                same = stored in (want, cfg.num_hidden_layers, cfg.num_hidden_layers + mtp)
                extra = want - cfg.num_hidden_layers
                what = f"num_hidden_layers = {cfg.num_hidden_layers}" + (f" (+ {extra} MTP)" if extra else "")
            if not same:
                raise KtransError(f"{self.file}: GGUF metadata '{key}' = {stored}, but {self.hf_dir}/config.json "
                                  f"has {what}; the GGUF and --model_path are different models")

    # ---- name resolution ----

    def _mapping(self) -> dict[str, _Resolved]:
        if self._map is None:
            cfg, tensors = self.config(), self.reader.tensors
            n_exp = names.num_experts(cfg)
            self._map = {}
            for hf, gnames, transform in names.expand(cfg, self.arch):
                options = [(gnames, transform)] + names_legacy.alternatives(hf, gnames, transform, n_exp)
                for g, t in names_legacy.preferred(options, transform):
                    if all(n in tensors for n in g):
                        self._map[hf] = _Resolved(hf, tuple(tensors[n] for n in g), t)
                        break
                else:
                    self._absent[hf] = gnames
        return self._map

    def _resolve(self, name: str) -> _Resolved:
        r = self._mapping().get(name)
        if r is None:
            if name in self._absent:
                missing = [g for g in self._absent[name] if g not in self.reader.tensors]
                raise KtransError(f"{self.path}: parameter '{name}' needs GGUF tensor(s) {', '.join(missing)}, "
                                  f"which the file(s) do not hold (truncated conversion or a different model?)")
            raise self.missing(name)
        return r

    # ---- WeightSource ----

    def names(self) -> list[str]:
        return list(self._mapping())

    def has(self, name: str) -> bool:
        return name in self._mapping()

    def info(self, name: str) -> TensorInfo:
        r = self._resolve(name)
        shape = self._hf_shape(r)
        qtypes = {p.qtype for p in r.parts}
        return TensorInfo(name, r.parts[0].qtype if len(qtypes) == 1 else "+".join(sorted(qtypes)), shape,
                          sum(p.nbytes for p in r.parts), r.parts[0].file.path)

    def _hf_shape(self, r: _Resolved) -> tuple[int, ...]:
        try:
            shape = names_legacy.hf_shape(r.transform, [p.shape for p in r.parts], self.config())
        except ValueError as e:
            raise KtransError(f"{r.parts[0].file.path}: tensor(s) {', '.join(p.name for p in r.parts)} for "
                              f"'{r.hf}': {e}") from None
        self.check_shape(r.hf, shape, r.parts[0].file.path, stored=" + ".join(p.name for p in r.parts[:2]))
        return shape

    def raw(self, name: str) -> RawTensor:
        return self.note_raw(self._raw(name))

    def raw_qtype(self, name: str) -> str:
        r = self._resolve(name)
        return raw_format(r.transform, {p.qtype for p in r.parts})

    def tensor(self, name: str, dtype=None, device="cpu"):
        import torch

        for p in self._resolve(name).parts:               # about to read all of it: map it in one go
            p.file.populate(p.start, p.nbytes)
        raw = self._raw(name)
        t = raw_to_torch(raw, where=f"{self.where(name)}").to(dtype or torch.float32)
        return self.placed(t, device, raw.nbytes)

    def where(self, name: str) -> str:
        r = self._resolve(name)
        return f"{r.parts[0].file.path}: tensor '{r.parts[0].name}' (parameter '{name}')"

    def _raw(self, name: str) -> RawTensor:
        r = self._resolve(name)
        shape = self._hf_shape(r)
        qtypes = {p.qtype for p in r.parts}
        qtype = qtypes.pop() if len(qtypes) == 1 else None
        cfg = self.config()
        if qtype and r.transform in names_legacy.ROW_TRANSFORMS:
            data = names_legacy.to_hf(r.transform, [p.data() for p in r.parts], cfg)   # quant rows moved whole
            return RawTensor(qtype, shape, np.ascontiguousarray(data))
        if qtype and raw_format(r.transform, {qtype}) == qtype:
            # moved elements in the stored dtype (Gemma's norm shift, Qwen3-Next's A: f32 arithmetic only)
            view = _PLAIN_TYPES[qtype][0]
            parts = [p.data().view(view).reshape(p.shape) for p in r.parts]
            data = np.ascontiguousarray(names_legacy.to_hf(r.transform, parts, cfg))
            return RawTensor(qtype, shape, data.view(np.uint8).reshape(shape[:-1] + (-1,)))
        # Rows split across quant blocks: only float32 can hold the HF layout.
        parts = [raw_to_torch(p.raw(), where=f"{p.file.path}: tensor '{p.name}'").float().numpy() for p in r.parts]
        data = np.ascontiguousarray(names_legacy.to_hf(r.transform, parts, cfg), dtype=np.float32)
        return RawTensor("f32", shape, data.view(np.uint8).reshape(shape[:-1] + (-1,)))

    def expert_stack(self, layer: int, proj: str) -> RawTensor:
        self.check_expert_proj(layer, proj)
        fused = f"model.layers.{layer}.mlp.experts.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
        if fused not in self._mapping():
            if fused in self._absent:
                self._resolve(fused)                      # raises, naming the missing GGUF tensors
            raise KtransError(f"{self.path}: layer {layer} has no routed experts (no parameter '{fused}')")
        r = self._map[fused]
        hf = self._hf_shape(r)                            # [E, 2I, H] / [E, H, I] (gpt-oss: [E, H, 2I] / [E, I, H])
        # NOTE: the stored tensors are the kernels' layout whatever the HF one is (gpt-oss keeps its
        # experts input-major and gate/up interleaved: transforms gate_up_oai / transpose).
        if r.transform in ("copy", "transpose"):          # stacked down_proj: zero-copy
            return self.note_raw(r.parts[0].raw())
        if r.transform in ("gate_up", "gate_up_oai"):     # stacked gate/up: zero-copy
            part = r.parts[0 if proj == "gate" else 1]
            return self.note_raw(part.raw())
        # Legacy per-expert tensors: stack the E expert matrices (one copy).
        n = hf[0]
        chosen = r.parts if proj == "down" else (r.parts[:n] if proj == "gate" else r.parts[n:])
        if len({p.qtype for p in chosen}) != 1:
            raise KtransError(f"{self.path}: layer {layer} {proj} experts are stored with different quant types "
                              f"({sorted({p.qtype for p in chosen})}); expected one type per projection")
        data = np.stack([p.data() for p in chosen])       # [E, rows, row_bytes]
        return self.note_raw(RawTensor(chosen[0].qtype, (n, *chosen[0].shape), data))

    def close(self) -> None:
        self.reader.close()
