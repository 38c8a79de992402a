"""hybrid_experts: experts split between a "GPU" part (torch, here placed on the CPU device) and the
CPU kernels equal all-CPU experts within tolerance: every split (none, some, all on the "GPU"),
both GPU paths (grouped matmul, per-expert loop), skipped slots, quantized stacks, the MoE
block's submit/sync overlap, planned bytes, bad kwargs; and on a real GPU (marked `gpu`)."""

from __future__ import annotations

import pytest
import torch

from ktrans.errors import KtransError
from ktrans.operators.hybrid_experts import grouped_moe, grouped_supported
from ktrans.operators.registry import get_operator
from tests.operators.hf_tiny import model_source, tiny_hf_model
from tests.operators.test_experts import KEY, Q8Source, nmse, routing
from tests.tolerances import F32_ATOL, F32_RTOL, GROUPED_BF16_NMSE, MOE_NMSE


def build(arch, gpu_experts, device="cpu", source=None, **kwargs):
    config, model = tiny_hf_model(arch)
    hf = model.model.layers[1].mlp.experts
    src = source(model) if source else model_source(model)
    mk = lambda name, **kw: get_operator(name)(key=KEY, orig_module=hf, config=config, device=device, **kw)  # noqa: E731
    op = mk("hybrid_experts", gpu_experts=gpu_experts, **kwargs)
    op.load_weights(src)
    ref = get_operator("cpu_experts")(key=KEY, orig_module=hf, config=config, device="cpu")
    ref.load_weights(src)
    return config, hf, op, ref


def _split(e: int) -> list:
    """A few GPU sets for a layer of e experts: one expert, a random third, all but one, all."""
    third = sorted(torch.randperm(e)[: max(1, e // 3)].tolist())
    return [[int(torch.randint(e, ()))], third, list(range(1, e)), "all"]


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral", "gpt_oss", "glm4_moe", "minimax_m2", "qwen3_next"])
def test_split_equals_all_cpu(arch):
    """(gpt-oss: both parts with its clamped SwiGLU and expert biases.)"""
    config, model = tiny_hf_model(arch)
    e = model.model.layers[1].mlp.experts.gate_up_proj.shape[0]
    for gpu in _split(e):
        config, hf, op, ref = build(arch, gpu)
        for t in (1, 5, 33):
            x = torch.randn(t, config.hidden_size)
            ids, w = routing(config, hf, t)
            with torch.no_grad():
                want = ref(x, ids, w)
                torch.testing.assert_close(op(x, ids, w), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)
                torch.testing.assert_close(op.forward_native(x, ids, w), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.parametrize("numa", ["replicate", "split"])
def test_cpu_part_in_numa_layouts(numa):
    """The CPU part as --fit writes it for two NUMA nodes (simulated here as two thread groups)."""
    config, hf, op, ref = build("deepseek_v3", [1, 4], numa=numa, numa_nodes=2)
    assert op.cpu_part.numa_mode == numa
    x = torch.randn(6, config.hidden_size)
    ids, w = routing(config, hf, 6)
    torch.testing.assert_close(op(x, ids, w), ref(x, ids, w), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


def test_loop_fallback_and_skipped_slots():
    config, hf, op, ref = build("qwen3_moe", [0, 2, 5])
    x = torch.randn(9, config.hidden_size)
    ids, w = routing(config, hf, 9)
    ids[3, 1] = -1                                                                        # skipped everywhere
    want = ref(x, ids, w)
    assert op._grouped == grouped_supported("cpu", torch.float32)
    torch.testing.assert_close(op(x, ids, w), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)
    op._grouped = False                                                                   # the per-expert loop
    torch.testing.assert_close(op(x, ids, w), want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.skipif(not grouped_supported("cpu", torch.float32), reason="torch._grouped_mm lacks a CPU path here")
def test_grouped_moe_ignores_other_slots_and_empty_groups():
    g, h, i, t, k = 4, 16, 8, 6, 3
    gate_up, down = torch.randn(g, 2 * i, h), torch.randn(g, h, i)
    x, w = torch.randn(t, h), torch.rand(t, k)
    ids = torch.tensor([[0, -1, 3]] * t)                                                  # experts 1, 2 unused
    got = grouped_moe(x, ids, w, gate_up.transpose(1, 2), down.transpose(1, 2))
    from ktrans.operators.experts import torch_moe

    want = torch_moe(x, ids, w, gate_up[:, :i], gate_up[:, i:], down)
    torch.testing.assert_close(got, want, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)
    assert torch.isfinite(grouped_moe(x, torch.full((t, k), -1), w, gate_up.transpose(1, 2),
                                      down.transpose(1, 2))).all()


def test_quantized_stack_bf16_inputs_and_submit():
    config, hf, op, ref = build("qwen3_moe", [1, 3], source=lambda m: Q8Source(dict(m.state_dict())))
    x = torch.randn(7, config.hidden_size).bfloat16()
    ids, w = routing(config, hf, 7)
    got = op.sync(op.submit(x, ids, w))
    assert got.dtype == torch.bfloat16
    assert nmse(got.float(), ref.forward_native(x.float(), ids, w)) < MOE_NMSE["bf16"] + MOE_NMSE["q8_0"]


def test_in_the_moe_block(tmp_path):
    """The whole MoE block with hybrid experts equals the block with CPU experts."""
    from ktrans.rules import prepare_model, shipped_rules
    from tests.rules.test_shipped_rules import CONFIGS, _weights

    config = CONFIGS["deepseek_v3"]()
    weights = _weights(config)
    text = shipped_rules("deepseek_v3").read_text()
    hot = ("rules:\n  - match: {name: '^model\\.layers\\.\\d+\\.mlp\\.experts$'}\n"
           "    replace: {class: hybrid_experts, kwargs: {gpu_experts: [0, 3, 5]}}\n    recursive: false\n")
    (tmp_path / "cpu.yaml").write_text(text)
    (tmp_path / "hybrid.yaml").write_text(text.replace("rules:\n", hot, 1))
    m_cpu, _ = prepare_model(config, weights, rules_path=tmp_path / "cpu.yaml", device_map="cpu")
    m_hyb, plan = prepare_model(config, weights, rules_path=tmp_path / "hybrid.yaml", device_map="cpu")
    assert any(e.op == "hybrid_experts" for e in plan.entries)
    layer = next(i for i, lyr in enumerate(m_hyb.model.layers) if type(getattr(lyr.mlp, "experts", None)).__name__ == "HybridExperts")
    x = torch.randn(1, 11, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(m_hyb.model.layers[layer].mlp(x), m_cpu.model.layers[layer].mlp(x),
                                   rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


def test_planned_bytes_split_between_devices():
    config, model = tiny_hf_model("qwen3_moe")
    hf = model.model.layers[1].mlp.experts
    e, two_i, h = hf.gate_up_proj.shape
    one = 3 * (two_i // 2) * h * 4                                                        # one f32 expert
    cls = get_operator("hybrid_experts")
    plan = lambda **kw: cls.planned_bytes(key=KEY, orig_module=hf, config=config, device=torch.device("cuda:0"),  # noqa: E731
                                          kwargs=kw, weights=model_source(model))
    got = plan(gpu_experts=[0, 1], dtype="float32", numa="split", numa_nodes=1)
    assert got == {"cuda:0": 2 * one, "cpu": (e - 2) * one}
    assert plan(gpu_experts="all") == {"cuda:0": e * one // 2}                            # bf16 on CUDA


@pytest.mark.parametrize("value, match", [([], "non-empty list"), ([0, 99], r"\[99\] out of range"),
                                          ("some", "'all' or"), ([True], "'all' or")])
def test_bad_gpu_experts(value, match):
    config, model = tiny_hf_model("qwen3_moe")
    with pytest.raises(KtransError, match=match):
        get_operator("hybrid_experts")(key=KEY, orig_module=model.model.layers[1].mlp.experts, config=config,
                                       device="cpu", gpu_experts=value)


@pytest.mark.gpu
def test_split_on_a_real_gpu():
    """GPU experts on cuda:0 (bf16, grouped matmul), CPU experts in the kernels; CUDA inputs take
    the stream-ordered CPU path."""
    config, hf, op, ref = build("qwen3_moe", [0, 2, 4, 6], device="cuda:0")
    for t in (1, 8, 200):
        x = torch.randn(t, config.hidden_size).bfloat16()
        ids, w = routing(config, hf, t)
        got = op(x.cuda(), ids.cuda(), w.cuda())
        assert got.is_cuda and got.dtype == torch.bfloat16
        assert nmse(got.float().cpu(), ref.forward_native(x.float(), ids, w)) < GROUPED_BF16_NMSE
