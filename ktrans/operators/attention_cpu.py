"""`cpu_gqa_attention` / `cpu_mla_attention`: the attention operators with their projection
matrices kept as the GGUF blocks they are stored in and run by the CPU linear kernels
(linear_cpu.QuantWeight), for all-CPU placements.

Everything else — rotary, the paged KV cache, the attention itself, and so every oracle — is the
parent operator's (attention_gqa.py / attention_mla.py): these subclasses only replace how a
projection is loaded (`_shapes` drops the projections from the parent's f32 parameters) and
applied (`_linear`). Norms, biases of the parent's own tensors and MLA's kv_b_proj halves (small,
used in einsums) stay f32. A decode-only step of a whole model of these operators can instead run
through the fused C++ step (cpu_decode.py), which reads the same QuantWeights.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ktrans.errors import KtransError
from ktrans.operators.attention_gqa import GQAAttention
from ktrans.operators.attention_mla import MLAAttention
from ktrans.operators.linear import param_bytes
from ktrans.operators.linear_cpu import PLACEMENT, QuantWeight, check_cpu_infer, cpu_pool, kernel_reads
from ktrans.operators.registry import register_operator


class _StoredProjections:
    """Mixin over an attention operator: projections named in PROJS held as QuantWeights."""

    PROJS: ClassVar[tuple[str, ...]] = ()
    placement = PLACEMENT

    def _init_cpu(self, key: str, cpu_infer) -> None:
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise KtransError(f"{key}: {self.name} computes in float32 on the CPU (got {self.device}, {self.dtype}); "
                              f"use the parent operator elsewhere")
        check_cpu_infer(key, cpu_infer)
        self.cpu_infer = cpu_infer
        self.qproj: dict[str, QuantWeight] = {}

    def _all_shapes(self) -> dict[str, tuple[int, ...]]:
        return super()._shapes()

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """The parent's f32 parameters: every tensor but the stored projections (and their biases)."""
        return {n: s for n, s in self._all_shapes().items() if n.rpartition(".")[0] not in self.PROJS}

    def _proj_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n.rpartition(".")[0]: s for n, s in self._all_shapes().items()
                if n.endswith(".weight") and n.rpartition(".")[0] in self.PROJS}

    def load_weights(self, weights) -> None:
        super().load_weights(weights)
        have = self._all_shapes()
        pool = cpu_pool(self.cpu_infer)
        self.qproj = {proj: QuantWeight.load(weights, f"{self.key}.{proj}.weight", shape, pool,
                                             bias=f"{self.key}.{proj}.bias" if f"{proj}.bias" in have else None)
                      for proj, shape in self._proj_shapes().items()}

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        probe = cls(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        total = param_bytes(list(probe._all_shapes().values()), torch.float32)
        if weights is not None:
            total = param_bytes(list(probe._shapes().values()), torch.float32)
            for name, shape in probe._all_shapes().items():
                proj = name.rpartition(".")[0]
                if proj in cls.PROJS and weights.has(f"{key}.{name}"):
                    info = weights.info(f"{key}.{name}")
                    stored = name.endswith(".weight") and kernel_reads(info.qtype, shape[-1])
                    total += info.nbytes if stored else param_bytes([shape], torch.float32)
        return {"cpu": total}

    def _linear(self, x: torch.Tensor, proj: str) -> torch.Tensor:
        return self.qproj[proj](x)


@register_operator("cpu_gqa_attention")
class CPUGQAAttention(_StoredProjections, GQAAttention):
    """gqa_attention with q/k/v/o as stored. kwargs: cpu_infer (threads of the shared pool)."""

    name: ClassVar[str] = "cpu_gqa_attention"
    PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, *, key: str, orig_module, config, device, cpu_infer: int | None = None, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self._init_cpu(key, cpu_infer)


@register_operator("cpu_mla_attention")
class CPUMLAAttention(_StoredProjections, MLAAttention):
    """mla_attention with q (or q_a/q_b), kv_a_proj_with_mqa and o as stored; kv_b_proj stays f32
    (absorbed into per-head matrices). kwargs: cpu_infer (threads of the shared pool)."""

    name: ClassVar[str] = "cpu_mla_attention"
    PROJS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")

    def __init__(self, *, key: str, orig_module, config, device, cpu_infer: int | None = None, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        self._init_cpu(key, cpu_infer)
