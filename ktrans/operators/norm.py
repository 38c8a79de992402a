"""`rms_norm`: a model's RMSNorm (input/post-attention layer norms, the final norm) as one kernel
on CUDA (ktrans.kernels.rms_norm) instead of the ~6 torch ops transformers runs; torch elsewhere
and as the oracle. Numerics are transformers': f32 statistics, the row rounded to the input
dtype, then scaled by the weight; for architectures whose norms scale by (1 + w) (Gemma 3,
ArchSpec.norm), the (1 + w) product in f32 and one rounding, as its RMSNorm module computes.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.linear import load_param, offset_norms, resolve_dtype, rms_norm, rms_norm_for, rms_norm_offset
from ktrans.operators.registry import register_operator


@register_operator("rms_norm")
class RMSNorm(Operator):
    name: ClassVar[str] = "rms_norm"

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        weight = getattr(orig_module, "weight", None)
        eps = getattr(orig_module, "variance_epsilon", getattr(orig_module, "eps", None))
        if weight is None or weight.dim() != 1 or eps is None:
            raise KtransError(f"{key}: rms_norm replaces an RMSNorm module (a 1-D weight and an epsilon), "
                              f"got {type(orig_module).__name__}")
        self.hidden_size, self.eps = int(weight.shape[0]), float(eps)
        self.dtype = resolve_dtype(dtype, self.device)
        self.offset = config is not None and offset_norms(config)     # Gemma: x̂ · (1 + w)
        self._norm = rms_norm_for(self.device, self.offset)

    def load_weights(self, weights) -> None:
        self.weight = load_param(weights, f"{self.key}.weight", self.dtype, self.device, (self.hidden_size,))

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        size = torch.empty(0, dtype=resolve_dtype(kwargs.get("dtype", "auto"), torch.device(device))).element_size()
        return {str(torch.device(device)): size * orig_module.weight.shape[0]}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._norm(hidden_states, self.weight, self.eps)

    def forward_native(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return (rms_norm_offset if self.offset else rms_norm)(hidden_states, self.weight, self.eps)
