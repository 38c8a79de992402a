"""Memory-mapped GGUF reader: one file, a split set, or a directory of GGUF files.

Only the header (metadata + tensor table) is parsed; tensor data stays in the page cache behind
an mmap and is handed out as zero-copy uint8 views. Every count, length and offset read from the
file is bounds-checked before use, so a truncated or corrupt file raises a KtransError naming the
file and the field instead of crashing, hanging or returning wrong bytes.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
kv_count x (string key, u32 type, value), tensor_count x (string name, u32 n_dims, u64 ne[n_dims],
u32 ggml_type, u64 offset), padding to `general.alignment`, then the data section. `ne[0]` is the
innermost (contiguous) dimension, so the row-major shape is `ne` reversed.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from ktrans.errors import KtransError
from ktrans.weights.source import RawTensor

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4                      # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
_MADV_POPULATE_READ = 22         # linux/mman.h; not exported by Python's mmap module
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF metadata value types -> (struct code, numpy dtype) for fixed-size scalars.
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


def qtype_name(ggml_type: int) -> str | None:
    """ktrans's quant type name of a ggml type id (the ggml enum name, lower case), None if unknown."""
    try:
        return gguf.GGMLQuantizationType(ggml_type).name.lower()
    except ValueError:
        return None


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a tensor table, resolved to an absolute byte range of its file."""

    name: str
    qtype: str                    # e.g. "q4_k"
    ggml_type: int
    shape: tuple[int, ...]        # row-major (ne reversed)
    start: int                    # absolute byte offset in `file`
    nbytes: int
    file: "GGUFFile" = field(repr=False, compare=False)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, int(np.prod(self.shape[:-1], dtype=np.int64)))

    def data(self) -> np.ndarray:
        """uint8 [*shape[:-1], row_bytes] zero-copy view of the stored bytes."""
        flat = self.file.view(self.start, self.nbytes)
        return flat.reshape(self.shape[:-1] + (self.row_bytes,))

    def raw(self) -> RawTensor:
        return RawTensor(self.qtype, self.shape, self.data())


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.off, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> KtransError:
        return KtransError(f"{self.path}: corrupt or truncated GGUF: {what} "
                           f"(at byte {self.off}, file size {self.size})")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.off + n > self.size:
            raise self.fail(f"{what} needs {n} bytes past the end of the file")
        at, self.off = self.off, self.off + n
        return at

    def scalar(self, code: str, what: str):
        at = self.take(struct.calcsize(code), what)
        return struct.unpack_from(code, self.buf, at)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        at = self.take(n, what)
        try:
            return bytes(self.buf[at:at + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], f"value of '{key}'")
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string(f"string value of '{key}'")
        if vtype == _ARRAY and depth == 0:
            return self.array(key)
        raise self.fail(f"metadata '{key}' has unknown value type {vtype}")

    def array(self, key: str) -> Any:
        etype = self.scalar("<I", f"array type of '{key}'")
        count = self.scalar("<Q", f"array length of '{key}'")
        if etype in _SCALARS:
            code, dt = _SCALARS[etype]
            at = self.take(count * struct.calcsize(code), f"array '{key}' of {count} items")
            return np.frombuffer(self.buf, dtype=np.dtype(dt).newbyteorder("<"), count=count, offset=at)
        if etype == _STRING:
            # Each string takes at least its 8-byte length: reject absurd counts before looping.
            if count * 8 > self.size - self.off:
                raise self.fail(f"array '{key}' claims {count} strings, more than the file can hold")
            return self._array_strings(count)
        if etype == _ARRAY:
            if count * 12 > self.size - self.off:
                raise self.fail(f"array '{key}' claims {count} nested arrays, more than the file can hold")
            return [self.array(key) for _ in range(count)]
        raise self.fail(f"array '{key}' has unknown element type {etype}")

    def _array_strings(self, count: int) -> list[str]:
        """`count` length-prefixed strings. The loop is inlined (no method call per string): a
        vocabulary holds ~150k of them and their parsing dominated opening a small model.
        NOTE: vocabulary entries may hold bytes that are not UTF-8 (partial byte tokens);
        surrogateescape keeps them lossless instead of failing the whole file."""
        buf, off, size, out = self.buf, self.off, self.size, []
        length = struct.Struct("<Q").unpack_from
        append = out.append
        for _ in range(count):
            if off + 8 > size:
                self.off = off
                raise self.fail("string length needs 8 bytes past the end of the file")
            n = length(buf, off)[0]
            off += 8
            if off + n > size:
                self.off = off
                raise self.fail(f"array string needs {n} bytes past the end of the file")
            append(buf[off:off + n].decode("utf-8", "surrogateescape"))
            off += n
        self.off = off
        return out


class GGUFFile:
    """One mapped GGUF file: `metadata` (key -> value), `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise KtransError(f"cannot open GGUF file '{self.path}': {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < 24:
                raise KtransError(f"{self.path}: truncated GGUF: {size} bytes, a header needs at least 24")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.size = size
        self._populate_ok: bool | None = None
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse()

    def view(self, start: int, nbytes: int) -> np.ndarray:
        return self._buf[start:start + nbytes]

    def populate(self, start: int, nbytes: int) -> None:
        """Map a byte range's pages in one call before a bulk copy of it.

        NOTE: copying from a fresh mapping takes one page fault per 4 KiB page, which halves copy
        speed from the page cache; MADV_POPULATE_READ (Linux >= 5.14) maps them all at once
        (reading from disk what is not cached). Where unsupported, pages fault in as before.
        """
        if nbytes <= 0 or self._populate_ok is False:
            return
        lo = start - start % mmap.PAGESIZE
        try:
            self._mm.madvise(_MADV_POPULATE_READ, lo, min(self.size, start + nbytes) - lo)
            self._populate_ok = True
        except (OSError, ValueError, AttributeError):
            self._populate_ok = False

    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.path)
        magic = bytes(self._mm[:4])
        if magic != GGUF_MAGIC:
            raise KtransError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        cur.off = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise KtransError(f"{self.path}: GGUF version {self.version}{hint}; ktrans reads versions 2 and 3")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        # Smallest kv entry: 8 (key length) + 4 (type) + 1 byte; smallest tensor entry: 8+4+8+4+8.
        if n_kv * 13 > self.size or n_tensors * 32 > self.size:
            raise cur.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
                           f"more than the file can hold")
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise cur.fail(f"metadata key '{key}' appears twice")
            self.metadata[key] = cur.value(cur.scalar("<I", f"type of '{key}'"), key)
        entries = [self._tensor_entry(cur, i) for i in range(n_tensors)]
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise KtransError(f"{self.path}: general.alignment is {align!r}, expected a power of two")
        self.alignment = align
        self.data_start = -(-cur.off // align) * align
        self._place(entries)

    def _tensor_entry(self, cur: _Cursor, i: int) -> tuple:
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.scalar("<I", f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
        ne = [cur.scalar("<Q", f"dimension of tensor '{name}'") for _ in range(n_dims)]
        ggml_type = cur.scalar("<I", f"type of tensor '{name}'")
        offset = cur.scalar("<Q", f"data offset of tensor '{name}'")
        return name, ne, ggml_type, offset

    def _place(self, entries: list[tuple]) -> None:
        """Resolve each tensor's byte range; check types, sizes, alignment and overlaps."""
        for name, ne, ggml_type, offset in entries:
            where = f"{self.path}: tensor '{name}'"
            qtype = qtype_name(ggml_type)
            if qtype is None:
                raise KtransError(f"{where} has unknown quant type id {ggml_type} (not a ggml type this ktrans knows)")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            if any(d <= 0 or d >= 1 << 40 for d in ne):
                raise KtransError(f"{where} has shape ne={ne}; expected positive dimensions")
            if ne[0] % block:
                raise KtransError(f"{where}: row length {ne[0]} is not a multiple of the {qtype} block size {block}")
            nbytes = ne[0] // block * type_size * int(np.prod(ne[1:], dtype=object))
            start = self.data_start + offset
            if offset % self.alignment:
                raise KtransError(f"{where}: data offset {offset} is not a multiple of the alignment {self.alignment}")
            if start + nbytes > self.size:
                raise KtransError(f"{where}: data [{start}, {start + nbytes}) runs past the end of the file "
                                  f"({self.size} bytes) — truncated file?")
            if name in self.tensors:
                raise KtransError(f"{where} appears twice in the tensor table")
            self.tensors[name] = GGUFTensor(name, qtype, ggml_type, tuple(reversed(ne)), start, nbytes, self)
        spans = sorted((t.start, t.start + t.nbytes, t.name) for t in self.tensors.values())
        for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise KtransError(f"{self.path}: tensors '{n0}' and '{n1}' overlap in the data section")

    def close(self) -> None:
        self.tensors.clear()
        self._buf = None  # the mapping is released once no tensor view refers to it


class GGUFReader:
    """All tensors and the metadata of a GGUF model given as a file, a split set or a directory.

    `metadata` comes from the first part of a split set (llama.cpp's splitter writes the model's
    metadata there) or, in a directory of unrelated files, from the one with the most tensors;
    that file is `files[0]`. `tensors` is the union of every file's tensor table.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.files = [GGUFFile(p) for p in gguf_files(self.path)]
        # The model's metadata: the first part of a split set, else the file with the most tensors
        # (a directory may also hold e.g. a small vision projector file).
        head = next((f for f in self.files if f.metadata.get("split.no") == 0), None)
        head = head or max(self.files, key=lambda f: len(f.tensors))
        self.files.remove(head)
        self.files.insert(0, head)
        self.metadata: dict[str, Any] = dict(head.metadata)
        self.tensors: dict[str, GGUFTensor] = {}
        for f in self.files:
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise KtransError(f"tensor '{name}' is in both {self.tensors[name].file.path} and {f.path}")
                self.tensors[name] = t
        _check_split(self.files)

    @property
    def arch(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise KtransError(f"{self.files[0].path}: no 'general.architecture' in the GGUF metadata")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KtransError(f"{self.path}: no tensor '{name}' in the GGUF file(s)") from None

    def raw(self, name: str) -> RawTensor:
        return self.tensor(name).raw()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        for f in self.files:
            f.close()


def gguf_files(path: str) -> list[str]:
    """The GGUF files making up `path`: a file (all its split siblings if it is part of a split
    set), or a directory (its *.gguf files, sorted)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".gguf"))
        if not files:
            raise KtransError(f"directory '{path}' holds no .gguf files")
        return files
    if not os.path.exists(path):
        raise KtransError(f"GGUF path '{path}' does not exist")
    m = SPLIT_RE.match(os.path.basename(path))
    if not m:
        return [path]
    count = int(m["count"])
    folder = os.path.dirname(path)
    parts = [os.path.join(folder, f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for p in parts:
        if not os.path.exists(p):
            raise KtransError(f"split GGUF set of '{path}' is incomplete: part '{p}' is missing")
    return parts


def _check_split(files: list[GGUFFile]) -> None:
    """Validate llama.cpp split metadata (split.no / split.count / split.tensors.count)."""
    split = [f for f in files if "split.count" in f.metadata]
    if not split:
        return
    count = split[0].metadata["split.count"]
    total = split[0].metadata.get("split.tensors.count")
    seen = sorted(f.metadata.get("split.no", -1) for f in split)
    if len(split) != count or seen != list(range(count)):
        raise KtransError(f"{split[0].path}: split set expects {count} parts numbered 0..{count - 1}, "
                          f"found parts {seen}")
    n = sum(len(f.tensors) for f in split)
    if total is not None and n != total:
        raise KtransError(f"{split[0].path}: split set declares {total} tensors, its parts hold {n}")
