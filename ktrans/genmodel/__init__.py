"""Random model factory behind `ktrans gen-model`: config, tokenizer, GGUF and safetensors of any
supported architecture, from tiny test shapes to the real models' shapes."""

from ktrans.genmodel.generate import generate_model
from ktrans.genmodel.presets import PRESETS, preset_names

__all__ = ["generate_model", "PRESETS", "preset_names"]
