"""SafetensorsSource: HuggingFace checkpoints (BF16/F16/F32, and DeepSeek's FP8 e4m3 blocks).

Files are memory-mapped and their headers parsed here (bounds-checked), so raw() hands out
zero-copy views. Checkpoint names are presented as transformers-5 parameter names:
- per-expert tensors (`mlp.experts.E.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.E.w1`)
  become the fused `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I];
- FP8 weights with a `weight_scale_inv` [ceil(R/128), ceil(C/128)] are dequantized by tensor();
  raw() / expert_stack() keep them FP8 and `scale_inv()` gives their block scales;
- a multimodal checkpoint's language model (Qwen3.5-MoE: `model.language_model.*`) is read as the
  text model's `model.*`; its vision tower (`model.visual.*`) and multi-token-prediction layers
  (`mtp.*`, also in Qwen3-Next's checkpoints) are not parameters of the model ktrans runs and are
  left out.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ktrans.errors import KtransError
from ktrans.weights import names
from ktrans.weights.source import _PLAIN_TYPES, RawTensor, TensorInfo, WeightSource, load_hf_config, raw_to_torch

# safetensors dtype -> (ktrans qtype, bytes per element)
_DTYPES = {"F32": ("f32", 4), "F16": ("f16", 2), "BF16": ("bf16", 2), "F8_E4M3": ("f8_e4m3", 1)}
# Checkpoint spellings of the expert projections (Mixtral: w1 = gate, w3 = up, w2 = down).
_PROJ_ALIASES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
_SKIPPED = ("model.visual.", "mtp.")
_EXPERT_RE = re.compile(r"^(?P<pre>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight(?P<scale>_scale_inv)?$")
FP8_BLOCK = 128   # DeepSeek-V3's quantization_config.weight_block_size (both dims)


@dataclass(frozen=True)
class _Entry:
    name: str          # checkpoint name
    qtype: str
    shape: tuple[int, ...]
    start: int         # absolute byte offset in the file
    nbytes: int
    file: "_STFile" = field(repr=False, compare=False)

    def raw(self) -> RawTensor:
        flat = self.file.buf[self.start:self.start + self.nbytes]
        rows = self.shape[:-1] if self.shape else ()
        return RawTensor(self.qtype, self.shape, flat.reshape(rows + (-1,)) if self.shape else flat)


class _STFile:
    """One mapped .safetensors file: u64 header length, JSON header, data."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise KtransError(f"cannot map safetensors file '{path}': {e}") from None
        self.buf = np.frombuffer(self._mm, dtype=np.uint8)
        size = len(self.buf)
        n = int.from_bytes(self._mm[:8], "little") if size >= 8 else -1
        if n < 2 or 8 + n > size:
            raise KtransError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(bytes(self._mm[8:8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KtransError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise KtransError(f"{path}: corrupt safetensors header (a JSON object was expected)")
        header.pop("__metadata__", None)
        self.entries = {name: self._entry(name, spec, 8 + n, size) for name, spec in header.items()}

    def _entry(self, name: str, spec, base: int, size: int) -> _Entry:
        where = f"{self.path}: tensor '{name}'"
        ok = isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
        shape, offsets = (spec.get("shape"), spec.get("data_offsets")) if ok else (None, None)
        ints = lambda v, n=None: (isinstance(v, list) and (n is None or len(v) == n)  # noqa: E731
                                  and all(type(x) is int and x >= 0 for x in v))
        if not (ok and ints(shape) and ints(offsets, 2)):
            raise KtransError(f"{where} has a malformed header entry {repr(spec)[:200]} (expected dtype, shape and "
                              f"data_offsets of non-negative integers)")
        dtype, shape, (b, e) = spec["dtype"], tuple(shape), offsets
        qtype, item = _DTYPES.get(dtype, (dtype.lower(), 0))
        if item and e - b != math.prod(shape) * item:
            raise KtransError(f"{where}: {e - b} bytes for {dtype} shape {list(shape)}, "
                              f"expected {math.prod(shape) * item}")
        if not 0 <= b <= e <= size - base:
            raise KtransError(f"{where}: data [{b}, {e}) lies outside the file — truncated file?")
        return _Entry(name, qtype, shape, base + b, e - b, self)


def _checkpoint_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise KtransError(f"model path '{path}' does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise KtransError(f"{index}: unreadable safetensors index ({e})") from None
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        for f in files:
            if not os.path.exists(f):
                raise KtransError(f"{index} lists shard '{os.path.basename(f)}', which is missing")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise KtransError(f"'{path}' holds no .safetensors files (and no GGUF path was given)")
    return files


class SafetensorsSource(WeightSource):
    """Weights of an HF checkpoint directory (single file, or shards + index)."""

    def __init__(self, path: str):
        self.path = str(path)
        self.dir = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
        self._plain: dict[str, _Entry] = {}     # parameter name -> stored tensor
        self._scales: dict[str, _Entry] = {}    # parameter name of an FP8 weight -> its scale_inv
        self._experts: dict[str, dict[str, dict[int, _Entry]]] = {}   # experts prefix -> proj -> e -> entry
        self._expert_scales: dict[tuple[str, str, int], _Entry] = {}
        for f in _checkpoint_files(self.path):
            for name, entry in _STFile(f).entries.items():
                if not name.startswith(_SKIPPED):
                    name = name.replace("model.language_model.", "model.", 1)
                    self._add(name.replace(".block_sparse_moe.", ".mlp."), entry)
        self._fused = {f"{pre}.{p}": pre for pre in self._experts for p in ("gate_up_proj", "down_proj")}
        self._names = sorted([*self._plain, *self._fused])
        self._cfg = None

    def _add(self, name: str, entry: _Entry) -> None:
        m = _EXPERT_RE.match(name)
        if m and m["proj"] in _PROJ_ALIASES:
            key = (m["pre"], _PROJ_ALIASES[m["proj"]], int(m["e"]))
            if m["scale"]:
                self._expert_scales[key] = entry
            else:
                self._experts.setdefault(key[0], {}).setdefault(key[1], {})[key[2]] = entry
        elif name.endswith(".weight_scale_inv"):
            self._scales[name[: -len("_scale_inv")]] = entry
        else:
            self._plain[name] = entry

    # ---- WeightSource ----

    def names(self) -> list[str]:
        return list(self._names)

    def has(self, name: str) -> bool:
        return name in self._plain or name in self._fused

    def info(self, name: str) -> TensorInfo:
        if name in self._plain:
            e = self._plain[name]
            self.check_shape(name, e.shape, e.file.path)
            return TensorInfo(name, e.qtype, e.shape, e.nbytes, e.file.path)
        if name in self._fused:
            parts = self._fused_parts(name)
            first = parts[0][0]
            shape = (len(parts[0]), sum(p[0].shape[0] for p in parts), first.shape[1])
            self.check_shape(name, shape, first.file.path)
            return TensorInfo(name, first.qtype, shape, sum(e.nbytes for p in parts for e in p), first.file.path)
        raise self.missing(name)

    def raw(self, name: str) -> RawTensor:
        info = self.info(name)
        if name in self._plain:
            return self.note_raw(self._plain[name].raw())
        # [E, rows, row_bytes] per projection, concatenated along rows (gate rows first, then up).
        data = np.concatenate([self._stack(p, name) for p in self._fused_parts(name)], axis=1)
        return self.note_raw(RawTensor(info.qtype, info.shape, data))

    def tensor(self, name: str, dtype=None, device="cpu"):
        import torch

        info = self.info(name)
        if name in self._plain:
            t = self._dequant(self._plain[name], self._scales.get(name))
        else:
            pre = self._fused[name]
            projs = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
            t = torch.cat([torch.stack([self._dequant(e, self._expert_scales.get((pre, p, i)))
                                        for i, e in sorted(self._experts_of(pre, p).items())]) for p in projs], dim=1)
        return self.placed(t.to(dtype or torch.float32), device, info.nbytes)

    def expert_stack(self, layer: int, proj: str) -> RawTensor:
        self.check_expert_proj(layer, proj)
        pre = f"model.layers.{layer}.mlp.experts"
        if pre in self._experts:
            group = self._experts_of(pre, proj)
            data = self._stack(list(dict(sorted(group.items())).values()), f"{pre}.{proj}")
            e0 = group[0]
            return self.note_raw(RawTensor(e0.qtype, (len(group), *e0.shape), data))
        fused = f"{pre}.down_proj" if proj == "down" else f"{pre}.gate_up_proj"
        if fused not in self._plain:
            raise KtransError(f"{self.path}: no routed experts for layer {layer} ({pre}.*)")
        raw = self._plain[fused].raw()                  # [E, 2I, H] or [E, H, I]
        if names.expert_transform(self.config(), fused.rsplit(".", 1)[-1]) in ("gate_up_oai", "transpose"):
            # gpt-oss: input-major, gate/up interleaved; the kernels take llama.cpp's layout
            part = names.stored_experts(proj, raw.data.view(_PLAIN_TYPES[raw.qtype][0]).reshape(raw.shape), self.config())
            return self.note_raw(RawTensor(raw.qtype, part.shape, part.view(np.uint8).reshape(part.shape[:-1] + (-1,))))
        if proj != "down":
            half = raw.shape[1] // 2
            rows = slice(0, half) if proj == "gate" else slice(half, 2 * half)
            raw = RawTensor(raw.qtype, (raw.shape[0], half, raw.shape[2]), np.ascontiguousarray(raw.data[:, rows]))
        return self.note_raw(raw)

    def scale_inv(self, name: str) -> RawTensor | None:
        """f32 block scales of an FP8 parameter ([ceil(R/128), ceil(C/128)], stacked [E, ...] for
        fused experts), or None when `name` is not stored as FP8."""
        if name in self._plain:
            e = self._scales.get(name)
            return e.raw() if e is not None else None
        if name not in self._fused:
            raise self.missing(name)
        pre = self._fused[name]
        projs = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
        try:
            # NOTE: gate and up scale grids stack along rows, which lines up with gate_up_proj's
            # rows because I is a multiple of the 128-row block in every FP8 checkpoint.
            stacks = [np.stack([self._expert_scales[(pre, p, i)].raw().data for i in sorted(self._experts_of(pre, p))])
                      for p in projs]                                   # [E, row_blocks, col_blocks * 4]
        except KeyError:
            return None
        data = np.concatenate(stacks, axis=1)
        return RawTensor("f32", (data.shape[0], data.shape[1], data.shape[2] // 4), data)

    def config(self):
        if self._cfg is None and os.path.exists(os.path.join(self.dir, "config.json")):
            self._cfg = load_hf_config(self.dir)
        return self._cfg

    def tokenizer(self):
        if not any(os.path.exists(os.path.join(self.dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.dir)

    # ---- helpers ----

    def _experts_of(self, pre: str, proj: str) -> dict[int, _Entry]:
        group = self._experts.get(pre, {}).get(proj, {})
        count = max(len(g) for g in self._experts[pre].values())
        missing = [i for i in range(count) if i not in group]
        if missing:
            raise KtransError(f"{self.path}: {pre}: experts {missing[:8]} have no {proj} projection "
                              f"(expected experts 0..{count - 1})")
        shapes = {(e.qtype, e.shape) for e in group.values()}
        if len(shapes) != 1:
            raise KtransError(f"{self.path}: {pre} {proj}: experts differ in type/shape: {sorted(shapes)}")
        return group

    def _fused_parts(self, name: str) -> list[list[_Entry]]:
        pre = self._fused[name]
        projs = ("gate", "up") if name.endswith("gate_up_proj") else ("down",)
        return [[e for _, e in sorted(self._experts_of(pre, p).items())] for p in projs]

    def _stack(self, entries: list[_Entry], what: str) -> np.ndarray:
        if len({e.qtype for e in entries}) != 1:
            raise KtransError(f"{self.path}: {what}: experts are stored with different dtypes")
        return np.stack([e.raw().data for e in entries])       # [E, rows, row_bytes]

    def _dequant(self, entry: _Entry, scale: _Entry | None):
        """A stored tensor as a float torch tensor; FP8 blocks multiplied by their scales."""
        if entry.qtype not in ("f32", "f16", "bf16", "f8_e4m3"):
            raise KtransError(f"{entry.file.path}: tensor '{entry.name}' has dtype {entry.qtype.upper()}; "
                              f"expected F32, F16, BF16 or F8_E4M3")
        t = raw_to_torch(entry.raw(), where=f"{entry.file.path}: tensor '{entry.name}'")
        if entry.qtype != "f8_e4m3":
            return t
        if scale is None:
            raise KtransError(f"{entry.file.path}: FP8 tensor '{entry.name}' has no weight_scale_inv")
        return dequant_fp8_blocks(t, raw_to_torch(scale.raw()), block=self.fp8_block(),
                                  where=f"{entry.file.path}: tensor '{entry.name}'")

    def fp8_block(self) -> int:
        """Block edge of the FP8 scales: config.json's quantization_config.weight_block_size."""
        qc = getattr(self.config(), "quantization_config", None) or {}
        size = (qc.get("weight_block_size") if isinstance(qc, dict) else getattr(qc, "weight_block_size", None))
        if not size:
            return FP8_BLOCK
        if len(set(size)) != 1:
            raise KtransError(f"{self.dir}/config.json: weight_block_size {size} is not square; ktrans reads "
                              f"square FP8 blocks (DeepSeek's [128, 128])")
        return int(size[0])


def dequant_fp8_blocks(w, scale_inv, block: int = FP8_BLOCK, where: str = "tensor"):
    """w: FP8 [R, C]; scale_inv: f32 [ceil(R/block), ceil(C/block)] -> float32 [R, C] = w * scale."""
    import torch

    rows, cols = w.shape
    want = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != want:
        raise KtransError(f"{where}: weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} "
                          f"for {block}x{block} blocks of a [{rows}, {cols}] weight")
    # NOTE: each block [block, block] of w shares one scale; expand the scale grid to w's shape.
    s = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]  # [R, C]
    return w.to(torch.float32) * s
