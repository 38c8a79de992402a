"""WeightSource: one read interface over every weight file format ktrans loads.

Operators and the model runner ask a WeightSource for tensors by transformers-5 parameter name
(what `model.named_parameters()` lists, e.g. `model.layers.3.mlp.experts.gate_up_proj`), never by
file-format names. GGUF files (GGUFSource) and safetensors checkpoints (SafetensorsSource)
implement it; `open_weights()` picks one from the command-line paths.

Two views of each tensor:
- `tensor()` — dequantized, in the HF shape and the asked dtype/device (the plain-torch path);
- `raw()` / `expert_stack()` — the bytes as stored (GGUF quant blocks, FP8, bf16), zero-copy
  memmap views where the layout allows, for kernels that consume the stored format directly.
"""

from __future__ import annotations

import abc
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ktrans.errors import KtransError

if TYPE_CHECKING:
    import torch

    from ktrans.weights.progress import LoadProgress

EXPERT_PROJS = ("gate", "up", "down")

# Stored types that need no block dequantization: (numpy view dtype, torch dtype name).
_PLAIN_TYPES = {
    "f32": (np.float32, "float32"),
    "f16": (np.float16, "float16"),
    "bf16": (np.int16, "bfloat16"),
    "f8_e4m3": (np.uint8, "float8_e4m3fn"),
}


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor is, without reading it."""

    name: str                   # parameter name (transformers-5)
    qtype: str                  # stored type: a quant type name (ktrans.weights.quant) or f8_e4m3
    shape: tuple[int, ...]      # HF shape, row-major
    nbytes: int                 # bytes as stored (sum over parts for a tensor built from several)
    file: str                   # file holding it (the first part's file when built from several)


@dataclass(frozen=True)
class RawTensor:
    """A tensor's stored bytes: `data` is uint8 and C-contiguous, shape[:-1] + (row bytes,)
    or flat; `shape` is the logical row-major shape (last dim contiguous, e.g. [E, I, H])."""

    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


_COPY_CHUNK = 32 << 20     # bytes per copy task: large enough to amortise a task, small enough to spread
_copy_pool: ThreadPoolExecutor | None = None


def copy_bytes(src: np.ndarray) -> np.ndarray:
    """An owned copy of flat uint8 `src`, split across threads when large.

    NOTE: one thread cannot saturate memory bandwidth on a many-core machine (and reading a
    memory-mapped file adds page-table work per page); numpy releases the GIL while copying, so
    chunks copied from a few threads run in parallel.
    """
    global _copy_pool
    out = np.empty(src.shape, dtype=src.dtype)
    n = src.nbytes
    threads = min(os.cpu_count() or 1, 8, n // _COPY_CHUNK)
    if threads <= 1:
        np.copyto(out, src)
        return out
    if _copy_pool is None:
        _copy_pool = ThreadPoolExecutor(min(os.cpu_count() or 1, 8), thread_name_prefix="ktrans-copy")
    steps = range(0, n, _COPY_CHUNK)
    list(_copy_pool.map(lambda i: np.copyto(out[i:i + _COPY_CHUNK], src[i:i + _COPY_CHUNK]), steps))
    return out


def raw_to_torch(raw: RawTensor, where: str = "") -> "torch.Tensor":
    """Dequantize stored bytes to a float tensor of `raw.shape` on the CPU.

    f32/f16/bf16/f8_e4m3 are reinterpreted: views are copied, an array owning its memory (made by
    a layout transform) is taken over (the result shares it); block quant types go through
    `ktrans.weights.quant.dequantize` (float32).
    """
    import torch

    shape = tuple(raw.shape)
    if raw.qtype in _PLAIN_TYPES:
        np_dtype, torch_name = _PLAIN_TYPES[raw.qtype]
        flat = np.ascontiguousarray(raw.data).reshape(-1)
        expect = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if flat.nbytes != expect:
            raise KtransError(
                f"{where or 'tensor'}: {raw.qtype} data has {flat.nbytes} bytes, expected {expect} "
                f"for shape {list(shape)}"
            )
        # An array that owns its writeable memory was just built by a layout transform
        # (concatenation, permutation) and is ours to keep; views (of a file mapping, of another
        # tensor) are copied, so the result never aliases memory someone else holds.
        mine = raw.data.flags.owndata and raw.data.flags.writeable
        owned = flat if mine else copy_bytes(flat)
        t = torch.from_numpy(owned.view(np_dtype))
        return t.view(getattr(torch, torch_name)).reshape(shape)
    from ktrans.weights import quant

    try:
        out = quant.dequantize(raw.data, raw.qtype, shape)
    except KtransError as e:
        raise KtransError(f"{where or 'tensor'}: {e}") from None
    return torch.from_numpy(out)


class WeightSource(abc.ABC):
    """Base of every weight reader. Subclasses implement names/info/raw/expert_stack and may
    override tensor() where the HF tensor is a transform of what is stored."""

    #: what was opened (file or directory), named in error messages
    path: str = ""
    #: set by `loading()` while a load is in progress; receives every read
    progress: "LoadProgress | None" = None
    #: HF parameter/buffer shapes implied by config(), built on first use
    _expected: dict[str, tuple[int, ...]] | None = None

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Parameter names available, sorted."""

    def has(self, name: str) -> bool:
        return name in self.names()

    @abc.abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Stored type, HF shape, bytes and file of `name`; reads no tensor data."""

    @abc.abstractmethod
    def raw(self, name: str) -> RawTensor:
        """The stored bytes of `name` (quant blocks for GGUF), logical shape = HF shape."""

    def raw_qtype(self, name: str) -> str:
        """The format raw(name) hands out: the stored one (info), unless the HF layout moves values
        within quant blocks and raw() has to give float32 (reads no tensor data)."""
        return self.info(name).qtype

    @abc.abstractmethod
    def expert_stack(self, layer: int, proj: str) -> RawTensor:
        """Routed experts of one layer and projection as one [E, rows, cols] tensor
        (gate/up: [E, I, H]; down: [E, H, I]); zero-copy when the file stores them stacked."""

    def tensor(self, name: str, dtype=None, device="cpu") -> "torch.Tensor":
        """Dequantized tensor in the HF shape, converted to `dtype` (default float32) on `device`.

        This default reports the read once, by device; a subclass whose raw() reports reads itself
        (note_raw) overrides tensor() so that a read is not counted twice."""
        import torch

        raw = self.raw(name)
        t = raw_to_torch(raw, where=self.where(name))
        t = t.to(dtype=dtype or torch.float32)
        return self.placed(t, device, raw.nbytes)

    # ---- config / tokenizer (single-file GGUF builds them from metadata) ----

    def config(self):
        """transformers config of the model these weights belong to, or None if the files
        carry none (then the caller needs --model_path)."""
        return None

    def tokenizer(self):
        """transformers tokenizer built from the files, or None when they carry none."""
        return None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the HF model's parameters and buffers for config() (built on the meta
        device, so free of memory); empty when there is no config."""
        if self._expected is None:
            cfg = self.config()
            shapes: dict[str, tuple[int, ...]] = {}
            if cfg is not None:
                from ktrans.config.arch import build_meta_model

                try:
                    model = build_meta_model(cfg)
                except KtransError:
                    raise
                except Exception as e:  # e.g. a zero head count from a corrupt file
                    raise KtransError(f"{self.path}: cannot build a {cfg.model_type} model from its config "
                                      f"({type(e).__name__}: {e})") from None
                for n, p in [*model.named_parameters(), *model.named_buffers()]:
                    shapes[n] = tuple(p.shape)
            self._expected = shapes
        return self._expected

    def check_shape(self, name: str, shape: tuple[int, ...], file: str, stored: str = "") -> None:
        """KtransError when the stored shape of `name` is not what the config implies; `stored`
        names the file's own tensor(s) when they differ from the parameter name."""
        want = self.expected_shapes().get(name)
        if want is not None and tuple(shape) != want:
            what = f"tensor '{name}'" + (f" (stored as {stored})" if stored else "")
            raise KtransError(f"{file}: {what} has shape {list(shape)}, but the model config "
                              f"expects {list(want)} (weights from a different model or variant?)")

    # ---- helpers shared by subclasses ----

    def missing(self, name: str) -> KtransError:
        """The error for a parameter the files do not hold."""
        return KtransError(f"{self.path}: no tensor for parameter '{name}' (the files hold {len(self.names())} "
                           f"parameters; is this the right model for the config?)")

    def where(self, name: str) -> str:
        return f"{self.info(name).file}: tensor '{name}'"

    def check_expert_proj(self, layer: int, proj: str) -> None:
        if proj not in EXPERT_PROJS:
            raise KtransError(f"expert projection '{proj}' is not one of {', '.join(EXPERT_PROJS)}")
        if not isinstance(layer, int) or layer < 0:
            raise KtransError(f"expert layer index must be a non-negative int, got {layer!r}")

    def placed(self, t: "torch.Tensor", device, nbytes: int) -> "torch.Tensor":
        """Move `t` to `device` and report the read to the progress tracker, if any."""
        t = t.to(device=device)
        if self.progress is not None:
            self.progress.record(nbytes, str(t.device))
        return t

    def note_raw(self, raw: RawTensor, device: str = "cpu") -> RawTensor:
        """Report a raw read (bytes kept in CPU RAM unless an operator says otherwise)."""
        if self.progress is not None:
            self.progress.record(raw.nbytes, device)
        return raw

    def loading(self, *, total_bytes: int | None = None, enabled: bool = True):
        """Context manager that shows a progress bar for the reads made inside it (when the
        load takes over a second) and prints a one-line summary at the end."""
        from ktrans.weights.progress import LoadProgress

        return LoadProgress(self, total_bytes=total_bytes, enabled=enabled)

    def close(self) -> None:
        """Release file mappings (tensors already returned by tensor() stay valid)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


def load_hf_config(model_dir: str):
    """transformers config of an HF model directory; KtransError naming config.json when
    transformers rejects it."""
    from transformers import AutoConfig

    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise KtransError(f"'{model_dir}' has no config.json (expected an HF model directory)")
    from ktrans.config.arch import text_model_config

    try:
        return text_model_config(AutoConfig.from_pretrained(model_dir))
    except KtransError:
        raise
    except Exception as e:  # transformers' validators raise several unrelated exception types
        raise KtransError(f"{path}: not a valid transformers config ({str(e).strip().splitlines()[-1]})") from None


def open_weights(model_path: str | None, gguf_path: str | None) -> WeightSource:
    """The WeightSource for the command-line paths.

    `gguf_path` (a .gguf file, the first file of a split set, or a directory of GGUF files) wins
    for tensors; `model_path` (an HF directory) then supplies config and tokenizer, which take
    precedence over the ones built from GGUF metadata. Without `gguf_path`, `model_path` must hold
    safetensors weights.
    """
    if gguf_path:
        from ktrans.weights.gguf_source import GGUFSource

        if model_path and not os.path.isdir(model_path):
            raise KtransError(f"--model_path '{model_path}' is not a directory (expected an HF model directory)")
        return GGUFSource(gguf_path, hf_dir=model_path)
    if model_path:
        if not os.path.exists(model_path):
            raise KtransError(f"model path '{model_path}' does not exist")
        if os.path.isfile(model_path) and model_path.endswith(".gguf") or _dir_has_only_gguf(model_path):
            from ktrans.weights.gguf_source import GGUFSource

            return GGUFSource(model_path)
        from ktrans.weights.safetensors_source import SafetensorsSource

        return SafetensorsSource(model_path)
    raise KtransError("no weights given: pass --model_path (HF directory) and/or --gguf_path (GGUF file or directory)")


def _dir_has_only_gguf(path: str) -> bool:
    """A directory with GGUF files and no safetensors is treated as a GGUF model directory."""
    if not os.path.isdir(path):
        return False
    files = os.listdir(path)
    return any(f.endswith(".gguf") for f in files) and not any(f.endswith(".safetensors") for f in files)
