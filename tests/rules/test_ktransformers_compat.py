"""KTransformers rule files load, translated to ktrans operators, without importing anything.

The first file is KTransformers' DeepSeek-V3-Chat.yaml (as shipped there, compacted); the
second is the shape of its multi-GPU files (layer-range regexes and `transfer_map`).
"""

from __future__ import annotations

import pytest
import transformers
from test_shipped_rules import CONFIGS

from ktrans.config.arch import build_meta_model
from ktrans.errors import KtransError
from ktrans.rules.explain import notes
from ktrans.rules.plan import plan_model
from ktrans.rules.schema import parse_rules

KT_DEEPSEEK_V3 = r"""
- match: {class: ktransformers.models.modeling_deepseek_v3.DeepseekV3RotaryEmbedding}
  replace: {class: ktransformers.operators.RoPE.YarnRotaryEmbeddingV3, kwargs: {generate_device: cuda, prefill_device: cuda}}
- match: {name: "^lm_head$", class: torch.nn.Linear}
  replace: {class: ktransformers.operators.linear.KTransformersLinear,
            kwargs: {generate_device: cuda, prefill_device: cuda, generate_op: KLinearMarlin, prefill_op: KLinearTorch}}
- match: {name: "^model\\.layers\\.(?!.*self_attn\\.kv_b_proj).*$", class: torch.nn.Linear}
  replace: {class: ktransformers.operators.linear.KTransformersLinear,
            kwargs: {generate_device: cuda, prefill_device: cuda, generate_op: KLinearMarlin, prefill_op: KLinearTorch}}
- match: {name: "^model\\.layers\\..*\\.mlp$", class: ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE}
  replace: {class: ktransformers.operators.experts.KDeepseekV3MoE, kwargs: {generate_device: cuda, prefill_device: cuda}}
- match: {class: ktransformers.models.modeling_deepseek_v3.MoEGate}
  replace: {class: ktransformers.operators.gate.KMoEGate, kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
- match: {name: "^model\\.layers\\..*\\.mlp\\.experts$"}
  replace: {class: ktransformers.operators.experts.KTransformersExperts,
            kwargs: {prefill_device: cuda, prefill_op: KExpertsTorch, generate_device: cpu, generate_op: KExpertsCPU,
                     out_device: cuda, backend: AMXInt8}}
  recursive: False
- match: {name: "^model\\.layers\\..*\\.self_attn$"}
  replace: {class: ktransformers.operators.attention.KDeepseekV2Attention,
            kwargs: {generate_device: cuda, prefill_device: cuda, absorb_for_prefill: False}}
- match: {name: "^model$"}
  replace: {class: ktransformers.operators.models.KDeepseekV2Model, kwargs: {per_layer_prefill_intput_threshold: 0}}
- match: {name: "^model.embed_tokens"}
  replace: {class: "default", kwargs: {generate_device: cpu, prefill_device: cpu}}
"""


def _plan(text, config, **kw):
    return plan_model(build_meta_model(config), parse_rules(text, source="kt.yaml"), config=config,
                      default_device="cuda:0", **kw)


def test_deepseek_v3_chat_file_translates():
    config = CONFIGS["deepseek_v3"]()
    rules = parse_rules(KT_DEEPSEEK_V3, source="kt.yaml").rules
    assert [r.op for r in rules] == ["default", "linear", "linear", "moe_block", "default", "cpu_experts",
                                     "mla_attention", "default", "default"]
    experts = rules[5]
    assert experts.device == "cpu" and experts.kwargs == {"backend": "amx_int8"} and not experts.recursive
    assert rules[6].kwargs == {"absorb_for_prefill": False} and not rules[6].recursive
    plan = _plan(KT_DEEPSEEK_V3, config)
    moe = list(range(config.first_k_dense_replace, config.num_hidden_layers))
    counts = plan.counts_per_rule()
    assert counts[6] == len(moe) and counts[4] == len(moe) and counts[7] == config.num_hidden_layers
    assert plan.entry("model.layers.3.mlp.experts").op == "cpu_experts"
    assert plan.entry("model.layers.0.mlp.gate_proj").op == "linear"            # dense MLP of layer 0
    assert plan.entry("model.layers.3.mlp.shared_experts.up_proj").device == "cuda:0"
    assert "model.layers.3.self_attn.kv_b_proj" not in {e.path for e in plan.entries}  # owned by mla_attention
    assert plan.entry("model.embed_tokens").device == "cpu"
    text = "\n".join(notes(plan))
    assert "out_device 'cuda' ignored" in text and "prefill_device 'cuda' ignored" in text
    assert "generate_op 'KLinearMarlin' ignored" in text
    assert "per_layer_prefill_intput_threshold '0' ignored" in text
    assert "rule 5 (kt.yaml:12): no effect" in text                  # MoEGate: moe_block loads the router


def test_multi_gpu_layer_split_with_transfer_map():
    config = CONFIGS["deepseek_v3"]()
    text = r"""
- match: {name: "^model\\.layers\\.([3])\\.mlp\\.experts$"}
  replace: {class: ktransformers.operators.experts.KTransformersExperts, kwargs: {generate_device: cpu, generate_op: KExpertsCPU}}
  recursive: False
- match: {name: "^model\\.layers\\.([4-7])\\.mlp\\.experts$"}
  replace: {class: ktransformers.operators.experts.KTransformersExperts, kwargs: {generate_device: "cuda:1", generate_op: KExpertsMarlin}}
  recursive: False
- match: {name: "^model\\.layers\\.([0-2])\\."}
  replace: {class: "default", kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}}
- match: {name: "^model\\.layers\\.([3-7])\\."}
  replace: {class: "default", kwargs: {generate_device: "cuda:1", prefill_device: "cuda:1"}}
- match: {name: "^model$"}
  replace: {class: ktransformers.operators.models.KDeepseekV2Model, kwargs: {transfer_map: {3: "cuda:1"}}}
"""
    plan = _plan(text, config)
    assert plan.transfer_map == {3: "cuda:1"}
    assert plan.entry("model.layers.4.mlp.experts").op == "torch_experts"
    assert plan.entry("model.layers.4.mlp.experts").device == "cuda:1"
    assert plan.entry("model.layers.2.input_layernorm").device == "cuda:0"
    mapped = _plan(text, config, device_map={"cuda:1": "cpu"})
    assert mapped.transfer_map == {3: "cpu"} and mapped.entry("model.layers.5.self_attn").device == "cpu"


def test_kt_match_aliases_reach_transformers_names():
    config = CONFIGS["deepseek_v2"]()
    text = "- match: {class: ktransformers.models.modeling_deepseek.DeepseekV2MoE}\n" \
           "  replace: {class: ktransformers.operators.experts.KDeepseekV2MoE}\n"
    plan = _plan(text, config)
    assert plan.counts_per_rule() == {1: config.num_hidden_layers - config.first_k_dense_replace}


def test_kt_class_with_unknown_kwarg_is_dropped_with_a_note_but_native_is_an_error():
    text = "- match: {name: '^lm_head$'}\n  replace: {class: ktransformers.operators.linear.KTransformersLinear, " \
           "kwargs: {generate_device: cuda, marlin_group: 64}}\n"
    rule = parse_rules(text).rules[0]
    assert rule.kwargs == {} and any("marlin_group '64' ignored" in n for n in rule.notes)
    with pytest.raises(KtransError, match="linear takes no kwargs marlin_group"):
        parse_rules(text.replace("ktransformers.operators.linear.KTransformersLinear", "linear"))


def test_trust_rules_imports_instead_of_translating():
    with pytest.raises(KtransError, match="cannot import 'ktransformers.operators.linear.KTransformersLinear'"):
        parse_rules("- match: {name: x}\n  replace: {class: ktransformers.operators.linear.KTransformersLinear}\n",
                    source="kt.yaml", trust_rules=True)


def test_qwen2_moe_file_shape():
    config = CONFIGS["qwen2_moe"]()
    assert isinstance(config, transformers.Qwen2MoeConfig)
    text = r"""
- match: {name: "^model\\.layers\\..*\\.mlp$", class: transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock}
  replace: {class: ktransformers.operators.experts.KQwen2MoeSparseMoeBlock}
- match: {name: "^model\\.layers\\..*\\.mlp\\.experts$"}
  replace: {class: ktransformers.operators.experts.KTransformersExperts, kwargs: {generate_device: cpu, backend: llamafile}}
  recursive: False
- match: {name: "^model\\.layers\\..*\\.self_attn$"}
  replace: {class: ktransformers.operators.balance_serve_attention.KQwen2MoeAttention}
"""
    plan = _plan(text, config)
    assert plan.entry("model.layers.1.mlp").op == "moe_block"
    assert plan.entry("model.layers.1.mlp.experts").kwargs == {"backend": "gguf"}
    assert plan.entry("model.layers.1.self_attn").op == "gqa_attention"
