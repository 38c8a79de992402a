"""GGUFSource: every transformers parameter of each architecture read back from a GGUF written
through the name tables, compared with gguf's own reader + numpy dequantization (the oracle) and,
for f32, with the model itself bit for bit; legacy layouts; zero-copy expert stacks; errors."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers

from gguf_testutil import model_to_gguf, write_gguf
from ktrans.errors import KtransError
from ktrans.weights import names, open_weights
from ktrans.weights.gguf_source import GGUFSource

SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
MOE = dict(intermediate_size=96, moe_intermediate_size=32, num_experts_per_tok=2)
MLA = dict(n_routed_experts=4, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
           qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_shared_experts=1)
DELTANET = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4, full_attention_interval=2)
ARCHS = {  # ktrans arch -> (gguf arch, config)
    "deepseek_v3": ("deepseek2", lambda: transformers.DeepseekV3Config(**SMALL, **MOE, **MLA, q_lora_rank=32)),
    "deepseek_v2": ("deepseek2", lambda: transformers.DeepseekV2Config(**SMALL, **MOE, **MLA, q_lora_rank=None)),
    "qwen3_moe": ("qwen3moe", lambda: transformers.Qwen3MoeConfig(**SMALL, **MOE, head_dim=32, num_experts=4)),
    "qwen2_moe": ("qwen2moe", lambda: transformers.Qwen2MoeConfig(**SMALL, **MOE, num_experts=4,
                                                                  shared_expert_intermediate_size=64)),
    "mixtral": ("llama", lambda: transformers.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=4)),
    "qwen2": ("qwen2", lambda: transformers.Qwen2Config(**SMALL, intermediate_size=96)),
    "llama": ("llama", lambda: transformers.LlamaConfig(**SMALL, intermediate_size=96)),
    "glm4_moe": ("glm4moe", lambda: transformers.Glm4MoeConfig(
        **SMALL, **MOE, head_dim=32, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
        use_qk_norm=True, attention_bias=True)),
    "minimax_m2": ("minimax-m2", lambda: transformers.MiniMaxM2Config(
        **SMALL, intermediate_size=32, head_dim=32, rotary_dim=16, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=1, eos_token_id=2)),
    # Gemma 3: every norm stored as 1 + w (norm_shift), the head tied to the embeddings
    "gemma3": ("gemma3", lambda: transformers.Gemma3TextConfig(**SMALL, intermediate_size=96, head_dim=32,
                                                               sliding_window=4)),
    # Qwen3-Next / Qwen3.5: a Gated DeltaNet layer (in_proj_qkvz split into attn_qkv + attn_gate;
    # Qwen3.5's value heads reordered grouped -> tiled, out_proj's columns too, which q8_0 rows
    # cannot keep) and a gated full-attention layer; 1 + w norms; A stored as -exp(A_log).
    "qwen3_next": ("qwen3next", lambda: transformers.Qwen3NextConfig(
        **SMALL, **MOE, head_dim=32, num_experts=4, shared_expert_intermediate_size=64, **DELTANET)),
    "qwen3_5_moe": ("qwen35moe", lambda: transformers.Qwen3_5MoeTextConfig(
        **SMALL, moe_intermediate_size=32, num_experts_per_tok=2, head_dim=32, num_experts=4,
        shared_expert_intermediate_size=64, **DELTANET)),
}


def _model(tmp_path, arch):
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch][1]())
    with torch.no_grad():                                 # norms/biases start constant: randomize them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    return model


def _oracle(path, src: GGUFSource, name: str) -> np.ndarray:
    """HF tensor from gguf's own reader and numpy dequantization, through names.gguf_to_hf."""
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    entry = {hf: (g, tr) for hf, g, tr in names.expand(src.config(), src.arch)}[name]
    parts = [gguf.quants.dequantize(np.asarray(stored[g].data), stored[g].tensor_type).reshape(
        tuple(int(d) for d in reversed(stored[g].shape))) for g in entry[0]]
    return names.gguf_to_hf(entry[1], parts, src.config())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_all_parameters_match(tmp_path, arch):
    model = _model(tmp_path, arch)
    saved = model.state_dict()               # (persistent buffers only: not Gemma's embed_scale)
    params = {**dict(model.named_parameters()),
              **{n: b for n, b in model.named_buffers() if "rotary" not in n and n in saved}}
    for qtype in ("f32", "q8_0"):
        path = model_to_gguf(model, tmp_path / f"{qtype}.gguf", ARCHS[arch][0], qtype)
        src = open_weights(str(tmp_path), str(path))
        assert isinstance(src, GGUFSource) and set(src.names()) == set(params)
        transform = {hf: tr for hf, _, tr in names.expand(src.config(), src.arch)}
        for name, p in params.items():
            got = src.tensor(name)
            assert got.dtype == torch.float32 and got.shape == p.shape, name
            if qtype == "f32" and transform[name] == "norm_shift":
                # NOTE: the file holds 1 + w in f32 (Gemma's norms, as llama.cpp writes them): the
                # w read back may differ in its last bits, the scale 1 + w the norm applies does not
                assert torch.equal(1 + got, 1 + p.detach().float()), name
            elif qtype == "f32" and transform[name].startswith("a_log"):
                # the file holds A = -exp(A_log); log() of it gives back an A_log whose exp (what the
                # layer uses) is A's within a few ulps
                torch.testing.assert_close(got.double().exp(), p.detach().double().exp(), rtol=5e-7, atol=0)
            elif qtype == "f32":
                assert torch.equal(got, p.detach().float()), name
            else:
                assert np.array_equal(got.numpy(), _oracle(path, src, name)), name
            assert src.info(name).shape == tuple(p.shape)


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral"])
@pytest.mark.parametrize("qtype", ["bf16", "q8_0"])
def test_legacy_layouts_read_like_current_ones(tmp_path, arch, qtype):
    model = _model(tmp_path, arch)
    new = GGUFSource(str(model_to_gguf(model, tmp_path / "new.gguf", ARCHS[arch][0], qtype)), hf_dir=str(tmp_path))
    old = GGUFSource(str(model_to_gguf(model, tmp_path / "old.gguf", ARCHS[arch][0], qtype, legacy=True)),
                     hf_dir=str(tmp_path))
    assert any(".ffn_gate.0.weight" in t for t in old.reader.tensors)
    assert old.names() == new.names()
    for name in new.names():
        a, b = old.tensor(name), new.tensor(name)
        if qtype == "q8_0" and "kv_b_proj" in name:
            # NOTE: attn_kv_b and attn_k_b are quantized along different axes, so they round
            # differently: each is within one q8_0 step (amax/127 of its 32-value block) of HF.
            assert (a - b).abs().max() <= 2 * b.abs().max() / 127, name
        else:
            assert torch.equal(a, b), name
    for proj in ("gate", "up", "down"):
        a, b = old.expert_stack(1, proj), new.expert_stack(1, proj)
        assert (a.qtype, a.shape) == (b.qtype, b.shape) == (qtype, a.shape) and np.array_equal(a.data, b.data)
    if arch == "deepseek_v3":                               # unsplit attn_kv_b keeps its quant type
        assert old.raw("model.layers.0.self_attn.kv_b_proj.weight").qtype == qtype


def test_expert_stack_is_zero_copy_and_raw_keeps_quant(tmp_path):
    model = _model(tmp_path, "qwen3_moe")
    src = GGUFSource(str(model_to_gguf(model, tmp_path / "m.gguf", "qwen3moe", "q8_0")), hf_dir=str(tmp_path))
    mm = src.reader.files[0]._buf
    inter, hidden = 32, 64
    for proj, shape in (("gate", (4, inter, hidden)), ("up", (4, inter, hidden)), ("down", (4, hidden, inter))):
        r = src.expert_stack(0, proj)
        assert r.qtype == "q8_0" and r.shape == shape and np.shares_memory(r.data, mm)
        assert r.data.shape == shape[:-1] + (shape[-1] // 32 * 34,)
    gate_up = src.raw("model.layers.0.mlp.experts.gate_up_proj")            # [E, 2I, H] q8_0 rows
    assert gate_up.qtype == "q8_0" and gate_up.shape == (4, 2 * inter, hidden)
    assert np.array_equal(gate_up.data[:, :inter], src.expert_stack(0, "gate").data)
    assert np.shares_memory(src.raw("model.layers.1.self_attn.o_proj.weight").data, mm)
    with pytest.raises(KtransError, match="not one of gate, up, down"):
        src.expert_stack(0, "w1")
    with pytest.raises(KtransError, match="no routed experts"):
        src.expert_stack(7, "gate")


def test_missing_tensor_names_parameter_and_gguf_tensor(tmp_path):
    model = _model(tmp_path, "qwen2")
    path = model_to_gguf(model, tmp_path / "m.gguf", "qwen2", "f32")
    r = gguf.GGUFReader(str(path))
    keep = {t.name: np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape))) for t in r.tensors
            if t.name != "blk.1.attn_k.weight"}
    cut = write_gguf(tmp_path / "cut.gguf", keep, arch="qwen2", metadata={"qwen2.block_count": 2})
    src = GGUFSource(str(cut), hf_dir=str(tmp_path))
    assert not src.has("model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(KtransError, match=r"cut.gguf: parameter 'model.layers.1.self_attn.k_proj.weight' needs "
                                          r"GGUF tensor\(s\) blk.1.attn_k.weight"):
        src.tensor("model.layers.1.self_attn.k_proj.weight")


def test_config_mismatches(tmp_path):
    model = _model(tmp_path, "qwen2_moe")
    path = model_to_gguf(model, tmp_path / "m.gguf", "qwen2moe", "f32")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3, "layer_types": ["full_attention"] * 3}))
    with pytest.raises(KtransError, match=r"m.gguf: GGUF metadata 'qwen2moe.block_count' = 2, but .*config.json "
                                          r"has num_hidden_layers = 3"):
        GGUFSource(str(path), hf_dir=str(tmp_path)).names()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(KtransError, match=r"config.json: not a valid transformers config \(.*layer_types"):
        GGUFSource(str(path), hf_dir=str(tmp_path)).names()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 48}))
    src = GGUFSource(str(path), hf_dir=str(tmp_path))
    with pytest.raises(KtransError, match=r"m.gguf: tensor 'model.layers.0.mlp.experts.gate_up_proj' \(stored as "
                                          r"blk.0.ffn_gate_exps.weight \+ blk.0.ffn_up_exps.weight\) has shape \[4, 64, 64\], "
                                          r"but the model config expects \[4, 96, 64\]"):
        src.tensor("model.layers.0.mlp.experts.gate_up_proj")


def test_unsupported_architecture_and_quant_type(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", {"token_embd.weight": np.zeros((4, 32))}, arch="gemma2")
    with pytest.raises(KtransError, match="g.gguf: GGUF architecture 'gemma2' is not supported; ktrans reads: deepseek2"):
        GGUFSource(str(path))
    model = _model(tmp_path, "qwen2")
    path = model_to_gguf(model, tmp_path / "m.gguf", "qwen2", "f32")
    blob = bytearray(path.read_bytes())
    # Re-type blk.0.attn_output.weight ([64, 64] f32) as q8_1, which ktrans does not read; the
    # byte count shrinks, so the bytes after it stay in the file (no overlap).
    name = b"blk.0.attn_output.weight"
    at = blob.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 4 + 16
    blob[at:at + 4] = int(gguf.GGMLQuantizationType.Q8_1).to_bytes(4, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(blob))
    src = GGUFSource(str(path), hf_dir=str(tmp_path))
    assert src.info("model.layers.0.self_attn.o_proj.weight").qtype == "q8_1"
    with pytest.raises(KtransError, match=r"m.gguf: tensor 'blk.0.attn_output.weight' \(parameter "
                                          r"'model.layers.0.self_attn.o_proj.weight'\): unknown quant type 'q8_1'"):
        src.tensor("model.layers.0.self_attn.o_proj.weight")
