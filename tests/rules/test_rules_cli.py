"""`ktrans rules explain` / `ktrans rules list` on generated tiny models, and StateDictSource."""

from __future__ import annotations

import json

import pytest
import torch

from ktrans.cli.main import main
from ktrans.errors import KtransError
from ktrans.rules.state_dict import StateDictSource
from ktrans.weights.source import raw_to_torch


def _explain(capsys, *args):
    code = main(["rules", "explain", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_explain_from_gguf_uses_the_shipped_default_file(tiny_model, capsys):
    path = tiny_model("qwen3_moe")
    code, out, err = _explain(capsys, "--gguf_path", path / "model.gguf")
    assert code == 0, err
    assert "qwen3_moe.yaml" in out
    assert "model.layers.{0-1}.mlp.experts" in out and "cpu_experts" in out
    assert "gqa_attention" in out and "cuda:0" in out
    assert "GPU total" in out and "CPU RAM" in out


def test_explain_cpu_device_and_variant(tiny_model, capsys):
    path = tiny_model("qwen3_moe")
    code, out, err = _explain(capsys, "--gguf_path", path / "model.gguf", "--variant", "2gpu", "--device", "cpu")
    assert code == 0, err
    assert "cuda" not in out.split("weights per device:")[1].split("|")[0]
    assert "device map: cuda -> cpu" in out
    # the same file on DeepSeek-V3's tiny preset (3 layers, layer 0 dense): its first half holds no
    # MoE block, so the cuda:0 MoE rule places nothing, which is an error pointing at the rule
    code, out, err = _explain(capsys, "--gguf_path", tiny_model("deepseek_v3") / "model.gguf", "--variant", "2gpu")
    assert code == 2 and "deepseek_v3-2gpu.yaml:11: rule 2" in err and "select [0] of the model's 3 layers" in err


def test_explain_from_config_only(tmp_path, capsys):
    from test_shipped_rules import CONFIGS

    CONFIGS["mixtral"]().save_pretrained(tmp_path)
    code, out, err = _explain(capsys, "--model_path", tmp_path, "--map-device", "cuda:0=cuda:1")
    assert code == 0, err
    assert "cuda:1" in out and "model.layers.{0-4}.mlp.experts" in out


def test_explain_reports_rule_errors_with_file_and_line(tmp_path, capsys):
    from test_shipped_rules import CONFIGS

    CONFIGS["qwen2"]().save_pretrained(tmp_path)
    rules = tmp_path / "mine.yaml"
    rules.write_text("- match: {name: '^model\\.layers\\.0\\.self_atn$'}\n  replace: {class: gqa_attention}\n")
    code, out, err = _explain(capsys, "--model_path", tmp_path, "--optimize_config_path", rules)
    assert code == 2
    assert f"{rules}:1: rule 1" in err and "nearest module names: model.layers.0.self_attn" in err


def test_explain_needs_a_model(capsys):
    code, _, err = _explain(capsys)
    assert code == 2 and "give --model_path" in err


def test_list_shows_files_and_operators(capsys):
    assert main(["rules", "list"]) == 0
    out = capsys.readouterr().out
    assert "deepseek_v3-cpu.yaml" in out and "cpu_experts" in out and "backend" in out


def test_state_dict_source_serves_every_view():
    e, i, h = 4, 6, 8
    gate_up, down, emb = torch.randn(e, 2 * i, h), torch.randn(e, h, i), torch.randn(10, h).bfloat16()
    src = StateDictSource({"model.layers.2.mlp.experts.gate_up_proj": gate_up,
                           "model.layers.2.mlp.experts.down_proj": down, "model.embed_tokens.weight": emb})
    assert src.names() == sorted(src.names()) and src.has("model.embed_tokens.weight")
    info = src.info("model.embed_tokens.weight")
    assert (info.qtype, info.shape, info.nbytes) == ("bf16", (10, h), 10 * h * 2)
    assert torch.equal(raw_to_torch(src.raw("model.embed_tokens.weight")), emb)
    assert torch.equal(src.tensor("model.embed_tokens.weight"), emb.float())
    up = src.expert_stack(2, "up")
    assert up.shape == (e, i, h) and torch.equal(raw_to_torch(up), gate_up[:, i:])
    assert torch.equal(raw_to_torch(src.expert_stack(2, "gate")), gate_up[:, :i])
    assert torch.equal(raw_to_torch(src.expert_stack(2, "down")), down)
    with pytest.raises(KtransError, match="no tensor for parameter 'model.norm.weight'"):
        src.tensor("model.norm.weight")
    with pytest.raises(KtransError, match="expert projection 'mid' is not one of gate, up, down"):
        src.expert_stack(2, "mid")
    with pytest.raises(KtransError, match="holds real float32/float16/bfloat16 tensors"):
        StateDictSource({"x": torch.zeros(2, dtype=torch.int64)})
    # plain Python ints (not numpy/torch scalars): the shape goes into JSON reports as is
    assert type(info.shape) is tuple and all(type(d) is int for d in info.shape)
    assert json.loads(json.dumps(info.shape)) == [10, h]
