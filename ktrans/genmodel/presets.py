"""Model shapes for `ktrans gen-model`: tiny/small test shapes and the real models' configs.

Each preset is the config.json a real checkpoint of that architecture ships (same keys, as the
HF hub files spell them), minus vocabulary-dependent ids, which `build_config` fills in from
the generated tokenizer.

NOTE: "tiny" uses hidden/intermediate sizes of 256 (not smaller) on purpose: llama.cpp's K-quants
pack 256 columns per super-block, so with smaller rows every K-quant tensor would fall back to
another type and tests of q4_k/q5_k/q6_k files would test nothing.
"""

from __future__ import annotations

import copy

from ktrans.config.arch import get_arch
from ktrans.errors import KtransError

# --quant choices: GGUF tensor types, plus llama.cpp's q4_k_m mixture recipe.
# mxfp4: the routed experts in mxfp4 (as gpt-oss is released), the other matrices q8_0.
QUANT_CHOICES = ("f32", "bf16", "f16", "q8_0", "q4_0", "q5_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "mxfp4")

_YARN_V3 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"}
_YARN_V2 = dict(_YARN_V3, mscale=0.707, mscale_all_dim=0.707)

_DEEPSEEK_V3 = {
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "vocab_size": 129280, "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": _YARN_V3, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "num_nextn_predict_layers": 0,
}
_DEEPSEEK_V2_LITE = {
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
    "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": _YARN_V2, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
}
_QWEN3_MOE = {
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 40960,
    "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6, "attention_bias": False,
    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
    "sliding_window": None,
}
_QWEN2_MOE = {
    "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
    "max_position_embeddings": 8192, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
}
_MIXTRAL = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
    "tie_word_embeddings": False, "hidden_act": "silu",
}
_QWEN2 = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
    "sliding_window": None,
}

_LLAMA = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}

_YARN_OSS = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
             "original_max_position_embeddings": 4096}
# gpt-oss-120b; gpt-oss-20b differs in layers (24) and experts (32). layer_types is left to the
# config's default (sliding window on even layers, full attention on odd ones), as both ship.
# (The real config.json's training-only keys -- router_aux_loss_coef, experts_per_token,
# initial_context_length -- are left out: single-file mode cannot rebuild them from GGUF.)
_GPT_OSS = {
    "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 128, "num_experts_per_tok": 4,
    "vocab_size": 201088, "max_position_embeddings": 131072, "rope_theta": 150000, "rope_scaling": _YARN_OSS, "rms_norm_eps": 1e-5, "sliding_window": 128,
    "swiglu_limit": 7.0, "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu",
    "tie_word_embeddings": False,
}

# GLM-4.5 (355B-A32B); GLM-4.5-Air (106B-A12B) differs in widths, depth, experts, routing scale and
# has no q/k norms. Both ship one multi-token-prediction layer (num_nextn_predict_layers), which
# gen-model writes as llama.cpp's converter does (ktrans does not run it).
_GLM4_MOE = {
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 92,
    "first_k_dense_replace": 3, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
    "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "use_qk_norm": True, "attention_bias": True,
    "partial_rotary_factor": 0.5, "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 131072,
    "vocab_size": 151552, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_dropout": 0.0, "num_nextn_predict_layers": 1,
}

# MiniMax-M2 (230B-A10B): every layer MoE (256 experts, 8 chosen by sigmoid scores with a
# routing bias), q/k norms over all heads, rotary on the first 64 of each head's 128 dims
# (rotary_dim, as its config.json spells it). Its multi-token-prediction modules are not in the
# released weights.
_MINIMAX_M2 = {
    "hidden_size": 3072, "intermediate_size": 1536, "num_hidden_layers": 62, "num_attention_heads": 48,
    "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64, "num_local_experts": 256, "num_experts_per_tok": 8,
    "vocab_size": 200064, "max_position_embeddings": 196608, "rope_theta": 5000000, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_dropout": 0.0,
}

# Kimi-K2 (1T-A32B): DeepSeek-V3's architecture with 384 experts (one group), 64 heads, one leading
# dense layer, its own YaRN and routing scale, and a tiktoken vocabulary split by its own regex
# (gen-model writes it with tokenizer.ggml.pre = kimi-k2).
_YARN_KIMI = {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
              "original_max_position_embeddings": 4096, "type": "yarn"}
_KIMI_K2 = dict(_DEEPSEEK_V3, num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=64,
                num_key_value_heads=64, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8, n_group=1,
                topk_group=1, routed_scaling_factor=2.827, vocab_size=163840, max_position_embeddings=131072,
                rope_theta=50000.0, rope_scaling=_YARN_KIMI)

# Gemma 3 1B (text only); 4B / 12B / 27B are the text part of the multimodal checkpoints
# (text_config: wider vocabulary, linear rope scaling x8 on the global layers, 1024-token window;
# 27B scales queries by hidden / heads = 168, not head_dim). Five local layers per global one
# (sliding_window_pattern 6), GELU-tanh MLPs, tied embeddings, no softcapping.
_GEMMA3 = {
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
    "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "max_position_embeddings": 32768, "vocab_size": 262144, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "tie_word_embeddings": True,
}
_GEMMA3_4B = dict(_GEMMA3, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, sliding_window=1024, rope_scaling={"factor": 8.0, "rope_type": "linear"},
                  max_position_embeddings=131072, vocab_size=262208)

# Qwen3-Next-80B-A3B: the shapes are Qwen3NextConfig's defaults (which describe this checkpoint);
# rope base and native context as its config.json publishes them. Three Gated DeltaNet layers
# (16 key heads, 32 value heads of 128, 4-tap conv) per gated full-attention layer (16 query heads
# of 256, 2 KV heads, rotary on the first quarter of each head); every layer MoE, 10 of 512 experts
# and a sigmoid-gated shared expert. Its multi-token-prediction layer is not generated.
_QWEN3_NEXT = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "partial_rotary_factor": 0.25, "rope_theta": 10000000,
    "max_position_embeddings": 262144, "full_attention_interval": 4, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts": 512, "num_experts_per_tok": 10,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
    "attention_dropout": 0.0,
}
# Qwen3.5-35B-A3B's text model: Qwen3_5MoeTextConfig's defaults (which describe this checkpoint),
# interleaved M-RoPE sections as its rotary module's default, rope base and native context as its
# config.json publishes them. The other Qwen3.5 MoE sizes' shapes are in no transformers class.
_QWEN3_5_MOE = {
    "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 256, "max_position_embeddings": 262144, "full_attention_interval": 4,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
    "num_experts": 256, "num_experts_per_tok": 8, "vocab_size": 248320, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
}
# tiny/small of both: one full-attention layer per linear one (interval 2), 2 key heads serving 4
# value heads (llama.cpp reads key and value heads of one size).
_HYBRID_TINY = dict(hidden_size=256, num_hidden_layers=4, full_attention_interval=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                    linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=256,
                    shared_expert_intermediate_size=256, num_experts=8, num_experts_per_tok=2, vocab_size=None,
                    max_position_embeddings=1024)
_HYBRID_SMALL = dict(hidden_size=1024, num_hidden_layers=8, full_attention_interval=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128,
                     linear_num_key_heads=4, linear_num_value_heads=8, moe_intermediate_size=512,
                     shared_expert_intermediate_size=512, num_experts=32, num_experts_per_tok=4, vocab_size=None,
                     max_position_embeddings=8192)


def _mrope(sections: list[int]) -> dict:
    return dict(_QWEN3_5_MOE["rope_parameters"], mrope_section=sections)


# vocab_size None = the generated tokenizer's size (tiny/small presets).
PRESETS: dict[str, dict[str, dict]] = {
    "deepseek_v3": {
        "tiny": dict(_DEEPSEEK_V3, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                     num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=8,
                     num_key_value_heads=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                     n_group=4, topk_group=2, q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=16,
                     qk_nope_head_dim=32, v_head_dim=32, vocab_size=None, max_position_embeddings=1024,
                     rope_scaling=dict(_YARN_V3, factor=4, original_max_position_embeddings=256)),
        "small": dict(_DEEPSEEK_V3, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                      num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16,
                      num_key_value_heads=16, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
                      topk_group=2, q_lora_rank=512, kv_lora_rank=256, qk_rope_head_dim=32,
                      qk_nope_head_dim=64, v_head_dim=64, vocab_size=None, max_position_embeddings=8192,
                      rope_scaling=dict(_YARN_V3, factor=4, original_max_position_embeddings=2048)),
        "deepseek-v3": _DEEPSEEK_V3,
        "kimi-k2": _KIMI_K2,
        # tiny's shapes with Kimi-K2's routing (one group), YaRN and tokenizer
        "kimi-k2-tiny": dict(_KIMI_K2, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                             num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=8,
                             num_experts_per_tok=2, q_lora_rank=256, kv_lora_rank=256, qk_rope_head_dim=16,
                             qk_nope_head_dim=32, v_head_dim=32, vocab_size=None, max_position_embeddings=1024,
                             rope_scaling=dict(_YARN_KIMI, factor=4.0, original_max_position_embeddings=256)),
    },
    "deepseek_v2": {
        "tiny": dict(_DEEPSEEK_V2_LITE, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                     num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=8,
                     n_shared_experts=2, num_experts_per_tok=2, kv_lora_rank=256, qk_rope_head_dim=16,
                     qk_nope_head_dim=32, v_head_dim=32, vocab_size=None, max_position_embeddings=1024,
                     rope_scaling=dict(_YARN_V2, factor=4, original_max_position_embeddings=256)),
        "small": dict(_DEEPSEEK_V2_LITE, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                      n_routed_experts=32, num_experts_per_tok=4, kv_lora_rank=256, qk_rope_head_dim=32,
                      qk_nope_head_dim=64, v_head_dim=64, vocab_size=None, max_position_embeddings=8192,
                      rope_scaling=dict(_YARN_V2, factor=4, original_max_position_embeddings=2048)),
        "deepseek-v2-lite": _DEEPSEEK_V2_LITE,
        "deepseek-v2": dict(_DEEPSEEK_V2_LITE, hidden_size=5120, intermediate_size=12288,
                            moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
                            num_key_value_heads=128, n_routed_experts=160, n_shared_experts=2,
                            num_experts_per_tok=6, n_group=8, topk_group=3, topk_method="group_limited_greedy",
                            routed_scaling_factor=16.0, q_lora_rank=1536),
    },
    "qwen3_moe": {
        "tiny": dict(_QWEN3_MOE, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     num_experts=8, num_experts_per_tok=2, vocab_size=None, max_position_embeddings=1024),
        "small": dict(_QWEN3_MOE, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                      num_experts=32, num_experts_per_tok=4, vocab_size=None, max_position_embeddings=8192),
        "qwen3-30b-a3b": _QWEN3_MOE,
        "qwen3-235b-a22b": dict(_QWEN3_MOE, hidden_size=4096, intermediate_size=12288,
                                moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64),
    },
    "qwen2_moe": {
        "tiny": dict(_QWEN2_MOE, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                     shared_expert_intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, vocab_size=None,
                     max_position_embeddings=1024),
        "small": dict(_QWEN2_MOE, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                      shared_expert_intermediate_size=2048, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, num_experts=32, num_experts_per_tok=4, vocab_size=None),
        "qwen1.5-moe-a2.7b": _QWEN2_MOE,
        "qwen2-57b-a14b": dict(_QWEN2_MOE, hidden_size=3584, intermediate_size=18944,
                               moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
                               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               num_experts=64, num_experts_per_tok=8, max_position_embeddings=32768),
    },
    "mixtral": {
        "tiny": dict(_MIXTRAL, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, vocab_size=None,
                     max_position_embeddings=1024),
        "small": dict(_MIXTRAL, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=None),
        "mixtral-8x7b": _MIXTRAL,
        "mixtral-8x22b": dict(_MIXTRAL, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                              num_attention_heads=48, num_key_value_heads=8, vocab_size=32768,
                              max_position_embeddings=65536),
    },
    "qwen2": {
        "tiny": dict(_QWEN2, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=None, max_position_embeddings=1024),
        "small": dict(_QWEN2, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=None),
        "qwen2-7b": _QWEN2,
        "qwen2-0.5b": dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                           tie_word_embeddings=True),
    },
    "llama": {
        "tiny": dict(_LLAMA, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=None, max_position_embeddings=1024),
        "small": dict(_LLAMA, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=None),
        "llama-3-8b": _LLAMA,
        "mistral-7b": dict(_LLAMA, vocab_size=32768, max_position_embeddings=32768, rope_theta=1000000.0),
    },
    # NOTE: tiny's window (8 tokens) is shorter than the tests' prompts, so the sliding layers
    # really slide there; small keeps the real 128.
    "gpt_oss": {
        "tiny": dict(_GPT_OSS, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
                     vocab_size=None, max_position_embeddings=1024, sliding_window=8,
                     rope_scaling=dict(_YARN_OSS, factor=4.0, original_max_position_embeddings=256)),
        "small": dict(_GPT_OSS, hidden_size=1024, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                      vocab_size=None, max_position_embeddings=8192,
                      rope_scaling=dict(_YARN_OSS, factor=4.0, original_max_position_embeddings=2048)),
        "gpt-oss-20b": dict(_GPT_OSS, num_hidden_layers=24, num_local_experts=32),
        "gpt-oss-120b": _GPT_OSS,
    },
    # NOTE: tiny routes over 2 of 4 expert groups (the real models have one group) so the group
    # limit is exercised; head_dim 64 with half of it rotated.
    "glm4_moe": {
        "tiny": dict(_GLM4_MOE, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                     num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                     vocab_size=None, max_position_embeddings=1024),
        "small": dict(_GLM4_MOE, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                      num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=64, n_routed_experts=32, num_experts_per_tok=4, vocab_size=None,
                      max_position_embeddings=8192),
        "glm-4.5-air": dict(_GLM4_MOE, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
                            num_hidden_layers=46, first_k_dense_replace=1, n_routed_experts=128,
                            routed_scaling_factor=1.0, use_qk_norm=False),
        "glm-4.5": _GLM4_MOE,
    },
    "minimax_m2": {
        "tiny": dict(_MINIMAX_M2, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, rotary_dim=32, num_local_experts=8, num_experts_per_tok=2,
                     vocab_size=None, max_position_embeddings=1024),
        "small": dict(_MINIMAX_M2, hidden_size=1024, intermediate_size=512, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64, rotary_dim=32, num_local_experts=32, num_experts_per_tok=4,
                      vocab_size=None, max_position_embeddings=8192),
        "minimax-m2": _MINIMAX_M2,
    },
    # NOTE: tiny has six layers so that llama.cpp's default pattern (no key in the file) gives one
    # global layer, an 8-token window shorter than the tests' prompts, and the 4B's linear scaling
    # on the global layer; small keeps the 1B's window with a pattern of 2 (written as a per-layer
    # key). Both scale queries by head_dim, as llama.cpp assumes for any depth but 62.
    "gemma3": {
        "tiny": dict(_GEMMA3_4B, hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=8, vocab_size=None,
                     max_position_embeddings=1024),
        "small": dict(_GEMMA3, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, query_pre_attn_scalar=128, sliding_window_pattern=2,
                      vocab_size=None, max_position_embeddings=8192),
        "gemma-3-1b": _GEMMA3,
        "gemma-3-4b": _GEMMA3_4B,
        "gemma-3-12b": dict(_GEMMA3_4B, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                            num_attention_heads=16, num_key_value_heads=8),
        "gemma-3-27b": dict(_GEMMA3_4B, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                            num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
    },
    "qwen3_next": {
        "tiny": dict(_QWEN3_NEXT, intermediate_size=256, **_HYBRID_TINY),
        "small": dict(_QWEN3_NEXT, intermediate_size=1024, **_HYBRID_SMALL),
        "qwen3-next-80b-a3b": _QWEN3_NEXT,
    },
    # NOTE: the M-RoPE sections split the rotated half-dims (head_dim x 0.25 / 2) among text,
    # height and width positions; text positions are equal in all three, so only their sum matters.
    "qwen3_5_moe": {
        "tiny": dict(_QWEN3_5_MOE, **_HYBRID_TINY, rope_parameters=_mrope([3, 3, 2])),
        "small": dict(_QWEN3_5_MOE, **_HYBRID_SMALL, rope_parameters=_mrope([6, 5, 5])),
        "qwen3.5-35b-a3b": _QWEN3_5_MOE,
    },
}


def preset_names(arch: str) -> list[str]:
    get_arch(arch)
    return list(PRESETS[arch])


def preset_config(arch: str, preset: str, layers: int | None) -> dict:
    """The preset's config.json fields (a fresh copy), with the layer count cut to `layers`.

    NOTE: when --layers cuts a DeepSeek model to no more layers than its leading dense ones,
    first_k_dense_replace shrinks so that at least one MoE layer remains (every feature present).
    """
    spec = get_arch(arch)
    if preset not in PRESETS[arch]:
        raise KtransError(f"unknown preset '{preset}' for --arch {arch}; expected one of: "
                          f"{', '.join(PRESETS[arch])}")
    cfg = copy.deepcopy(PRESETS[arch][preset])
    if layers is not None:
        if layers < 1:
            raise KtransError(f"--layers must be at least 1, got {layers}")
        cfg["num_hidden_layers"] = layers
        if "first_k_dense_replace" in cfg:
            cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], layers - 1)
    cfg["model_type"] = spec.model_type
    cfg["architectures"] = [spec.hf_class]
    return cfg
