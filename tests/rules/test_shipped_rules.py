"""Every shipped rule file, against the real operator registry, on every architecture.

Planning uses small configs with enough layers for every variant (the 2-GPU split needs MoE
layers in both halves, gpu-experts needs DeepSeek-V3's and GLM-4.5's first MoE layers 3-6). Applying maps every
CUDA device to the CPU, so each file runs here without a GPU. The AMX variant's packed backends
(amx_int8) have AVX-512, AVX2 and generic kernels beside the AMX ones, so that file applies on any
CPU and is not marked amx.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from ktrans.config.arch import ARCHS, arch_from_config, build_meta_model
from ktrans.errors import KtransError
from ktrans.rules.apply import apply_plan
from ktrans.rules.explain import explain_rows
from ktrans.rules.files import VARIANTS, list_shipped, rules_dir, shipped_rules
from ktrans.rules.plan import plan_model
from ktrans.rules.schema import load_rules
from ktrans.rules.state_dict import StateDictSource

_COMMON = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
_DEEPSEEK = dict(_COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                 num_experts_per_tok=2, n_shared_experts=1, num_key_value_heads=4, kv_lora_rank=16,
                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
_HYBRID = dict(num_hidden_layers=8, full_attention_interval=2, num_key_value_heads=2, head_dim=16,
               moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
CONFIGS = {
    "deepseek_v3": lambda: transformers.DeepseekV3Config(**_DEEPSEEK, num_hidden_layers=8, first_k_dense_replace=3,
                                                         q_lora_rank=32, n_group=2, topk_group=1),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(**_DEEPSEEK, num_hidden_layers=6, first_k_dense_replace=1,
                                                         q_lora_rank=None),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=32,
                                                     num_hidden_layers=5, num_experts=8, num_experts_per_tok=2,
                                                     num_key_value_heads=2, head_dim=16),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=48, num_hidden_layers=5,
                                                     num_experts=8, num_experts_per_tok=2, num_key_value_heads=2),
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, intermediate_size=32, num_hidden_layers=5,
                                                  num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, intermediate_size=96, num_hidden_layers=5,
                                              num_key_value_heads=2),
    "llama": lambda: transformers.LlamaConfig(**_COMMON, intermediate_size=96, num_hidden_layers=5,
                                              num_key_value_heads=2),
    "gpt_oss": lambda: transformers.GptOssConfig(**_COMMON, intermediate_size=32, num_hidden_layers=6,
                                                 num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
                                                 head_dim=16, sliding_window=4),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(**_COMMON, intermediate_size=96, moe_intermediate_size=32,
                                                   num_hidden_layers=8, first_k_dense_replace=3, n_routed_experts=8,
                                                   num_experts_per_tok=2, n_shared_experts=1, num_key_value_heads=2,
                                                   head_dim=16, use_qk_norm=True, attention_bias=True),
    "minimax_m2": lambda: transformers.MiniMaxM2Config(**_COMMON, intermediate_size=32, num_hidden_layers=6,
                                                       num_local_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
                                                       head_dim=16, rotary_dim=8, bos_token_id=1, eos_token_id=2),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_COMMON, intermediate_size=96, num_hidden_layers=6,
                                                    num_key_value_heads=2, head_dim=16, sliding_window=4),
    # hybrids: linear and full attention layers in both halves of the 2-GPU split
    "qwen3_next": lambda: transformers.Qwen3NextConfig(**_COMMON, **_HYBRID, intermediate_size=96),
    "qwen3_5_moe": lambda: transformers.Qwen3_5MoeTextConfig(**_COMMON, **_HYBRID),
}
SHIPPED = [(p.stem.split("-", 1)[0], p.stem.split("-", 1)[1] if "-" in p.stem else "") for p in list_shipped()]


def _moe_layers(config) -> list[int]:
    if not arch_from_config(config).is_moe:
        return []
    first = getattr(config, "first_k_dense_replace", 0)
    return list(range(first, config.num_hidden_layers))


def test_every_architecture_ships_every_variant():
    for arch, spec in ARCHS.items():
        want = set(VARIANTS) if spec.is_moe else {"", "cpu", "2gpu"}
        assert {v for a, v in SHIPPED if a == arch} == want, arch
        assert shipped_rules(arch).parent == rules_dir()


@pytest.mark.parametrize("arch,variant", SHIPPED, ids=[f"{a}-{v or 'default'}" for a, v in SHIPPED])
def test_shipped_file_plans(arch, variant):
    config = CONFIGS[arch]()
    plan = plan_model(build_meta_model(config), load_rules(shipped_rules(arch, variant)), config=config,
                      default_device="cuda:0")
    ops = {}
    for e in plan.entries:
        ops.setdefault(e.op, []).append(e)
    n, moe = config.num_hidden_layers, _moe_layers(config)
    attention = "mla_attention" if ARCHS[arch].mla else "gqa_attention"
    linear = f"{'cpu_' if variant == 'cpu' else ''}gated_deltanet"     # hybrids' linear-attention layers
    if variant == "cpu":  # all-CPU files keep the projections as stored (attention_cpu.py)
        attention = f"cpu_{attention}"
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * n
    assert len(ops[attention]) == kinds.count("full_attention") + kinds.count("sliding_attention")
    assert len(ops.get(linear, [])) == kinds.count("linear_attention")
    assert len(ops.get("moe_block", [])) == len(moe)
    experts = ops.get("cpu_experts", []) + ops.get("hybrid_experts", [])
    assert sorted(int(e.path.split(".")[2]) for e in experts) == moe
    assert all(e.device == "cpu" for e in ops.get("cpu_experts", []))
    assert plan.entry("model.embed_tokens").device == "cpu"
    devices = {e.device for e in plan.entries}
    if variant == "cpu":
        assert devices == {"cpu"}
    elif variant == "2gpu":
        assert devices == {"cpu", "cuda:0", "cuda:1"} and plan.transfer_map == {n // 2: "cuda:1"}
        assert plan.entry("lm_head").device == "cuda:1"
    else:
        assert devices == {"cpu", "cuda:0"}
    if variant == "gpu-experts":
        gpu = [int(e.path.split(".")[2]) for e in ops["hybrid_experts"]]
        assert gpu == moe[:4] and all(e.device == "cuda:0" for e in ops["hybrid_experts"])
    if variant == "amx":
        assert {e.kwargs["backend"] for e in ops["cpu_experts"]} == {"amx_int8"}
    mapped = plan_model(build_meta_model(config), load_rules(shipped_rules(arch, variant)), config=config,
                        default_device="cuda:0", device_map="cpu")
    # NOTE: totals differ from the GPU plan: "auto" dtypes are bf16 on CUDA and f32 on the CPU.
    assert set(mapped.bytes_per_device()) == {"cpu"}


def _weights(config) -> StateDictSource:
    model = getattr(transformers, arch_from_config(config).hf_class)(config)
    return StateDictSource(model.state_dict(), config=config)


APPLY = [pytest.param(a, v, id=f"{a}-{v or 'default'}") for a, v in SHIPPED]


@pytest.mark.parametrize("arch,variant", APPLY)
def test_shipped_file_applies_on_cpu(arch, variant):
    config = CONFIGS[arch]()
    model = build_meta_model(config)
    plan = plan_model(model, load_rules(shipped_rules(arch, variant)), config=config, default_device="cuda:0",
                      device_map="cpu")
    rows = explain_rows(plan)
    apply_plan(model, plan, _weights(config))
    for row in rows:
        for path in row.paths:
            mod = model.get_submodule(path)
            if row.op == "default":
                assert type(mod).__name__ == row.module_class
                own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
                assert all(t.device.type == "cpu" for t in own)
            else:
                assert mod.name == row.op and mod.device == torch.device("cpu"), path
        if row.op == "default":
            held = sum(t.numel() * t.element_size() for p in row.paths
                       for t in list(model.get_submodule(p).parameters(recurse=False))
                       + list(model.get_submodule(p).buffers(recurse=False)))
            assert held == row.total_bytes, row.group


def test_rules_dir_in_a_wheel_and_in_a_checkout(tmp_path):
    checkout = tmp_path / "src"
    (checkout / "ktrans").mkdir(parents=True)
    (checkout / "optimize_rules").mkdir()
    (checkout / "optimize_rules" / "qwen2.yaml").write_text("[]")
    assert rules_dir(checkout / "ktrans") == checkout / "optimize_rules"
    wheel = tmp_path / "site-packages" / "ktrans"
    (wheel / "optimize_rules").mkdir(parents=True)
    (wheel / "optimize_rules" / "qwen2.yaml").write_text("[]")
    assert rules_dir(wheel) == wheel / "optimize_rules"
    with pytest.raises(KtransError, match="no optimize_rules directory with rule files"):
        rules_dir(tmp_path / "empty" / "ktrans")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["", "2gpu"], ids=["default", "2gpu"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_default_and_2gpu_files_apply_on_gpus(arch, variant):
    """On the accelerator machine: the default file on cuda:0, the 2-GPU split on two GPUs."""
    if variant == "2gpu" and torch.cuda.device_count() < 2:
        pytest.skip("the 2-GPU rule file needs two CUDA GPUs")
    config = CONFIGS[arch]()
    model = build_meta_model(config)
    plan = plan_model(model, load_rules(shipped_rules(arch, variant)), config=config, default_device="cuda:0")
    apply_plan(model, plan, _weights(config))
    for e in plan.entries:
        mod = model.get_submodule(e.path) if e.op != "default" or e.nbytes else None
        if mod is not None and e.op != "default":
            assert mod.device == torch.device(e.device), e.path
        elif mod is not None:
            assert all(str(t.device) == e.device for t in mod.parameters(recurse=False)), e.path
