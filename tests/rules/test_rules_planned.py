"""Planning without weight files: PlannedSource equals the GGUF gen-model writes (names, types,
shapes, bytes, and so every operator's planned bytes), the KV cache's bytes per device, and
`ktrans rules explain --arch/--preset/--config/--quant` with its errors, and the docs' example."""

from __future__ import annotations

import dataclasses
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from ktrans.cli.main import main
from ktrans.config.arch import ARCHS, build_meta_model
from ktrans.errors import KtransError
from ktrans.genmodel import generate_model
from ktrans.genmodel.planned import PlannedSource
from ktrans.genmodel.presets import QUANT_CHOICES
from ktrans.kv_cache.sizing import plan_kv_cache
from ktrans.kv_cache.storage import KVStorage
from ktrans.rules.explain import human_bytes
from ktrans.rules.files import shipped_rules
from ktrans.rules.plan import plan_model
from ktrans.rules.schema import load_rules
from ktrans.weights.source import open_weights

ARCHS_BY_TYPE = {a.model_type: a.name for a in ARCHS.values()}


def _explain(capsys, *args):
    code = main(["rules", "explain", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _line(out: str, start: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(start))


def _weights_line(out: str) -> str:
    return _line(out, "weights per device:")


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


def _same_tensors(planned, real) -> None:
    assert planned.names() == real.names()
    for name in real.names():
        assert dataclasses.replace(planned.info(name), file="") == dataclasses.replace(real.info(name), file=""), name


def _plan(config, weights, variant: str = ""):
    rules = load_rules(shipped_rules(ARCHS_BY_TYPE[config.model_type], variant))
    return plan_model(build_meta_model(config), rules, config=config, weights=weights)


@pytest.mark.parametrize("arch, quant", [("deepseek_v3", "q4_k_m"), ("qwen3_moe", "q4_k"), ("mixtral", "bf16"),
                                         ("qwen2_moe", "q4_k_m"), ("deepseek_v2", "q4_k"), ("llama", "q4_k_m"),
                                         ("glm4_moe", "q4_k_m"), ("qwen3_5_moe", "q6_k")])
def test_planned_source_is_the_generated_gguf(tiny_model, arch, quant):
    path = tiny_model(arch, quant, with_safetensors=False)
    real = open_weights(str(path), str(path / "model.gguf"))
    config = real.config()
    for planned in (PlannedSource.from_preset(arch, "tiny", quant), PlannedSource(config, quant)):
        _same_tensors(planned, real)
        assert all(planned.raw_qtype(n) == real.raw_qtype(n) for n in real.names())   # what kernels are chosen by
        assert planned.total_bytes() == sum(t.nbytes for t in real.reader.tensors.values())   # (GLM's MTP block too)
        by_file = {e.path: e.nbytes for e in _plan(config, real).entries}
        assert {e.path: e.nbytes for e in _plan(config, planned).entries} == by_file
    if quant == "q4_k_m":   # the mix really is a mix here (the test would pass vacuously otherwise)
        assert len({planned.info(n).qtype for n in planned.names()} - {"f32"}) > 1


def test_planned_source_random_arch_quant_and_depth(tmp_path):
    rng = random.Random()
    arch, quant, layers = rng.choice(list(ARCHS)), rng.choice(QUANT_CHOICES), rng.randint(1, 6)
    what = f"{arch} {quant} --layers {layers}"
    out = generate_model(tmp_path / "m", arch=arch, preset="tiny", quant=quant, layers=layers, seed=rng.randrange(99))
    real = open_weights(str(out), str(out / "model.gguf"))
    planned = PlannedSource.from_preset(arch, "tiny", quant, layers=layers)
    assert planned.names(), what
    _same_tensors(planned, real)
    config = real.config()
    for variant in ("", "cpu"):
        assert _plan(config, planned, variant).bytes_per_device() == _plan(config, real, variant).bytes_per_device(), what


def test_planned_source_has_no_data():
    src = PlannedSource.from_preset("qwen3_moe", "tiny", "q4_k")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert src.info(name).qtype == "q4_k"
    for call in (lambda: src.raw(name), lambda: src.tensor(name), lambda: src.expert_stack(1, "gate")):
        with pytest.raises(KtransError, match="planning only: no weights"):
            call()
    with pytest.raises(KtransError, match="no tensor for parameter 'model.nope'"):
        src.info("model.nope")


def _kv_bytes_per_token_layer(config, elem: int) -> int:
    """Independent of KVStorage: MLA caches the latent and the rope key; GQA K and V per KV head."""
    if getattr(config, "kv_lora_rank", None):
        return (config.kv_lora_rank + config.qk_rope_head_dim) * elem
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * elem


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_kv_cache_bytes_follow_the_attention(arch):
    src = PlannedSource.from_preset(arch, "tiny", "q4_k")
    config = src.config()
    tokens, page = random.randint(64, 5000), random.choice([16, 64, 128])
    tokens = max(tokens, page)
    slots = (-(-tokens // page) + 1) * page                       # the pool's pages + 1 scratch page
    per_layer = slots * _kv_bytes_per_token_layer(config, 2)     # bf16 on CUDA
    kv = plan_kv_cache(_plan(config, src), cache_lens=tokens, page_size=page)
    assert kv.nbytes == {"cuda:0": per_layer * config.num_hidden_layers} and kv.dtypes == ("bfloat16",)
    rules = load_rules(shipped_rules(arch))
    cpu = plan_model(build_meta_model(config), rules, config=config, weights=src, device_map="cpu")
    assert plan_kv_cache(cpu, cache_lens=tokens, page_size=page).nbytes == {"cpu": 2 * per_layer * config.num_hidden_layers}


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe"])
def test_kv_plan_holds_the_state_rows_of_every_request(arch):
    """Linear-attention layers keep a recurrent state per running request: the plan's bytes are
    what a KVStorage really allocates with that many requests' state rows reserved."""
    src = PlannedSource.from_preset(arch, "tiny", "q4_k")
    config = src.config()
    rules = load_rules(shipped_rules(arch))
    cpu = plan_model(build_meta_model(config), rules, config=config, weights=src, device_map="cpu")
    slots, page = random.randint(1, 16), random.choice([16, 64])
    kv = plan_kv_cache(cpu, cache_lens=random.randint(page, 4096), page_size=page, state_slots=slots)
    real = KVStorage.for_config(config, num_pages=kv.num_pages, page_size=page, dtype=torch.float32, device="cpu")
    real.reserve_states(slots)
    assert real.recurrent_layers
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    allocated = sum(nbytes(lay) for lay in real.layers) + sum(nbytes(real.state(i)) for i in real.recurrent_layers)
    assert kv.nbytes == {"cpu": allocated} and kv.state_slots == slots
    one = plan_kv_cache(cpu, cache_lens=kv.cache_lens, page_size=page)
    assert kv.nbytes["cpu"] - one.nbytes["cpu"] == (slots - 1) * kv.state_per_slot["cpu"] > 0
    with pytest.raises(KtransError, match="--max_batch_size 0"):
        plan_kv_cache(cpu, cache_lens=kv.cache_lens, page_size=page, state_slots=0)


def test_kv_cache_splits_with_the_layers():
    src = PlannedSource.from_preset("qwen3_moe", "tiny", "q4_k_m")        # 2 layers: one per GPU
    kv = plan_kv_cache(_plan(src.config(), src, "2gpu"), cache_lens=4096, page_size=64)
    assert set(kv.nbytes) == {"cuda:0", "cuda:1"} and kv.nbytes["cuda:0"] == kv.nbytes["cuda:1"] > 0


def test_explain_preset_prints_kv_and_totals(capsys):
    tokens = random.randint(64, 20000)
    code, out, err = _explain(capsys, "--arch", "deepseek_v3", "--preset", "tiny", "--quant", "q4_k_m",
                              "--cache_lens", tokens)
    assert code == 0, err
    src = PlannedSource.from_preset("deepseek_v3", "tiny", "q4_k_m")
    plan = _plan(src.config(), src)
    kv = plan_kv_cache(plan, cache_lens=tokens, page_size=64)
    weights_gpu = plan.bytes_per_device()["cuda:0"]
    assert f"KV cache ({tokens} tokens: {-(-tokens // 64)} pages of 64" in out
    assert _line(out, "KV cache").endswith(f"cuda:0 {human_bytes(kv.nbytes['cuda:0'])}")
    assert _line(out, "weights per device:").endswith(f"cuda:0 {human_bytes(weights_gpu)}")
    assert f"GPU total {human_bytes(weights_gpu + kv.nbytes['cuda:0'])}," in _line(out, "weights + KV cache")
    assert "no weight file read" in out and "model.layers.{1-2}.mlp.experts" in out


def test_explain_from_config_matches_the_gguf(tiny_model, tmp_path, capsys):
    path = tiny_model("qwen2_moe", "q4_k_m", with_safetensors=False)
    code, from_file, err = _explain(capsys, "--gguf_path", path / "model.gguf", "--model_path", path)
    assert code == 0, err
    shutil.copy(path / "config.json", tmp_path / "config.json")
    for flags in (["--model_path", tmp_path], ["--config", tmp_path / "config.json"]):
        code, planned, err = _explain(capsys, *flags, "--quant", "q4_k_m")
        assert code == 0, err
        assert _weights_line(planned) == _weights_line(from_file)
        assert _line(planned, "weights + KV cache") == _line(from_file, "weights + KV cache")
    # without --quant the config alone plans the unquantized model: different bytes
    code, plain, err = _explain(capsys, "--config", tmp_path / "config.json")
    assert code == 0, err
    assert _weights_line(plain) != _weights_line(from_file)


@pytest.mark.parametrize("flags, message", [
    (["--arch", "deepseek_v4", "--preset", "tiny", "--quant", "q4_k"], "unknown architecture 'deepseek_v4'; expected one of: deepseek_v3, "),
    (["--arch", "deepseek_v3", "--preset", "deepseek-v4", "--quant", "q4_k"], "unknown preset 'deepseek-v4' for --arch deepseek_v3; expected one of: tiny, small, deepseek-v3"),
    (["--arch", "deepseek_v3", "--preset", "tiny", "--quant", "q3_k"], "unknown quant 'q3_k'; expected one of: f32, bf16, "),
    (["--arch", "deepseek_v3", "--preset", "tiny"], "add --quant, one of: f32, "),
    (["--arch", "deepseek_v3", "--quant", "q4_k"], "--arch deepseek_v3 needs --preset, one of: tiny, small, deepseek-v3"),
    (["--preset", "tiny", "--quant", "q4_k"], "--preset 'tiny' needs --arch"),
    (["--quant", "q4_k"], "--quant needs a model to plan"),
    (["--arch", "qwen2", "--preset", "tiny", "--quant", "q4_k", "--cache_lens", "10"], "--cache_lens 10 must be at least one page (64 tokens)"),
    (["--arch", "qwen2", "--preset", "tiny", "--quant", "q4_k", "--page_size", "0"], "--page_size 0: expected a positive"),
    (["--config", "/nonexistent/config.json", "--quant", "q4_k"], "--config '/nonexistent/config.json': no such file"),
])
def test_explain_planning_errors(capsys, flags, message):
    code, out, err = _explain(capsys, *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_explain_refuses_quant_with_weight_files(tiny_model, capsys):
    path = tiny_model("qwen3_moe", "f32", with_safetensors=True)
    for flags in (["--gguf_path", path / "model.gguf"], ["--model_path", path]):
        code, _, err = _explain(capsys, *flags, "--quant", "q4_k_m")
        assert code == 2 and "--quant plans weights that do not exist yet" in err and "holds weight files" in err
    code, _, err = _explain(capsys, "--arch", "qwen3_moe", "--preset", "tiny", "--quant", "q4_k", "--gguf_path",
                            path / "model.gguf")
    assert code == 2 and re.search(r"--arch/--preset name the model, so --gguf_path cannot", err)


def test_explain_notes_gpu_projections_counted_dense_without_triton(monkeypatch, capsys):
    flags = ["--arch", "qwen3_moe", "--preset", "tiny", "--quant", "q4_k"]
    code, with_triton, err = _explain(capsys, *flags)
    assert code == 0, err
    assert "Triton does not import here" not in with_triton
    import ktrans.kernels

    monkeypatch.setattr(ktrans.kernels, "triton_available", lambda: False)
    code, without, err = _explain(capsys, *flags)
    assert code == 0, err
    assert "Triton does not import here" in without
    gpu = [_bytes(re.search(r"cuda:0 ([\d.]+ \w+)$", _weights_line(out)).group(1)) for out in (with_triton, without)]
    assert gpu[1] > 2 * gpu[0]


def test_docs_planned_python_example_runs(capsys):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "rules.md").read_text()
    code = re.search(r"<!-- example: planned -->\n```python\n(.*?)```", doc, re.S).group(1)
    assert '"deepseek-v3"' in code
    scope: dict = {}
    exec(code.replace('"deepseek-v3"', '"tiny"'), scope)      # the real shapes take seconds; same path
    out = capsys.readouterr().out
    assert re.search(r"KV cache \(8192 tokens: 128 pages of 64 .*\): cuda:0 ", out) and "GPU total" in out
    assert isinstance(scope["weights"], PlannedSource) and scope["plan"].bytes_per_device()["cpu"] > 0
