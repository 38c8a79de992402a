"""`ktrans weights`: description of GGUF / safetensors weights and --check against the config."""

from __future__ import annotations

import gguf
import numpy as np

from gguf_testutil import write_gguf
from ktrans.cli.main import main


def test_describe_and_check(tiny_model, tmp_path, capsys):
    d = tiny_model("qwen2_moe", "q4_k_m", with_safetensors=False)
    assert main(["weights", "--gguf_path", str(d / "model.gguf"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "GGUF architecture: qwen2moe; config and tokenizer from GGUF metadata (single-file mode)" in out
    assert "config: qwen2_moe, 2 layers" in out and "q4_k" in out and "q6_k" in out and ", 0 problem(s)" in out

    r = gguf.GGUFReader(str(d / "model.gguf"))
    keep = {t.name: t for t in r.tensors if t.name != "blk.1.ffn_down_exps.weight"}
    w = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "qwen2moe")
    for key, field in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for name, t in keep.items():
        w.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["weights", "--gguf_path", str(tmp_path / "cut.gguf"), "--model_path", str(d), "--check"]) == 1
    out = capsys.readouterr().out
    assert "config and tokenizer from --model_path" in out
    assert "problem: " in out and "'model.layers.1.mlp.experts.down_proj' needs GGUF tensor(s) " \
                                  "blk.1.ffn_down_exps.weight" in out and ", 1 problem(s)" in out


def test_errors_are_reported(tmp_path, capsys):
    write_gguf(tmp_path / "g.gguf", {"token_embd.weight": np.zeros((4, 32))}, arch="gemma3")
    assert main(["weights", "--gguf_path", str(tmp_path / "g.gguf")]) == 2
    assert "ktrans weights: error: " in capsys.readouterr().err
