"""Quant formats: dequantization bit-exact against gguf-py's numpy code (random valid blocks and
round trips), quantized bytes equal to gguf-py's quantize where it has one, K-quant error bounds
on Gaussian data, every ISA variant against the generic reference, and API boundary checks."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq

from ktrans import _C, cpu
from ktrans.errors import KtransError
from ktrans.weights import quant
from tests import tolerances as tol
from tests.seeds import np_rng

ISAS = cpu.supported_isas()
WEIGHT_TYPES = list(quant.QTYPES)

# Byte offsets of the fp16 scale fields inside one block (they must be finite in random blocks).
FP16_FIELDS = {
    "q8_0": [0], "q4_0": [0], "q5_0": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208],
    "q2_k": [80, 82], "q3_k": [108], "iq4_xs": [0],
    "mxfp4": [],  # its E8M0 exponent byte is valid at every value (255: 2^127, products overflow to inf)
}


def _ggml(qtype: str) -> GT:
    return GT(quant.QTYPES[qtype].ggml_type)


def _nmse(out: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(((out.astype(np.float64) - ref) ** 2).sum() / max((ref**2).sum(), 1e-300))


def _finite_fp16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    h = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    # exponent 31 is inf/NaN: move those to the largest finite exponent
    bad = (h >> 10) & 0x1F == 0x1F
    h[bad] &= np.uint16(0xFBFF)
    return h


def _random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every quant bit, finite random fp16/bf16/f32 values where floats live."""
    q = quant.QTYPES[qtype]
    nb = cols // q.block_size
    raw = rng.integers(0, 256, (rows, nb, q.type_size), dtype=np.uint8)
    if qtype == "f32":
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype in ("f16", "bf16"):
        bits = _finite_fp16_bits(rng, rows * cols) if qtype == "f16" else rng.integers(0, 1 << 16, rows * cols)
        bits = bits.astype(np.uint16)
        if qtype == "bf16":  # keep bf16 finite: exponent 255 -> 254
            bits[(bits >> 7) & 0xFF == 0xFF] &= np.uint16(0xFF7F)
        return bits.reshape(rows, cols).view(np.uint8)
    for off in FP16_FIELDS[qtype]:
        raw[..., off : off + 2] = _finite_fp16_bits(rng, rows * nb).reshape(rows, nb, 1).view(np.uint8)
    return raw.reshape(rows, nb * q.type_size)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_dequantize_random_blocks_bit_exact_vs_gguf(qtype):
    rng = np_rng()
    q = quant.QTYPES[qtype]
    cols = 2 * max(q.block_size, 256)
    raw = _random_blocks(qtype, 5, cols, rng)
    ref = gq.dequantize(raw, _ggml(qtype)).reshape(5, cols).astype(np.float32)
    out = quant.dequantize(raw, qtype, (5, cols))
    assert out.dtype == np.float32 and out.shape == (5, cols)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), qtype
    for isa in ISAS:
        flat = _C.quant_dequantize(qtype, raw.reshape(-1), 5 * cols, isa=isa)
        assert np.array_equal(flat.view(np.uint32), ref.reshape(-1).view(np.uint32)), (qtype, isa)


def _gaussian_with_edge_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """N(0,1) rows with varied magnitudes plus edge blocks: all zero, constant, +/-max ties."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= np.float32(10.0) ** rng.uniform(-3, 3, (rows, 1)).astype(np.float32)
    x[0, :256] = 0.0
    x[1, :256] = 0.75
    x[2, :32] = rng.integers(-3, 4, 32).astype(np.float32)  # exact small integers: rounding ties
    x[2, 5], x[2, 9] = -7.0, 7.0
    # amax 127 -> q8_0 scale 1: halves are exact rounding ties (away from zero, not to even)
    x[3, :32] = np.arange(-15.5, 16.5, dtype=np.float32)
    x[3, 7] = 127.0
    return x


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "mxfp4"])
def test_quantize_bytes_equal_gguf(qtype):
    rng = np_rng()
    x = _gaussian_with_edge_blocks(8, 512, rng)
    ref = np.ascontiguousarray(gq.quantize(x, _ggml(qtype))).view(np.uint8).reshape(8, -1)
    for isa in ISAS:
        out = _C.quant_quantize(qtype, x, isa=isa).reshape(8, -1)
        assert np.array_equal(out, ref), (qtype, isa, np.argwhere(out != ref)[:5])
    assert np.array_equal(quant.quantize(x, qtype), ref)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_quantize_error_on_gaussian_and_gguf_reads_it(qtype):
    rng = np_rng()
    x = rng.standard_normal((128, 1024)).astype(np.float32)
    raw = quant.quantize(x, qtype)
    assert raw.shape == (128, quant.row_bytes(qtype, 1024)) and raw.dtype == np.uint8
    ours = quant.dequantize(raw, qtype, x.shape)
    ref = gq.dequantize(raw, _ggml(qtype)).reshape(x.shape).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    err = _nmse(ours, x)
    assert err <= tol.QUANT_NMSE[qtype], (qtype, err)


@pytest.mark.parametrize("qtype", WEIGHT_TYPES)
def test_quantize_identical_bytes_on_every_isa(qtype):
    """SIMD quantizers repeat the reference's float operations in order: the same bytes."""
    rng = np_rng()
    x = _gaussian_with_edge_blocks(6, 1024, rng)
    x[3, 256:512] = -np.abs(x[3, 256:512])
    x[4, 512:768] = np.abs(x[4, 512:768]) + 3.0
    ref = _C.quant_quantize(qtype, x, isa="generic")
    for isa in ISAS[1:]:
        out = _C.quant_quantize(qtype, x, isa=isa)
        assert np.array_equal(out, ref), (qtype, isa, _C.quant_kernel_isa("quantize", qtype, isa))


KQUANT_BITS = {"q4_k": 4, "q5_k": 5, "q6_k": 6, "q2_k": 2, "q3_k": 3, "iq4_xs": 4}


@pytest.mark.parametrize("qtype", list(KQUANT_BITS))
def test_kquant_edge_blocks_decode_finite_and_close(qtype):
    """Edge super-blocks (zeros, a constant, small integers with rounding ties, a wide ramp) decode
    finite and within two quantization steps of their range (plus the scales' resolution); the gaussian super-blocks beside
    them (an all-negative one included) within the format's NMSE bound. (NOTE: the edge blocks
    are not held to the gaussian NMSE: in a row drawn at a small scale the integer block holds
    nearly all the energy, and its rounding then sets the row's NMSE.)"""
    rng = np_rng()
    x = _gaussian_with_edge_blocks(4, 512, rng)
    x[3, 256:] = -np.abs(x[3, 256:])  # all-negative block: min-only formats must still fit
    out = quant.dequantize(quant.quantize(x, qtype), qtype, x.shape)
    assert np.all(np.isfinite(out))
    assert np.all(out[0, :256] == 0.0)
    levels = 2 ** KQUANT_BITS[qtype] - 1
    for r in range(4):
        edge, got = x[r, :256], out[r, :256]
        step = (float(edge.max()) - float(edge.min())) / levels
        amax = float(np.abs(edge).max())
        # two steps of the block's range, plus the 6-bit (sub-)block scale's resolution of its
        # magnitude (a constant block has no range: only its scale's rounding is left)
        assert float(np.abs(got - edge).max()) <= 2 * step + amax / 64, (qtype, r)
        assert _nmse(out[r, 256:], x[r, 256:]) <= 4 * tol.QUANT_NMSE[qtype], (qtype, r)


@pytest.mark.parametrize("qtype", ["q4_k", "q8_0", "q6_k"])
def test_threads_split_gives_identical_bytes(qtype):
    x = np_rng().standard_normal((37, 512)).astype(np.float32)
    one = quant.quantize(x, qtype, nthreads=1)
    assert np.array_equal(quant.quantize(x, qtype, nthreads=3), one)
    assert np.array_equal(quant.quantize(x, qtype, nthreads=0), one)
    assert np.array_equal(quant.dequantize(one, qtype, x.shape, nthreads=1),
                          quant.dequantize(one, qtype, x.shape, nthreads=3))


def test_qtype_table_matches_gguf():
    for name, q in quant.QTYPES.items():
        assert GT(q.ggml_type).name.lower() == name
        assert gq.GGML_QUANT_SIZES[GT(q.ggml_type)] == (q.block_size, q.type_size)
        assert quant.qtype_from_ggml(q.ggml_type) == name
        assert quant.row_bytes(name, 4 * q.block_size) == 4 * q.type_size


def test_boundary_errors_are_clear():
    x = np.zeros((2, 256), np.float32)
    cases = [
        (lambda: quant.quantize(x.astype(np.float64), "q4_k"), "float32"),
        (lambda: quant.quantize(np.asfortranarray(np.zeros((256, 2), np.float32)), "q8_0"), "C-contiguous"),
        (lambda: quant.quantize(np.zeros((2, 100), np.float32), "q4_k"), "256"),
        (lambda: quant.quantize(x, "q4_q"), "unknown quant type"),
        (lambda: quant.row_bytes("q8_0", 33), "32"),
        (lambda: quant.qtype_from_ggml(int(GT.Q4_1)), "Q4_1"),
        (lambda: quant.qtype_from_ggml(1234), "1234"),
        (lambda: quant.dequantize(np.zeros(143, np.uint8), "q4_k", (1, 256)), "144"),
        (lambda: quant.dequantize(np.zeros(144, np.int8), "q4_k", (1, 256)), "uint8"),
        (lambda: quant.dequantize(np.zeros((4, 72), np.uint8)[:, ::2], "q4_k", (1, 256)), "C-contiguous"),
    ]
    for fn, needle in cases:
        with pytest.raises(KtransError, match=needle):
            fn()


# --- activation quantizers and vec_dot -----------------------------------------------------------

DOT_TYPES = [t for t in WEIGHT_TYPES if _C.quant_kernel_isa("vec_dot", t, "generic") == "generic"]


@pytest.mark.parametrize("act", ["q8_0", "q8_k"])
def test_activation_quantizers_identical_across_isas(act):
    x = np_rng().standard_normal((3, 1024)).astype(np.float32) * 3
    x[0, :256] = 0.0
    ref = _C.quant_quantize(act, x, isa="generic")
    for isa in ISAS:
        assert np.array_equal(_C.quant_quantize(act, x, isa=isa), ref), (act, isa)
    back = _C.quant_dequantize(act, ref, x.size).reshape(x.shape)
    assert _nmse(back, x) < 1e-4


def _check_q8k_bsums(raw: np.ndarray, rows: int):
    blocks = raw.reshape(-1, 292)
    qs = blocks[:, 4:260].view(np.int8).astype(np.int32)
    bsums = blocks[:, 260:].copy().view(np.int16).astype(np.int32)
    assert np.array_equal(qs.reshape(-1, 16, 16).sum(-1), bsums)


def test_q8k_block_sums():
    x = np_rng().standard_normal((2, 512)).astype(np.float32)
    for isa in ISAS:
        _check_q8k_bsums(_C.quant_quantize("q8_k", x, isa=isa), 2)


def _weights_for(qtype: str, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return quant.quantize(rng.standard_normal((rows, n)).astype(np.float32), qtype)


@pytest.mark.parametrize("qtype", DOT_TYPES)
@pytest.mark.parametrize("blocks", [1, 3, 8])
def test_vec_dot_every_isa_vs_float64(qtype, blocks):
    rng = np_rng()
    bs = max(quant.QTYPES[qtype].block_size, 32)
    n = blocks * (256 if bs == 256 else 32 * (1 + blocks % 3))
    rows = 24
    w_raw = _weights_for(qtype, rows, n, rng)
    x = rng.standard_normal((2, n)).astype(np.float32)
    w = gq.dequantize(w_raw, _ggml(qtype)).reshape(rows, n).astype(np.float64)
    ref = x.astype(np.float64) @ w.T  # [2, rows]
    bound = tol.VEC_DOT_NMSE[qtype]
    generic = _C.quant_vec_dot(qtype, w_raw, x, isa="generic")
    assert generic.shape == (2, rows)
    assert _nmse(generic, ref) <= bound, (qtype, _nmse(generic, ref))
    for isa in ISAS[1:]:
        out = _C.quant_vec_dot(qtype, w_raw, x, isa=isa)
        assert _nmse(out, generic) <= tol.VEC_DOT_ISA_NMSE, (qtype, isa, _C.quant_kernel_isa("vec_dot", qtype, isa))
        assert _nmse(out, ref) <= bound, (qtype, isa)


def test_vec_dot_one_dim_input_and_bad_shapes():
    rng = np_rng()
    w = quant.quantize(rng.standard_normal((4, 256)).astype(np.float32), "q4_k")
    x = rng.standard_normal(256).astype(np.float32)
    y = _C.quant_vec_dot("q4_k", w, x)
    assert y.shape == (4,)
    assert np.allclose(y, _C.quant_vec_dot("q4_k", w, x[None])[0])
    with pytest.raises(ValueError, match="bytes"):
        _C.quant_vec_dot("q4_k", w[:, :100].copy(), x)
    with pytest.raises(ValueError, match="multiple"):
        _C.quant_vec_dot("q8_0", np.zeros((1, 34), np.uint8), np.zeros(48, np.float32))


def test_every_isa_has_its_own_vec_dot_and_activation_quantizer():
    """Guards the static registration: each ISA level this CPU has runs its own kernels."""
    for isa in ISAS:
        want = "avx512" if isa == "amx" else isa
        for t in DOT_TYPES:
            assert _C.quant_kernel_isa("vec_dot", t, isa) == want, (t, isa)
        for act in ("q8_0", "q8_k"):
            assert _C.quant_kernel_isa("quantize", act, isa) == ("generic" if isa == "generic" else "avx2")


def test_f16_every_half_value_and_random_float_bits():
    """All 65536 halves decode as numpy does (NaN: identical across ISAs); random float32 bit
    patterns (subnormals, overflow to inf) encode as numpy's astype(float16)."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = halves.view(np.float16).astype(np.float32)
    not_nan = ~np.isnan(ref)
    outs = [_C.quant_dequantize("f16", halves.view(np.uint8), halves.size, isa=isa) for isa in ISAS]
    for isa, out in zip(ISAS, outs):
        assert np.array_equal(out.view(np.uint32)[not_nan], ref.view(np.uint32)[not_nan]), isa
        assert np.array_equal(out.view(np.uint32), outs[0].view(np.uint32)), isa
    bits = np_rng().integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    finite = ~np.isnan(x)
    first = _C.quant_quantize("f16", x, isa="generic")
    for isa in ISAS:
        got = _C.quant_quantize("f16", x, isa=isa).view(np.uint16)
        assert np.array_equal(got[finite], want[finite]), isa
        assert np.array_equal(got, first.view(np.uint16)), isa


def test_read_only_and_memmap_inputs(tmp_path):
    """The loader hands zero-copy read-only memmaps; gen-model may pass read-only arrays."""
    x = np_rng().standard_normal((4, 256)).astype(np.float32)
    raw = quant.quantize(x, "q4_k")
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    ref = quant.dequantize(raw, "q4_k", x.shape)
    assert np.array_equal(quant.dequantize(mm, "q4_k", x.shape), ref)
    frozen = x.copy()
    frozen.flags.writeable = False
    assert np.array_equal(quant.quantize(frozen, "q4_k"), raw)
