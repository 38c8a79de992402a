"""Packed AMX/AVX-512 formats (csrc/packed): packed_gemm on every ISA this CPU has, against torch
on the dequantized weights and against the generic scalar reference; packing and its checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ktrans import _C, cpu
from tests.tolerances import PACKED_GEMM_NMSE, PACKED_ISA_NMSE, PACKED_WEIGHT_NMSE

FORMATS = ["bf16", "int8", "int4"]
SHAPES = [(48, 64), (37, 96), (80, 256)]  # (N, K): N not a multiple of 16, K = 3 x 32
ROWS = [1, 3, 17, 300]


def isa_params():
    marks = {"avx512": [pytest.mark.avx512], "amx": [pytest.mark.amx]}
    return [pytest.param(isa, marks=marks.get(isa, [])) for isa in cpu.ISA_LEVELS]


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def nmse(out, ref) -> float:
    out, ref = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-300))


def packed_case(fmt: str, N: int, K: int):
    W = torch.randn(N, K)
    packed = _C.pack_f32(fmt, W.numpy())
    return W, packed, torch.from_numpy(_C.unpack(fmt, packed, N, K))


def gemm(fmt, packed, N, K, x, isa, y=None, **kw):
    y = np.zeros((x.shape[0], N), np.float32) if y is None else y
    _C.packed_gemm(fmt, packed, N, K, bf16_bits(x), y, isa=isa, **kw)
    return y


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_matches_torch_and_reference(fmt, isa):
    for N, K in SHAPES:
        W, packed, Wd = packed_case(fmt, N, K)
        for M in ROWS:
            x = torch.randn(M, K).to(torch.bfloat16)
            ref = x.double() @ Wd.double().T  # [M, N]
            y = gemm(fmt, packed, N, K, x, isa)
            assert nmse(y, ref) < PACKED_GEMM_NMSE[fmt], (fmt, isa, N, K, M)
            if isa != "generic" and not (fmt == "int4" and isa == "amx" and M >= 24):  # AMX int4: bf16 x
                y_ref = gemm(fmt, packed, N, K, x, "generic")
                assert nmse(y, y_ref) < PACKED_ISA_NMSE, (fmt, isa, N, K, M)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_large_blocks(fmt, isa):
    """Several L2 super-blocks of panels and K slices, an odd panel count, a 32-row block with a
    tail; M 130 also takes the AMX bf16 tiles' wide K pieces (csrc/amx/packed_amx.cpp)."""
    N, K = 300, 4096
    W, packed, Wd = packed_case(fmt, N, K)
    for M in (40, 130):
        x = torch.randn(M, K).to(torch.bfloat16)
        y = gemm(fmt, packed, N, K, x, isa)
        assert nmse(y, x.double() @ Wd.double().T) < PACKED_GEMM_NMSE[fmt], (fmt, isa, M)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_column_range_and_accumulate(fmt, isa):
    N, K = 70, 128
    W, packed, Wd = packed_case(fmt, N, K)
    for M, (nb, ne) in [(2, (5, 37)), (20, (16, 64)), (33, (3, 70))]:
        x = torch.randn(M, K).to(torch.bfloat16)
        y0 = np.random.randn(M, N).astype(np.float32)
        y = gemm(fmt, packed, N, K, x, isa, y=y0.copy(), n_begin=nb, n_end=ne, accumulate=True)
        ref = x.double() @ Wd.double().T
        outside = np.r_[0:nb, ne:N]
        assert np.array_equal(y[:, outside], y0[:, outside])
        assert nmse(y[:, nb:ne] - y0[:, nb:ne], ref[:, nb:ne]) < PACKED_GEMM_NMSE[fmt] * 4
        y2 = gemm(fmt, packed, N, K, x, isa, y=y0.copy(), n_begin=nb, n_end=ne)
        assert np.array_equal(y2[:, outside], y0[:, outside])
        assert nmse(y2[:, nb:ne], ref[:, nb:ne]) < PACKED_GEMM_NMSE[fmt]


@pytest.mark.parametrize("isa", isa_params())
def test_gemm_strided_rows(isa):
    N, K, M = 32, 64, 18
    W, packed, Wd = packed_case("bf16", N, K)
    x = torch.randn(M, K + 32).to(torch.bfloat16)
    xb = bf16_bits(x)[:, :K]  # row stride K + 32
    y = np.zeros((M, N + 5), np.float32)[:, :N]
    _C.packed_gemm("bf16", packed, N, K, xb, y, isa=isa)
    assert nmse(y, x[:, :K].double() @ Wd.double().T) < PACKED_GEMM_NMSE["bf16"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_quantization_error(fmt):
    W = torch.randn(64, 256)
    Wd = _C.unpack(fmt, _C.pack_f32(fmt, W.numpy()), 64, 256)
    assert nmse(Wd, W) < PACKED_WEIGHT_NMSE[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_ranges_bf16_source_and_threads_agree(fmt):
    N, K = 53, 96
    W = torch.randn(N, K).to(torch.bfloat16)
    whole = _C.pack_f32(fmt, W.float().numpy())
    assert np.array_equal(_C.pack_bf16(fmt, bf16_bits(W)), whole)
    assert np.array_equal(_C.pack_f32(fmt, W.float().numpy(), nthreads=2), whole)
    out = np.zeros(_C.packed_bytes(fmt, N, K), np.uint8)
    for nb, ne in [(20, 53), (0, 7), (7, 20)]:  # panels shared by two ranges
        _C.pack_f32(fmt, W.float().numpy(), n_begin=nb, n_end=ne, out=out)
    assert np.array_equal(out, whole)


def test_bf16_pack_is_exact():
    W = torch.randn(40, 64).to(torch.bfloat16)
    Wd = _C.unpack("bf16", _C.pack_bf16("bf16", bf16_bits(W)), 40, 64)
    assert np.array_equal(Wd, W.float().numpy())


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_shapes_and_arguments_are_refused(fmt):
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.pack_f32(fmt, np.zeros((16, 48), np.float32))
    with pytest.raises(ValueError, match="unknown packed format"):
        _C.packed_bytes("fp4", 16, 64)
    packed = _C.pack_f32(fmt, np.ones((16, 64), np.float32))
    x = np.zeros((2, 64), np.uint16)
    with pytest.raises(ValueError, match="column range"):
        _C.packed_gemm(fmt, packed, 16, 64, x, np.zeros((2, 16), np.float32), n_begin=4, n_end=17)
    with pytest.raises(ValueError, match="columns, expected K"):
        _C.packed_gemm(fmt, packed, 16, 64, np.zeros((2, 32), np.uint16), np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="wrong size"):
        _C.packed_gemm(fmt, packed[:-1], 16, 64, x, np.zeros((2, 16), np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k", "q6_k", "bf16"])
def test_pack_from_gguf_rows(fmt, qtype):
    """GGUF rows pack exactly like their gguf-dequantized f32 values."""
    from gguf import GGMLQuantizationType, quants

    N, K = 40, 256
    ggml = GGMLQuantizationType[qtype.upper()]
    raw = _C.quant_quantize(qtype, np.random.randn(N, K).astype(np.float32)).reshape(N, -1)  # [N, row_bytes]
    W = quants.dequantize(raw, ggml).astype(np.float32)
    assert np.array_equal(_C.pack_gguf(fmt, qtype, raw, K), _C.pack_f32(fmt, W))


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k"])
def test_pack_k_quants_to_bf16_panels_on_every_isa(qtype, isa):
    """The AMX level expands K-quant rows straight into bf16 panels (csrc/amx/gguf_panels.cpp):
    the same bytes as gguf-py's dequantization packed from f32, for whole and partial panels and
    row ranges that start or end inside a panel; blocks with random scale bytes and fp16 scales
    (finite) beside real quantized rows."""
    from gguf import GGMLQuantizationType, quants

    N, K = 56, 512  # 3 whole panels + 8 rows
    raw = _C.quant_quantize(qtype, (np.random.randn(N, K) * np.random.rand(N, 1) * 4).astype(np.float32))
    raw = raw.reshape(N, -1).copy()
    nb, bb = K // 256, {"q4_k": 144, "q5_k": 176, "q6_k": 210}[qtype]
    blocks = raw.reshape(N, nb, bb)  # a view: edits land in raw
    wild = np.flatnonzero(np.random.rand(N) < 0.5)  # these rows: every byte random, fp16 scales finite
    blocks[wild] = np.random.randint(0, 256, (len(wild), nb, bb), dtype=np.uint8)
    n_scales = 1 if qtype == "q6_k" else 2  # q6_K: d last; q4_K/q5_K: d, dmin first
    scales = (np.random.randn(len(wild), nb, n_scales) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == "q6_k":
        blocks[wild, :, bb - 2:] = scales
    else:
        blocks[wild, :, :4] = scales
    W = quants.dequantize(raw, GGMLQuantizationType[qtype.upper()]).astype(np.float32)
    size = _C.packed_bytes("bf16", N, K)
    best = cpu.selected_isa()
    cpu.set_isa(isa)
    try:
        for b, e in [(0, N), (5, 37), (16, 32), (3, 12), (40, N)]:
            want = _C.pack_f32("bf16", W, b, e, out=np.zeros(size, np.uint8))
            got = _C.pack_gguf("bf16", qtype, raw, K, b, e, out=np.zeros(size, np.uint8))
            assert np.array_equal(got, want), (qtype, isa, b, e)
    finally:
        cpu.set_isa(best)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_from_fp8_blocks(fmt):
    N, K = 200, 320  # partial 128-blocks in both directions
    W8 = (torch.randn(N, K) * 3).to(torch.float8_e4m3fn)
    scale_inv = torch.rand((N + 127) // 128, (K + 127) // 128) + 0.5
    W = W8.float() * scale_inv.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    got = _C.pack_fp8(fmt, W8.view(torch.uint8).numpy(), scale_inv.numpy())
    assert np.array_equal(got, _C.pack_f32(fmt, W.numpy()))


def test_pack_sources_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown quant type"):
        _C.pack_gguf("int8", "q9_9", np.zeros((16, 34), np.uint8), 32)
    with pytest.raises(ValueError, match="row_bytes"):
        _C.pack_gguf("int8", "q8_0", np.zeros((16, 30), np.uint8), 32)
    with pytest.raises(ValueError, match="scale_inv"):
        _C.pack_fp8("int8", np.zeros((16, 64), np.uint8), np.ones((2, 1), np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_isa_level_has_its_own_kernel(fmt):
    """The ISA tests above really exercise each level's kernel, not a fallback."""
    for isa in cpu.supported_isas():
        assert _C.packed_kernel_isa(fmt, isa) == isa


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_shapes(fmt, isa):
    """Fewer columns than one panel and the smallest K (int8 pads it to a whole 64-deep tile)."""
    # NMSE over a handful of outputs is dominated by chance cancellations, so these use the
    # worst-case bound instead: activation rounding moves each x[m, k] by at most amax_m / 254,
    # and f32 accumulation / the AMX int4 bf16 weight rounding by a small multiple of |x| |W|.
    for N, K in [(5, 32), (16, 32), (1, 64)]:
        W, packed, Wd = packed_case(fmt, N, K)
        for M in (1, 33):
            x = torch.randn(M, K).to(torch.bfloat16).double()
            y = torch.from_numpy(gemm(fmt, packed, N, K, x, isa)).double()
            err = (y - x @ Wd.double().T).abs()
            mag = x.abs() @ Wd.double().abs().T  # [M, N]
            act = 0 if fmt == "bf16" else x.abs().amax(1, keepdim=True) / 254 * Wd.double().abs().sum(1)
            assert (err <= 1.001 * act + 4e-3 * mag + 1e-6).all(), (N, K, M)


@pytest.mark.parametrize("isa", isa_params())
def test_concurrent_threads_on_column_ranges(isa):
    """Threads of one process share a packed matrix and y, each on its own columns (the MoE
    layer's split), with thread-local scratch and tile state."""
    from concurrent.futures import ThreadPoolExecutor

    N, K, M = 200, 256, 40
    W, packed, Wd = packed_case("int8", N, K)
    xb = bf16_bits(torch.randn(M, K))
    want = np.zeros((M, N), np.float32)
    _C.packed_gemm("int8", packed, N, K, xb, want, isa=isa)
    y = np.zeros((M, N), np.float32)
    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(_C.packed_gemm, "int8", packed, N, K, xb, y, b, min(b + 32, N), False, isa)
                  for b in range(0, N, 32)]:
            f.result()
    assert np.array_equal(y, want)


def test_bf16_panel_packer_matches_row_packer_on_special_values():
    """Whole panels take the vectorized packer, split ranges the row packer: same bytes, also
    for inf, NaN, -0 and values that round up across an exponent."""
    N, K = 48, 64
    W = torch.randn(N, K)
    W[3, 5], W[20, 7], W[33, 0], W[40, 63] = float("inf"), float("nan"), -0.0, 1.0 + 2**-8 + 2**-20
    whole = _C.pack_f32("bf16", W.numpy())
    rows = np.zeros_like(whole)
    for n in range(N):  # one row per call: never a whole panel
        _C.pack_f32("bf16", W.numpy(), n_begin=n, n_end=n + 1, out=rows)
    assert np.array_equal(whole, rows)


def test_int8_panel_packer_matches_row_packer():
    N, K = 48, 96  # K pads to 128 in the int8 panels
    W = torch.randn(N, K) * torch.rand(N, 1) * 4
    W[7] = 0.0  # all-zero row: scale 0
    whole = _C.pack_f32("int8", W.numpy())
    rows = np.zeros_like(whole)
    for n in range(N):
        _C.pack_f32("int8", W.numpy(), n_begin=n, n_end=n + 1, out=rows)
    assert np.array_equal(whole, rows)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_prepared_activations_match_plain_calls(fmt, isa):
    """One preparation of x shared by two matrices (gate/up) and several column blocks gives
    packed_gemm's result bit for bit."""
    N, K = 70, 128
    packs = [packed_case(fmt, N, K)[1] for _ in range(2)]
    for M in (3, 17, 40, 300):
        xb = bf16_bits(torch.randn(M, K))
        want = [np.zeros((M, N), np.float32) for _ in packs]
        for p, w in zip(packs, want):
            _C.packed_gemm(fmt, p, N, K, xb, w, isa=isa)
        got = [np.zeros((M, N), np.float32) for _ in packs]
        _C.packed_gemm_prepared(fmt, packs, N, K, xb, got, [(0, 32), (32, 45), (45, N)], isa=isa)
        for g, w in zip(got, want):
            assert np.array_equal(g, w), (M, isa)
        if isa == "amx":
            assert (_C.packed_acts_bytes(fmt, M, K, isa) > 0) == (M >= {"bf16": 8, "int8": 16, "int4": 24}[fmt])
