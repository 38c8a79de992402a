"""`gated_mlp`: a dense gated MLP — down(act(gate(x)) · up(x)) — as DeepSeek's shared experts and
dense layers, Qwen2-MoE's shared expert and Llama/Qwen2's MLPs compute it (act = SiLU), and Gemma
3's (GELU, tanh-approximated as its config's gelu_pytorch_tanh says), with gate and up fused
into one product where they share a format (one GGUF quant type, or both dense), and act·mul
as one kernel on CUDA: three launches per MLP instead of five. Projections keep their GGUF
formats on CUDA like the `linear` operator (`weights`: auto | stored | dense).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.linear import ProjectionOwner, concat_projections, resolve_dtype
from ktrans.operators.registry import register_operator


# transformers' activation names -> the torch function the oracle applies
_ACTS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": lambda g: F.gelu(g, approximate="tanh"),
         "gelu": F.gelu}


def _act_mul_torch(gu: torch.Tensor, act) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return act(g) * u


def mlp_activation(config) -> str | None:
    """The MLP activation's transformers name (Gemma 3 calls the key hidden_activation)."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)


@register_operator("gated_mlp")
class GatedMLP(ProjectionOwner, Operator):
    name: ClassVar[str] = "gated_mlp"
    owned_children: ClassVar[tuple[str, ...]] = ("*",)      # its three projections are loaded here

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", weights="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        projs = [getattr(orig_module, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, torch.nn.Linear) for p in projs):
            raise KtransError(f"{key}: gated_mlp replaces an MLP with gate_proj/up_proj/down_proj, "
                              f"got {type(orig_module).__name__}")
        act = mlp_activation(config)
        if act not in _ACTS:
            raise KtransError(f"{key}: gated_mlp computes act(gate) * up with act one of {', '.join(_ACTS)}; "
                              f"this model's activation is {act!r}")
        self.act = act
        self.hidden_size, self.intermediate_size = projs[0].in_features, projs[0].out_features
        self.has_bias = projs[0].bias is not None
        self.dtype = resolve_dtype(dtype, self.device)
        self._set_weights_mode(key, weights)
        self.gate_up = None
        self._act_mul = lambda gu: _act_mul_torch(gu, _ACTS[act])
        if self.device.type == "cuda":
            from ktrans.kernels import triton_available

            if triton_available():
                from ktrans.kernels.silu_mul import ACTIVATIONS, act_mul

                self._act_mul = lambda gu: act_mul(gu, ACTIVATIONS[act])

    def _proj_shapes(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden_size, self.intermediate_size
        return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def _biased(self) -> set[str]:
        return {"gate_proj", "up_proj", "down_proj"} if self.has_bias else set()

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def load_weights(self, weights) -> None:
        self._load_owned(weights)
        fused = concat_projections(self.projs["gate_proj"], self.projs["up_proj"])
        if fused is not None:            # one [2I, H] product instead of two; the halves are dropped
            self.gate_up = fused
            del self.projs["gate_proj"], self.projs["up_proj"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        if self.gate_up is not None:
            lead = x.shape[:-1]
            h = self._act_mul(self.gate_up(x.reshape(-1, self.hidden_size)))            # [T, I]
            return self.projs["down_proj"](h).view(*lead, self.hidden_size)
        return self.projs["down_proj"](_ACTS[self.act](self.projs["gate_proj"](x)) * self.projs["up_proj"](x))

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype)
        if self.gate_up is not None:
            w = self.gate_up.dense_weight()
            b = self.gate_up.bias
            gu = F.linear(x, w, b)
        else:
            gu = torch.cat([self._linear(x, "gate_proj", True), self._linear(x, "up_proj", True)], dim=-1)
        return self._linear(_act_mul_torch(gu, _ACTS[self.act]), "down_proj", True)
