"""Single-file mode: the transformers config and tokenizer of a model rebuilt from GGUF metadata
alone, as llama.cpp and Ollama run a bare .gguf (an HF directory via --model_path still wins).

Config: names.py's METADATA table gives the plain `{arch}.*` keys; the rest (DeepSeek's MLA head
dims, rope scaling, tied head, v2 vs v3) is derived here. Tokenizer: tokenizer_gguf.py.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ktrans.config.arch import ARCHS
from ktrans.errors import KtransError
from ktrans.weights import names
from ktrans.weights.gguf_reader import GGUFReader
from ktrans.weights.tokenizer_gguf import tokenizer_from_gguf

__all__ = ["config_from_gguf", "config_dict_from_gguf", "tokenizer_from_gguf"]

# general.file_type (llama_ftype) of unquantized files -> config dtype; quantized files were
# converted from bf16 checkpoints, the dtype their non-quantized modules run in.
_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}
# llama.cpp's expert gating function id of sigmoid scoring (LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID).
_GATING_SIGMOID = 2
_BLK = re.compile(r"^blk\.(\d+)\.")


def _f32(x) -> float:
    # NOTE: GGUF stores floats as f32; 7 significant digits give back the decimal that was
    # written (1e-06, not 9.99999997e-07), which is what config.json holds.
    return float(f"{float(x):.7g}")


def _model_type(r: GGUFReader) -> str:
    """transformers model_type of a GGUF (llama.cpp's arch names cover several HF models)."""
    arch = r.arch
    if arch == "deepseek2":
        v3 = r.get(f"{arch}.expert_gating_func") == _GATING_SIGMOID or any(
            n.endswith("exp_probs_b.bias") for n in r.tensors)
        return "deepseek_v3" if v3 else "deepseek_v2"
    if arch == "llama":  # llama.cpp's 'llama' holds dense Llama/Mistral models and Mixtral
        if "rope_freqs.weight" in r.tensors:
            raise KtransError(f"{r.path}: per-frequency rope factors (rope_freqs.weight, Llama 3.1-style "
                              f"rope scaling) are not rebuilt in single-file mode; pass --model_path with "
                              f"the HF config.json")
        return "mixtral" if r.get("llama.expert_count") else "llama"
    by_gguf = {a.gguf_arch: a.model_type for a in ARCHS.values() if a.gguf_arch not in ("deepseek2", "llama")}
    if arch not in by_gguf:
        supported = sorted({a.gguf_arch for a in ARCHS.values()})
        raise KtransError(f"{r.path}: GGUF architecture '{arch}' is not supported in single-file mode; "
                          f"supported: {', '.join(supported)} (or pass --model_path with an HF config)")
    return by_gguf[arch]


def _need(r: GGUFReader, key: str) -> Any:
    v = r.get(key)
    if v is None:
        raise KtransError(f"{r.path}: GGUF metadata has no '{key}', needed to build the model config "
                          f"(pass --model_path with the HF config.json)")
    return v


def _rope(r: GGUFReader, arch: str, cfg: dict) -> None:
    cfg["rope_theta"] = _f32(r.get(f"{arch}.rope.freq_base", 10000.0))
    kind = r.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        cfg["rope_scaling"] = None
        return
    if kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": _f32(_need(r, f"{arch}.rope.scaling.factor"))}
        return
    if kind != "yarn":
        raise KtransError(f"{r.path}: rope scaling '{kind}' is not supported in single-file mode (expected yarn "
                          f"or linear)")
    mscale_all = _f32(r.get(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
    cfg["rope_scaling"] = {
        "type": "yarn", "factor": _f32(_need(r, f"{arch}.rope.scaling.factor")),
        "original_max_position_embeddings": int(_need(r, f"{arch}.rope.scaling.original_context_length")),
        "beta_fast": _f32(r.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
        "beta_slow": _f32(r.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        # NOTE: llama.cpp keeps one multiplier; mscale == mscale_all_dim makes HF's rotary
        # attention factor 1 and its softmax scale match llama.cpp's.
        "mscale": round(mscale_all, 6), "mscale_all_dim": round(mscale_all, 6),
    }


def _deepseek(r: GGUFReader, cfg: dict, model_type: str) -> None:
    a = "deepseek2"
    rope = int(_need(r, f"{a}.rope.dimension_count"))
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]   # GGUF says 1: MLA run as MQA over the latent
    cfg["q_lora_rank"] = int(r.get(f"{a}.attention.q_lora_rank", 0)) or None
    if r.get(f"{a}.attention.key_length_mla") is not None:
        cfg["qk_nope_head_dim"] = int(r.get(f"{a}.attention.key_length_mla")) - rope
    else:                      # files from before llama.cpp's MLA rewrite: per-head K/V lengths
        cfg["qk_nope_head_dim"] = int(_need(r, f"{a}.attention.key_length")) - rope
        cfg.setdefault("v_head_dim", int(_need(r, f"{a}.attention.value_length")))
    v3 = model_type == "deepseek_v3"
    cfg["scoring_func"] = "sigmoid" if v3 else "softmax"
    cfg.setdefault("norm_topk_prob", v3)
    cfg.setdefault("n_group", 1)
    cfg.setdefault("topk_group", 1)
    cfg.setdefault("routed_scaling_factor", 1.0)
    cfg["topk_method"] = "noaux_tc" if v3 else ("greedy" if cfg["n_group"] == 1 else "group_limited_greedy")
    cfg["moe_layer_freq"] = 1
    cfg["attention_bias"] = False
    if v3:                     # multi-token-prediction layers are not converted to GGUF
        cfg["num_nextn_predict_layers"] = int(r.get(f"{a}.nextn_predict_layers", 0))


def _layer_types(r: GGUFReader, a: str, n: int, period: int) -> list[str]:
    """transformers' layer_types from llama.cpp's attention.sliding_window_pattern: a per-layer
    bool array, or a period p (layer i slides unless i % p == p - 1); absent, the arch's period."""
    pattern = r.get(f"{a}.attention.sliding_window_pattern", period)
    if np.ndim(pattern) == 1:                       # (the reader gives arrays as numpy arrays)
        if len(pattern) != n:
            raise KtransError(f"{r.path}: {a}.attention.sliding_window_pattern has {len(pattern)} entries for {n} layers")
        slides = [bool(x) for x in pattern]
    else:
        slides = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n)]
    return ["sliding_attention" if s else "full_attention" for s in slides]


def _gpt_oss(r: GGUFReader, cfg: dict) -> None:
    """gpt-oss: biased attention, sliding-window layers, HF's un-truncated YaRN."""
    a = "gpt-oss"
    cfg["attention_bias"] = True
    # NOTE: absent, llama.cpp's period for gpt-oss is 2 (even layers slide), as gpt-oss ships.
    cfg["layer_types"] = _layer_types(r, a, cfg["num_hidden_layers"], 2)
    if cfg.get("rope_scaling"):
        # NOTE: gpt-oss's checkpoints use YaRN without rounding the correction range (truncate
        # false) and without mscale overrides; llama.cpp keeps neither.
        rs = cfg["rope_scaling"]
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": rs["factor"], "beta_fast": rs["beta_fast"],
                               "beta_slow": rs["beta_slow"], "truncate": False,
                               "original_max_position_embeddings": rs["original_max_position_embeddings"]}


def _glm4_moe(r: GGUFReader, cfg: dict) -> None:
    """GLM-4.5: the MTP blocks counted in block_count, partial rotary, optional q/k norms and
    q/k/v biases (seen in the tensors), sigmoid routing with llama.cpp's defaults."""
    a = "glm4moe"
    cfg["num_hidden_layers"] -= cfg.get("num_nextn_predict_layers", 0)   # block_count counts the MTP blocks
    gating = r.get(f"{a}.expert_gating_func", _GATING_SIGMOID)
    if gating != _GATING_SIGMOID:
        raise KtransError(f"{r.path}: {a}.expert_gating_func = {gating}; GLM-4.5 routes with sigmoid scores "
                          f"({_GATING_SIGMOID})")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["partial_rotary_factor"] = int(r.get(f"{a}.rope.dimension_count", head_dim)) / head_dim
    cfg["use_qk_norm"] = "blk.0.attn_q_norm.weight" in r.tensors
    cfg["attention_bias"] = "blk.0.attn_q.bias" in r.tensors
    # NOTE: absent keys take llama.cpp's defaults (no leading dense layers, no renormalisation).
    for key, default in (("first_k_dense_replace", 0), ("norm_topk_prob", False), ("n_group", 1),
                         ("topk_group", 1), ("routed_scaling_factor", 1.0), ("num_nextn_predict_layers", 0)):
        cfg.setdefault(key, default)


def _minimax_m2(r: GGUFReader, cfg: dict) -> None:
    """MiniMax-M2: partial rotary (config.json's rotary_dim), sigmoid routing."""
    a = "minimax-m2"
    gating = r.get(f"{a}.expert_gating_func", _GATING_SIGMOID)
    if gating != _GATING_SIGMOID:
        raise KtransError(f"{r.path}: {a}.expert_gating_func = {gating}; MiniMax-M2 routes with sigmoid scores "
                          f"({_GATING_SIGMOID})")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["rotary_dim"] = int(r.get(f"{a}.rope.dimension_count", head_dim))


def _qwen3_hybrid(r: GGUFReader, cfg: dict, model_type: str) -> None:
    """Qwen3-Next / Qwen3.5-MoE: the MTP blocks a converter may append (counted in block_count, not
    run), which layers are linear attention (attention.recurrent_layers, else every
    full_attention_interval-th layer is full attention, as llama.cpp reads them), the DeltaNet's
    value head size, partial rotary, llama.cpp's always-renormalised top-k; Qwen3.5's M-RoPE
    sections."""
    a = r.arch
    n = cfg["num_hidden_layers"] = cfg["num_hidden_layers"] - int(r.get(f"{a}.nextn_predict_layers", 0))
    recurrent = r.get(f"{a}.attention.recurrent_layers")
    if recurrent is not None:
        if len(recurrent) < n:
            raise KtransError(f"{r.path}: {a}.attention.recurrent_layers has {len(recurrent)} entries for {n} layers")
        linear = [bool(x) for x in recurrent[:n]]
    else:
        interval = int(r.get(f"{a}.full_attention_interval", 4))
        if interval < 1:
            raise KtransError(f"{r.path}: {a}.full_attention_interval = {interval}; expected a period of at least 1")
        linear = [(i + 1) % interval != 0 for i in range(n)]
    cfg["layer_types"] = ["linear_attention" if x else "full_attention" for x in linear]
    heads = cfg.get("linear_num_value_heads") or _need(r, f"{a}.ssm.time_step_rank")
    cfg["linear_value_head_dim"] = int(_need(r, f"{a}.ssm.inner_size")) // int(heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor = int(r.get(f"{a}.rope.dimension_count", head_dim)) / head_dim
    cfg.update(attention_bias=False, attention_dropout=0.0)
    if model_type == "qwen3_next":
        cfg.update(partial_rotary_factor=factor, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        return
    cfg.pop("intermediate_size", None)       # (Qwen3.5-MoE has no dense MLP)
    sections = r.get(f"{a}.rope.dimension_sections")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta"), "partial_rotary_factor": factor,
                              "mrope_section": [int(x) for x in (sections if sections is not None else [11, 11, 10])[:3]],
                              "mrope_interleaved": True}
    if cfg.pop("rope_scaling", None):
        raise KtransError(f"{r.path}: rope scaling is not read for {a} in single-file mode")


# Token texts llama.cpp takes as end of turn when a file names no eot token (it matches them by
# text): Gemma's, and ChatML's (Kimi-K2's turns end with it, its EOS is [EOS]).
_EOT_TEXTS = ("<end_of_turn>", "<|im_end|>")


def _gemma3(r: GGUFReader, cfg: dict) -> None:
    """Gemma 3: GELU MLPs, local layers (every 6th global unless the file says otherwise) with their
    own rope base, the attention scale llama.cpp assumes."""
    a = "gemma3"
    del cfg["hidden_act"]
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    n, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.setdefault("head_dim", hidden // heads)
    scale = r.get(f"{a}.attention.scale")
    cfg["query_pre_attn_scalar"] = (round(float(scale) ** -2) if scale else
                                    names.gemma3_query_scalar(n, hidden, heads, head_dim))
    cfg["rope_local_base_freq"] = _f32(r.get(f"{a}.rope.freq_base_swa", 10000.0))
    if cfg.get("sliding_window"):
        cfg["layer_types"] = _layer_types(r, a, n, 6)
        period = r.get(f"{a}.attention.sliding_window_pattern", 6)
        if np.ndim(period) == 0:                      # as config.json spells a period
            cfg["sliding_window_pattern"] = int(period)
    else:                       # llama.cpp: no window key (or 0), no local layers
        cfg.update(sliding_window=None, layer_types=["full_attention"] * n)
    cfg.setdefault("final_logit_softcapping", None)
    cfg.update(attn_logit_softcapping=None, attention_bias=False)


def _end_tokens(r: GGUFReader) -> list[int]:
    """Every token that ends a generation: EOS, end of turn / message (GLM's <|user|> and
    <|observation|>), or, where the file names no end of turn, the tokens llama.cpp takes as one
    by their text (_EOT_TEXTS)."""
    ends = [int(t) for t in (r.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")) if t is not None]
    if ends and r.get("tokenizer.ggml.eot_token_id") is None:
        tokens = r.get("tokenizer.ggml.tokens")
        ends += [i for i, t in enumerate(tokens if tokens is not None else []) if t in _EOT_TEXTS]
    return list(dict.fromkeys(ends))


def _check_against_tensors(r: GGUFReader, cfg: dict) -> None:
    """Sizes from metadata must match the tensors, so a corrupt key cannot make ktrans build a model
    of billions of layers or experts."""
    layers = {int(m[1]) for m in (_BLK.match(n) for n in r.tensors) if m}
    # NOTE: block_count counts GLM-4.5's (and Qwen3-Next's) MTP blocks, which a converter may have left out.
    trunk = cfg["num_hidden_layers"] - cfg.get("num_nextn_predict_layers", int(r.get(f"{r.arch}.nextn_predict_layers", 0)))
    if layers and max(layers) + 1 not in (cfg["num_hidden_layers"], trunk):
        raise KtransError(f"{r.path}: GGUF metadata says {cfg['num_hidden_layers']} layers, but the tensors cover "
                          f"blk.0 .. blk.{max(layers)}")
    embd = r.tensors.get("token_embd.weight")
    if embd is not None and embd.shape[-1] != cfg["hidden_size"]:
        raise KtransError(f"{r.path}: GGUF metadata says hidden size {cfg['hidden_size']}, but token_embd.weight "
                          f"has shape {list(embd.shape)}")
    routers = [t for n, t in r.tensors.items() if n.endswith(".ffn_gate_inp.weight")]
    experts = next((cfg[k] for k in ("n_routed_experts", "num_experts", "num_local_experts") if k in cfg), None)
    if routers and experts is not None and routers[0].shape[0] != experts:
        raise KtransError(f"{r.path}: GGUF metadata says {experts} experts, but {routers[0].name} has shape "
                          f"{list(routers[0].shape)}")


def config_dict_from_gguf(r: GGUFReader) -> dict:
    """The config.json fields of the model in `r` (plain dict, HF spelling)."""
    model_type = _model_type(r)
    spec = next(a for a in ARCHS.values() if a.model_type == model_type)
    arch = r.arch
    cfg: dict[str, Any] = {"architectures": [spec.hf_class], "model_type": model_type, "hidden_act": "silu"}
    for mk in names.metadata_table(arch):
        v = r.get(f"{arch}.{mk.key}")
        if v is not None:
            cfg[mk.attr] = _f32(v) if mk.vtype == "f32" else bool(v) if mk.vtype == "bool" else int(v)
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if key not in cfg:
            raise KtransError(f"{r.path}: GGUF metadata lacks the {key} key of '{arch}'; cannot build a config")
    _check_against_tensors(r, cfg)
    embd = r.tensors.get("token_embd.weight")
    if embd is not None:
        cfg["vocab_size"] = embd.shape[0]              # one embedding row per token
    elif "vocab_size" not in cfg:
        cfg["vocab_size"] = len(_need(r, "tokenizer.ggml.tokens"))
    cfg["tie_word_embeddings"] = "output.weight" not in r.tensors
    cfg["dtype"] = _DTYPES.get(r.get("general.file_type"), "bfloat16")
    cfg.setdefault("max_position_embeddings", 4096)
    cfg.setdefault("rms_norm_eps", 1e-6)
    _rope(r, arch, cfg)
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        tid = r.get(f"tokenizer.ggml.{key}_token_id")
        cfg[f"{role}_token_id"] = int(tid) if tid is not None else None
    # NOTE: llama.cpp ends a generation on end-of-turn / end-of-message tokens too; config.json
    # lists them all in eos_token_id.
    ends = _end_tokens(r)
    if len(ends) > 1:
        cfg["eos_token_id"] = ends
    if model_type.startswith("deepseek"):
        _deepseek(r, cfg, model_type)
    elif model_type == "gpt_oss":
        _gpt_oss(r, cfg)
    elif model_type == "glm4_moe":
        _glm4_moe(r, cfg)
    elif model_type == "minimax_m2":
        _minimax_m2(r, cfg)
    elif model_type == "gemma3_text":
        _gemma3(r, cfg)
    elif model_type in ("qwen3_next", "qwen3_5_moe_text"):
        _qwen3_hybrid(r, cfg, model_type)
    elif model_type in ("qwen3_moe", "qwen2_moe"):
        # NOTE: llama.cpp hard-codes the top-k renormalisation per arch: on for qwen3moe, off for qwen2moe.
        cfg.update(norm_topk_prob=model_type == "qwen3_moe", decoder_sparse_step=1, mlp_only_layers=[])
    if model_type in ("qwen3_moe", "qwen2_moe", "qwen2"):
        cfg.update(use_sliding_window=False, sliding_window=None)
    if model_type == "mixtral":
        cfg["sliding_window"] = None
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    return cfg


def config_from_gguf(r: GGUFReader):
    """transformers config object of the model in `r`; KtransError when it cannot be built."""
    from transformers import CONFIG_MAPPING

    d = config_dict_from_gguf(r)
    try:
        return CONFIG_MAPPING[d["model_type"]](**{k: v for k, v in d.items() if k != "model_type"})
    except Exception as e:  # transformers' validators raise several unrelated exception types
        raise KtransError(f"{r.path}: the config rebuilt from GGUF metadata is invalid: {e}") from None
