"""Tiny transformers models with random weights for operator tests, one config per architecture,
and a WeightSource over their state dict (the operators under test load through the same
WeightSource interface as from GGUF/safetensors files)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from ktrans.config.arch import arch_from_config
from ktrans.operators.linear import offset_norms
from ktrans.weights import names
from ktrans.weights.source import RawTensor, TensorInfo, WeightSource

_COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

CONFIGS = {
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32.0, "beta_slow": 1.0}),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **_COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", first_k_dense_replace=1, routed_scaling_factor=1.5),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_COMMON, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "mixtral": lambda: transformers.MixtralConfig(
        **_COMMON, num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, num_key_value_heads=2, intermediate_size=96),
    "llama": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=2, intermediate_size=96),
    # gpt-oss: layer 0 slides over 3 tokens, layer 1 is full; attention sinks, expert biases.
    "gpt_oss": lambda: transformers.GptOssConfig(
        **_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=48, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=3),
    # GLM-4.5: rotary on the first half of each head, q/k norms, q/k/v biases, sigmoid routing with
    # the correction bias over 2 of 4 groups, a shared expert, layer 0 dense.
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2,
        first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=True,
        attention_bias=True, partial_rotary_factor=0.5),
    # MiniMax-M2: q/k norms over all heads, rotary on half of each head, sigmoid routing with the
    # block's bias, every layer MoE.
    "minimax_m2": lambda: transformers.MiniMaxM2Config(
        **_COMMON, num_key_value_heads=2, head_dim=16, rotary_dim=8, intermediate_size=32, num_local_experts=8,
        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2),
    # Gemma 3: layer 0 local (a 3-token window, rope base 100), layer 1 global (base 10000, linear
    # scaling x2); queries scaled by 24^-1/2, not head_dim^-1/2; (1 + w) norms, GELU-tanh MLPs,
    # scaled and tied embeddings, softcapped logits (null in the real configs; supported).
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **(_COMMON | {"tie_word_embeddings": True}), num_key_value_heads=2, head_dim=16, intermediate_size=96,
        query_pre_attn_scalar=24, sliding_window=3, sliding_window_pattern=2, rope_theta=10000.0,
        rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=30.0),
    # Qwen3-Next: layer 0 Gated DeltaNet (2 key heads of 8 serving 4 value heads of 12, a 4-tap
    # conv), layer 1 gated full attention with rotary on a quarter of each head; (1 + w) norms; MoE
    # with a sigmoid-gated shared expert in both layers.
    "qwen3_next": lambda: transformers.Qwen3NextConfig(
        **_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_conv_kernel_dim=4, full_attention_interval=2, bos_token_id=1, eos_token_id=2),
    # Qwen3.5-MoE's text model: the same layer kinds with separate q/k/v, z, b and a projections in
    # its DeltaNet layers, always-renormalised routing, interleaved M-RoPE (text positions: plain
    # rotary on a quarter of each head).
    "qwen3_5_moe": lambda: transformers.Qwen3_5MoeTextConfig(
        **_COMMON, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4, full_attention_interval=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
        bos_token_id=1, eos_token_id=2),
}


def tiny_hf_model(arch: str, seed: int | None = None):
    """(config, HF causal LM with random f32 weights in eval mode)."""
    config = CONFIGS[arch]()
    config._attn_implementation = "eager"
    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, arch_from_config(config).hf_class)(config).eval()
    # NOTE: norms around 1, or around 0 where the norm scales by (1 + w) (Gemma 3, Qwen3-Next;
    # not the Gated DeltaNet's output norm, which scales by w).
    centre = 0.0 if offset_norms(config) else 1.0
    with torch.no_grad():  # HF zero-inits some tensors (routing bias); make every weight matter
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" not in name and "embed_scale" not in name and t.is_floating_point():
                mean = (1.0 if name.endswith("linear_attn.norm.weight") else centre) if "norm" in name else 0.0
                t.copy_(torch.randn_like(t) * _init_scale(name) + mean)
    return config, model


def _init_scale(name: str) -> float:
    # NOTE: DeepSeek-V3's score-correction bias must be of the order of the gaps between sigmoid
    # scores (~0.1 here) to change which experts are chosen; at 0.02 a router that ignored it
    # would go unnoticed on most draws.
    if name.endswith("e_score_correction_bias"):
        return 0.1
    return 0.02 if "bias" in name else 0.15


class StateDictSource(WeightSource):
    """A WeightSource over in-memory f32 tensors named as transformers names them."""

    def __init__(self, tensors: dict[str, torch.Tensor], config=None):
        self.path = "<state dict>"
        self._t = {k: v.detach().float().contiguous() for k, v in tensors.items()}
        self._config = config       # for layouts of the fused experts other than [E, 2I, H] (gpt-oss)

    def names(self):
        return sorted(self._t)

    def info(self, name):
        if name not in self._t:
            raise self.missing(name)
        t = self._t[name]
        return TensorInfo(name, "f32", tuple(t.shape), t.numel() * 4, self.path)

    def raw(self, name):
        self.info(name)
        t = self._t[name]
        return RawTensor("f32", tuple(t.shape), t.numpy().view(np.uint8).reshape(-1))

    def expert_stack(self, layer, proj):
        self.check_expert_proj(layer, proj)
        prefix = f"model.layers.{layer}.mlp.experts"
        fused = self._t[f"{prefix}.{'down_proj' if proj == 'down' else 'gate_up_proj'}"].numpy()
        t = np.ascontiguousarray(names.stored_experts(proj, fused, self._config))   # [E, I, H] / [E, H, I]
        return RawTensor("f32", tuple(t.shape), t.view(np.uint8).reshape(-1))


def model_source(model) -> StateDictSource:
    return StateDictSource(dict(model.state_dict()), model.config)
