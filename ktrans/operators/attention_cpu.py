"""`cpu_gqa_attention` / `cpu_mla_attention` / `cpu_gated_deltanet`: the attention operators (and
the Gated DeltaNet linear attention) with their projection matrices kept as the GGUF blocks they
are stored in and run by the CPU linear kernels (linear_cpu.QuantWeight), for all-CPU placements.

Everything else — rotary, the paged KV cache (the DeltaNet's state rows), the attention itself, and
so every oracle — is the parent operator's (attention_gqa.py / attention_mla.py /
gated_deltanet.py): these subclasses only replace how a
projection is loaded (`_load_owned`: the parent's `_proj_shapes` as QuantWeights, its
`_param_shapes` in f32) and applied (`_linear`; the oracle path through gguf-py-dequantized weights). Norms, biases of the parent's own tensors and MLA's kv_b_proj halves (small,
used in einsums) stay f32. A decode-only step of a whole model of these operators can instead run
through the fused C++ step (cpu_decode.py), which reads the same QuantWeights.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ktrans.errors import KtransError
from ktrans.operators.attention_gqa import GQAAttention
from ktrans.operators.attention_mla import MLAAttention
from ktrans.operators.gated_deltanet import GatedDeltaNet
from ktrans.operators.linear import load_param, param_bytes
from ktrans.operators.linear_cpu import PLACEMENT, QuantWeight, check_cpu_infer, cpu_pool, kernel_reads
from ktrans.operators.registry import register_operator


class _StoredProjections:
    """Mixin over an attention operator: its projections (the parent's _proj_shapes) held as
    QuantWeights; the parent's other tensors (_param_shapes: norms, MLA's kv_b_proj) in f32."""

    placement = PLACEMENT

    def _init_cpu(self, key: str, cpu_infer) -> None:
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise KtransError(f"{key}: {self.name} computes in float32 on the CPU (got {self.device}, {self.dtype}); "
                              f"use the parent operator elsewhere")
        check_cpu_infer(key, cpu_infer)
        self.cpu_infer = cpu_infer
        self.qproj: dict[str, QuantWeight] = {}

    def _load_owned(self, weights) -> None:
        pool = cpu_pool(self.cpu_infer)
        biased = self._biased()
        self.qproj = {proj: QuantWeight.load(weights, f"{self.key}.{proj}.weight", shape, pool,
                                             bias=f"{self.key}.{proj}.bias" if proj in biased else None)
                      for proj, shape in self._proj_shapes().items()}
        self.params = torch.nn.ParameterDict({
            name.replace(".", "__"): load_param(weights, f"{self.key}.{name}", self.dtype, self.device, shape)
            for name, shape in self._param_shapes().items()})

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        probe = cls(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        total = param_bytes(list(probe._param_shapes().values()), torch.float32)
        total += param_bytes([(probe._proj_shapes()[p][0],) for p in probe._biased()], torch.float32)
        for proj, shape in probe._proj_shapes().items():
            name = f"{key}.{proj}.weight"
            info = weights.info(name) if weights is not None and weights.has(name) else None
            stored = info is not None and kernel_reads(info.qtype, shape[-1])
            total += info.nbytes if stored else param_bytes([shape], torch.float32)
        return {"cpu": total}

    def _linear(self, x: torch.Tensor, proj: str, native: bool = False) -> torch.Tensor:
        q = self.qproj[proj]
        return q.native(x) if native else q(x)


@register_operator("cpu_gqa_attention")
class CPUGQAAttention(_StoredProjections, GQAAttention):
    """gqa_attention with q/k/v/o as stored. kwargs: cpu_infer (threads of the shared pool)."""

    name: ClassVar[str] = "cpu_gqa_attention"

    def __init__(self, *, key: str, orig_module, config, device, cpu_infer: int | None = None, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self._init_cpu(key, cpu_infer)


@register_operator("cpu_mla_attention")
class CPUMLAAttention(_StoredProjections, MLAAttention):
    """mla_attention with q (or q_a/q_b), kv_a_proj_with_mqa and o as stored; kv_b_proj stays f32
    (absorbed into per-head matrices). kwargs: cpu_infer (threads of the shared pool)."""

    name: ClassVar[str] = "cpu_mla_attention"

    def __init__(self, *, key: str, orig_module, config, device, cpu_infer: int | None = None, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self._init_cpu(key, cpu_infer)


@register_operator("cpu_gated_deltanet")
class CPUGatedDeltaNet(_StoredProjections, GatedDeltaNet):
    """gated_deltanet (Qwen3-Next, Qwen3.5) with its input and output projections as stored; the
    conv kernel, A_log, dt_bias and the output norm in f32. kwargs: cpu_infer (threads of the shared
    pool)."""

    name: ClassVar[str] = "cpu_gated_deltanet"

    def __init__(self, *, key: str, orig_module, config, device, cpu_infer: int | None = None, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self._init_cpu(key, cpu_infer)
