"""SafetensorsSource against transformers' own checkpoints: sharded per-expert files written by
`save_pretrained` read back as the fused transformers-5 parameters, bit for bit; FP8 e4m3 blocks
with weight_scale_inv; Mixtral's block_sparse_moe names; bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from ktrans.errors import KtransError
from ktrans.weights import open_weights
from ktrans.weights.safetensors_source import SafetensorsSource

SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                                     num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=16,
                                                     shared_expert_intermediate_size=24, num_experts=4,
                                                     num_experts_per_tok=2),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=16, num_local_experts=4),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(**SMALL, intermediate_size=48, moe_intermediate_size=16,
                                                         n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                                         topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                                                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                                         v_head_dim=8),
}


def _saved_model(tmp_path, arch, dtype=torch.bfloat16):
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]()).to(dtype)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_sharded_per_expert_checkpoint_reads_as_fused(tmp_path, arch):
    model = _saved_model(tmp_path, arch)
    assert (tmp_path / "model.safetensors.index.json").exists()
    src = open_weights(str(tmp_path), None)
    assert isinstance(src, SafetensorsSource)
    params = dict(model.named_parameters())
    assert set(params) <= set(src.names())
    for name, p in params.items():
        got = src.tensor(name, dtype=torch.bfloat16)
        assert got.shape == p.shape and torch.equal(got, p.detach()), name
        assert src.info(name).shape == tuple(p.shape) and src.info(name).qtype == "bf16"
    experts = model.model.layers[1].mlp.experts
    inter = experts.down_proj.shape[-1]
    gate = src.expert_stack(1, "gate")                     # [E, I, H] bf16 bytes
    up, down = src.expert_stack(1, "up"), src.expert_stack(1, "down")
    as_bf16 = lambda r: torch.from_numpy(r.data.view(np.int16).copy()).view(torch.bfloat16).reshape(r.shape)  # noqa: E731
    assert gate.shape == (4, inter, 32) and down.shape == (4, 32, inter)
    assert torch.equal(as_bf16(gate), experts.gate_up_proj[:, :inter].detach())
    assert torch.equal(as_bf16(up), experts.gate_up_proj[:, inter:].detach())
    assert torch.equal(as_bf16(down), experts.down_proj.detach())
    assert torch.equal(as_bf16(src.raw("model.layers.1.mlp.experts.gate_up_proj")), experts.gate_up_proj.detach())
    assert src.config().model_type == model.config.model_type


def _fp8_blocks(w: torch.Tensor, block=128):
    """Reference block quantizer: one scale per block so that max |w| maps to 448."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // block), -(-cols // block))
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = blk.abs().max().clamp(min=1e-8) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def _fp8_reference(q, scale, block=128):
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].float() * scale[i, j]
    return out


def test_fp8_block_weights(tmp_path):
    rows, cols, n_exp = 200, 300, 3                        # edge blocks on both dims
    tensors, ref = {}, {}
    for name in ["model.layers.0.self_attn.o_proj"] + [f"model.layers.0.mlp.experts.{e}.{p}_proj"
                                                        for e in range(n_exp) for p in ("gate", "up")]:
        q, s = _fp8_blocks(torch.randn(rows, cols))
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = q, s
        ref[name] = (q, s)
    for e in range(n_exp):
        q, s = _fp8_blocks(torch.randn(cols, rows))
        tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = q
        tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight_scale_inv"] = s
    tensors["model.norm.weight"] = torch.randn(cols).to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    src = SafetensorsSource(str(tmp_path))
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" not in src.names()
    o = src.tensor("model.layers.0.self_attn.o_proj.weight")
    assert torch.equal(o, _fp8_reference(*ref["model.layers.0.self_attn.o_proj"]))
    raw = src.raw("model.layers.0.self_attn.o_proj.weight")
    assert raw.qtype == "f8_e4m3" and raw.shape == (rows, cols)
    assert torch.equal(torch.from_numpy(raw.data.copy()).view(torch.float8_e4m3fn), ref["model.layers.0.self_attn.o_proj"][0])
    assert torch.equal(torch.from_numpy(src.scale_inv("model.layers.0.self_attn.o_proj.weight").data.copy())
                       .view(torch.float32), ref["model.layers.0.self_attn.o_proj"][1])
    gate_up = src.tensor("model.layers.0.mlp.experts.gate_up_proj")          # [E, 2I, H]
    want = torch.stack([torch.cat([_fp8_reference(*ref[f"model.layers.0.mlp.experts.{e}.{p}_proj"]) for p in ("gate", "up")])
                        for e in range(n_exp)])
    assert torch.equal(gate_up, want)
    stack = src.expert_stack(0, "up")
    assert stack.qtype == "f8_e4m3" and stack.shape == (n_exp, rows, cols)
    assert src.scale_inv("model.layers.0.mlp.experts.gate_up_proj").shape == (n_exp, 4, 3)
    assert src.scale_inv("model.norm.weight") is None


def test_mixtral_names_and_missing_expert(tmp_path):
    t = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": torch.randn(8, 4) for e in range(2) for w in ("w1", "w3")}
    t.update({f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": torch.randn(4, 8) for e in range(2)})
    t["model.layers.0.block_sparse_moe.gate.weight"] = torch.randn(2, 4)
    save_file(t, str(tmp_path / "model.safetensors"))
    src = SafetensorsSource(str(tmp_path))
    assert src.names() == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj",
                           "model.layers.0.mlp.gate.weight"]
    gu = src.tensor("model.layers.0.mlp.experts.gate_up_proj")
    assert torch.equal(gu[1, 8:], t["model.layers.0.block_sparse_moe.experts.1.w3.weight"])
    del t["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(KtransError, match=r"experts \[1\] have no up projection"):
        SafetensorsSource(str(tmp_path)).tensor("model.layers.0.mlp.experts.gate_up_proj")


def test_bad_checkpoints(tmp_path):
    save_file({"a.weight": torch.randn(4, 4)}, str(tmp_path / "model.safetensors"))
    blob = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[:-10])
    with pytest.raises(KtransError, match="model.safetensors: tensor 'a.weight': data .* outside the file"):
        SafetensorsSource(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(KtransError, match="not a safetensors file"):
        SafetensorsSource(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(blob)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    with pytest.raises(KtransError, match="lists shard 'gone.safetensors', which is missing"):
        SafetensorsSource(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(KtransError, match="no tensor for parameter 'b.weight'"):
        SafetensorsSource(str(tmp_path)).tensor("b.weight")
    with pytest.raises(KtransError, match="does not exist"):
        open_weights(str(tmp_path / "nope"), None)


def test_shape_mismatch_with_config(tmp_path):
    _saved_model(tmp_path, "qwen3_moe")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    src = SafetensorsSource(str(tmp_path))
    with pytest.raises(KtransError, match=r"tensor 'model.norm.weight' has shape \[32\], but the model config expects \[64\]"):
        src.tensor("model.norm.weight")


def test_fp8_block_size_from_config(tmp_path):
    cfg = CONFIGS["deepseek_v3"]().to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [64, 64]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    q, s = _fp8_blocks(torch.randn(100, 130), block=64)
    save_file({"extra.weight": q, "extra.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    src = SafetensorsSource(str(tmp_path))
    assert torch.equal(src.tensor("extra.weight"), _fp8_reference(q, s, block=64))
    cfg["quantization_config"]["weight_block_size"] = [128, 64]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KtransError, match=r"weight_block_size \[128, 64\] is not square"):
        SafetensorsSource(str(tmp_path)).tensor("extra.weight")


@pytest.mark.parametrize("header,msg", [
    ([1, 2], "a JSON object was expected"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "malformed header entry"),
    ({"a": {"dtype": 3, "shape": [2], "data_offsets": [0, 8]}}, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}}, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, r"-8 bytes for F32 shape \[2\], expected 8"),
    ({"a": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, r"data \[0, 256\) lies outside the file"),
    ({"a": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}, "has dtype I64; expected F32, F16, BF16"),
])
def test_malformed_headers(tmp_path, header, msg):
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(64))
    with pytest.raises(KtransError, match=msg) as e:
        src = SafetensorsSource(str(tmp_path))
        src.tensor("a")
    assert "model.safetensors" in str(e.value)
