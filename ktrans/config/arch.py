"""The architectures ktrans supports, as data: HF names, GGUF names, and what each has.

Every other module that needs "which architecture is this?" asks here, so adding an architecture
starts with one ArchSpec entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ktrans.errors import KtransError


@dataclass(frozen=True)
class ArchSpec:
    name: str          # ktrans's name, used by --arch and rule file names (deepseek_v3)
    model_type: str    # transformers' config.model_type
    hf_class: str      # transformers causal-LM class built from the config
    gguf_arch: str     # llama.cpp's general.architecture
    is_moe: bool       # has routed experts (model.layers.N.mlp.experts)
    mla: bool          # DeepSeek multi-head latent attention (else GQA/MHA)
    # How the router picks experts and weighs them (moe_block.route):
    #   softmax_topk  softmax over all experts, then top-k (renormalised per config / arch)
    #   topk_softmax  top-k of the raw logits (router bias included), softmax over those k (gpt-oss)
    #   deepseek_v3  sigmoid scores + e_score_correction_bias, group-limited top-k (DeepSeek-V3, GLM-4.5)
    #   deepseek_v2  softmax, greedy or group-limited greedy
    #   sigmoid_topk  sigmoid scores + e_score_correction_bias for the choice, top-k, weights from
    #                 the unbiased scores renormalised (MiniMax-M2)
    routing: str = "softmax_topk"
    # The experts' MLP gating: silu (silu(g) * u) or swiglu_oai (gpt-oss's clamped SwiGLU with
    # config.swiglu_alpha / swiglu_limit, and expert biases).
    expert_gating: str = "silu"
    # The HF decoder layer unpacks (hidden, router_scores) from its MLP (gpt-oss) instead of
    # taking one tensor: the MoE block returns what the layer expects.
    mlp_returns_pair: bool = False
    # How its RMSNorms scale the normalised row x̂ (operators/linear.py rms_norm_for):
    #   rms         w · x̂, x̂ rounded to x's dtype first (Llama and most others)
    #   rms_offset  x̂ · (1 + w) in f32, rounded once (Gemma, Qwen3-Next, Qwen3.5: the weights are
    #               stored zero-centred; llama.cpp's converter writes 1 + w into the GGUF, names.py's
    #               norm_shift)
    norm: str = "rms"


ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in [
        ArchSpec("deepseek_v3", "deepseek_v3", "DeepseekV3ForCausalLM", "deepseek2", True, True, "deepseek_v3"),
        ArchSpec("deepseek_v2", "deepseek_v2", "DeepseekV2ForCausalLM", "deepseek2", True, True, "deepseek_v2"),
        ArchSpec("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", True, False),
        ArchSpec("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", "qwen2moe", True, False),
        ArchSpec("mixtral", "mixtral", "MixtralForCausalLM", "llama", True, False),
        ArchSpec("qwen2", "qwen2", "Qwen2ForCausalLM", "qwen2", False, False),
        ArchSpec("llama", "llama", "LlamaForCausalLM", "llama", False, False),
        ArchSpec("gpt_oss", "gpt_oss", "GptOssForCausalLM", "gpt-oss", True, False, "topk_softmax", "swiglu_oai", True),
        ArchSpec("glm4_moe", "glm4_moe", "Glm4MoeForCausalLM", "glm4moe", True, False, "deepseek_v3"),
        ArchSpec("minimax_m2", "minimax_m2", "MiniMaxM2ForCausalLM", "minimax-m2", True, False, "sigmoid_topk"),
        ArchSpec("gemma3", "gemma3_text", "Gemma3ForCausalLM", "gemma3", False, False, norm="rms_offset"),
        # Hybrid: Gated DeltaNet (linear attention, a recurrent state per request) in most layers,
        # gated full attention every config.full_attention_interval-th; MoE with a gated shared
        # expert. Qwen3.5-MoE is a vision-language model in transformers: ktrans runs its text model.
        ArchSpec("qwen3_next", "qwen3_next", "Qwen3NextForCausalLM", "qwen3next", True, False, norm="rms_offset"),
        ArchSpec("qwen3_5_moe", "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "qwen35moe", True, False,
                 norm="rms_offset"),
    ]
}

_BY_MODEL_TYPE = {a.model_type: a for a in ARCHS.values()}
# Multimodal wrappers whose text model ktrans runs (their config.json holds it as text_config; the
# checkpoint's language-model weights sit under model.language_model.*, the vision tower's under
# model.visual.*, which is not read).
_TEXT_OF = {"qwen3_5_moe": "qwen3_5_moe_text"}


def text_model_config(config):
    """The config ktrans runs: the text model's of a multimodal wrapper (Qwen3.5-MoE), else `config`."""
    want = _TEXT_OF.get(getattr(config, "model_type", None))
    if want is None:
        return config
    text = getattr(config, "text_config", None)
    if getattr(text, "model_type", None) != want:
        raise KtransError(f"a {config.model_type} config must hold its text model as text_config ({want}); "
                          f"got {getattr(text, 'model_type', None)!r}")
    return text


def get_arch(name: str) -> ArchSpec:
    """ArchSpec by ktrans name; a wrong name lists the valid ones."""
    try:
        return ARCHS[name]
    except KeyError:
        raise KtransError(f"unknown architecture '{name}'; expected one of: {', '.join(ARCHS)}") from None


def arch_from_config(config) -> ArchSpec:
    """ArchSpec of a transformers config (by its model_type)."""
    mt = getattr(config, "model_type", None)
    if mt not in _BY_MODEL_TYPE:
        raise KtransError(f"unsupported model_type '{mt}'; ktrans supports: {', '.join(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[mt]


def build_meta_model(config):
    """The HF causal-LM module tree for `config`, on the meta device (no memory for weights)."""
    import torch
    import transformers

    spec = arch_from_config(config)
    cls = getattr(transformers, spec.hf_class)
    with torch.device("meta"):
        return cls(config)
