"""GGUF <-> transformers-5 name tables, as data.

Two tables per llama.cpp architecture (`general.architecture`):

* TENSORS: which transformers-5 parameter (the name `model.named_parameters()` lists, plus the
  DeepSeek-V3 `mlp.gate.e_score_correction_bias`, a persistent buffer in transformers) is stored
  under which llama.cpp tensor name(s), in which kind of layer, and the transform between the two
  layouts.
* METADATA: which config attribute is stored under which `{arch}.*` GGUF key.

Shapes below are numpy shapes (row-major, last dim contiguous). GGUF lists dims reversed
(ne[0] is the contiguous one), so the GGUF tensor `ffn_gate_exps` with ne = [H, I, E] is the
numpy array [E, I, H].

Transforms (implemented by `hf_to_gguf` / `gguf_to_hf` below; pure numpy, no copies beyond
the reshuffle itself):

  copy          same array on both sides
  gate_up       HF `experts.gate_up_proj` [E, 2I, H] (gate rows first, then up)
                <-> (`ffn_gate_exps` [E, I, H], `ffn_up_exps` [E, I, H])
  rope_q        llama.cpp's llama arch (Mixtral) stores q_proj rows permuted from HF's
  rope_k        rotate-half RoPE order to interleaved pairs (per head); k_proj per KV head
  kv_b          DeepSeek MLA: HF `kv_b_proj` [nH*(nope+v), r]
                <-> (`attn_k_b` [nH, r, nope] (transposed per head), `attn_v_b` [nH, v, r])
  flat          HF [1, H] <-> GGUF [H] (qwen2moe's shared-expert gate)
  gate_up_oai   gpt-oss: HF `experts.gate_up_proj` [E, H, 2I] (input-major, gate and up columns
                interleaved: gate 0, up 0, gate 1, ...) <-> (`ffn_gate_exps` [E, I, H], `ffn_up_exps`)
  interleave    gpt-oss: HF `experts.gate_up_proj_bias` [E, 2I] (interleaved as above)
                <-> (`ffn_gate_exps.bias` [E, I], `ffn_up_exps.bias` [E, I])
  transpose     gpt-oss: HF `experts.down_proj` [E, I, H] <-> `ffn_down_exps` [E, H, I]
  norm_shift    Gemma 3's RMSNorm weights: HF stores w (the norm scales by 1 + w), llama.cpp's
                converter writes 1 + w, so GGUF = HF + 1 (element-wise, in float32)
  qkvz, conv, a_log, v_tiled, qkv_tiled, conv_tiled, a_log_tiled, v_cols_tiled
                Qwen3-Next's / Qwen3.5's Gated DeltaNet layers (deltanet_layout.py)

Entries may carry a `needs` condition on the config (see `_NEEDS`); `layers` says which
layers hold the tensor: "all", "dense" (plain MLP), "moe" (router + experts), "nextn" (only the
multi-token-prediction blocks below), and in hybrid models (config.layer_types) "attn" (full
attention layers) or "linear" (linear-attention layers).

Multi-token prediction (GLM-4.5's `num_nextn_predict_layers`): llama.cpp's converter appends the
MTP block(s) after the main layers, as blk.L .. blk.L+n-1 with `block_count` = L + n (a whole MoE
decoder layer each, plus the `nextn.*` tensors of MTP_TENSORS; the optional nextn.embed_tokens and
nextn.shared_head_head are not written, llama.cpp then uses token_embd / output). ktrans does not
run them: `expand` lists them only when asked (gen-model writes them, so its files are laid out as
converted ones), and the loaders never ask for a tensor of those layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ktrans.errors import KtransError
from ktrans.weights.deltanet_layout import DELTANET_TRANSFORMS, deltanet_to_gguf, deltanet_to_hf


@dataclass(frozen=True)
class TensorMap:
    hf: str                    # HF name; "{i}" = layer index
    gguf: tuple[str, ...]      # llama.cpp tensor name(s); "{i}" = layer index
    transform: str = "copy"    # see module docstring
    layers: str = "global"     # "global" (no layer), "all", "dense", "moe", "nextn"
    needs: str | None = None   # a key of _NEEDS, or None


def _attn_gqa(qk_norm: bool | str = False, bias: bool | str = False, rope_perm: bool = False) -> list[TensorMap]:
    """q/k/v/o projections; q/k/v biases and q/k norms (per head, or over all heads: MiniMax-M2)
    when `bias` / `qk_norm` is True, or when the config meets the _NEEDS condition they name
    (GLM-4.5 has both as config options)."""
    q_t, k_t = ("rope_q", "rope_k") if rope_perm else ("copy", "copy")
    out = [
        TensorMap("model.layers.{i}.self_attn.q_proj.weight", ("blk.{i}.attn_q.weight",), q_t, "all"),
        TensorMap("model.layers.{i}.self_attn.k_proj.weight", ("blk.{i}.attn_k.weight",), k_t, "all"),
        TensorMap("model.layers.{i}.self_attn.v_proj.weight", ("blk.{i}.attn_v.weight",), "copy", "all"),
        TensorMap("model.layers.{i}.self_attn.o_proj.weight", ("blk.{i}.attn_output.weight",), "copy", "all"),
    ]
    if bias:
        out += [TensorMap(f"model.layers.{{i}}.self_attn.{p}_proj.bias", (f"blk.{{i}}.attn_{p}.bias",),
                          "copy", "all", bias if isinstance(bias, str) else None) for p in "qkv"]
    if qk_norm:
        out += [TensorMap(f"model.layers.{{i}}.self_attn.{p}_norm.weight", (f"blk.{{i}}.attn_{p}_norm.weight",),
                          "copy", "all", qk_norm if isinstance(qk_norm, str) else None) for p in "qk"]
    return out


_MLA = [
    TensorMap("model.layers.{i}.self_attn.q_a_proj.weight", ("blk.{i}.attn_q_a.weight",), "copy", "all", "q_lora"),
    TensorMap("model.layers.{i}.self_attn.q_a_layernorm.weight", ("blk.{i}.attn_q_a_norm.weight",), "copy", "all",
              "q_lora"),
    TensorMap("model.layers.{i}.self_attn.q_b_proj.weight", ("blk.{i}.attn_q_b.weight",), "copy", "all", "q_lora"),
    TensorMap("model.layers.{i}.self_attn.q_proj.weight", ("blk.{i}.attn_q.weight",), "copy", "all", "no_q_lora"),
    TensorMap("model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight", ("blk.{i}.attn_kv_a_mqa.weight",), "copy", "all"),
    TensorMap("model.layers.{i}.self_attn.kv_a_layernorm.weight", ("blk.{i}.attn_kv_a_norm.weight",), "copy", "all"),
    TensorMap("model.layers.{i}.self_attn.kv_b_proj.weight", ("blk.{i}.attn_k_b.weight", "blk.{i}.attn_v_b.weight"),
              "kv_b", "all"),
    TensorMap("model.layers.{i}.self_attn.o_proj.weight", ("blk.{i}.attn_output.weight",), "copy", "all"),
]

_COMMON = [
    TensorMap("model.embed_tokens.weight", ("token_embd.weight",)),
    TensorMap("model.norm.weight", ("output_norm.weight",)),
    TensorMap("lm_head.weight", ("output.weight",), needs="untied"),
    TensorMap("model.layers.{i}.input_layernorm.weight", ("blk.{i}.attn_norm.weight",), "copy", "all"),
    TensorMap("model.layers.{i}.post_attention_layernorm.weight", ("blk.{i}.ffn_norm.weight",), "copy", "all"),
]


def _dense_mlp(prefix: str = "mlp", suffix: str = "", layers: str = "dense") -> list[TensorMap]:
    return [TensorMap(f"model.layers.{{i}}.{prefix}.{p}_proj.weight", (f"blk.{{i}}.ffn_{p}{suffix}.weight",),
                      "copy", layers) for p in ("gate", "up", "down")]


_EXPERTS = [
    TensorMap("model.layers.{i}.mlp.gate.weight", ("blk.{i}.ffn_gate_inp.weight",), "copy", "moe"),
    TensorMap("model.layers.{i}.mlp.experts.gate_up_proj",
              ("blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight"), "gate_up", "moe"),
    TensorMap("model.layers.{i}.mlp.experts.down_proj", ("blk.{i}.ffn_down_exps.weight",), "copy", "moe"),
]

# Embedding, head, and each layer's input norm and post-attention norm under llama.cpp's
# attn_post_norm-style name post_attention_norm (gpt-oss, GLM-4.5).
_POST_NORMED_BASE = [
    TensorMap("model.embed_tokens.weight", ("token_embd.weight",)),
    TensorMap("model.norm.weight", ("output_norm.weight",)),
    TensorMap("lm_head.weight", ("output.weight",), needs="untied"),
    TensorMap("model.layers.{i}.input_layernorm.weight", ("blk.{i}.attn_norm.weight",), "copy", "all"),
    TensorMap("model.layers.{i}.post_attention_layernorm.weight", ("blk.{i}.post_attention_norm.weight",), "copy",
              "all"),
]

_GPT_OSS = _POST_NORMED_BASE + _attn_gqa(bias=True) + [
    TensorMap("model.layers.{i}.self_attn.o_proj.bias", ("blk.{i}.attn_output.bias",), "copy", "all"),
    TensorMap("model.layers.{i}.self_attn.sinks", ("blk.{i}.attn_sinks.weight",), "copy", "all"),
    TensorMap("model.layers.{i}.mlp.router.weight", ("blk.{i}.ffn_gate_inp.weight",), "copy", "moe"),
    TensorMap("model.layers.{i}.mlp.router.bias", ("blk.{i}.ffn_gate_inp.bias",), "copy", "moe"),
    TensorMap("model.layers.{i}.mlp.experts.gate_up_proj",
              ("blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight"), "gate_up_oai", "moe"),
    TensorMap("model.layers.{i}.mlp.experts.gate_up_proj_bias",
              ("blk.{i}.ffn_gate_exps.bias", "blk.{i}.ffn_up_exps.bias"), "interleave", "moe"),
    TensorMap("model.layers.{i}.mlp.experts.down_proj", ("blk.{i}.ffn_down_exps.weight",), "transpose", "moe"),
    TensorMap("model.layers.{i}.mlp.experts.down_proj_bias", ("blk.{i}.ffn_down_exps.bias",), "copy", "moe"),
]

# GLM-4.5: biased q/k/v (attention_bias), optional per-head q/k norms (use_qk_norm), the post-attention
# norm under llama.cpp's attn_post_norm name, first_k_dense_replace dense layers, then sigmoid-routed
# experts with DeepSeek-V3's correction bias and shared experts.
_GLM4_MOE = _POST_NORMED_BASE + _attn_gqa(qk_norm="qk_norm", bias="attention_bias") + _dense_mlp() + _EXPERTS + [
    TensorMap("model.layers.{i}.mlp.gate.e_score_correction_bias", ("blk.{i}.exp_probs_b.bias",), "copy", "moe"),
] + _dense_mlp("mlp.shared_experts", "_shexp", "moe")

# MiniMax-M2: q/k norms over all heads of a token (attn_q_norm [Hq*d], attn_k_norm [Hkv*d]), every
# layer MoE, the routing bias on the MoE block itself (llama.cpp's exp_probs_b).
_MINIMAX_M2 = _COMMON + _attn_gqa(qk_norm=True) + _EXPERTS + [
    TensorMap("model.layers.{i}.mlp.e_score_correction_bias", ("blk.{i}.exp_probs_b.bias",), "copy", "moe"),
]


def _norm(hf: str, gguf: str, layers: str = "all") -> TensorMap:
    return TensorMap(hf, (gguf,), "norm_shift", layers)


# The models whose norms are stored as 1 + w (norm_shift): embedding, final norm, the head (tied to
# the embeddings unless the file holds `output`) and each layer's input / post-attention norms.
_SHIFTED_OUTER = [
    TensorMap("model.embed_tokens.weight", ("token_embd.weight",)),
    _norm("model.norm.weight", "output_norm.weight", "global"),
    TensorMap("lm_head.weight", ("output.weight",), needs="untied"),
    _norm("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    _norm("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
]

# Gemma 3: four norms per layer and q/k norms per head, every one stored as 1 + w.
_GEMMA3 = _SHIFTED_OUTER + [
    _norm("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    _norm("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
] + _attn_gqa() + [
    _norm(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"blk.{{i}}.attn_{p}_norm.weight") for p in "qk"
] + _dense_mlp()

# Qwen3-Next / Qwen3.5-MoE: every norm but the DeltaNet's output norm stored as 1 + w; full
# attention layers (q_proj carrying each head's sigmoid gate, per-head q/k norms) and Gated
# DeltaNet layers; MoE with a sigmoid-gated shared expert (Qwen3-Next may have dense layers).
def _qwen3_hybrid(tiled: bool) -> list[TensorMap]:
    t = "_tiled" if tiled else ""
    lin = "model.layers.{i}.linear_attn"
    out = _SHIFTED_OUTER + [TensorMap(m.hf, m.gguf, m.transform, "attn") for m in _attn_gqa()] + [
        _norm(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"blk.{{i}}.attn_{p}_norm.weight", "attn") for p in "qk"
    ] + [
        TensorMap(f"{lin}.conv1d.weight", ("blk.{i}.ssm_conv1d.weight",), "conv" + t, "linear"),
        TensorMap(f"{lin}.dt_bias", ("blk.{i}.ssm_dt.bias",), "v_tiled" if tiled else "copy", "linear"),
        TensorMap(f"{lin}.A_log", ("blk.{i}.ssm_a",), "a_log" + t, "linear"),
        TensorMap(f"{lin}.norm.weight", ("blk.{i}.ssm_norm.weight",), "copy", "linear"),
        TensorMap(f"{lin}.out_proj.weight", ("blk.{i}.ssm_out.weight",), "v_cols_tiled" if tiled else "copy", "linear"),
    ]
    if tiled:
        out += [
            TensorMap(f"{lin}.in_proj_qkv.weight", ("blk.{i}.attn_qkv.weight",), "qkv_tiled", "linear"),
            TensorMap(f"{lin}.in_proj_z.weight", ("blk.{i}.attn_gate.weight",), "v_tiled", "linear"),
            TensorMap(f"{lin}.in_proj_b.weight", ("blk.{i}.ssm_beta.weight",), "v_tiled", "linear"),
            TensorMap(f"{lin}.in_proj_a.weight", ("blk.{i}.ssm_alpha.weight",), "v_tiled", "linear"),
        ]
    else:
        out += [
            TensorMap(f"{lin}.in_proj_qkvz.weight", ("blk.{i}.attn_qkv.weight", "blk.{i}.attn_gate.weight"), "qkvz",
                      "linear"),
            TensorMap(f"{lin}.in_proj_ba.weight", ("blk.{i}.ssm_ba.weight",), "copy", "linear"),
        ]
    return out + _dense_mlp() + _EXPERTS + _dense_mlp("mlp.shared_expert", "_shexp", "moe") + [
        TensorMap("model.layers.{i}.mlp.shared_expert_gate.weight", ("blk.{i}.ffn_gate_inp_shexp.weight",), "flat",
                  "moe"),
    ]


# The nextn-only tensors of an MTP block (see the module docstring); HF name -> llama.cpp name.
MTP_TENSORS: dict[str, list[TensorMap]] = {
    "glm4moe": [
        TensorMap("model.layers.{i}.eh_proj.weight", ("blk.{i}.nextn.eh_proj.weight",), "copy", "nextn"),
        TensorMap("model.layers.{i}.enorm.weight", ("blk.{i}.nextn.enorm.weight",), "copy", "nextn"),
        TensorMap("model.layers.{i}.hnorm.weight", ("blk.{i}.nextn.hnorm.weight",), "copy", "nextn"),
        TensorMap("model.layers.{i}.shared_head.norm.weight", ("blk.{i}.nextn.shared_head_norm.weight",), "copy",
                  "nextn"),
    ],
}

TENSORS: dict[str, list[TensorMap]] = {
    "deepseek2": _COMMON + _MLA + _dense_mlp() + _EXPERTS + _dense_mlp("mlp.shared_experts", "_shexp", "moe") + [
        TensorMap("model.layers.{i}.mlp.gate.e_score_correction_bias", ("blk.{i}.exp_probs_b.bias",), "copy", "moe",
                  "score_bias"),
    ],
    "qwen3moe": _COMMON + _attn_gqa(qk_norm=True) + _dense_mlp() + _EXPERTS,
    "qwen2moe": _COMMON + _attn_gqa(bias=True) + _dense_mlp() + _EXPERTS
    + _dense_mlp("mlp.shared_expert", "_shexp", "moe") + [
        TensorMap("model.layers.{i}.mlp.shared_expert_gate.weight", ("blk.{i}.ffn_gate_inp_shexp.weight",), "flat",
                  "moe"),
    ],
    "llama": _COMMON + _attn_gqa(rope_perm=True) + _dense_mlp() + _EXPERTS,
    "qwen2": _COMMON + _attn_gqa(bias=True) + _dense_mlp(),
    "qwen3": _COMMON + _attn_gqa(qk_norm=True) + _dense_mlp(),
    "gpt-oss": _GPT_OSS,
    "glm4moe": _GLM4_MOE,
    "minimax-m2": _MINIMAX_M2,
    "gemma3": _GEMMA3,
    "qwen3next": _qwen3_hybrid(tiled=False),
    "qwen35moe": _qwen3_hybrid(tiled=True),
}

# Conditions an entry may require of the transformers config.
_NEEDS = {
    "q_lora": lambda c: getattr(c, "q_lora_rank", None) is not None,
    "no_q_lora": lambda c: getattr(c, "q_lora_rank", None) is None,
    "score_bias": lambda c: c.model_type == "deepseek_v3",
    "untied": lambda c: not getattr(c, "tie_word_embeddings", False),
    "qk_norm": lambda c: bool(getattr(c, "use_qk_norm", False)),
    "attention_bias": lambda c: bool(getattr(c, "attention_bias", False)),
}


def num_experts(config) -> int:
    """Routed experts per MoE layer (0 for dense models); the attribute name differs per arch."""
    for attr in ("n_routed_experts", "num_experts", "num_local_experts"):
        n = getattr(config, attr, None)
        if n:
            return int(n)
    return 0


def layer_kind(config, i: int) -> str:
    """'moe' if layer i has a router + experts, else 'dense'."""
    if not num_experts(config):
        return "dense"
    if i < (getattr(config, "first_k_dense_replace", 0) or 0):
        return "dense"
    if i in (getattr(config, "mlp_only_layers", None) or []):
        return "dense"
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return "moe" if (i + 1) % step == 0 else "dense"


def expert_transform(config, suffix: str) -> str:
    """names.py's transform of a fused experts parameter (`gate_up_proj` or `down_proj`) of the
    config's architecture: gate_up / copy for most, gpt-oss's gate_up_oai / transpose."""
    from ktrans.config.arch import arch_from_config

    default = "gate_up" if suffix == "gate_up_proj" else "copy"
    if config is None:
        return default
    for m in tensor_table(arch_from_config(config).gguf_arch):
        if m.hf.endswith(f".mlp.experts.{suffix}"):
            return m.transform
    return default


def stored_experts(proj: str, hf: np.ndarray, config) -> np.ndarray:
    """The [E, rows, cols] stack of one projection (gate/up: [E, I, H], down: [E, H, I], the CPU
    kernels' and llama.cpp's layout) from the HF fused tensor `hf` (gate_up_proj for gate/up,
    down_proj for down) of the config's architecture."""
    parts = hf_to_gguf(expert_transform(config, "down_proj" if proj == "down" else "gate_up_proj"), hf, config)
    return parts[1 if proj == "up" else 0]


def tensor_table(gguf_arch: str) -> list[TensorMap]:
    try:
        return TENSORS[gguf_arch]
    except KeyError:
        raise KtransError(f"no tensor-name table for GGUF architecture '{gguf_arch}'; "
                          f"expected one of: {', '.join(TENSORS)}") from None


def num_mtp_layers(config, gguf_arch: str) -> int:
    """Multi-token-prediction blocks a GGUF of this arch holds after the main layers (0 for archs
    whose converter drops them)."""
    if gguf_arch not in MTP_TENSORS:
        return 0
    return int(getattr(config, "num_nextn_predict_layers", 0) or 0)


def block_count(config, gguf_arch: str) -> int:
    """llama.cpp's `{arch}.block_count`: the main layers plus the MTP blocks."""
    return config.num_hidden_layers + num_mtp_layers(config, gguf_arch)


def attention_kind(config, i: int) -> str:
    """'linear' for a linear-attention (Gated DeltaNet) layer of a hybrid model, else 'attn'."""
    types = getattr(config, "layer_types", None) or ()
    return "linear" if i < len(types) and types[i] == "linear_attention" else "attn"


def expand(config, gguf_arch: str, mtp: bool = False) -> list[tuple[str, tuple[str, ...], str]]:
    """Every (hf_name, gguf_names, transform) of a model with this config, layer by layer in file
    order: globals first (embedding, norm, head), then blk.0, blk.1, ...; with `mtp`, the MTP
    blocks after them (module docstring)."""
    table = tensor_table(gguf_arch)
    ok = [m for m in table if m.needs is None or _NEEDS[m.needs](config)]
    out = [(m.hf, m.gguf, m.transform) for m in ok if m.layers == "global"]
    L = config.num_hidden_layers
    extra = MTP_TENSORS.get(gguf_arch, []) if mtp else []
    for i in range(L + (num_mtp_layers(config, gguf_arch) if mtp else 0)):
        kinds = (layer_kind(config, i), attention_kind(config, i))
        for m in ok + (extra if i >= L else []):
            if m.layers == "all" or m.layers in kinds or m.layers == "nextn":
                out.append((m.hf.format(i=i), tuple(g.format(i=i) for g in m.gguf), m.transform))
    return out


def mtp_shape(config, hf: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """HF shape of a tensor of an MTP block (`expand(..., mtp=True)` beyond the main layers), which
    transformers' model does not build: the nextn projections, else the last layer's twin (an MoE
    layer, as every MTP block is)."""
    h = config.hidden_size
    layer, rest = hf[len("model.layers."):].split(".", 1)
    nextn = {"eh_proj.weight": (h, 2 * h), "enorm.weight": (h,), "hnorm.weight": (h,),
             "shared_head.norm.weight": (h,)}
    if rest in nextn:
        return nextn[rest]
    twin = f"model.layers.{config.num_hidden_layers - 1}.{rest}"
    if twin not in shapes:
        raise KtransError(f"MTP tensor '{hf}' has no twin '{twin}' in the main layers (the last layer must be "
                          f"an MoE layer)")
    return shapes[twin]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_perm(w: np.ndarray, n_head: int, inverse: bool) -> np.ndarray:
    # NOTE: HF rotates halves (x[:d/2], x[d/2:]); llama.cpp's llama arch rotates adjacent pairs.
    # Forward: per head, rows [2, d/2] -> [d/2, 2]; inverse undoes it.
    rows = w.shape[0]
    half = rows // n_head // 2
    shape = (n_head, half, 2) if inverse else (n_head, 2, half)
    return np.ascontiguousarray(w.reshape(*shape, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def hf_to_gguf(transform: str, w: np.ndarray, config) -> list[np.ndarray]:
    """The GGUF array(s) (numpy shapes) holding HF array `w`."""
    if transform == "copy":
        return [w]
    if transform in DELTANET_TRANSFORMS:
        return deltanet_to_gguf(transform, w, config)
    if transform == "gate_up":                          # [E, 2I, H] -> 2 x [E, I, H]
        i = w.shape[1] // 2
        return [np.ascontiguousarray(w[:, :i]), np.ascontiguousarray(w[:, i:])]
    if transform == "rope_q":
        return [_rope_perm(w, config.num_attention_heads, inverse=False)]
    if transform == "rope_k":
        return [_rope_perm(w, config.num_key_value_heads, inverse=False)]
    if transform == "kv_b":                             # [nH*(nope+v), r]
        nh, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
        kv = w.reshape(nh, nope + v, w.shape[-1])
        return [np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1)),  # [nH, r, nope]
                np.ascontiguousarray(kv[:, nope:])]                     # [nH, v, r]
    if transform == "flat":
        return [w.reshape(-1)]
    if transform == "gate_up_oai":                      # [E, H, 2I] -> 2 x [E, I, H]
        return [np.ascontiguousarray(w[:, :, 0::2].transpose(0, 2, 1)),
                np.ascontiguousarray(w[:, :, 1::2].transpose(0, 2, 1))]
    if transform == "interleave":                       # [E, 2I] -> 2 x [E, I]
        return [np.ascontiguousarray(w[:, 0::2]), np.ascontiguousarray(w[:, 1::2])]
    if transform == "transpose":                        # [E, I, H] -> [E, H, I]
        return [np.ascontiguousarray(w.transpose(0, 2, 1))]
    if transform == "norm_shift":
        return [w.astype(np.float32) + np.float32(1.0)]
    raise KtransError(f"unknown tensor transform '{transform}'")


def gguf_to_hf(transform: str, parts: list[np.ndarray], config) -> np.ndarray:
    """The HF array built from the GGUF array(s) `parts` (numpy shapes); inverse of hf_to_gguf."""
    if transform == "copy":
        return parts[0]
    if transform in DELTANET_TRANSFORMS:
        return deltanet_to_hf(transform, parts, config)
    if transform == "gate_up":                          # 2 x [E, I, H] -> [E, 2I, H]
        return np.concatenate(parts, axis=1)
    if transform == "rope_q":
        return _rope_perm(parts[0], config.num_attention_heads, inverse=True)
    if transform == "rope_k":
        return _rope_perm(parts[0], config.num_key_value_heads, inverse=True)
    if transform == "kv_b":
        k_b, v_b = parts                                # [nH, r, nope], [nH, v, r]
        kv = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # [nH, nope+v, r]
        return np.ascontiguousarray(kv.reshape(-1, kv.shape[-1]))
    if transform == "flat":
        return parts[0].reshape(1, -1)
    if transform in ("gate_up_oai", "interleave"):      # 2 x [E, I, H] -> [E, H, 2I]; 2 x [E, I] -> [E, 2I]
        g, u = (p.transpose(0, 2, 1) if transform == "gate_up_oai" else p for p in parts)
        out = np.empty(g.shape[:-1] + (2 * g.shape[-1],), dtype=g.dtype)
        out[..., 0::2], out[..., 1::2] = g, u
        return out
    if transform == "transpose":                        # [E, H, I] -> [E, I, H]
        return np.ascontiguousarray(parts[0].transpose(0, 2, 1))
    if transform == "norm_shift":
        # NOTE: exact for stored values in [0.5, 2] (Sterbenz); elsewhere w is the f32 nearest to
        # stored - 1, and 1 + w (what the norm computes) gives the stored value back within 2^-24.
        return parts[0].astype(np.float32) - np.float32(1.0)
    raise KtransError(f"unknown tensor transform '{transform}'")


# ---------------------------------------------------------------------------------------------
# Config <-> GGUF metadata. Each entry: (key suffix after "{arch}.", config attribute, GGUF value
# type). Keys whose value is not a plain config attribute are in DERIVED_METADATA (written by
# gen-model; a reader rebuilds the attribute from the plain keys, e.g. head_dim from key_length).

@dataclass(frozen=True)
class MetaKey:
    key: str        # suffix after "{arch}."
    attr: str       # transformers config attribute
    vtype: str      # "u32" | "f32" | "bool"


_BASE_META = [
    MetaKey("block_count", "num_hidden_layers", "u32"),
    MetaKey("context_length", "max_position_embeddings", "u32"),
    MetaKey("embedding_length", "hidden_size", "u32"),
    MetaKey("feed_forward_length", "intermediate_size", "u32"),
    MetaKey("attention.head_count", "num_attention_heads", "u32"),
    MetaKey("attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32"),
    MetaKey("vocab_size", "vocab_size", "u32"),
]
_GQA_META = [MetaKey("attention.head_count_kv", "num_key_value_heads", "u32")]
_MOE_META = [
    MetaKey("expert_count", "num_experts", "u32"),
    MetaKey("expert_used_count", "num_experts_per_tok", "u32"),
]
_LOCAL_MOE_META = [  # Mixtral's / gpt-oss's / MiniMax-M2's config names
    MetaKey("expert_count", "num_local_experts", "u32"),
    MetaKey("expert_used_count", "num_experts_per_tok", "u32"),
]
_HEAD_DIM_META = [  # a head_dim apart from hidden / heads
    MetaKey("attention.key_length", "head_dim", "u32"),
    MetaKey("attention.value_length", "head_dim", "u32"),
]
_DEEPSEEK_MOE_META = [  # DeepSeek-V2/V3's and GLM-4.5's MoE: shared experts, dense first layers, groups
    MetaKey("expert_count", "n_routed_experts", "u32"),
    MetaKey("expert_used_count", "num_experts_per_tok", "u32"),
    MetaKey("expert_feed_forward_length", "moe_intermediate_size", "u32"),
    MetaKey("expert_shared_count", "n_shared_experts", "u32"),
    MetaKey("leading_dense_block_count", "first_k_dense_replace", "u32"),
    MetaKey("expert_weights_scale", "routed_scaling_factor", "f32"),
    MetaKey("expert_weights_norm", "norm_topk_prob", "bool"),
    MetaKey("expert_group_count", "n_group", "u32"),
    MetaKey("expert_group_used_count", "topk_group", "u32"),
]

_QWEN3_HYBRID_META = [  # Qwen3-Next / Qwen3.5-MoE: MoE sizes and the Gated DeltaNet's (llama.cpp's ssm.*)
    MetaKey("expert_feed_forward_length", "moe_intermediate_size", "u32"),
    MetaKey("expert_shared_feed_forward_length", "shared_expert_intermediate_size", "u32"),
    MetaKey("ssm.conv_kernel", "linear_conv_kernel_dim", "u32"),
    MetaKey("ssm.state_size", "linear_key_head_dim", "u32"),
    MetaKey("ssm.group_count", "linear_num_key_heads", "u32"),
    MetaKey("ssm.time_step_rank", "linear_num_value_heads", "u32"),
]

METADATA: dict[str, list[MetaKey]] = {
    "deepseek2": _BASE_META + _DEEPSEEK_MOE_META + [
        MetaKey("attention.kv_lora_rank", "kv_lora_rank", "u32"),
        MetaKey("attention.value_length_mla", "v_head_dim", "u32"),
        MetaKey("rope.dimension_count", "qk_rope_head_dim", "u32"),
    ],
    "qwen3moe": _BASE_META + _GQA_META + _MOE_META + [
        MetaKey("expert_feed_forward_length", "moe_intermediate_size", "u32")] + _HEAD_DIM_META,
    "qwen2moe": _BASE_META + _GQA_META + _MOE_META + [
        MetaKey("expert_feed_forward_length", "moe_intermediate_size", "u32"),
        MetaKey("expert_shared_feed_forward_length", "shared_expert_intermediate_size", "u32"),
    ],
    "llama": _BASE_META + _GQA_META + _LOCAL_MOE_META,
    "qwen2": _BASE_META + _GQA_META,
    "gpt-oss": _BASE_META + _GQA_META + _LOCAL_MOE_META + [
        MetaKey("expert_feed_forward_length", "intermediate_size", "u32")] + _HEAD_DIM_META + [
        MetaKey("attention.sliding_window", "sliding_window", "u32")],
    "qwen3": _BASE_META + _GQA_META + _HEAD_DIM_META,
    "glm4moe": _BASE_META + _GQA_META + _DEEPSEEK_MOE_META + _HEAD_DIM_META + [
        MetaKey("nextn_predict_layers", "num_nextn_predict_layers", "u32"),
    ],
    "minimax-m2": _BASE_META + _GQA_META + _LOCAL_MOE_META + [
        MetaKey("expert_feed_forward_length", "intermediate_size", "u32")] + _HEAD_DIM_META,
    "gemma3": _BASE_META + _GQA_META + _HEAD_DIM_META + [
        MetaKey("attention.sliding_window", "sliding_window", "u32"),
        MetaKey("final_logit_softcapping", "final_logit_softcapping", "f32"),
    ],
    "qwen3next": _BASE_META + _GQA_META + _MOE_META + _HEAD_DIM_META + _QWEN3_HYBRID_META,
    "qwen35moe": _BASE_META + _GQA_META + _MOE_META + _HEAD_DIM_META + _QWEN3_HYBRID_META,
}

# Keys computed from several attributes (or from rope_parameters); `{arch}.` prefix implied.
#   deepseek2:
#     attention.head_count_kv     = 1      (llama.cpp runs MLA as MQA over the latent)
#     attention.q_lora_rank       = q_lora_rank or 0 (0: plain q_proj -> attn_q)
#     attention.key_length        = kv_lora_rank + qk_rope_head_dim
#     attention.value_length      = kv_lora_rank
#     attention.key_length_mla    = qk_nope_head_dim + qk_rope_head_dim
#     expert_gating_func          = 2 (sigmoid) for deepseek_v3, 1 (softmax) for deepseek_v2
#   glm4moe, minimax-m2:
#     expert_gating_func          = 2 (sigmoid)
#   gemma3 (llama.cpp hard-codes what the file leaves out):
#     rope.freq_base              = the global (full-attention) layers' base, rope_theta
#     rope.freq_base_swa          = the local (sliding) layers' base, rope_local_base_freq
#                                   (absent: 10000)
#     rope.scaling.type = "linear", rope.scaling.factor   (the global layers' scaling, when set)
#     attention.sliding_window_pattern = one bool per layer (slides), written only when
#                                   layer_types is not llama.cpp's default (every 6th layer global)
#     attention.scale             = query_pre_attn_scalar^-1/2, written only when it is not what
#                                   llama.cpp assumes (gemma3_query_scalar; llama.cpp ignores the key)
#   qwen3next, qwen35moe (llama.cpp's converter):
#     ssm.inner_size              = linear_value_head_dim * linear_num_value_heads
#     full_attention_interval     = config.json's full_attention_interval (absent: 4)
#     attention.recurrent_layers  = one bool per layer (linear attention), written only when
#                                   config.json lists layer_types
#     rope.dimension_sections     = qwen35moe: rope_parameters' mrope_section padded to 4 (absent:
#                                   [11, 11, 10, 0]); text positions rotate as plain rotary
#   all:
#     block_count                 = num_hidden_layers + the MTP blocks the file holds (block_count())
#     rope.freq_base              = rope_parameters["rope_theta"]
#     rope.dimension_count        = the rotated dims of a head (rotary_dim(): head_dim, or its first
#                                   partial_rotary_factor part; deepseek2 uses qk_rope_head_dim above)
#     rope.scaling.type = "yarn", rope.scaling.factor, rope.scaling.original_context_length,
#     rope.scaling.yarn_log_multiplier = 0.1 * mscale_all_dim   (when rope_type is yarn)
#     rope.scaling.yarn_beta_fast, rope.scaling.yarn_beta_slow  (yarn, when the config sets them)
DERIVED_METADATA = {
    "deepseek2": ["attention.head_count_kv", "attention.q_lora_rank", "attention.key_length",
                  "attention.value_length", "attention.key_length_mla", "expert_gating_func"],
    "glm4moe": ["expert_gating_func"],
    "minimax-m2": ["expert_gating_func"],
    "gemma3": ["rope.freq_base_swa", "attention.sliding_window_pattern", "attention.scale"],
    "qwen3next": ["ssm.inner_size", "full_attention_interval", "attention.recurrent_layers"],
    "qwen35moe": ["ssm.inner_size", "full_attention_interval", "attention.recurrent_layers",
                  "rope.dimension_sections"],
    "all": ["rope.freq_base", "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
            "rope.scaling.original_context_length", "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast",
            "rope.scaling.yarn_beta_slow"],
}


def metadata_value(config, gguf_arch: str, mk: MetaKey):
    """The value of metadata key `mk` for this config (block_count counts the MTP blocks)."""
    if mk.key == "block_count":
        return block_count(config, gguf_arch)
    return getattr(config, mk.attr, None)


def gemma3_query_scalar(num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp assumes for a gemma3 file (GGUF stores none): hidden /
    heads for a 62-layer model (Gemma 3 27B), head_dim for every other depth."""
    return hidden_size // num_heads if num_layers == 62 else head_dim


def rope_parameters(config) -> tuple[dict, dict | None]:
    """(the global layers' rope parameters, the local layers' or None): transformers keeps one
    dict per layer type where the two differ (Gemma 3: full_attention / sliding_attention)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params.get("full_attention") or {}, params.get("sliding_attention")
    return params, None


def rotary_dim(config) -> int:
    """Dims of each q/k head that RoPE rotates (the first ones): head_dim, or its first
    partial_rotary_factor part (GLM-4.5, MiniMax-M2: half)."""
    params = rope_parameters(config)[0]
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    return int(_head_dim(config) * factor)


def metadata_table(gguf_arch: str) -> list[MetaKey]:
    try:
        return METADATA[gguf_arch]
    except KeyError:
        raise KtransError(f"no metadata table for GGUF architecture '{gguf_arch}'; "
                          f"expected one of: {', '.join(METADATA)}") from None
