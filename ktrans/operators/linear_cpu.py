"""`cpu_linear` and `cpu_embedding`: dense weights on the CPU kept as the GGUF blocks they are
stored in, read in place from the file mapping (nothing dequantized or copied at load).

`cpu_linear` runs y = x Wᵀ (+ b) in ktrans's C++ kernels (csrc/linear/): the same vec_dot /
multi-token dots as the CPU experts, with x quantized per row to the format's activation type
(q8_0 / q8_K) as llama.cpp does, and on AMX CPUs a bf16 tile GEMM for many tokens (prefill).
`cpu_embedding` dequantizes only the rows of the tokens looked up (and scales them where the
model's embedding module does: Gemma 3 multiplies by sqrt(hidden_size)).

`QuantWeight` is the shared piece: attention operators that own their projections hold them as
QuantWeights too (attention_cpu.py). Formats the kernels lack (e.g. FP8 safetensors) are
dequantized to f32 at load and run through the same kernels as f32 rows.

Oracles (`forward_native`): plain torch over the weights dequantized by gguf-py's own numpy
code, so the C++ dequantizers are not part of the reference.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ktrans.errors import KtransError
from ktrans.operators.base import Operator
from ktrans.operators.registry import register_operator

# Stored formats the C++ linear reads directly (quant/quant.h).
KERNEL_QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q2_k", "q3_k", "iq4_xs")
# Values per block (weights and their activation format alike): 1 for the float formats, 32 for
# q4_0/q5_0/q8_0 (q8_0 activations), 256 for the K-quants and iq4_xs (q8_K activations).
_BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_0": 32, "q5_0": 32}
PLACEMENT = (torch.device("cpu"), torch.float32)


def cpu_pool(cpu_infer: int | None):
    """The owned thread pool shared with the CPU experts (one pool per process and size)."""
    from ktrans.operators.experts import default_threads, shared_pool

    return shared_pool(cpu_infer or default_threads(), 0)


def check_cpu_infer(key: str, cpu_infer) -> None:
    if cpu_infer is not None and (not isinstance(cpu_infer, int) or cpu_infer < 1):
        raise KtransError(f"{key}: cpu_infer must be a positive number of threads, got {cpu_infer!r}")


def kernel_reads(qtype: str, k: int) -> bool:
    """Whether the C++ linear computes from `qtype` rows of `k` values as stored."""
    return qtype in KERNEL_QTYPES and k % _BLOCK.get(qtype, 256) == 0


def gguf_dequantize(raw) -> torch.Tensor:
    """f32 [*shape] of stored rows, by gguf-py's numpy dequantizers (the oracle's weights)."""
    import gguf

    if raw.qtype == "f32":
        return torch.from_numpy(np.ascontiguousarray(raw.data).view(np.float32).reshape(raw.shape).copy())
    qt = gguf.GGMLQuantizationType[raw.qtype.upper()]
    out = gguf.quants.dequantize(np.ascontiguousarray(raw.data).reshape(-1), qt)
    return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(raw.shape).copy())


class QuantWeight:
    """One weight matrix [N, K] as stored, with its C++ linear layer over it."""

    def __init__(self, raw, bias: torch.Tensor | None, pool, where: str):
        from ktrans import _C

        n, k = int(raw.shape[0]), int(raw.shape[-1])
        self.shape, self.where = (n, k), where
        self.raw = raw                                            # keeps the mapping alive
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()    # [N]
        try:
            self.lin = _C.Linear(pool, raw.qtype, n, k, np.ascontiguousarray(raw.data).reshape(-1),
                                 None if self.bias is None else self.bias.numpy())
        except ValueError as e:
            raise KtransError(f"{where}: {e}") from None
        self._native: torch.Tensor | None = None

    @classmethod
    def load(cls, weights, name: str, shape: tuple[int, int], pool, bias: str | None = None,
             source: str | None = None) -> "QuantWeight":
        """`name` [N, K] (read from `source`, e.g. the tied embedding, when given) and its
        optional bias parameter `bias`; KtransError when the shape is not what the config implies."""
        src = source or name
        info = weights.info(src)
        if tuple(info.shape) != tuple(shape):
            raise KtransError(f"{weights!r}: tensor '{src}' has shape {list(info.shape)}, the config implies "
                              f"{list(shape)} for '{name}'; do the weights belong to this model?")
        if kernel_reads(info.qtype, shape[1]):
            raw = weights.raw(src)
        else:  # e.g. FP8 with block scales, or rows the activation blocks do not divide: f32 rows
            from ktrans.weights.source import RawTensor

            t = weights.tensor(src, dtype=torch.float32).contiguous()
            raw = RawTensor("f32", tuple(t.shape), t.numpy().view(np.uint8).reshape(shape[0], -1))
        b = weights.tensor(bias, dtype=torch.float32) if bias and weights.has(bias) else None
        if b is not None and tuple(b.shape) != (shape[0],):
            raise KtransError(f"{weights!r}: bias '{bias}' has shape {list(b.shape)}, expected [{shape[0]}]")
        return cls(raw, b, pool, where=name)

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] float32, through the C++ kernels."""
        n, k = self.shape
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32 or not x2.is_contiguous() or x2.device.type != "cpu":
            x2 = x2.to("cpu", torch.float32).contiguous()
        out = torch.empty(x2.shape[0], n, dtype=torch.float32)                          # [T, N]
        try:
            self.lin.forward(x2.numpy(), out.numpy())
        except ValueError as e:
            raise KtransError(f"{self.where}: {e}") from None
        return out.view(*x.shape[:-1], n)

    def dequantized(self) -> torch.Tensor:
        """f32 [N, K] by gguf-py's dequantizers (cached: the oracle only)."""
        if self._native is None:
            self._native = gguf_dequantize(self.raw).reshape(self.shape)
        return self._native

    def native(self, x: torch.Tensor) -> torch.Tensor:
        """Plain-torch oracle of __call__."""
        return F.linear(x.to("cpu", torch.float32), self.dequantized(), self.bias)


@register_operator("cpu_linear")
class CPULinear(Operator):
    """nn.Linear with its weight as stored, on the CPU kernels; f32 in and out.

    kwargs: cpu_infer (threads of the shared pool; default: the CPU experts' default)."""

    name: ClassVar[str] = "cpu_linear"
    placement = PLACEMENT          # device and dtype its inputs go to (no float parameters to read it from)

    def __init__(self, *, key: str, orig_module, config, device, cpu_infer: int | None = None, **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        if not isinstance(orig_module, torch.nn.Linear):
            raise KtransError(f"{key}: cpu_linear replaces torch.nn.Linear, got {type(orig_module).__name__}")
        if self.device.type != "cpu":
            raise KtransError(f"{key}: cpu_linear runs on the CPU, not {self.device}; use 'linear' there")
        check_cpu_infer(key, cpu_infer)
        self.in_features, self.out_features = orig_module.in_features, orig_module.out_features
        self.has_bias = orig_module.bias is not None
        self.cpu_infer = cpu_infer
        self.qweight: QuantWeight | None = None

    def _source(self, weights) -> str:
        """The stored tensor: the module's own, or the input embeddings' when lm_head is tied."""
        from ktrans.operators.linear import tied_source

        return tied_source(weights, self.key, self.config)

    def load_weights(self, weights) -> None:
        self.qweight = QuantWeight.load(weights, f"{self.key}.weight", (self.out_features, self.in_features),
                                        cpu_pool(self.cpu_infer), bias=f"{self.key}.bias" if self.has_bias else None,
                                        source=self._source(weights))

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        n, k = orig_module.out_features, orig_module.in_features
        total = 4 * n * k
        if weights is not None:
            probe = cls(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
            src = probe._source(weights)
            if weights.has(src):
                info = weights.info(src)
                total = info.nbytes if kernel_reads(info.qtype, k) else 4 * n * k
        return {"cpu": total + (4 * n if orig_module.bias is not None else 0)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.native(x)


@register_operator("cpu_embedding")
class CPUEmbedding(Operator):
    """nn.Embedding with its table as stored; a lookup dequantizes only the rows asked for.

    kwargs: dtype (auto = f32): the dtype the model's hidden states start in. The rows come out
    in it, and a scaled embedding's factor (Gemma 3's sqrt(hidden_size), the module's
    `scalar_embed_scale`) is rounded to it first, as transformers' model in that dtype rounds it
    (bf16: sqrt(3072) = 55.4256 becomes 55.5)."""

    name: ClassVar[str] = "cpu_embedding"
    placement = PLACEMENT

    def __init__(self, *, key: str, orig_module, config, device, dtype="auto", **kwargs):
        super().__init__(key=key, orig_module=orig_module, config=config, device=device, **kwargs)
        from ktrans.operators.linear import resolve_dtype

        if not isinstance(orig_module, torch.nn.Embedding):
            raise KtransError(f"{key}: cpu_embedding replaces torch.nn.Embedding, got {type(orig_module).__name__}")
        if self.device.type != "cpu":
            raise KtransError(f"{key}: cpu_embedding keeps its table in CPU RAM, not on {self.device}")
        self.num_embeddings, self.embedding_dim = orig_module.num_embeddings, orig_module.embedding_dim
        self.dtype = resolve_dtype(dtype, self.device)
        scale = getattr(orig_module, "scalar_embed_scale", None)
        # NOTE: the factor as a float32 tensor of the out dtype's value (f32 multiply below).
        self.scale = None if scale is None else torch.tensor(scale).to(self.dtype).float()
        self.raw = None
        self._native: torch.Tensor | None = None

    def load_weights(self, weights) -> None:
        name = f"{self.key}.weight"
        info = weights.info(name)
        if tuple(info.shape) != (self.num_embeddings, self.embedding_dim):
            raise KtransError(f"{weights!r}: tensor '{name}' has shape {list(info.shape)}, the config implies "
                              f"{[self.num_embeddings, self.embedding_dim]}")
        if info.qtype in KERNEL_QTYPES:
            self.raw = weights.raw(name)
        else:
            from ktrans.weights.source import RawTensor

            t = weights.tensor(name, dtype=torch.float32).contiguous()
            self.raw = RawTensor("f32", tuple(t.shape), t.numpy().view(np.uint8).reshape(t.shape[0], -1))

    @classmethod
    def planned_bytes(cls, *, key, orig_module, config, device, kwargs, weights) -> dict[str, int]:
        name = f"{key}.weight"
        n = orig_module.num_embeddings * orig_module.embedding_dim
        if weights is not None and weights.has(name) and weights.info(name).qtype in KERNEL_QTYPES:
            return {"cpu": weights.info(name).nbytes}
        return {"cpu": 4 * n}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from ktrans.weights import quant

        ids = input_ids.reshape(-1).to("cpu").numpy()
        rows = self.raw.data.reshape(self.num_embeddings, -1)[ids]                        # [T, row_bytes] copy
        out = quant.dequantize(rows, self.raw.qtype, (len(ids), self.embedding_dim))
        return self._scaled(torch.from_numpy(out).view(*input_ids.shape, self.embedding_dim))

    def forward_native(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._native is None:
            self._native = gguf_dequantize(self.raw).reshape(self.num_embeddings, self.embedding_dim)
        return self._scaled(F.embedding(input_ids.to("cpu"), self._native))

    def _scaled(self, rows: torch.Tensor) -> torch.Tensor:
        """f32 rows times the embedding scale (if any), in the operator's dtype. The f32 product of
        two values of that dtype rounded once is what transformers' multiply in it gives."""
        if self.scale is not None:
            rows = rows.to(self.dtype).float() * self.scale
        return rows.to(self.dtype)
