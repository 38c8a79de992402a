"""`linear` operator (a placed nn.Linear) and the small dense helpers the attention and MoE
operators share: weight loading by parameter name, compute dtype, RMSNorm, gated MLP.

Weights come from any WeightSource (GGUF blocks are dequantized; safetensors converted) as the
compute dtype on the operator's device.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.registry import register_operator

_DTYPES = {"f32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "f16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """Compute dtype from an operator's `dtype` kwarg: "auto" (or None) is bf16 on CUDA and
    f32 on the CPU (where bf16 matmuls are slow in torch and f32 keeps CI exact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise KtransError(f"dtype '{dtype}' is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_param(weights, name: str, dtype: torch.dtype, device,
               shape: tuple[int, ...] | None = None) -> torch.nn.Parameter:
    """One parameter by its transformers name, dequantized to `dtype` on `device`; KtransError
    when it does not have the `shape` the config implies."""
    t = weights.tensor(name, dtype=dtype, device=device)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise KtransError(f"{weights!r}: tensor '{name}' has shape {list(t.shape)}, the config implies "
                          f"{list(shape)}; do the weights belong to this model?")
    return torch.nn.Parameter(t, requires_grad=False)


def optional_param(weights, name: str, dtype, device) -> torch.nn.Parameter | None:
    return load_param(weights, name, dtype, device) if weights.has(name) else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it: statistics in f32, scale in x's dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def param_bytes(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    size = torch.empty(0, dtype=dtype).element_size()
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n * size


class GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)): dense MLPs and shared experts, weights loaded under `prefix`."""

    def __init__(self, weights, prefix: str, act, dtype, device):
        super().__init__()
        self.gate_proj = load_param(weights, f"{prefix}.gate_proj.weight", dtype, device)  # [I, H]
        self.up_proj = load_param(weights, f"{prefix}.up_proj.weight", dtype, device)      # [I, H]
        self.down_proj = load_param(weights, f"{prefix}.down_proj.weight", dtype, device)  # [H, I]
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x, self.gate_proj)) * F.linear(x, self.up_proj), self.down_proj)


@register_operator("linear")
class Linear(Operator):
    """nn.Linear on a chosen device and dtype; input is moved there and the output stays there."""

    name: ClassVar[str] = "linear"

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if not isinstance(orig_module, torch.nn.Linear):
            raise KtransError(f"{key}: the linear operator replaces torch.nn.Linear, got {type(orig_module).__name__}")
        self.in_features = orig_module.in_features
        self.out_features = orig_module.out_features
        self.has_bias = orig_module.bias is not None
        self.dtype = resolve_dtype(dtype, torch.device(device))
        self.weight = None
        self.bias = None

    def load_weights(self, weights) -> None:
        self.weight = load_param(weights, f"{self.key}.weight", self.dtype, self.device,
                                 (self.out_features, self.in_features))                  # [out, in]
        if self.has_bias:
            self.bias = load_param(weights, f"{self.key}.bias", self.dtype, self.device, (self.out_features,))

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        dtype = resolve_dtype(kwargs.get("dtype", "auto"), torch.device(device))
        shapes = [tuple(orig_module.weight.shape)]
        if orig_module.bias is not None:
            shapes.append(tuple(orig_module.bias.shape))
        return {str(torch.device(device)): param_bytes(shapes, dtype)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.device, self.dtype), self.weight, self.bias)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(self.device, self.dtype) @ self.weight.t()
        return y + self.bias if self.bias is not None else y
