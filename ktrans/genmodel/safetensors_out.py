"""Safetensors side of gen-model: a streaming writer in the real checkpoints' per-expert layout.

The file format is small enough to write directly: an 8-byte little-endian header length, a
JSON header listing every tensor's dtype, shape and byte range, then the raw bytes. Knowing the
whole tensor list up front lets us write the header first and stream the data after it, so a
real-size model is never held in memory. Shards split between tensors once a shard would exceed
`shard_bytes`; more than one shard adds model.safetensors.index.json, as HF checkpoints do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def checkpoint_name(hf_name: str, model_type: str) -> str:
    """The on-disk checkpoint key of a transformers-5 parameter name (what real checkpoints use;
    transformers renames it back on load). Mixtral and MiniMax-M2 keep their original
    `block_sparse_moe` naming (MiniMax-M2's routing bias sits on the block)."""
    if model_type in ("mixtral", "minimax_m2"):
        hf_name = hf_name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        hf_name = hf_name.replace(".mlp.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias")
        m = re.match(r"(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", hf_name)
        if m:
            w = {"gate": "w1", "down": "w2", "up": "w3"}[m.group(3)]
            hf_name = f"{m.group(1)}.block_sparse_moe.experts.{m.group(2)}.{w}.weight"
    return hf_name


class SafetensorsStream:
    """Write tensors, known up front as (name, shape, dtype), in order, chunk by chunk."""

    def __init__(self, out_dir: Path, tensors: list[tuple[str, tuple[int, ...], str]], shard_bytes: int):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            n = int(np.prod(shape)) * DTYPE_BYTES[dtype]
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype))
            size += n
        self._shards = shards
        n = len(shards)
        self.files = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._sizes = [[int(np.prod(s)) * DTYPE_BYTES[d] for _, s, d in sh] for sh in shards]
        self._shard = -1
        self._f = None
        self._next_shard()

    def _next_shard(self) -> None:
        if self._f is not None:
            self._f.close()
        self._shard += 1
        self._t = 0
        if self._shard == len(self._shards):
            self._f = None
            return
        header, off = {}, 0
        for (name, shape, dtype), n in zip(self._shards[self._shard], self._sizes[self._shard]):
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)    # the data section starts 8-byte aligned
        self._f = open(self.out_dir / self.files[self._shard], "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._left = self._sizes[self._shard][0]

    def write(self, data: np.ndarray) -> None:
        """Append the next chunk (raw bytes in the declared dtype) of the current tensor."""
        self._f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self._left -= data.nbytes
        assert self._left >= 0, "more bytes than the tensor holds"
        while self._f is not None and self._left == 0:
            self._t += 1
            if self._t == len(self._shards[self._shard]):
                self._next_shard()
            else:
                self._left = self._sizes[self._shard][self._t]

    def close(self) -> None:
        assert self._f is None, "safetensors closed before every tensor was written"
        if len(self.files) > 1:
            weight_map = {name: f for f, sh in zip(self.files, self._shards) for name, _, _ in sh}
            total = sum(sum(s) for s in self._sizes)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
