"""Expert activation counts: the MoE block counts every routed slot, collect() reads and clears,
save() adds to the model's file, `ktrans probe --experts` calibrates on a tiny model, counts
gathered by `ktrans generate` are saved, and --fit then puts the counted experts on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from ktrans.cli.main import main
from ktrans.fit import counts


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KTRANS_CACHE", str(tmp_path))
    return tmp_path


def test_moe_block_counts_every_slot():
    from ktrans.rules import prepare_model
    from tests.rules.test_shipped_rules import CONFIGS, _weights

    config = CONFIGS["qwen3_moe"]()
    model, _ = prepare_model(config, _weights(config), device_map="cpu")
    x = torch.randn(1, 13, config.hidden_size)
    block = model.model.layers[2].mlp
    with torch.no_grad():
        block(x)
        block(x[:, :4])
    got = counts.collect(model)
    assert sorted(got) == list(range(config.num_hidden_layers))
    assert sum(got[2]) == 17 * config.num_experts_per_tok and sum(got[0]) == 0
    assert len(got[2]) == config.num_experts
    assert sum(counts.collect(model)[2]) == 0                              # cleared


def test_save_adds_and_load_reads(cache):
    mid = "/models/Some Model/model.gguf"
    path = counts.save(mid, {3: [1, 2, 3]}, "calibration")
    assert path.parent == cache / "expert-counts" and path.name.startswith("model.gguf-")
    counts.save(mid, {3: [10, 0, 0], 4: [5, 5]}, "serving")
    assert counts.load(mid) == {3: [11, 2, 3], 4: [5, 5]}
    data = json.loads(path.read_text())
    assert data["sources"] == {"calibration": 6, "serving": 20} and data["model"] == mid
    counts.save(mid, {3: [1, 1, 1, 1]}, "serving")                        # more experts now: that layer restarts
    assert counts.load(mid)[3] == [1, 1, 1, 1]
    path.write_text("garbage")
    assert counts.load(mid) is None and counts.load(None) is None
    assert counts.model_id(None, None) is None


def test_calibration_and_serving_counts_feed_the_fit(cache, tiny_model, capsys):
    model = tiny_model("qwen3_moe", "q4_k", with_safetensors=False) / "model.gguf"
    assert main(["probe", "--experts", str(model)]) == 0
    err = capsys.readouterr().err
    assert "calibration tokens" in err
    mid = counts.model_id(None, str(model))
    first = counts.load(mid)
    assert first and all(sum(c) > 0 for c in first.values())
    assert main(["generate", "--gguf_path", str(model), "--prompt", "hello there", "--max_new_tokens", "4",
                 "--device", "cpu"]) == 0
    after = counts.load(mid)
    assert sum(map(sum, after.values())) > sum(map(sum, first.values()))
    sources = json.loads(counts.counts_path(mid).read_text())["sources"]
    assert set(sources) == {"calibration", "serving"}
    capsys.readouterr()
    # explain --fit now picks experts by the counts: a GPU with room for 5 of the 16 experts
    from ktrans.fit.model_bytes import model_bytes
    from ktrans.rules.files import shipped_rules
    from ktrans.weights.source import open_weights

    src = open_weights(None, str(model))
    mb, _ = model_bytes(src.config(), src, rules_path=shipped_rules("qwen3_moe"), cache_lens=256, page_size=64)
    need = mb.outer_gpu + sum(lb.dense_gpu + lb.kv_gpu for lb in mb.layers) + 5.5 * mb.moe_layers()[0].expert_gpu
    gib = (2**30 + mb.activations_gpu + need / 0.95) / 2**30                 # FitOptions' reserve and margin
    assert main(["rules", "explain", "--gguf_path", str(model), "--fit", "--gpu_memory", f"{gib:.9f}",
                 "--cache_lens", "256"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0: 5 routed expert(s) of layer(s) 0-1, the most used by the counts" in out
    from ktrans.rules.schema import load_rules

    (written,) = (cache / "fitted-rules").glob("*.yaml")
    chosen = {(min(r.layers.indices(2)), e) for r in load_rules(written).rules if r.op == "hybrid_experts"
              for e in r.kwargs["gpu_experts"]}
    share = {(i, e): c / sum(cs) for i, cs in after.items() for e, c in enumerate(cs)}
    assert len(chosen) == 5
    assert min(share[k] for k in chosen) >= max(share[k] for k in share if k not in chosen)


def test_probe_experts_errors(cache, capsys, tmp_path):
    assert main(["probe", "--experts", str(tmp_path / "nope.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err
