"""`ktrans gen-model`: every architecture's files load in transformers and gguf, the GGUF and the
safetensors hold the same weights, quant types follow llama.cpp's rules, bad input fails cleanly.

References are the libraries themselves: transformers (AutoConfig, AutoTokenizer,
AutoModelForCausalLM with its own per-expert checkpoint conversion) and gguf-py (GGUFReader and
its numpy dequantization).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tolerances import QUANT_NMSE

from ktrans.cli.main import main as cli_main
from ktrans.config.arch import ARCHS
from ktrans.errors import KtransError
from ktrans.genmodel import generate_model
from ktrans.genmodel.gguf_out import tensor_qtype
from ktrans.weights import names

ALL_ARCHS = list(ARCHS)
TEXT = "Hello, world! 你好，世界。こんにちは 🚀🔥 naïve café ∑x² <think>hmm</think>"


def _gguf_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _np_shape(t) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(t.shape))


def _dequant(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(_np_shape(t))


def _hf_from_gguf(cfg, arch: str, tensors: dict) -> dict[str, np.ndarray]:
    """transformers-5 parameter name -> weights rebuilt from the GGUF with gguf-py's dequantization."""
    return {hf: names.gguf_to_hf(tr, [_dequant(tensors[g]) for g in gn], cfg)
            for hf, gn, tr in names.expand(cfg, ARCHS[arch].gguf_arch)}


def _load_st(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(path).items()}


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_arch_files_load_and_agree(tiny_model, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers import CONFIG_MAPPING

    d = tiny_model(arch)
    spec = ARCHS[arch]
    cfg = AutoConfig.from_pretrained(d)
    assert type(cfg) is CONFIG_MAPPING[spec.model_type]
    reader = gguf.GGUFReader(d / "model.gguf")
    ga = spec.gguf_arch
    assert _field(reader, "general.architecture") == ga
    mtp = names.num_mtp_layers(cfg, ga)                       # GLM-4.5's MTP block, after the main layers
    assert _field(reader, f"{ga}.block_count") == cfg.num_hidden_layers + mtp
    for key, attr in [("embedding_length", "hidden_size"), ("attention.head_count", "num_attention_heads"),
                      ("context_length", "max_position_embeddings")]:
        assert _field(reader, f"{ga}.{key}") == getattr(cfg, attr), key
    if spec.is_moe:
        assert _field(reader, f"{ga}.expert_count") == names.num_experts(cfg)
        assert _field(reader, f"{ga}.expert_used_count") == cfg.num_experts_per_tok
    tokens = _field(reader, "tokenizer.ggml.tokens")
    # byte-level BPE, or sentencepiece (Gemma 3) with its scores and <0xXX> byte pieces
    spm = _field(reader, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == cfg.vocab_size and _field(reader, "tokenizer.ggml.model") in ("gpt2", "llama")
    assert spm == ("<0x0A>" in tokens) == ("tokenizer.ggml.scores" in reader.fields)
    ends = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")
            if f"tokenizer.ggml.{k}_token_id" in reader.fields]       # (GLM: end of turn / message too)
    # Gemma's <end_of_turn>: no eot id in the file, llama.cpp knows it by its text
    ends += [tokens.index("<end_of_turn>")] if "<end_of_turn>" in tokens else []
    assert ends == (cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])
    assert "{%" in _field(reader, "tokenizer.chat_template")

    tensors = {t.name: t for t in reader.tensors}
    expected = names.expand(cfg, ga, mtp=True)
    assert set(tensors) == {g for _, gn, _ in expected for g in gn}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())

    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info
    # the MTP block is in the checkpoint (as released) but not in transformers' model
    mtp_layers = tuple(f"model.layers.{i}." for i in range(cfg.num_hidden_layers, cfg.num_hidden_layers + mtp))
    assert all(k.startswith(mtp_layers) for k in info["unexpected_keys"]) if mtp else not info["unexpected_keys"], info
    assert bool(info["unexpected_keys"]) == bool(mtp)
    state = model.state_dict()
    for hf, w in _hf_from_gguf(cfg, arch, tensors).items():
        assert w.shape == tuple(state[hf].shape), hf
        np.testing.assert_array_equal(w, state[hf].numpy(), err_msg=hf)
    # Gemma's norms: the checkpoint holds w around 0 (the norm scales by 1 + w), the GGUF 1 + w,
    # as llama.cpp's converter writes them
    for hf, gn, tr in names.expand(cfg, ga):
        if tr == "norm_shift":
            w = state[hf].numpy()
            assert abs(float(w.mean())) < 0.1, hf
            np.testing.assert_array_equal(_dequant(tensors[gn[0]]), w + np.float32(1), err_msg=hf)

    ids = torch.randint(0, len(tokens), (1, 12))
    with torch.no_grad():
        logits = model(ids).logits[0]                          # [T, V]
    assert torch.isfinite(logits).all()
    assert (logits.std(-1) > 0.3).all() and (logits.std(-1) < 10).all()   # not degenerate, not exploding
    assert len(set(logits.argmax(-1).tolist())) > 1            # different tokens, different predictions


@pytest.mark.parametrize("quant", ["bf16", "f16", "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q4_k_m"])
def test_quant_gguf_matches_safetensors(tiny_model, quant):
    """DeepSeek-V3 tiny has every kind of tensor (MLA incl. 32-column k_b, dense + MoE, shared
    experts, router, score bias). The safetensors hold exactly what gguf-py dequantizes; both
    stay within the format's error of the f32 model generated from the same seed."""
    from transformers import AutoConfig

    d, ref = tiny_model("deepseek_v3", quant), tiny_model("deepseek_v3", "f32")
    cfg = AutoConfig.from_pretrained(d)
    tensors = _gguf_tensors(d / "model.gguf")
    want = (_expected_q4_k_m("deepseek_v3") if quant == "q4_k_m"
            else {name: _expected_single_type(name, len(t.shape), quant) for name, t in tensors.items()})
    assert {name: t.tensor_type.name.lower() for name, t in tensors.items()} == want
    st = _load_st(d / "model.safetensors")
    ref_st = _load_st(ref / "model.safetensors")
    assert set(st) == set(ref_st)
    kinds = {t.tensor_type.name.lower() for t in tensors.values()}
    assert {"f32", {"q4_k_m": "q4_k"}.get(quant, quant)} <= kinds, kinds
    if quant.startswith(("q4_k", "q5_k", "q6_k")):       # attn_k_b rows of 32: llama.cpp's fallback
        assert tensors["blk.0.attn_k_b.weight"].tensor_type.name.lower() in ("q5_0", "q8_0")
    for hf, w in _hf_from_gguf(cfg, "deepseek_v3", tensors).items():
        if ".experts." in hf:       # fused in transformers, per expert on disk
            proj = hf.rsplit(".", 1)[-1]
            parts = ["gate", "up"] if proj == "gate_up_proj" else ["down"]
            layer = hf.split(".mlp.")[0]
            disk = [np.concatenate([st[f"{layer}.mlp.experts.{e}.{p}_proj.weight"] for p in parts])
                    for e in range(w.shape[0])]
            got = np.stack(disk)
        else:
            got = st[hf]
        np.testing.assert_array_equal(got, w, err_msg=hf)
    for name, t in tensors.items():
        q, r = _dequant(t), ref_tensors(ref)[name]
        nmse = float(((q - r) ** 2).sum() / (r ** 2).sum())
        assert nmse <= QUANT_NMSE[t.tensor_type.name.lower()], (name, t.tensor_type.name, nmse)


_REF_CACHE: dict[Path, dict] = {}


def ref_tensors(d: Path) -> dict[str, np.ndarray]:
    if d not in _REF_CACHE:
        _REF_CACHE[d] = {n: _dequant(t) for n, t in _gguf_tensors(d / "model.gguf").items()}
    return _REF_CACHE[d]


# What llama.cpp's llama_tensor_get_type (src/llama-quant.cpp) picks, worked out by hand.
# Single-type choices are `llama-quantize --pure`: every 2-D/3-D weight in that type, except
# - 1-D tensors (norms, biases) and the routers (ffn_gate_inp) are never quantized: f32;
# - rows that are not whole blocks fall back (llama.cpp: q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0;
#   ktrans has no q5_1 and uses q8_0): in the tiny presets only DeepSeek's attn_k_b (32 columns).
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q8_0", "q6_k": "q8_0"}


def _expected_single_type(name: str, ndim: int, quant: str) -> str:
    if ndim == 1 or name.endswith("ffn_gate_inp.weight"):
        return "f32"
    if name.endswith("attn_k_b.weight"):
        return _FALLBACK.get(quant, quant)
    return quant


# Q4_K_M of the tiny presets: q4_k, but output.weight q6_k; attn_v and ffn_down (routed and shared
# experts too) q6_k in the layers use_more_bits(i, n) picks (i < n/8, i >= 7n/8 or (i - n/8) % 3
# == 2: layer 1 of 2, layer 2 of 3, layers 2 and 3 of 4); with 8 experts attn_k and attn_v q8_0 and
# attn_output q5_k; attn_k_b's 32 columns fall back to q5_0. GLM-4.5's MTP block counts as a layer
# (llama.cpp's n_layer_all). One entry per layer; None: no such tensor there.
_Q4_K_M = {
    "deepseek_v3": {                                            # 3 layers (0 dense), 8 experts
        "attn_q_a": ["q4_k"] * 3, "attn_q_b": ["q4_k"] * 3, "attn_kv_a_mqa": ["q4_k"] * 3,
        "attn_k_b": ["q5_0"] * 3, "attn_v_b": ["q4_k"] * 3, "attn_output": ["q5_k"] * 3,
        "ffn_gate": ["q4_k", None, None], "ffn_up": ["q4_k", None, None], "ffn_down": ["q4_k", None, None],
        "ffn_gate_exps": [None, "q4_k", "q4_k"], "ffn_up_exps": [None, "q4_k", "q4_k"],
        "ffn_down_exps": [None, "q4_k", "q6_k"], "ffn_gate_shexp": [None, "q4_k", "q4_k"],
        "ffn_up_shexp": [None, "q4_k", "q4_k"], "ffn_down_shexp": [None, "q4_k", "q6_k"],
        "ffn_gate_inp": [None, "f32", "f32"], "exp_probs_b.bias": [None, "f32", "f32"],
        "attn_norm": ["f32"] * 3, "ffn_norm": ["f32"] * 3, "attn_q_a_norm": ["f32"] * 3, "attn_kv_a_norm": ["f32"] * 3,
    },
    "qwen3_moe": {                                              # 2 layers, 8 experts
        "attn_q": ["q4_k"] * 2, "attn_k": ["q8_0"] * 2, "attn_v": ["q8_0"] * 2, "attn_output": ["q5_k"] * 2,
        "ffn_gate_exps": ["q4_k"] * 2, "ffn_up_exps": ["q4_k"] * 2, "ffn_down_exps": ["q4_k", "q6_k"],
        "ffn_gate_inp": ["f32"] * 2, "attn_q_norm": ["f32"] * 2, "attn_k_norm": ["f32"] * 2,
        "attn_norm": ["f32"] * 2, "ffn_norm": ["f32"] * 2,
    },
    "mixtral": {                                                # 2 layers, 4 experts
        "attn_q": ["q4_k"] * 2, "attn_k": ["q4_k"] * 2, "attn_v": ["q4_k", "q6_k"], "attn_output": ["q4_k"] * 2,
        "ffn_gate_exps": ["q4_k"] * 2, "ffn_up_exps": ["q4_k"] * 2, "ffn_down_exps": ["q4_k", "q6_k"],
        "ffn_gate_inp": ["f32"] * 2, "attn_norm": ["f32"] * 2, "ffn_norm": ["f32"] * 2,
    },
    "glm4_moe": {                                               # 3 layers (0 dense) + the MTP block, 8 experts
        "attn_q": ["q4_k"] * 4, "attn_k": ["q8_0"] * 4, "attn_v": ["q8_0"] * 4, "attn_output": ["q5_k"] * 4,
        "attn_q.bias": ["f32"] * 4, "attn_k.bias": ["f32"] * 4, "attn_v.bias": ["f32"] * 4,
        "attn_q_norm": ["f32"] * 4, "attn_k_norm": ["f32"] * 4, "attn_norm": ["f32"] * 4,
        "post_attention_norm": ["f32"] * 4,
        "ffn_gate": ["q4_k", None, None, None], "ffn_up": ["q4_k", None, None, None],
        "ffn_down": ["q4_k", None, None, None], "ffn_gate_exps": [None, "q4_k", "q4_k", "q4_k"],
        "ffn_up_exps": [None, "q4_k", "q4_k", "q4_k"], "ffn_down_exps": [None, "q4_k", "q6_k", "q6_k"],
        "ffn_gate_shexp": [None, "q4_k", "q4_k", "q4_k"], "ffn_up_shexp": [None, "q4_k", "q4_k", "q4_k"],
        "ffn_down_shexp": [None, "q4_k", "q6_k", "q6_k"], "ffn_gate_inp": [None, "f32", "f32", "f32"],
        "exp_probs_b.bias": [None, "f32", "f32", "f32"], "nextn.eh_proj": [None, None, None, "q4_k"],
        "nextn.enorm": [None, None, None, "f32"], "nextn.hnorm": [None, None, None, "f32"],
        "nextn.shared_head_norm": [None, None, None, "f32"],
    },
    # 4 layers (linear, full, linear, full), 8 experts: attn_qkv is an attn_v to llama.cpp (q8_0
    # with 8 experts); the DeltaNet's other matrices q4_k, its conv kernel and small tensors f32
    "qwen3_next": {
        "attn_qkv": ["q8_0", None, "q8_0", None], "attn_gate": ["q4_k", None, "q4_k", None],
        "ssm_ba": ["q4_k", None, "q4_k", None], "ssm_out": ["q4_k", None, "q4_k", None],
        "ssm_conv1d": ["f32", None, "f32", None], "ssm_norm": ["f32", None, "f32", None],
        "ssm_dt.bias": ["f32", None, "f32", None], "ssm_a": ["f32", None, "f32", None],
        "attn_q": [None, "q4_k", None, "q4_k"], "attn_k": [None, "q8_0", None, "q8_0"],
        "attn_v": [None, "q8_0", None, "q8_0"], "attn_output": [None, "q5_k", None, "q5_k"],
        "attn_q_norm": [None, "f32", None, "f32"], "attn_k_norm": [None, "f32", None, "f32"],
        "attn_norm": ["f32"] * 4, "post_attention_norm": ["f32"] * 4, "ffn_gate_inp": ["f32"] * 4,
        "ffn_gate_exps": ["q4_k"] * 4, "ffn_up_exps": ["q4_k"] * 4, "ffn_down_exps": ["q4_k", "q4_k", "q6_k", "q6_k"],
        "ffn_gate_shexp": ["q4_k"] * 4, "ffn_up_shexp": ["q4_k"] * 4,
        "ffn_down_shexp": ["q4_k", "q4_k", "q6_k", "q6_k"],
        "ffn_gate_inp_shexp": ["f32"] * 4,
    },
    "qwen2": {                                                  # 2 layers, dense
        "attn_q": ["q4_k"] * 2, "attn_k": ["q4_k"] * 2, "attn_v": ["q4_k", "q6_k"], "attn_output": ["q4_k"] * 2,
        "attn_q.bias": ["f32"] * 2, "attn_k.bias": ["f32"] * 2, "attn_v.bias": ["f32"] * 2,
        "ffn_gate": ["q4_k"] * 2, "ffn_up": ["q4_k"] * 2, "ffn_down": ["q4_k", "q6_k"],
        "attn_norm": ["f32"] * 2, "ffn_norm": ["f32"] * 2,
    },
}


def _expected_q4_k_m(arch: str) -> dict[str, str]:
    want = {"token_embd.weight": "q4_k", "output.weight": "q6_k", "output_norm.weight": "f32"}
    for tensor, per_layer in _Q4_K_M[arch].items():
        full = tensor if tensor.endswith(".bias") or tensor == "ssm_a" else f"{tensor}.weight"   # (ssm_a: no suffix)
        want.update({f"blk.{i}.{full}": t for i, t in enumerate(per_layer) if t is not None})
    return want


@pytest.mark.parametrize("arch", list(_Q4_K_M))
def test_q4_k_m_files_hold_llama_cpp_types(tiny_model, arch):
    """Every tensor of a generated Q4_K_M file has the type llama.cpp's quantizer gives it."""
    tensors = _gguf_tensors(tiny_model(arch, "q4_k_m", with_safetensors=False) / "model.gguf")
    assert {name: t.tensor_type.name.lower() for name, t in tensors.items()} == _expected_q4_k_m(arch)


def test_q4_k_m_follows_llama_cpp_recipe():
    """Layers that get q6_k ffn_down / attn_v in a 32-layer Q4_K_M model (llama.cpp's
    use_more_bits: first and last 4, then every third from layer 6)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen2", num_hidden_layers=32, hidden_size=512, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=1000)
    q6 = [i for i in range(32) if tensor_qtype(f"blk.{i}.ffn_down.weight", (512, 1024), "q4_k_m", cfg) == "q6_k"]
    assert q6 == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_qtype("blk.5.attn_v.weight", (128, 512), "q4_k_m", cfg) == "q4_k"
    assert tensor_qtype("blk.6.attn_v.weight", (128, 512), "q4_k_m", cfg) == "q6_k"
    assert tensor_qtype("output.weight", (1000, 512), "q4_k_m", cfg) == "q6_k"
    assert tensor_qtype("blk.5.ffn_gate.weight", (1024, 512), "q4_k_m", cfg) == "q4_k"
    assert tensor_qtype("blk.5.attn_norm.weight", (512,), "q4_k_m", cfg) == "f32"
    assert tensor_qtype("blk.5.ffn_down.weight", (512, 1408), "q4_k", cfg) == "q5_0"    # 1408 % 256 != 0
    mix = AutoConfig.for_model("mixtral", num_hidden_layers=32, num_local_experts=8)
    assert tensor_qtype("blk.5.attn_v.weight", (1024, 4096), "q4_k_m", mix) == "q8_0"
    assert tensor_qtype("blk.5.attn_k.weight", (1024, 4096), "q4_k_m", mix) == "q8_0"
    assert tensor_qtype("blk.5.attn_output.weight", (4096, 4096), "q4_k_m", mix) == "q5_k"
    assert tensor_qtype("blk.5.attn_q.weight", (4096, 4096), "q4_k_m", mix) == "q4_k"
    assert tensor_qtype("blk.5.ffn_gate_inp.weight", (8, 4096), "q4_k_m", mix) == "f32"


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral", "glm4_moe", "minimax_m2", "gemma3",
                                  "qwen3_next", "qwen3_5_moe", "deepseek_v3/kimi-k2-tiny"])
def test_tokenizer_round_trip_and_chat_template(tiny_model, arch):
    from transformers import AutoTokenizer

    arch, _, preset = arch.partition("/")
    arch = preset or arch
    tok = AutoTokenizer.from_pretrained(tiny_model("deepseek_v3", preset=preset) if preset else tiny_model(arch))
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == TEXT
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 你好"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    marker = {"deepseek_v3": "<｜Assistant｜>", "qwen3_moe": "<|im_start|>assistant\n", "mixtral": "[/INST]",
              "glm4_moe": "<|assistant|>", "minimax_m2": "]~b]ai\n<think>\n", "gemma3": "<start_of_turn>model\n",
              "qwen3_next": "<|im_start|>assistant\n", "qwen3_5_moe": "<|im_start|>assistant\n",
              "kimi-k2-tiny": "<|im_assistant|>assistant<|im_middle|>"}[arch]
    assert "Hi 你好" in text and "2+2?" in text and text.rstrip().endswith(marker.rstrip())
    user = {"deepseek_v3": "<｜User｜>", "glm4_moe": "<|user|>", "minimax_m2": "]~b]", "gemma3": "<start_of_turn>",
            "kimi-k2-tiny": "<|im_user|>"}
    opens = {"kimi-k2-tiny": "<|im_system|>system<|im_middle|>Be brief.<|im_end|>",
             "gemma3": "<bos><start_of_turn>user\nBe brief.\n\nHi 你好<end_of_turn>\n"}
    if arch in user:             # (GLM's [gMASK] and MiniMax's ]~!b[: written by the template, never added)
        assert text.startswith(opens.get(arch, tok.bos_token))
        thinks = () if arch in ("gemma3", "kimi-k2-tiny") else ("<think>", "</think>")     # (no reasoning markers)
        for special in (*thinks, user[arch]):
            assert len(tok.encode(special, add_special_tokens=False)) == 1, special


def test_sharded_safetensors_and_determinism(tiny_model, tmp_path):
    """Shards + index load into the same model; the same seed gives the same weights."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.seeds import SESSION_SEED as SEED

    ref = tiny_model("qwen2_moe")
    out = generate_model(tmp_path / "m", arch="qwen2_moe", preset="tiny", quant="f32", seed=SEED,
                         with_safetensors=True, shard_bytes=2 << 20, nthreads=2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    merged = {k: v for f in files for k, v in _load_st(out / f).items()}
    single = _load_st(ref / "model.safetensors")
    assert merged.keys() == single.keys()
    for k in single:
        np.testing.assert_array_equal(merged[k], single[k], err_msg=k)
    assert (out / "model.gguf").read_bytes() == (ref / "model.gguf").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8


def _cli(argv, capsys) -> tuple[int, str]:
    rc = cli_main(["gen-model", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--arch", "llama9"], "unknown architecture 'llama9'; expected one of: deepseek_v3"),
    (["--arch", "qwen2", "--preset", "deepseek-v3"], "unknown preset 'deepseek-v3' for --arch qwen2"),
    (["--arch", "qwen2", "--quant", "q4_k_s"], "unknown quant type 'q4_k_s'; expected one of: f32"),
    (["--arch", "qwen2", "--layers", "0"], "--layers must be at least 1"),
    (["--arch", "qwen2", "--threads", "-2"], "--threads must be 0 (all cores) or more, got -2"),
])
def test_bad_flags(tmp_path, capsys, argv, message):
    rc, err = _cli([str(tmp_path / "out"), *argv], capsys)
    assert rc != 0 and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_bad_output_paths(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    rc, err = _cli([str(full), "--arch", "qwen2"], capsys)
    assert rc != 0 and "is not empty; pass --force" in err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    rc, err = _cli([str(full / "keep.txt"), "--arch", "qwen2"], capsys)
    assert rc != 0 and "exists and is not a directory" in err
    rc, err = _cli([str(full / "keep.txt" / "sub"), "--arch", "qwen2"], capsys)
    assert rc != 0 and "keep.txt" in err and "Not a directory" in err
    rc, err = _cli(["/proc/ktrans-gen-model-test", "--arch", "qwen2"], capsys)
    assert rc != 0 and "cannot write '/proc/ktrans-gen-model-test'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_failure_midway_leaves_nothing_and_keeps_old_output(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("previous model")

    def boom(n):
        raise KeyboardInterrupt        # what Ctrl+C raises in the writing thread

    with pytest.raises(KeyboardInterrupt):
        generate_model(out, arch="qwen2", preset="tiny", quant="q8_0", force=True, on_bytes=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with pytest.raises(KeyboardInterrupt):      # missing parents are created, and removed again
        generate_model(tmp_path / "a" / "b" / "m", arch="qwen2", preset="tiny", quant="f32", on_bytes=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(KtransError, match="not empty"):
        generate_model(out, arch="qwen2", preset="tiny", quant="f32")

    def disk_full(n):
        raise OSError(28, "No space left on device")

    with pytest.raises(KtransError, match=r"writing '.*new' failed: No space left on device"):
        generate_model(tmp_path / "new", arch="qwen2", preset="tiny", quant="f32", on_bytes=disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_python_m_ktrans_and_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    cmd = [sys.executable, "-m", "ktrans", "gen-model", str(out), "--arch", "mixtral", "--quant", "q4_0",
           "--layers", "1", "--seed", "7", "--force"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.gguf",
                                                     "tokenizer.json", "tokenizer_config.json"]
    reader = gguf.GGUFReader(out / "model.gguf")
    assert _field(reader, "llama.block_count") == 1
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_real_presets_have_real_shapes():
    """The real-shape presets, planned (not written) at full depth."""
    import transformers

    from ktrans.config.arch import get_arch
    from ktrans.genmodel import plan
    from ktrans.genmodel.generate import _hf_shapes
    from ktrans.genmodel.presets import preset_config

    cfg = preset_config("deepseek_v3", "deepseek-v3", None)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    units = plan.build_plan(config, get_arch("deepseek_v3").gguf_arch, "q4_k_m", _hf_shapes(config))
    g = {n: (s, q) for u in units for n, s, q in u.gguf}
    assert g["blk.3.ffn_gate_exps.weight"] == ((256, 2048, 7168), "q4_k")
    assert g["blk.60.ffn_down_exps.weight"] == ((256, 7168, 2048), "q6_k")
    assert g["blk.0.attn_k_b.weight"] == ((128, 512, 128), "q5_0")
    assert g["blk.0.attn_v_b.weight"] == ((128, 128, 512), "q4_k")
    assert g["blk.3.exp_probs_b.bias"] == ((256,), "f32")
    assert "blk.2.ffn_gate_exps.weight" not in g and g["blk.2.ffn_gate.weight"][0] == (18432, 7168)
    assert g["token_embd.weight"][0] == (129280, 7168) and g["output.weight"][1] == "q6_k"
    params = sum(int(np.prod(s)) for s, _ in g.values())
    assert 670e9 < params < 672e9      # DeepSeek-V3 without its MTP layer: 671B


def test_ctrl_c_leaves_nothing(tmp_path):
    """A real SIGINT while tensors are being written: exit code 130, no partial directory left."""
    import signal
    import time

    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "ktrans", "gen-model", str(out), "--arch", "qwen2", "--preset", "qwen2-7b",
           "--layers", "1", "--quant", "q4_k", "--threads", "1"]
    # NOTE: as from a terminal, the child must not inherit an ignored SIGINT (a shell's background
    # job, e.g. a CI runner, ignores it, and exec keeps "ignored"; a handled signal resets to default).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 300
        # the interrupt lands in the tensor loop: some tensor data is already in the file
        while sum(f.stat().st_size for f in tmp_path.glob(".m.partial-*/model.gguf")) < (8 << 20):
            assert proc.poll() is None and time.monotonic() < deadline, "tensor writing never started"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, time.monotonic() - sent, err[-2000:])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch, layers", [("deepseek_v3", 61), ("qwen2", 28)])
def test_real_depth_stays_finite(tmp_path, arch, layers):
    """At the real models' depth, the residual stream neither explodes nor vanishes and the logits
    stay informative (init scales depend on depth and fan-in only, so narrow layers suffice)."""
    from transformers import AutoModelForCausalLM

    out = generate_model(tmp_path / "m", arch=arch, preset="tiny", layers=layers, quant="f32", seed=1,
                         with_safetensors=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        res = model(ids, output_hidden_states=True)
    rms = torch.stack([h[0].pow(2).mean(-1).sqrt() for h in res.hidden_states])   # [L+1, T]
    assert torch.isfinite(rms).all() and len(rms) == layers + 1
    assert rms.max() / rms[0].min() < 8 and rms.min() > 0.3
    logits = res.logits[0]
    assert torch.isfinite(logits).all() and (logits.std(-1) > 0.3).all() and (logits.std(-1) < 10).all()
    assert len(set(logits.argmax(-1).tolist())) > 2
