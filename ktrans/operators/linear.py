"""`linear` operator (a placed nn.Linear) and the small dense helpers the attention and MoE
operators share: weight loading by parameter name, compute dtype, RMSNorm, gated MLP, and
projections that keep GGUF quant blocks on the GPU.

Weights come from any WeightSource as the compute dtype on the operator's device (GGUF blocks
dequantized, safetensors converted), except where a projection keeps them as stored: on CUDA, a
q8_0/q4_k/q5_k/q6_k weight is held in its GGUF format and multiplied by the Triton kernel of
ktrans.kernels.quant_matmul (`weights: auto` or `stored`; `dense` dequantizes as before).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
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


WEIGHT_MODES = ("auto", "stored", "dense")


def _stored_format(weights, name: str, shape: tuple[int, int], device: torch.device, mode: str, key: str) -> str | None:
    """The GGUF format a projection keeps on `device`, or None to dequantize it (see the module
    docstring). `stored` where it cannot be kept is an error naming why."""
    import os

    if mode not in WEIGHT_MODES:
        raise KtransError(f"{key}: weights '{mode}' is not one of {', '.join(WEIGHT_MODES)}")
    if mode == "dense" or weights is None or not weights.has(name):
        return None
    from ktrans.kernels import triton_available

    qtype = weights.raw_qtype(name)
    kernels = ("q8_0", "q4_k", "q5_k", "q6_k", "f8_e4m3")
    why = None
    if device.type != "cuda" and not (mode == "stored" and os.environ.get("TRITON_INTERPRET") == "1"):
        why = f"it is placed on {device} (the kernels are for CUDA)"
    elif qtype not in kernels:
        why = f"'{name}' is stored as {qtype} (GPU kernels: {', '.join(kernels)})"
    elif shape[1] % 256:
        why = f"its rows of {shape[1]} values are not whole 256-value super-blocks"
    elif qtype == "f8_e4m3" and _fp8_block(weights) != 128:
        why = f"its FP8 scale blocks are {_fp8_block(weights)} wide (the kernel reads 128 x 128 blocks)"
    elif not triton_available():
        why = "Triton does not import here"
    if why and mode == "stored":
        raise KtransError(f"{key}: weights stored cannot keep '{name}' in its GGUF format: {why}")
    return None if why else qtype


_PACKED_BYTES_PER_256 = {"q8_0": 272, "q4_k": 148, "q5_k": 180, "q6_k": 210, "f8_e4m3": 256}


def _fp8_block(weights) -> int | None:
    """Edge of an FP8 checkpoint's scale blocks (sources without FP8 have none)."""
    block = getattr(weights, "fp8_block", None)
    return block() if callable(block) else None


def _packed_bytes(qtype: str, shape: tuple[int, int]) -> int:
    n, k = shape
    extra = 4 * -(-n // 128) * -(-k // 128) if qtype == "f8_e4m3" else 0        # FP8 block scales
    return n * k // 256 * _PACKED_BYTES_PER_256[qtype] + extra


class DenseProjection(torch.nn.Module):
    """x · Wᵀ (+ b) with W in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight


class QuantProjection(torch.nn.Module):
    """x · Wᵀ (+ b) with W kept in its GGUF format (ktrans.kernels.quant_matmul's packed layout)."""

    def __init__(self, qtype: str, packed: dict[str, torch.Tensor], shape: tuple[int, int],
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.out_features, self.in_features = qtype, shape[0], shape[1]
        self.dtype = dtype
        for field, t in packed.items():
            self.register_buffer(field, t)
        self._fields = tuple(packed)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ktrans.kernels.quant_matmul import quant_matmul

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()                    # [T, in]
        y = quant_matmul(x2, self.qtype, {f: getattr(self, f) for f in self._fields}, self.out_features,
                         self.in_features)                                                   # [T, out]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight dequantized (bit-exact vs gguf-py) in the compute dtype: the oracle's."""
        from ktrans.kernels.quant_matmul import dequantize

        return dequantize(self.qtype, {f: getattr(self, f) for f in self._fields}).to(self.dtype)


def concat_projections(a: torch.nn.Module, b: torch.nn.Module) -> torch.nn.Module | None:
    """One projection computing [a(x), b(x)] (rows of a then b), when both hold the same format
    (both dense, or one GGUF type) and either both or neither have a bias; else None."""
    if (a.bias is None) != (b.bias is None):
        return None
    bias = None if a.bias is None else torch.cat([a.bias, b.bias])
    if isinstance(a, DenseProjection) and isinstance(b, DenseProjection):
        return DenseProjection(torch.cat([a.weight, b.weight]), bias)
    if (isinstance(a, QuantProjection) and isinstance(b, QuantProjection) and a.qtype == b.qtype
            and a.in_features == b.in_features and a.dtype == b.dtype
            and (a.qtype != "f8_e4m3" or a.out_features % 128 == 0)):   # FP8 scale rows stay aligned
        packed = {f: torch.cat([getattr(a, f), getattr(b, f)]) for f in a._fields}
        return QuantProjection(a.qtype, packed, (a.out_features + b.out_features, a.in_features), bias, a.dtype)
    return None


def load_projection(weights, name: str, shape: tuple[int, int], dtype: torch.dtype, device, *, mode: str = "auto",
                    key: str = "", bias_name: str | None = None) -> torch.nn.Module:
    """The projection `name` ([out, in] weight, optional bias) on `device`: QuantProjection where
    its GGUF format is kept (see _stored_format), else DenseProjection."""
    device = torch.device(device)
    bias = load_param(weights, bias_name, dtype, device, (shape[0],)) if bias_name else None
    qtype = _stored_format(weights, name, shape, device, mode, key or name)
    if qtype is None:
        return DenseProjection(load_param(weights, name, dtype, device, shape), bias)
    from ktrans.kernels.quant_matmul import pack

    raw = weights.raw(name)
    if tuple(raw.shape) != tuple(shape):
        raise KtransError(f"{weights!r}: tensor '{name}' has shape {list(raw.shape)}, the config implies {list(shape)}")
    scale = None
    if qtype == "f8_e4m3":
        scale = np.ascontiguousarray(weights.scale_inv(name).data).view(np.float32).reshape(
            -(-shape[0] // 128), -(-shape[1] // 128))
    try:
        packed = {f: t.to(device) for f, t in pack(qtype, raw.data, shape[0], shape[1], scale).items()}
    except ValueError as e:
        raise KtransError(f"{weights.where(name)}: {e}") from None
    return QuantProjection(qtype, packed, shape, bias, dtype)


def projection_bytes(weights, name: str, shape: tuple[int, int], dtype: torch.dtype, device, mode: str = "auto",
                     key: str = "") -> int:
    """Bytes load_projection will hold for the weight `name` (without its bias)."""
    qtype = _stored_format(weights, name, shape, torch.device(device), mode, key or name)
    if qtype is None:
        return param_bytes([shape], dtype)
    return _packed_bytes(qtype, shape)


class ProjectionOwner:
    """Mixin for operators that load their projections and small parameters themselves
    (attention): subclasses set self.key/device/dtype/weights_mode and define
    _proj_shapes() {proj: (out, in)}, _biased() {proj with a bias} and _param_shapes()
    {name: shape} of the other tensors (norms), loaded dense."""

    def _set_weights_mode(self, key: str, weights: str) -> None:
        """Check and keep the `weights` kwarg (auto | stored | dense, see load_projection)."""
        if weights not in WEIGHT_MODES:
            raise KtransError(f"{key}: weights '{weights}' is not one of {', '.join(WEIGHT_MODES)}")
        self.weights_mode = weights

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        probe = cls(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        return {str(torch.device(device)): probe._owned_bytes(weights)}

    def _load_owned(self, weights) -> None:
        biased = self._biased()
        self.projs = torch.nn.ModuleDict({
            proj: load_projection(weights, f"{self.key}.{proj}.weight", shape, self.dtype, self.device,
                                  mode=self.weights_mode, key=self.key,
                                  bias_name=f"{self.key}.{proj}.bias" if proj in biased else None)
            for proj, shape in self._proj_shapes().items()})
        self.params = torch.nn.ParameterDict({
            name.replace(".", "__"): load_param(weights, f"{self.key}.{name}", self.dtype, self.device, shape)
            for name, shape in self._param_shapes().items()})

    def _owned_bytes(self, weights) -> int:
        n = sum(projection_bytes(weights, f"{self.key}.{proj}.weight", shape, self.dtype, self.device,
                                 self.weights_mode, self.key) for proj, shape in self._proj_shapes().items())
        shapes = list(self._param_shapes().values()) + [(self._proj_shapes()[p][0],) for p in self._biased()]
        return n + param_bytes(shapes, self.dtype)

    def _p(self, name: str) -> torch.Tensor | None:
        """A loaded small parameter by its name under this module."""
        return self.params.get(name.replace(".", "__"))

    def _linear(self, x: torch.Tensor, proj: str, native: bool = False) -> torch.Tensor:
        """x · Wᵀ (+ b) of one projection; native: through the dense weight (the oracle)."""
        p = self.projs[proj]
        return F.linear(x, p.dense_weight(), p.bias) if native else p(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it: statistics in f32, scale in x's dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm_offset(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm exactly as transformers computes it: the normalised row times (1 + weight),
    all in f32, rounded to x's dtype once. `weight` is zero-centred (HF's stored convention)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def offset_norms(config) -> bool:
    """Whether the config's architecture scales its RMSNorms by (1 + w) (ArchSpec.norm)."""
    from ktrans.config.arch import arch_from_config

    return arch_from_config(config).norm == "rms_offset"


def rms_norm_for(device: torch.device, offset: bool = False):
    """The RMSNorm an operator on `device` uses (`offset`: Gemma's (1 + w) form): one Triton
    kernel on CUDA (same numerics, ktrans.kernels.rms_norm), torch's ops elsewhere (and as the
    oracle)."""
    if torch.device(device).type == "cuda":
        from ktrans.kernels import triton_available

        if triton_available():
            from ktrans.kernels.rms_norm import rms_norm as fused
            from ktrans.kernels.rms_norm import rms_norm_offset as fused_offset

            return fused_offset if offset else fused
    return rms_norm_offset if offset else rms_norm


def tied_source(weights, key: str, config) -> str:
    """The stored weight of projection `key`: its own, or the input embeddings' for a tied
    lm_head (tie_word_embeddings: the file holds the table once, as token_embd)."""
    name = f"{key}.weight"
    if not weights.has(name) and getattr(config, "tie_word_embeddings", False) and key.endswith("lm_head") \
            and weights.has("model.embed_tokens.weight"):
        return "model.embed_tokens.weight"
    return name


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

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", weights="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if not isinstance(orig_module, torch.nn.Linear):
            raise KtransError(f"{key}: the linear operator replaces torch.nn.Linear, got {type(orig_module).__name__}")
        if weights not in WEIGHT_MODES:
            raise KtransError(f"{key}: weights '{weights}' is not one of {', '.join(WEIGHT_MODES)}")
        self.in_features = orig_module.in_features
        self.out_features = orig_module.out_features
        self.has_bias = orig_module.bias is not None
        self.dtype = resolve_dtype(dtype, torch.device(device))
        self.weights_mode = weights
        self.proj = None

    def load_weights(self, weights) -> None:
        self.proj = load_projection(weights, tied_source(weights, self.key, self.config),
                                    (self.out_features, self.in_features), self.dtype, self.device,
                                    mode=self.weights_mode, key=self.key,
                                    bias_name=f"{self.key}.bias" if self.has_bias else None)

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        dtype = resolve_dtype(kwargs.get("dtype", "auto"), torch.device(device))
        name = tied_source(weights, key, config) if weights is not None else f"{key}.weight"
        n = projection_bytes(weights, name, tuple(orig_module.weight.shape), dtype, device,
                             kwargs.get("weights", "auto"), key)
        if orig_module.bias is not None:
            n += param_bytes([tuple(orig_module.bias.shape)], dtype)
        return {str(torch.device(device)): n}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.device, self.dtype))

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(self.device, self.dtype) @ self.proj.dense_weight().t()
        return y + self.proj.bias if self.proj.bias is not None else y
