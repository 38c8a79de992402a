"""GGUF reader: bytes, shapes and metadata against gguf's own reader; split sets and directories;
memory mapping (no whole-file reads); clear errors for bad files."""

from __future__ import annotations

import os
import resource
import struct

import gguf
import numpy as np
import pytest

from gguf_testutil import split_gguf, write_gguf
from ktrans.errors import KtransError
from ktrans.weights.gguf_reader import GGUFReader
from tests.seeds import np_rng

QTYPES = ["f32", "f16", "bf16", "q8_0"]


def _random_model(tmp_path, n=7, name="m.gguf"):
    rng = np_rng()
    tensors, qtypes = {}, {}
    for i in range(n):
        shape = [(64,), (8, 64), (3, 4, 64)][i % 3]
        tensors[f"blk.{i}.t.weight"] = rng.standard_normal(shape).astype(np.float32)
        qtypes[f"blk.{i}.t.weight"] = QTYPES[i % len(QTYPES)]
    meta = {"qwen2.block_count": n, "tokenizer.ggml.tokens": ["a", "中", "🙂"], "general.name": "tiny",
            "tokenizer.ggml.scores": [0.5, -1.0, 2.0], "x.flag": True, "x.eps": 1e-6}
    return write_gguf(tmp_path / name, tensors, metadata=meta, qtypes=qtypes), tensors, qtypes


def _assert_same_tensors(a: GGUFReader, b: GGUFReader):
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (t.qtype, t.shape, t.nbytes) == (u.qtype, u.shape, u.nbytes)
        assert np.array_equal(t.data(), u.data())


def test_matches_gguf_package(tmp_path):
    path, tensors, qtypes = _random_model(tmp_path)
    ours, theirs = GGUFReader(str(path)), gguf.GGUFReader(str(path))
    assert ours.arch == "qwen2"
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type.name.lower() == qtypes[t.name]
        assert mine.shape == tensors[t.name].shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.data().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    f32 = ours.raw("blk.0.t.weight")
    assert np.array_equal(f32.data.view(np.float32), tensors["blk.0.t.weight"])
    assert ours.get("tokenizer.ggml.tokens") == ["a", "中", "🙂"]
    assert ours.get("qwen2.block_count") == 7 and ours.get("x.flag") is True
    assert np.allclose(ours.get("tokenizer.ggml.scores"), [0.5, -1.0, 2.0])
    assert ours.get("x.eps") == pytest.approx(1e-6)


def test_data_is_zero_copy_read_only(tmp_path):
    path, _, _ = _random_model(tmp_path, n=8)
    r = GGUFReader(str(path))
    raw = r.raw("blk.7.t.weight")                      # q8_0 [8, 64] -> [8, 2 blocks * 34 bytes]
    assert raw.data.dtype == np.uint8 and raw.data.shape == (8, 68) and raw.data.flags.c_contiguous
    assert not raw.data.flags.writeable and not raw.data.flags.owndata
    assert np.shares_memory(raw.data, r.files[0]._buf)


def test_split_set_and_directory_match_single_file(tmp_path):
    path, _, _ = _random_model(tmp_path, n=9)
    out = tmp_path / "split"
    out.mkdir()
    parts = split_gguf(path, out, parts=3)
    assert [p.name for p in parts] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    single = GGUFReader(str(path))
    for opened in (parts[0], parts[2], out):              # any part, or the directory
        r = GGUFReader(str(opened))
        assert len(r.files) == 3
        _assert_same_tensors(single, r)
        assert r.get("tokenizer.ggml.tokens") == single.get("tokenizer.ggml.tokens")


def test_split_set_with_missing_part(tmp_path):
    path, _, _ = _random_model(tmp_path, n=6)
    out = tmp_path / "split"
    out.mkdir()
    parts = split_gguf(path, out, parts=3)
    os.remove(parts[1])
    with pytest.raises(KtransError, match="m-00002-of-00003.gguf' is missing"):
        GGUFReader(str(parts[0]))
    with pytest.raises(KtransError, match="expects 3 parts"):
        GGUFReader(str(out))


def test_directory_of_files_and_duplicates(tmp_path):
    rng = np_rng()
    write_gguf(tmp_path / "a.gguf", {"x.weight": rng.standard_normal((2, 32))})
    write_gguf(tmp_path / "b.gguf", {"y.weight": rng.standard_normal((2, 32))})
    assert sorted(GGUFReader(str(tmp_path)).tensors) == ["x.weight", "y.weight"]
    write_gguf(tmp_path / "a-mmproj.gguf", {"v.weight": rng.standard_normal((2, 32))}, arch="clip")
    write_gguf(tmp_path / "model.gguf", {f"blk.{i}.w": rng.standard_normal((2, 32)) for i in range(3)})
    r = GGUFReader(str(tmp_path))                           # metadata from the file with most tensors
    assert r.arch == "qwen2" and r.files[0].path.endswith("model.gguf") and len(r.tensors) == 6
    write_gguf(tmp_path / "c.gguf", {"x.weight": rng.standard_normal((2, 32))})
    with pytest.raises(KtransError, match="'x.weight' is in both .*a.gguf and .*c.gguf"):
        GGUFReader(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KtransError, match="holds no .gguf files"):
        GGUFReader(str(tmp_path / "empty"))


def _header_offsets(path):
    """Byte offsets of the first tensor entry's type id and data offset fields."""
    r = gguf.GGUFReader(str(path))
    t = r.tensors[0]
    blob = path.read_bytes()
    name = t.name.encode()
    at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", blob, at)[0]
    type_at = at + 4 + 8 * n_dims
    return type_at, type_at + 4, t.name


def _patched(path, at, payload, out):
    blob = bytearray(path.read_bytes())
    blob[at:at + len(payload)] = payload
    out.write_bytes(bytes(blob))
    return str(out)


def test_bad_files_give_clear_errors(tmp_path):
    path, _, _ = _random_model(tmp_path, n=3)
    blob = path.read_bytes()
    type_at, off_at, first = _header_offsets(path)
    cases = [
        (_patched(path, 0, b"GGML", tmp_path / "magic.gguf"), r"not a GGUF file \(magic b'GGML'"),
        (_patched(path, 4, struct.pack("<I", 7), tmp_path / "ver.gguf"), "GGUF version 7"),
        (_patched(path, type_at, struct.pack("<I", 77), tmp_path / "qt.gguf"),
         f"tensor '{first}' has unknown quant type id 77"),
        (_patched(path, off_at, struct.pack("<Q", 1 << 40), tmp_path / "off.gguf"),
         f"tensor '{first}': data .* runs past the end"),
        (_patched(path, off_at, struct.pack("<Q", 3), tmp_path / "align.gguf"), "not a multiple of the alignment"),
    ]
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(blob[:-100])
    cases.append((str(trunc), "runs past the end of the file .* truncated file"))
    head = tmp_path / "head.gguf"
    head.write_bytes(blob[:200])
    cases.append((str(head), "corrupt or truncated GGUF"))
    for bad, msg in cases:
        with pytest.raises(KtransError, match=msg) as e:
            GGUFReader(bad)
        assert bad in str(e.value)
    with pytest.raises(KtransError, match="does not exist"):
        GGUFReader(str(tmp_path / "absent.gguf"))
    with pytest.raises(KtransError, match="no tensor 'nope'"):
        GGUFReader(str(path)).raw("nope")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_open_maps_instead_of_reading(tmp_path):
    """A 2 GB (sparse) GGUF opens and hands out every tensor view without reading its data."""
    path = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    shape, n = (4096, 16384), 8                         # 8 bf16 tensors of 128 MiB each
    for i in range(n):
        w.add_tensor_info(f"blk.{i}.w", shape, np.dtype(np.float16), shape[0] * shape[1] * 2,
                          raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    header = path.stat().st_size
    with open(path, "r+b") as f:                         # sparse data section: no disk, no reads
        f.truncate(-(-header // 32) * 32 + n * shape[0] * shape[1] * 2)
    before = _rss_bytes()
    r = GGUFReader(str(path))
    views = [r.raw(name).data for name in r.tensors]
    assert sum(v.nbytes for v in views) == n * 128 * 2**20
    assert _rss_bytes() - before < 32 * 2**20


def test_custom_alignment(tmp_path):
    x = np_rng().standard_normal((3, 40)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "qwen2")
    w.add_custom_alignment(256)
    w.add_tensor("a.weight", x[:, :33].copy())                 # odd byte sizes: padding between tensors
    w.add_tensor("b.weight", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = GGUFReader(str(tmp_path / "a.gguf"))
    assert r.files[0].alignment == 256 and all(t.start % 256 == 0 for t in r.tensors.values())
    assert np.array_equal(r.raw("b.weight").data.view(np.float32), x)
    assert np.array_equal(r.raw("a.weight").data.view(np.float32), x[:, :33])
