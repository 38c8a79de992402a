"""Weights: GGUF and safetensors readers, quant formats, GGUF <-> transformers name tables.

Entry point: `open_weights(model_path, gguf_path)` returns a `WeightSource`.
"""

from ktrans.weights.source import RawTensor, TensorInfo, WeightSource, open_weights

__all__ = ["RawTensor", "TensorInfo", "WeightSource", "open_weights"]
