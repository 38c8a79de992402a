"""Loading gen-model files of every architecture and quant type: every transformers parameter from
the GGUF equals gguf's own numpy dequantization of the stored tensors (through names.py's
transforms); f32 GGUF equals the safetensors copy; expert stacks are zero-copy views; a split set
loads tensors identical to the single file; GLM-4.5's multi-token-prediction block is written as
llama.cpp's converter lays it out and left out of what ktrans loads; the progress tracker counts
what was read."""

from __future__ import annotations

import io

import gguf
import numpy as np
import pytest
import torch
from rich.console import Console

from gguf_testutil import filter_gguf, split_gguf
from ktrans.config.arch import ARCHS
from ktrans.genmodel.gguf_out import QUANT_CHOICES
from ktrans.weights import names, open_weights
from ktrans.weights.gguf_source import GGUFSource
from ktrans.weights.progress import LoadProgress
from ktrans.weights.safetensors_source import SafetensorsSource


def _oracle(reader: gguf.GGUFReader, src: GGUFSource) -> dict[str, np.ndarray]:
    """Every HF tensor rebuilt with gguf's reader + numpy dequantization."""
    stored = {t.name: t for t in reader.tensors}

    def deq(name):
        t = stored[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)

    return {hf: names.gguf_to_hf(tr, [deq(g) for g in gnames], src.config())
            for hf, gnames, tr in names.expand(src.config(), src.arch)}


@pytest.mark.parametrize("quant", QUANT_CHOICES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_and_quant_type(tiny_model, arch, quant):
    d = tiny_model(arch, quant, with_safetensors=False)
    src = open_weights(str(d), str(d / "model.gguf"))
    reader = gguf.GGUFReader(str(d / "model.gguf"))
    want = _oracle(reader, src)
    assert src.names() == list(want)
    stored_types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    if quant not in ("f32", "q4_k_m"):                    # the file really holds the asked type
        # (mxfp4 is a recipe for the routed experts: dense models get its q8_0 for the rest)
        assert (quant if quant != "mxfp4" or names.num_experts(src.config()) else "q8_0") in set(stored_types.values())
    for hf, gnames, _ in names.expand(src.config(), src.arch):
        got = src.tensor(hf)
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want[hf]), hf
        types = {stored_types[g] for g in gnames}
        assert src.info(hf).qtype == "+".join(sorted(types)) and src.info(hf).shape == want[hf].shape
        assert src.raw_qtype(hf) == src.raw(hf).qtype, hf            # what a kernel choosing by format reads
    if names.num_experts(src.config()):
        layer = next(i for i in range(src.config().num_hidden_layers)
                     if names.layer_kind(src.config(), i) == "moe")
        for proj, g in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"), ("down", "ffn_down_exps")):
            r = src.expert_stack(layer, proj)
            t = src.reader.tensors[f"blk.{layer}.{g}.weight"]
            assert r.qtype == t.qtype and r.shape == t.shape and np.shares_memory(r.data, t.data())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_f32_gguf_equals_safetensors(tiny_model, arch):
    d = tiny_model(arch, "f32")
    g, s = GGUFSource(str(d / "model.gguf"), hf_dir=str(d)), SafetensorsSource(str(d))
    assert set(g.names()) <= set(s.names())
    for name in g.names():
        assert torch.equal(g.tensor(name), s.tensor(name)), name
    if names.num_experts(g.config()):
        layer = g.config().num_hidden_layers - 1
        for proj in ("gate", "up", "down"):
            a, b = g.expert_stack(layer, proj), s.expert_stack(layer, proj)
            assert a.shape == b.shape and np.array_equal(a.data, b.data)


@pytest.mark.parametrize("arch,quant", [("deepseek_v3", "q4_k_m"), ("mixtral", "q8_0")])
def test_split_set_loads_like_single_file(tiny_model, tmp_path, arch, quant):
    d = tiny_model(arch, quant, with_safetensors=False)
    parts = split_gguf(d / "model.gguf", tmp_path, parts=3)
    assert len(parts) == 3
    one, many = open_weights(None, str(d / "model.gguf")), open_weights(None, str(parts[0]))
    assert len(many.reader.files) == 3 and many.names() == one.names()
    assert many.config().to_dict() == one.config().to_dict()
    for name in one.names():
        a, b = one.raw(name), many.raw(name)
        assert (a.qtype, a.shape) == (b.qtype, b.shape) and np.array_equal(a.data, b.data), name
        assert torch.equal(one.tensor(name), many.tensor(name)), name


def test_glm_mtp_block_is_written_as_converted_and_not_loaded(tiny_model, tmp_path):
    """blk.L (L = num_hidden_layers) holds the MTP block: a whole MoE layer plus the nextn tensors,
    counted in block_count with nextn_predict_layers; ktrans's names stop at layer L-1, and a file
    without the block (block_count still counting it, as llama.cpp accepts) reads the same."""
    d = tiny_model("glm4_moe", "q8_0", with_safetensors=False)
    src = open_weights(None, str(d / "model.gguf"))
    cfg, n = src.config(), src.config().num_hidden_layers
    assert cfg.num_nextn_predict_layers == 1
    assert src.reader.get("glm4moe.block_count") == n + 1 and src.reader.get("glm4moe.nextn_predict_layers") == 1
    table = [g for _, gnames, _ in names.expand(cfg, "glm4moe", mtp=True) for g in gnames]
    assert sorted(table) == sorted(src.reader.tensors)                  # every tensor of the file accounted for
    mtp = {t for t in src.reader.tensors if t.startswith(f"blk.{n}.")}
    assert {f"blk.{n}.nextn.{t}.weight" for t in ("eh_proj", "enorm", "hnorm", "shared_head_norm")} <= mtp
    assert {f"blk.{n}.ffn_gate_exps.weight", f"blk.{n}.attn_q.weight", f"blk.{n}.exp_probs_b.bias"} <= mtp
    assert src.reader.tensors[f"blk.{n}.nextn.eh_proj.weight"].shape == (cfg.hidden_size, 2 * cfg.hidden_size)
    assert not any(name.startswith(f"model.layers.{n}.") for name in src.names())
    trunk = open_weights(None, str(filter_gguf(d / "model.gguf", tmp_path / "trunk.gguf",
                                               lambda t: not t.startswith(f"blk.{n}."))))
    assert trunk.config().to_dict() == cfg.to_dict() and trunk.names() == src.names()
    for name in src.names():
        assert torch.equal(trunk.tensor(name), src.tensor(name)), name


def test_progress_counts_bytes_per_device(tiny_model):
    d = tiny_model("qwen2_moe", "q4_k_m", with_safetensors=False)
    src = open_weights(None, str(d / "model.gguf"))
    out = io.StringIO()
    with src.loading(total_bytes=src.reader.nbytes) as p:
        p.console = Console(file=out, width=200)
        for name in src.names():
            src.tensor(name, dtype=torch.bfloat16)
        stack = src.expert_stack(0, "down")
    assert src.progress is None
    assert p.num_tensors == len(src.names()) + 1
    assert p.num_bytes == sum(src.info(n).nbytes for n in src.names()) + stack.nbytes
    assert p.by_device == {"CPU RAM": p.num_bytes}
    line = out.getvalue().strip()
    assert line.startswith(f"loaded {p.num_tensors} tensors, ") and line.endswith(f"CPU RAM {line.split(', ')[1].split(' in ')[0]}")
    quiet = LoadProgress(enabled=False)
    with quiet:
        quiet.record(10, "cuda:0")
        quiet.record(5, "cpu")
    assert quiet.by_device == {"cuda:0": 10, "CPU RAM": 5} and "cuda:0 10 B" in quiet.summary()
