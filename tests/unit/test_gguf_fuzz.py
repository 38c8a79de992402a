"""Fuzz the GGUF reader: truncated files and corrupted headers / tensor tables must give a clean
KtransError — never another exception, a crash or a hang — or, where the corruption leaves a
well-formed file, exactly what the format's own reader sees: gguf-py's GGUFReader for GGUF (same
metadata, tensor table and bytes), the safetensors library for safetensors checkpoints."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_testutil import write_gguf
from ktrans.errors import KtransError
from ktrans.weights.gguf_reader import GGUFReader
from tests.seeds import np_rng

INTERESTING_U64 = [0, 1, 2, 3, 4, 7, 8, 31, 32, 255, 2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]


@pytest.fixture(scope="module")
def valid_blob(tmp_path_factory):
    rng = np_rng()
    d = tmp_path_factory.mktemp("fuzz")
    tensors = {"token_embd.weight": rng.standard_normal((8, 32)), "blk.0.attn_q.weight": rng.standard_normal((4, 64)),
               "blk.0.ffn_gate_exps.weight": rng.standard_normal((2, 4, 32)), "output_norm.weight": rng.standard_normal(32)}
    meta = {"qwen2.block_count": 1, "general.name": "fuzz", "tokenizer.ggml.tokens": ["<s>", "a", "中", "🙂"],
            "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0], "tokenizer.ggml.add_bos_token": True}
    path = write_gguf(d / "valid.gguf", tensors, metadata=meta,
                      qtypes={"blk.0.attn_q.weight": "q8_0", "token_embd.weight": "f16", "blk.0.ffn_gate_exps.weight": "bf16"})
    blob = path.read_bytes()
    header_end = GGUFReader(str(path)).files[0].data_start
    return blob, header_end, d


def _check(path: str) -> None:
    try:
        r = GGUFReader(path)
    except KtransError as e:
        assert path in str(e) or "GGUF" in str(e)
        return
    size = r.files[0].size
    for t in r.tensors.values():
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
        assert t.nbytes == int(np.prod(t.shape[:-1])) * t.shape[-1] // block * type_size
        assert 0 <= t.start and t.start + t.nbytes <= size
        data = t.data()
        assert data.nbytes == t.nbytes
        int(data[..., :1].sum())  # touch the mapping
    _same_as_gguf_py(r, path)


def _plain(value):
    """ktrans's metadata value in a comparable form: strings as their bytes (array strings may hold
    non-UTF-8 token bytes, kept with surrogateescape), floats as float32, arrays as lists."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(np.float32(value)) if np.isfinite(value) else repr(float(value))
    return value.item() if isinstance(value, np.generic) else value


def _gguf_py_value(field):
    """gguf-py's parsed field, from its raw parts (its contents() would fail on non-UTF-8 bytes)."""
    kind = gguf.GGUFValueType
    one = lambda i: (bytes(field.parts[i]) if field.types[-1] == kind.STRING  # noqa: E731
                     else _plain(field.parts[i].tolist()[0]))
    if field.types[0] == kind.ARRAY:
        return [one(i) for i in field.data]
    return one(field.data[0])


def _same_as_gguf_py(ours: GGUFReader, path: str) -> None:
    """A file ktrans accepts is read by gguf-py as the same metadata, tensor table and bytes."""
    ref = gguf.GGUFReader(path)       # NOTE: raising here means ktrans accepted a file gguf-py rejects
    fields = {k: _gguf_py_value(f) for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert {k: _plain(v) for k, v in ours.metadata.items()} == fields
    assert sorted(ours.tensors) == sorted(t.name for t in ref.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert (mine.ggml_type, mine.shape) == (int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)))
        assert (mine.start, mine.nbytes) == (t.data_offset, t.n_bytes), t.name
        assert np.array_equal(mine.data().reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(cut=st.floats(0, 1))
def test_truncated(valid_blob, cut):
    blob, _, d = valid_blob
    path = d / "trunc.gguf"
    path.write_bytes(blob[: int(len(blob) * cut)])
    _check(str(path))


@FUZZ
@given(data=st.data())
def test_corrupt_header_bytes(valid_blob, data):
    blob, header_end, d = valid_blob
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, header_end - 1))
        buf[at] = data.draw(st.integers(0, 255))
    path = d / "bytes.gguf"
    path.write_bytes(bytes(buf))
    _check(str(path))


@FUZZ
@given(data=st.data())
def test_corrupt_header_fields(valid_blob, data):
    """Overwrite 4- or 8-byte fields (counts, lengths, dims, types, offsets) with edge values."""
    blob, header_end, d = valid_blob
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        width = data.draw(st.sampled_from([4, 8]))
        at = data.draw(st.integers(4, header_end - width))
        value = data.draw(st.sampled_from(INTERESTING_U64)) % (1 << (8 * width))
        buf[at:at + width] = struct.pack("<I" if width == 4 else "<Q", value)
    path = d / "fields.gguf"
    path.write_bytes(bytes(buf))
    _check(str(path))


@pytest.fixture(scope="module")
def valid_safetensors(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("fuzz-st")
    experts = {f"model.layers.0.mlp.experts.{e}.{p}_proj.weight": torch.randn(4, 16) if p != "down" else torch.randn(16, 4)
               for e in range(2) for p in ("gate", "up", "down")}
    save_file({"model.norm.weight": torch.randn(16), "model.embed_tokens.weight": torch.randn(6, 16).bfloat16(),
               **experts}, str(d / "model.safetensors"))
    blob = (d / "model.safetensors").read_bytes()
    return blob, 8 + int.from_bytes(blob[:8], "little"), d


@FUZZ
@given(data=st.data())
def test_corrupt_safetensors(valid_safetensors, data):
    """Truncated files and corrupted JSON headers of safetensors checkpoints: KtransError only."""
    from ktrans.weights.safetensors_source import SafetensorsSource

    blob, header_end, d = valid_safetensors
    buf = bytearray(blob[: data.draw(st.integers(0, len(blob)))] if data.draw(st.booleans()) else blob)
    for _ in range(data.draw(st.integers(0, 6))):
        if len(buf) > 8:
            at = data.draw(st.integers(0, min(header_end, len(buf)) - 1))
            buf[at] = data.draw(st.sampled_from(list(b'0123456789[]{}",:-.eE ') + [0, 255]))
    path = d / "model.safetensors"
    path.write_bytes(bytes(buf))
    try:
        src = SafetensorsSource(str(d))
        got = {name: src.tensor(name) for name in src.names()}
    except KtransError:
        return
    want = _safetensors_view(path)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _safetensors_view(path) -> dict:
    """The checkpoint as the safetensors library reads it, per-expert tensors fused the
    transformers-5 way ([E, 2I, H] gate rows then up rows; [E, H, I])."""
    import re

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:   # NOTE: raising here means ktrans accepted a file safetensors rejects
        flat = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict)
    out, experts = {}, {}
    for k, v in flat.items():
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", k)
        if m:
            experts.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = v
        else:
            out[k] = v
    for pre, projs in experts.items():
        stack = lambda p: torch.stack([projs[p][e] for e in sorted(projs[p])])  # noqa: E731
        out[f"{pre}.gate_up_proj"] = torch.cat([stack("gate"), stack("up")], dim=1)
        out[f"{pre}.down_proj"] = stack("down")
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_model_metadata_single_file(tiny_model, tmp_path_factory, data):
    """Corrupted metadata values of a real gen-model GGUF (sizes, ids, token strings): building the
    config, the tokenizer and reading tensors gives a clean KtransError or a consistent model."""
    from ktrans.weights import open_weights

    src_path = tiny_model("qwen3_moe", "q8_0", with_safetensors=False) / "model.gguf"
    blob = bytearray(src_path.read_bytes())
    # Half the time aim at the model keys (sizes, rope, ids) ahead of the large token arrays.
    header_end = GGUFReader(str(src_path)).files[0].data_start
    if data.draw(st.booleans()):
        header_end = bytes(blob).index(b"tokenizer.ggml.tokens")
    for _ in range(data.draw(st.integers(1, 4))):
        width = data.draw(st.sampled_from([1, 4, 8]))
        at = data.draw(st.integers(24, header_end - width))
        value = data.draw(st.sampled_from(INTERESTING_U64 + [5, 64, 256])) % (1 << (8 * width))
        blob[at:at + width] = value.to_bytes(width, "little")
    path = tmp_path_factory.mktemp("fuzz-model") / "model.gguf"
    path.write_bytes(bytes(blob))
    try:
        src = open_weights(None, str(path))
        cfg = src.config()
        names = src.names()
        for name in names[:3] + names[-3:]:
            assert src.tensor(name).shape == src.info(name).shape
        tok = src.tokenizer()
        tok.decode(tok("hello 你好")["input_ids"])
        assert cfg.num_hidden_layers >= 1
    except KtransError:
        pass
