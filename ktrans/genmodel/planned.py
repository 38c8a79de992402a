"""PlannedSource: the tensors `ktrans gen-model` would write for a config and a --quant choice, as
a WeightSource that holds no data — for planning ("will it fit?") before any download.

Its tensor list, HF shapes and per-tensor stored types come from the same code that writes the
files (genmodel.plan.build_plan, whose types are gguf_out.tensor_qtype: a plain type or llama.cpp's
Q4_K_M mix), and bytes from ktrans.weights.quant.row_bytes, so operators' planned_bytes() give the
bytes they would give on the generated GGUF. Anything that would read data raises a KtransError.

NOTE: for the real models' configs (presets, or a downloaded config.json) the types are those of
gen-model's recipe; a published GGUF made by another tool may choose a few tensors differently.
"""

from __future__ import annotations

from ktrans.config.arch import arch_from_config, get_arch
from ktrans.errors import KtransError
from ktrans.genmodel.gguf_out import nbytes
from ktrans.genmodel.plan import build_plan
from ktrans.genmodel.presets import QUANT_CHOICES, preset_config
from ktrans.weights import names
from ktrans.weights.gguf_source import raw_format
from ktrans.weights.source import RawTensor, TensorInfo, WeightSource


def check_quant(quant: str) -> str:
    if quant not in QUANT_CHOICES:
        raise KtransError(f"unknown quant '{quant}'; expected one of: {', '.join(QUANT_CHOICES)}")
    return quant


class PlannedSource(WeightSource):
    """Tensor infos of the GGUF gen-model writes for `config` and `quant`; no tensor data."""

    def __init__(self, config, quant: str, *, label: str = ""):
        self.quant = check_quant(quant)
        self._cfg = config
        spec = arch_from_config(config)
        self.path = label or f"planned {spec.name} {quant} weights"
        units = build_plan(config, spec.gguf_arch, quant, self.expected_shapes())
        stored = {g: (shape, qtype) for u in units for g, shape, qtype in u.gguf}   # GGUF name -> (shape, type)
        # NOTE: the file also holds blocks ktrans does not load (GLM-4.5's MTP layer): counted in
        # total_bytes, not among the tensors.
        self._file_bytes = sum(nbytes(q, shape) for shape, q in stored.values())
        self._infos, self._raw_qtypes = {}, {}
        for hf, gnames, transform in names.expand(config, spec.gguf_arch):
            parts = [stored[g] for g in gnames]
            self._infos[hf] = self._info(hf, parts)
            self._raw_qtypes[hf] = raw_format(transform, {q for _, q in parts})

    @classmethod
    def from_preset(cls, arch: str, preset: str, quant: str, layers: int | None = None) -> "PlannedSource":
        """The model `ktrans gen-model --arch ARCH --preset PRESET --quant QUANT` writes."""
        import transformers

        get_arch(arch)
        check_quant(quant)
        cfg = preset_config(arch, preset, layers)
        if cfg.get("vocab_size") is None:                 # tiny/small: the generated tokenizer's size
            from ktrans.genmodel.tokenizer import trained_vocab_size

            cfg["vocab_size"] = trained_vocab_size(arch, preset)
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return cls(config, quant, label=f"planned {arch} {preset} {quant} weights")

    def _info(self, hf: str, parts: list[tuple[tuple[int, ...], str]]) -> TensorInfo:
        # NOTE: as GGUFSource.info: one type, or the sorted types of the parts ("q4_k+q5_0" for
        # DeepSeek's kv_b_proj stored as attn_k_b + attn_v_b), bytes summed over the parts.
        qtypes = sorted({q for _, q in parts})
        return TensorInfo(hf, "+".join(qtypes), self.expected_shapes()[hf],
                          sum(nbytes(q, shape) for shape, q in parts), self.path)

    # ---- WeightSource ----

    def config(self):
        return self._cfg

    def names(self) -> list[str]:
        return list(self._infos)

    def has(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        info = self._infos.get(name)
        if info is None:
            raise self.missing(name)
        return info

    def raw_qtype(self, name: str) -> str:
        self.info(name)                                   # a name it does not hold is named
        return self._raw_qtypes[name]

    def total_bytes(self) -> int:
        """Bytes of tensor data the GGUF would hold."""
        return self._file_bytes

    def _no_data(self, what: str) -> KtransError:
        return KtransError(f"{self.path}: planning only: no weights ({what} was planned from the config, "
                           f"not read; load a real GGUF or safetensors model to run it)")

    def raw(self, name: str) -> RawTensor:
        raise self._no_data(f"tensor '{name}'")

    def tensor(self, name: str, dtype=None, device="cpu"):
        raise self._no_data(f"tensor '{name}'")

    def expert_stack(self, layer: int, proj: str) -> RawTensor:
        raise self._no_data(f"the layer {layer} {proj} experts")
