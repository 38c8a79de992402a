"""--fit end to end on tiny models: the written rule file is valid, plans within the budget, and
the model it builds (GPU parts mapped to the CPU here) gives the logits of the shipped placement;
`ktrans rules explain --fit` with its what-if flags; the refusal before loading; the load flags."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from ktrans.cli.main import main
from ktrans.errors import UsageError
from ktrans.fit.fit import fit_rules, planned_totals, what_if
from ktrans.fit.model_bytes import model_bytes
from ktrans.fit.placement import FitError, FitOptions
from ktrans.fit.probe import facts
from ktrans.rules.files import shipped_rules
from ktrans.rules.schema import load_rules
from ktrans.weights.source import open_weights

MOE = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "glm4_moe", "minimax_m2",
       "qwen3_next", "qwen3_5_moe"]


def _gguf(tiny_model, arch):
    return str(tiny_model(arch, "f32", with_safetensors=False) / "model.gguf")


def _gpu_for(mb, experts: float) -> int:
    """GPU bytes that hold the parts outside the experts, the KV cache and `experts` layers' worth
    of experts (with FitOptions(gpu_reserve=0, margin=0))."""
    moe = mb.moe_layers()
    return (mb.outer_gpu + sum(lb.dense_gpu + lb.kv_gpu for lb in mb.layers) + mb.activations_gpu
            + int(experts * moe[0].num_experts * moe[0].expert_gpu))


def _logits(runner, ids):
    from ktrans.engine.batch import ForwardBatch

    pages = torch.arange(runner.num_pages, dtype=torch.int32)
    batch = ForwardBatch(input_ids=ids, positions=torch.arange(len(ids)), seq_ids=[0], num_computed=[0],
                         num_new=[len(ids)], page_table=pages[None], logits_indices=torch.arange(len(ids)),
                         state_rows=torch.tensor([[0, 1]]))        # (models with recurrent layers)
    return runner.execute(batch)


@pytest.mark.parametrize("arch", MOE)
def test_fitted_rules_build_the_same_model(arch, tiny_model, tmp_path):
    from ktrans.engine.model_runner import ModelRunner

    path = _gguf(tiny_model, arch)
    src = open_weights(None, path)
    config = src.config()
    mb, _ = model_bytes(config, src, rules_path=shipped_rules(arch), cache_lens=256, page_size=64)
    profile = what_if(facts(), gpu_memory=_gpu_for(mb, 1.5))
    opts = FitOptions(gpu_reserve=0, ram_reserve=0, margin=0.0)
    res = fit_rules(config, src, profile=profile, opts=opts, cache_lens=256, page_size=64, out_dir=tmp_path, label=arch)
    res.check()
    p = res.placement
    assert p.gpu == "cuda:0" and p.gpu_layers == config.num_hidden_layers
    assert len(p.whole_layers(mb)) == 1 and len(p.gpu_experts) == 2           # one whole layer, half of the next
    assert res.totals["cuda:0"] <= p.available["cuda:0"] and res.totals == planned_totals(
        config, src, res.path, "cuda:0", cache_lens=256, page_size=64)
    ops = {e.op for e in load_rules(res.path).rules}
    assert "hybrid_experts" in ops
    ids = torch.randint(0, config.vocab_size, (12,))
    fitted = ModelRunner(gguf_path=path, optimize_config_path=res.path, device="cpu", cache_lens=256, progress=False)
    shipped = ModelRunner(gguf_path=path, device="cpu", cache_lens=256, progress=False)
    kinds = [type(getattr(layer.mlp, "experts", None)).__name__ for layer in fitted.model.model.layers]
    assert "HybridExperts" in kinds
    torch.testing.assert_close(_logits(fitted, ids), _logits(shipped, ids), rtol=1e-4, atol=1e-4)
    fitted.close()
    shipped.close()


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
def test_layers_past_the_gpu_run_on_the_cpu(arch, tiny_model, tmp_path):
    """A GPU that holds only the first layers: the rest move to the CPU through copied rules (and a
    dense model, with no experts to place, fits the same way); same logits as the shipped file."""
    from ktrans.engine.model_runner import ModelRunner

    path = _gguf(tiny_model, arch)
    src = open_weights(None, path)
    config = src.config()
    mb, _ = model_bytes(config, src, rules_path=shipped_rules(arch), cache_lens=256, page_size=64)
    first = mb.layers[0]
    gpu = mb.outer_gpu + mb.activations_gpu + first.dense_gpu + first.kv_gpu + 1
    res = fit_rules(config, src, profile=what_if(facts(), gpu_memory=gpu), cache_lens=256, page_size=64,
                    opts=FitOptions(gpu_reserve=0, ram_reserve=0, margin=0.0), out_dir=tmp_path, label=arch)
    res.check()
    assert res.placement.gpu_layers == 1 and not res.placement.gpu_experts
    plan_devices = {e.path: e.device for e in _plan(config, src, res.path).entries}
    assert plan_devices["model.layers.0.self_attn"] == "cuda:0"
    assert {d for p, d in plan_devices.items() if p.startswith("model.layers.1.")} == {"cpu"}
    assert plan_devices["lm_head"] == "cuda:0"
    ids = torch.randint(0, config.vocab_size, (9,))
    runners = [ModelRunner(gguf_path=path, optimize_config_path=p, device="cpu", cache_lens=256, progress=False)
               for p in (res.path, None)]
    torch.testing.assert_close(_logits(runners[0], ids), _logits(runners[1], ids), rtol=1e-4, atol=1e-4)


def _plan(config, src, rules):
    from ktrans.config.arch import build_meta_model
    from ktrans.rules.plan import plan_model

    return plan_model(build_meta_model(config), load_rules(rules), config=config, weights=src)


def _explain(capsys, *args):
    code = main(["rules", "explain", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KTRANS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_explain_fit_writes_and_explains_the_rules(capsys, cache, tiny_model):
    path = _gguf(tiny_model, "qwen3_moe")
    code, out, err = _explain(capsys, "--gguf_path", path, "--fit", "--gpu_memory", 1.05, "--cache_lens", 256)
    assert code == 0, err
    assert "hybrid_experts" in out and "note: fit: rules written to" in out
    written = list((cache / "fitted-rules").glob("*.yaml"))
    assert len(written) == 1 and str(written[0]) in out.replace("\n", "")
    assert load_rules(written[0]).rules[0].op == "hybrid_experts"
    code, out, _ = _explain(capsys, "--gguf_path", path, "--fit", "--device", "cpu", "--cache_lens", 256)
    assert code == 0 and "hybrid_experts" not in out and "cuda" not in out.split("note:")[0]


def test_explain_fit_shows_numa_and_refuses_with_numbers(capsys, cache):
    code, out, err = _explain(capsys, "--arch", "qwen3_moe", "--preset", "tiny", "--quant", "q4_k", "--fit",
                              "--gpu_memory", 1.02, "--ram", 8, "--numa_nodes", 2)
    assert code == 0, err
    assert "note: fit: NUMA: 2 nodes, experts replicated on each" in out
    code, out, err = _explain(capsys, "--arch", "deepseek_v3", "--preset", "deepseek-v3", "--quant", "q4_k_m",
                              "--fit", "--gpu_memory", 24, "--ram", 128)
    assert code == 2 and "weights per device" in out                       # the plan is shown, then refused
    assert "does not fit on this machine (cpu: needs" in err and "GiB usable; cuda:0: needs" in err


def test_fit_counts_the_recurrent_state_of_every_request(capsys, cache):
    """Qwen3-Next keeps ~147 MiB of recurrent state per running request (bf16 on the GPU): --fit
    and explain count it for --max_batch_size requests, and a fit that had room for one request's
    state moves experts off the GPU to make room for 64."""
    totals = {}
    for n in (1, 64):
        code, out, err = _explain(capsys, "--arch", "qwen3_next", "--preset", "qwen3-next-80b-a3b", "--quant", "q4_k_m",
                                  "--fit", "--gpu_memory", 24, "--ram", 64, "--cache_lens", 4096, "--max_batch_size", n)
        assert code == 0, err
        assert f"recurrent state for {n} request{'s' if n > 1 else ''}):" in out
        line = next(ln for ln in out.splitlines() if ln.startswith("weights + KV cache per device:"))
        totals[n] = {d: float(v) for d, v in re.findall(r"(cpu|cuda:0) ([0-9.]+) GiB", line.split("|")[0])}
    assert totals[64]["cpu"] > totals[1]["cpu"] + 2                        # experts moved to the CPU
    assert totals[64]["cuda:0"] <= 24


@pytest.mark.parametrize("flags, match", [(["--variant", "cpu"], "drop --variant"),
                                          (["--gpu_memory", "-1"], "positive number of GiB"),
                                          (["--numa_nodes", "0"], "at least 1")])
def test_explain_fit_flag_errors(capsys, cache, flags, match):
    code, _, err = _explain(capsys, "--arch", "qwen3_moe", "--preset", "tiny", "--quant", "q4_k", "--fit", *flags)
    assert code == 2 and match in err


def test_runner_refuses_before_loading(tiny_model, monkeypatch):
    from ktrans.engine import model_runner
    from ktrans.fit import probe

    monkeypatch.setattr(probe, "ram", lambda root=None: (1 << 40, 2**31 + (1 << 20)))  # 1 MiB past the reserve
    monkeypatch.setattr("ktrans.rules.apply.apply_plan", lambda *a, **k: pytest.fail("loading started"))
    with pytest.raises(FitError, match=r"does not fit on this machine \(cpu: needs .* GiB, 0.0 GiB usable\)"):
        model_runner.ModelRunner(gguf_path=_gguf(tiny_model, "qwen3_moe"), device="cpu", progress=False)


def _args(**kw):
    base = dict(model_path=None, gguf_path=None, optimize_config_path=None, device="cpu", cpu_infer=None,
                cache_lens=256, chunk_size=64, max_new_tokens=8, page_size=None, trust_rules=False,
                disable_cuda_graphs=False, fit=True, gpu_memory=None)
    return SimpleNamespace(**{**base, **kw})


def test_load_flags(tiny_model, tmp_path, cache, monkeypatch):
    from ktrans.cli.model_args import runner_kwargs
    from ktrans.fit import load

    path = _gguf(tiny_model, "mixtral")
    rules = tmp_path / "r.yaml"
    rules.write_text(shipped_rules("mixtral").read_text())
    with pytest.raises(UsageError, match="--gpu_memory caps what --fit places"):
        runner_kwargs(_args(gguf_path=path, optimize_config_path=str(rules), gpu_memory=8.0))
    with pytest.raises(UsageError, match="the model runs on cpu"):
        runner_kwargs(_args(gguf_path=path, gpu_memory=8.0))
    assert runner_kwargs(_args(gguf_path=path))["optimize_config_path"] is None   # CPU: the shipped rules
    # On a GPU (a made-up one: the fit itself is pure), the fitted file is what the runner loads.
    monkeypatch.setattr(load, "current_profile", lambda free_of=None: (what_if(facts(), gpu_memory=2 << 30), False))
    said = []
    res = load.fit_for_load(model_path=None, gguf_path=path, device="cuda:0", cache_lens=256, page_size=64,
                            chunk_size=64, gpu_memory=1.5, say=said.append)
    assert res.path.parent == cache / "fitted-rules" and said[0].endswith(str(res.path))
    assert res.placement.available["cuda:0"] < 1.5 * 2**30                  # the cap, less the reserves
    assert any("every routed expert" in s for s in said)


@pytest.mark.gpu
def test_fitted_rules_on_a_real_gpu(tiny_model, tmp_path):
    """On a GPU: the fitted placement (a whole layer of experts on cuda:0, half of the next, the
    rest in the CPU kernels) gives the shipped placement's logits within bf16 tolerance, and its
    decode steps are CUDA graphs (the grouped matmul and the split need no host sync)."""
    from ktrans.engine.batch import ForwardBatch
    from ktrans.engine.model_runner import ModelRunner
    from tests.tolerances import BF16_LOGITS_NMSE

    path = _gguf(tiny_model, "qwen3_moe")
    src = open_weights(None, path)
    config = src.config()
    mb, _ = model_bytes(config, src, rules_path=shipped_rules("qwen3_moe"), cache_lens=256, page_size=64)
    opts = FitOptions(gpu_reserve=0, ram_reserve=0, margin=0.0, gpu_memory=_gpu_for(mb, 1.5))
    res = fit_rules(config, src, profile=facts(), opts=opts, cache_lens=256, page_size=64,
                    out_dir=tmp_path, label="gpu-test")
    assert len(res.placement.gpu_experts) == 2
    runners = [ModelRunner(gguf_path=path, optimize_config_path=p, device="cuda", cache_lens=256, progress=False)
               for p in (res.path, shipped_rules("qwen3_moe"))]
    ids = torch.randint(0, config.vocab_size, (20,))
    out = [_logits(r, ids[:16]).float().cpu() for r in runners]
    nmse = lambda a, b: float((a - b).pow(2).sum() / b.pow(2).sum())  # noqa: E731
    assert nmse(out[0], out[1]) < BF16_LOGITS_NMSE
    pages = torch.arange(runners[0].num_pages, dtype=torch.int32)[None]
    for n in range(16, 20):                                                # decode steps: graph replays
        batch = ForwardBatch(input_ids=ids[n:n + 1], positions=torch.tensor([n]), seq_ids=[0], num_computed=[n],
                             num_new=[1], page_table=pages, logits_indices=torch.tensor([0]))
        got = [r.execute(batch).float().cpu() for r in runners]
        assert nmse(got[0], got[1]) < BF16_LOGITS_NMSE
    assert runners[0].graphs is not None and runners[0].graphs.enabled, runners[0].graphs.reason
    assert runners[0].graphs.graphs                                        # captured, not run eagerly
