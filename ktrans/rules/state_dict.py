"""StateDictSource: a WeightSource over tensors already in memory.

For weights that are not in a file: a HF model's `state_dict()` (tests compare ktrans operators
with the transformers modules holding the very same tensors), or tensors produced by a
conversion. Names are transformers-5 parameter names, as for every WeightSource; tensors are
stored as given (f32, f16 or bf16) and `raw()` exposes their bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from ktrans.errors import KtransError
from ktrans.weights import names
from ktrans.weights.source import RawTensor, TensorInfo, WeightSource

_QTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class StateDictSource(WeightSource):
    """Weights from a mapping of parameter name -> CPU tensor (float32, float16 or bfloat16)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str = "<state dict>", config=None):
        self.path = path
        self._config = config      # the model's config, where its fused experts are not [E, 2I, H] (gpt-oss)
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if t.dtype not in _QTYPES or t.is_meta:
                raise KtransError(f"{path}: tensor '{name}' is {t.dtype} on {t.device}; StateDictSource "
                                  f"holds real float32/float16/bfloat16 tensors")
            self._tensors[name] = t.detach().to("cpu").contiguous()

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise self.missing(name)
        return self._tensors[name]

    def info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name, _QTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size(), self.path)

    def raw(self, name: str) -> RawTensor:
        t = self._get(name)
        return self.note_raw(RawTensor(_QTYPES[t.dtype], tuple(t.shape), _bytes(t)))

    def tensor(self, name: str, dtype=None, device="cpu") -> torch.Tensor:
        t = self._get(name)
        out = t.to(dtype=dtype or torch.float32, copy=True)
        return self.placed(out, device, t.numel() * t.element_size())

    def expert_stack(self, layer: int, proj: str) -> RawTensor:
        """[E, rows, cols] slice of the fused transformers-5 expert tensors of `layer`."""
        self.check_expert_proj(layer, proj)
        prefix = f"model.layers.{layer}.mlp.experts"
        fused = self._get(f"{prefix}.{'down_proj' if proj == 'down' else 'gate_up_proj'}")
        t = torch.from_numpy(names.stored_experts(proj, fused.numpy() if fused.dtype != torch.bfloat16 else
                                                  fused.view(torch.int16).numpy(), self._config))
        t = t.view(torch.bfloat16) if fused.dtype == torch.bfloat16 else t            # [E, I, H] / [E, H, I]
        return self.note_raw(RawTensor(_QTYPES[t.dtype], tuple(t.shape), _bytes(t.contiguous())))

    def config(self):
        return self._config


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (shares memory with `t`)."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
