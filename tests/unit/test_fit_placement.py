"""--fit's decisions on made-up machines and models (pure functions): a model that fits, one that
does not (refused with the numbers), a VRAM cap, hot experts from counts, dense layers spilling to
the CPU, NUMA replicate vs split, the prefill crossover; and the rule file written from them."""

from __future__ import annotations

import random

import pytest

from ktrans.fit.model_bytes import LayerBytes, ModelBytes
from ktrans.fit.numa import choose_numa
from ktrans.fit.placement import FitError, FitOptions, check_fits, decide, gpu_budget
from ktrans.fit.prefill import LayerShape, cpu_seconds, prefill_crossover, streamed_seconds
from ktrans.fit.profile import GpuInfo, NumaNode, Profile
from ktrans.fit.rulegen import render_rules
from ktrans.rules.files import shipped_rules
from ktrans.rules.schema import parse_rules

G = 2**30


def model(n_layers=10, dense_layers=1, experts=8, expert_cpu=G // 8, expert_gpu=G // 2, dense=G, kv=G // 10):
    layers = tuple(LayerBytes(i, dense, 4 * dense, kv, 2 * kv,
                              *((experts, expert_cpu, expert_gpu, expert_cpu) if i >= dense_layers else (0, 0, 0, 0)))
                   for i in range(n_layers))
    return ModelBytes("deepseek_v3", layers, outer_gpu=G // 2, outer_cpu=G, outer_all_cpu=2 * G,
                      activations_gpu=G // 4, top_k=2, hidden_size=4096, moe_intermediate=1024)


def machine(ram=64 * G, gpu=80 * G, nodes=1, h2d=None, gpu_tflops=None, read=None, cpu_tflops=None):
    per = ram // nodes
    return Profile(cpu_model="test CPU", isa="avx2", physical_cores=16, logical_cpus=32, ram_total=ram,
                   ram_available=ram, numa_nodes=[NumaNode(i, 16 // nodes, per, per) for i in range(nodes)],
                   gpus=[GpuInfo(0, "test GPU", gpu, gpu, h2d, gpu_tflops)] if gpu else [], read_gbs=read,
                   cpu_moe_tflops={"q4_k": cpu_tflops} if cpu_tflops else {})


def test_everything_fits_on_a_big_gpu():
    mb = model()
    p = decide(mb, machine(gpu=80 * G))
    assert p.gpu == "cuda:0" and p.gpu_layers == 10 and p.fits
    assert p.whole_layers(mb) == list(range(1, 10))                       # 9 layers x 8 experts x 0.5 GiB
    assert p.needed["cuda:0"] == G // 2 + 10 * (G + G // 10) + 9 * 8 * (G // 2)
    assert p.needed["cpu"] == G                                            # only the embedding
    assert all(h == pytest.approx(1.0) for h in p.hit_rate.values())


def test_no_gpu_puts_everything_on_the_cpu():
    mb = model()
    for prof, opts in ((machine(gpu=0), FitOptions()), (machine(), FitOptions(use_gpu=False))):
        p = decide(mb, prof, opts)
        assert p.gpu is None and p.gpu_layers == 0 and not p.gpu_experts
        assert p.needed == {"cpu": 2 * G + 10 * (4 * G + G // 5) + 9 * 8 * (G // 8)}


def test_vram_cap_fills_whole_layers_in_order_then_part_of_one():
    mb = model()
    opts = FitOptions(gpu_memory=24 * G)
    p = decide(mb, machine(gpu=80 * G), opts)
    assert p.needed["cuda:0"] <= p.available["cuda:0"] == gpu_budget(machine(gpu=80 * G), mb, opts) < 24 * G
    layers = sorted(p.gpu_experts)
    assert layers == list(range(1, layers[-1] + 1))                       # first MoE layers first
    assert all(len(p.gpu_experts[i]) == 8 for i in layers[:-1])
    assert p.gpu_experts[layers[-1]] == tuple(range(len(p.gpu_experts[layers[-1]])))
    left = p.available["cuda:0"] - p.needed["cuda:0"]
    assert 0 <= left < G // 2                                              # not even one more expert fits
    assert not p.counted


def test_counts_pick_the_most_used_experts():
    mb = model()
    rng = random.Random(0)
    counts = {i: [rng.randrange(1, 50) for _ in range(8)] for i in range(1, 10)}
    counts[5][3] = 10_000                                                  # one very hot expert
    p = decide(mb, machine(gpu=80 * G), FitOptions(gpu_memory=18 * G), counts)
    assert p.counted and 3 in p.gpu_experts[5]
    chosen = [(i, e) for i, ids in p.gpu_experts.items() for e in ids]
    share = lambda i, e: counts[i][e] / sum(counts[i])  # noqa: E731
    worst = min(share(i, e) for i, e in chosen)
    best_left = max(share(i, e) for i in counts for e in range(8) if (i, e) not in chosen)
    assert worst >= best_left
    for i, ids in p.gpu_experts.items():
        assert p.hit_rate[i] == pytest.approx(sum(share(i, e) for e in ids))


def test_small_gpu_runs_late_layers_on_the_cpu():
    mb = model()
    p = decide(mb, machine(gpu=6 * G))
    assert 0 < p.gpu_layers < 10 and p.fits
    assert all(i < p.gpu_layers for i in p.gpu_experts)
    assert any("run on the CPU" in n for n in p.notes)
    tiny = decide(mb, machine(gpu=int(1.5 * G)))                          # not even the first layer
    assert tiny.gpu is None and any("everything runs on the CPU" in n for n in tiny.notes)


def test_too_big_for_ram_is_refused_with_numbers():
    mb = model(expert_cpu=4 * G)                                           # 9 x 8 x 4 GiB of experts
    p = decide(mb, machine(ram=64 * G, gpu=24 * G))
    assert not p.fits
    with pytest.raises(FitError) as e:
        check_fits(p.needed, p.available, "big-model.gguf")
    msg = str(e.value)
    assert "big-model.gguf does not fit" in msg
    assert f"cpu: needs {p.needed['cpu'] / G:.1f} GiB, {p.available['cpu'] / G:.1f} GiB usable" in msg
    assert "cuda:0: needs" in msg and "smaller quantization" in msg
    check_fits({"cpu": 1}, {"cpu": 1}, "ok")                               # equal is fine


def test_two_numa_nodes_replicate_when_each_holds_a_copy_else_split():
    mb = model()                                                           # 9 GiB of CPU experts
    rep = decide(mb, machine(ram=128 * G, gpu=0, nodes=2))
    assert (rep.numa.mode, rep.numa.nodes, rep.numa.copies) == ("replicate", 2, 2)
    assert rep.needed["cpu"] == 2 * G + 10 * (4 * G + G // 5) + 2 * 9 * G
    spl = decide(mb, machine(ram=60 * G, gpu=0, nodes=2))
    assert (spl.numa.mode, spl.numa.copies) == ("split", 1) and spl.fits
    assert any("split" in n and "replicate:" in n for n in spl.notes)     # the cost of each, for explain
    assert decide(mb, machine(ram=128 * G, gpu=0, nodes=1)).numa.mode is None


def test_numa_choice_uses_the_fullest_node():
    prof = machine(ram=100 * G, nodes=2)
    prof.numa_nodes[1].mem_free = 10 * G                                   # one node nearly full
    assert choose_numa(20 * G, 0, prof, 0, 0.0).mode == "split"
    prof.numa_nodes[1].mem_free = 50 * G
    assert choose_numa(20 * G, 0, prof, 0, 0.0).mode == "replicate"
    assert choose_numa(0, 0, prof, 0, 0.0).mode is None


def test_prefill_crossover_from_measured_rates():
    mb = model(experts=64, expert_cpu=8 << 20)
    assert prefill_crossover(mb, machine()) is None                       # nothing measured
    prof = machine(h2d=50.0, gpu_tflops=400.0, read=200.0, cpu_tflops=2.0)
    c = prefill_crossover(mb, prof)
    lb = mb.moe_layers()[0]
    shape = LayerShape(lb.num_experts, mb.hidden_size, mb.moe_intermediate, mb.top_k, lb.expert_cpu, lb.expert_stored)
    assert c.crossover is not None and c.crossover > 1
    at = lambda t: (streamed_seconds(t, shape, c.stream_s, 400.0), cpu_seconds(t, shape, 2.0, 200.0))  # noqa: E731
    assert at(c.crossover)[0] < at(c.crossover)[1] and at(c.crossover - 1)[0] >= at(c.crossover - 1)[1]
    assert c.stream_s == pytest.approx(64 * (8 << 20) / 50e9)
    slower_link = prefill_crossover(mb, machine(h2d=5.0, gpu_tflops=400.0, read=200.0, cpu_tflops=2.0))
    assert slower_link.crossover > c.crossover                             # a slower PCIe moves it later
    never = prefill_crossover(mb, machine(h2d=50.0, gpu_tflops=1.0, read=200.0, cpu_tflops=2.0))
    assert never.crossover is None                                         # a GPU slower than the CPU


def _rules(p, mb, copy_rules=frozenset()):
    text = render_rules(p, mb, shipped_rules("deepseek_v3").read_text(), copy_rules=set(copy_rules),
                        header=["test header"])
    return text, parse_rules(text)


def test_rule_file_for_experts_on_the_gpu():
    mb = model()
    p = decide(mb, machine(gpu=80 * G), FitOptions(gpu_memory=24 * G))
    text, rules = _rules(p, mb)
    assert text.startswith("# test header\ndefault_device: cuda:0\n")
    first = rules.rules[0]
    assert first.op == "hybrid_experts" and first.device == "cuda:0" and first.kwargs["gpu_experts"] == "all"
    assert first.layers.indices(10) == frozenset(p.whole_layers(mb))
    part = rules.rules[1]
    assert part.op == "hybrid_experts" and part.kwargs["gpu_experts"] == list(p.gpu_experts[max(p.gpu_experts)])
    assert rules.rules[2].op == "cpu_experts"                              # then the shipped rules as they are


def test_rule_file_for_cpu_layers_and_numa():
    mb = model()
    p = decide(mb, machine(ram=512 * G, gpu=6 * G, nodes=2))
    text, rules = _rules(p, mb, copy_rules={2, 3, 4, 6})
    start = p.gpu_layers
    moved = [r for r in rules.rules if r.layers is not None and r.layers.text == f"{start}:"]
    assert [r.op for r in moved] == ["moe_block", "mla_attention", "gated_mlp", "rms_norm", "default"]
    assert all(r.device == "cpu" for r in moved)
    assert rules.rules[-1].op == "default"                                 # the catch-all comes last
    cpu = next(r for r in rules.rules if r.op == "cpu_experts")
    assert cpu.kwargs["numa"] == p.numa.mode and cpu.kwargs["numa_nodes"] == 2


def test_rule_file_all_cpu():
    mb = model()
    p = decide(mb, machine(gpu=0))
    text, rules = _rules(p, mb)
    assert "default_device: cpu" in text
    assert all(r.device in (None, "cpu") for r in rules.rules) and "hybrid_experts" not in text
