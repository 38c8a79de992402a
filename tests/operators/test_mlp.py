"""`gated_mlp` vs the transformers MLP it replaces (same weights): dense weights (gate and up
fused into one product), GGUF weights kept as stored (fused when gate and up share a type,
separate when they do not), and the errors it gives for modules it cannot replace."""

from __future__ import annotations

import pytest
import torch

from ktrans.errors import KtransError
from ktrans.operators.linear import DenseProjection, QuantProjection
from ktrans.operators.mlp import GatedMLP
from tests.operators.hf_tiny import model_source, tiny_hf_model
from tests.tolerances import F32_ATOL, F32_RTOL

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("arch,path", [("deepseek_v2", "model.layers.0.mlp"), ("llama", "model.layers.1.mlp"),
                                       ("qwen2_moe", "model.layers.1.mlp.shared_expert"),
                                       ("gemma3", "model.layers.1.mlp")])
def test_gated_mlp_matches_hf(arch, path):
    config, model = tiny_hf_model(arch)
    hf = model.get_submodule(path)
    op = GatedMLP(key=path, orig_module=hf, config=config, device="cpu")
    op.load_weights(model_source(model))
    assert isinstance(op.gate_up, DenseProjection) and set(op.projs) == {"down_proj"}
    x = torch.randn(5, config.hidden_size)
    with torch.no_grad():
        want = hf(x)
    torch.testing.assert_close(op(x), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)
    torch.testing.assert_close(op.forward_native(x), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


def test_gated_mlp_with_gguf_weights(tiny_model):
    """q4_k_m: gate/up stored as one K-quant type are fused and stay quantized; the output equals
    the same operator on the dequantized weights. (Triton's interpreter on a CPU-only machine.)"""
    from ktrans.config.arch import build_meta_model
    from ktrans.kernels import triton_available
    from ktrans.weights.source import open_weights

    if not triton_available():
        pytest.skip("needs Triton")
    src = open_weights(None, str(tiny_model("llama", "q4_k_m", with_safetensors=False) / "model.gguf"))
    config = src.config()
    key = "model.layers.1.mlp"
    hf = build_meta_model(config).get_submodule(key)
    ops = {}
    for mode in ("stored", "dense"):
        ops[mode] = GatedMLP(key=key, orig_module=hf, config=config, device=DEV, dtype="f32", weights=mode)
        ops[mode].load_weights(src)
    assert src.info(f"{key}.gate_proj.weight").qtype == src.info(f"{key}.up_proj.weight").qtype
    assert isinstance(ops["stored"].gate_up, QuantProjection)
    x = torch.randn(3, config.hidden_size, device=DEV)
    tol = 2e-3 if DEV == "cuda" else 1e-5
    torch.testing.assert_close(ops["stored"](x), ops["dense"](x), rtol=tol, atol=tol)
    planned = GatedMLP.planned_bytes(key=key, orig_module=hf, config=config, device=DEV,
                                     kwargs={"dtype": "f32", "weights": "stored"}, weights=src)
    held = sum(b.numel() * b.element_size() for b in ops["stored"].buffers())
    assert planned == {str(torch.device(DEV)): held}


def test_gated_mlp_refuses_other_modules():
    config, model = tiny_hf_model("llama")
    with pytest.raises(KtransError, match="gated_mlp replaces an MLP"):
        GatedMLP(key="model.layers.0.self_attn", orig_module=model.model.layers[0].self_attn, config=config,
                 device="cpu")
    config.hidden_act = "relu"
    with pytest.raises(KtransError, match="activation is 'relu'"):
        GatedMLP(key="model.layers.0.mlp", orig_module=model.model.layers[0].mlp, config=config, device="cpu")


def test_unfused_path_and_what_does_not_fuse(monkeypatch):
    """Projections of different formats are not concatenated, and the operator then runs gate
    and up as two products (checked against transformers with the fusion turned off)."""
    from ktrans.kernels.quant_matmul import pack
    from ktrans.operators import linear, mlp
    from ktrans.weights import quant

    w = torch.randn(4, 256).numpy()
    q8 = QuantProjection("q8_0", pack("q8_0", quant.quantize(w, "q8_0"), 4, 256), (4, 256), None, torch.float32)
    q4 = QuantProjection("q4_k", pack("q4_k", quant.quantize(w, "q4_k"), 4, 256), (4, 256), None, torch.float32)
    dense = DenseProjection(torch.randn(4, 256), None)
    assert linear.concat_projections(q8, q4) is None and linear.concat_projections(q8, dense) is None
    assert linear.concat_projections(q8, q8).out_features == 8
    config, model = tiny_hf_model("deepseek_v2")
    hf = model.model.layers[0].mlp
    monkeypatch.setattr(mlp, "concat_projections", lambda a, b: None)
    op = GatedMLP(key="model.layers.0.mlp", orig_module=hf, config=config, device="cpu")
    op.load_weights(model_source(model))
    assert op.gate_up is None and set(op.projs) == {"gate_proj", "up_proj", "down_proj"}
    x = torch.randn(5, config.hidden_size)
    with torch.no_grad():
        want = hf(x)
    torch.testing.assert_close(op(x), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)
    torch.testing.assert_close(op.forward_native(x), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)
