"""GGUF weights on the GPU (ktrans.kernels.quant_matmul): the packed layout dequantizes
bit-exactly like gguf-py, and the Triton kernels over it (the decode GEMV for M <= 8, the tiled
matmul above) equal x · Wᵀ on those dequantized weights, for every format, every tiling (split
K, prefill tiles) and ragged M/N.
Then the `linear` operator with `weights: stored` against its dense twin on the same GGUF file.
On a CPU-only machine the kernel runs under Triton's interpreter (tests/conftest.py)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ktrans.kernels import triton_available
from ktrans.weights import quant

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton")

FORMATS = ["q8_0", "q4_k", "q5_k", "q6_k", "f8_e4m3"]
ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
F32_EPS = torch.finfo(torch.float32).eps


def _weights(qtype: str, n: int, k: int):
    """Random [n, k] weights quantized by ktrans (llama.cpp's layout) and gguf-py's dequantization;
    FP8: e4m3 values (every bit pattern but NaN) with random 128 x 128 block scales, and torch's
    float8 conversion times the scales."""
    if qtype == "f8_e4m3":
        bits = torch.randint(0, 256, (n, k), dtype=torch.uint8)
        bits[(bits & 0x7F) == 0x7F] = 0x3F                                  # no NaN patterns
        scale = torch.rand(-(-n // 128), -(-k // 128)) * 0.01 + 1e-4
        w = bits.view(torch.float8_e4m3fn).float()
        ref = w * scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        return (bits.numpy(), scale.numpy()), ref
    w = (torch.randn(n, k) * torch.rand(n, 1) * 2).numpy()                   # rows of different scales
    data = quant.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    ref = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, qtype.upper()))
    return data, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))


@pytest.mark.parametrize("qtype", FORMATS)
def test_packed_layout_dequantizes_like_gguf(qtype):
    from ktrans.kernels.quant_matmul import dequantize

    data, ref = _weights(qtype, 24, 768)
    packed = _pack(qtype, data, 24, 768)
    assert torch.equal(dequantize(qtype, packed), ref)
    size = sum(t.numel() * t.element_size() for t in packed.values())
    if qtype == "f8_e4m3":
        assert size == 24 * 768 + 4 * 1 * 6
    else:
        assert size == 24 * 768 // 256 * {"q8_0": 272, "q4_k": 148, "q5_k": 180, "q6_k": 210}[qtype]


def _pack(qtype, data, n, k):
    from ktrans.kernels.quant_matmul import pack

    if qtype == "f8_e4m3":
        return pack(qtype, data[0], n, k, scale=data[1])
    return pack(qtype, data, n, k)


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 20, 130])
def test_quant_matmul_matches_dequantized_weights(qtype, m):
    from ktrans.kernels.quant_matmul import quant_matmul

    # ragged N tiles (and FP8 scale rows), 4 super-blocks; a narrow output at M = 1 splits K;
    # M <= 8 runs the decode GEMV for the GGUF formats, larger M the tiled kernel
    n, k = (136 if m > 1 else 40), 1024
    data, ref = _weights(qtype, n, k)
    packed = {f: t.to(DEV) for f, t in _pack(qtype, data, n, k).items()}
    x = torch.randn(m, k)
    if ON_GPU:
        # bf16 activations, and the weight rounded to bf16 as the dense bf16 path rounds it
        y = quant_matmul(x.to(DEV, torch.bfloat16), qtype, packed, n, k).float().cpu()
        want = x.bfloat16().float() @ ref.bfloat16().float().T
        err = (y - want).norm() / want.norm()
        assert err < 1e-2, f"relative error {err:.2e}"
    else:
        y = quant_matmul(x, qtype, packed, n, k)
        torch.testing.assert_close(y.double(), x.double() @ ref.double().T, rtol=1e-5, atol=1e-4)


def test_pack_rejects_what_it_cannot_hold():
    from ktrans.kernels.quant_matmul import pack

    with pytest.raises(ValueError, match="no GPU kernel for q4_0"):
        pack("q4_0", np.zeros(18, np.uint8), 1, 32)
    with pytest.raises(ValueError, match="multiple of 256"):
        pack("q8_0", np.zeros(34 * 4, np.uint8), 1, 128)


@pytest.mark.parametrize("quant_type", ["q4_k", "q4_k_m"])
def test_linear_stored_matches_dense(tiny_model, quant_type, monkeypatch):
    """`linear` with weights stored vs weights dense on the same GGUF tensors: the same product
    up to the weight's rounding to the compute dtype (f32 here: none), and the planned bytes are
    the packed layout's."""
    from ktrans.errors import KtransError
    from ktrans.operators.linear import Linear, QuantProjection
    from ktrans.weights.source import open_weights

    out = tiny_model("qwen3_moe", quant_type, with_safetensors=False)
    src = open_weights(None, str(out / "model.gguf"))
    key = "model.layers.0.self_attn.o_proj"
    info = src.info(f"{key}.weight")
    n, k = info.shape
    with torch.device("meta"):
        meta = torch.nn.Linear(k, n, bias=False)
    ops = {}
    for mode in ("stored", "dense"):
        kw = {"weights": mode, "dtype": "bf16" if ON_GPU else "f32"}
        ops[mode] = Linear(key=key, orig_module=meta, config=None, device=DEV, **kw)
        ops[mode].load_weights(src)
        planned = Linear.planned_bytes(key=key, orig_module=meta, config=None, device=DEV, kwargs=kw, weights=src)
        if mode == "stored":
            assert isinstance(ops[mode].proj, QuantProjection)
            held = sum(b.numel() * b.element_size() for b in ops[mode].proj.buffers())
            assert planned == {str(torch.device(DEV)): held}
    x = torch.randn(3, k, device=DEV)
    tol = dict(rtol=2e-2, atol=2e-2) if ON_GPU else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops["stored"](x).float(), ops["dense"](x).float(), **tol)
    torch.testing.assert_close(ops["stored"].forward_native(x), ops["dense"].forward_native(x), rtol=0, atol=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")                          # a plain CPU placement
    with pytest.raises(KtransError, match="weights stored cannot keep .* placed on cpu"):
        Linear(key=key, orig_module=meta, config=None, device="cpu", weights="stored").load_weights(src)


def test_linear_stored_fp8_matches_dense(tmp_path):
    """A DeepSeek-style FP8 safetensors weight (e4m3 + 128 x 128 scale_inv blocks, a ragged last
    row block) kept as stored vs dequantized: the same product."""
    from safetensors.torch import save_file

    from ktrans.operators.linear import Linear, QuantProjection
    from ktrans.weights.safetensors_source import SafetensorsSource

    (bits, scale), ref = _weights("f8_e4m3", 200, 512)
    save_file({"model.x.weight": torch.from_numpy(bits).view(torch.float8_e4m3fn),
               "model.x.weight_scale_inv": torch.from_numpy(scale)}, str(tmp_path / "model.safetensors"))
    src = SafetensorsSource(str(tmp_path))
    with torch.device("meta"):
        meta = torch.nn.Linear(512, 200, bias=False)
    ops = {m: Linear(key="model.x", orig_module=meta, config=None, device=DEV, dtype="f32", weights=m)
           for m in ("stored", "dense")}
    for op in ops.values():
        op.load_weights(src)
    assert isinstance(ops["stored"].proj, QuantProjection)
    torch.testing.assert_close(ops["stored"].proj.dense_weight().cpu(), ref, rtol=0, atol=0)
    x = torch.randn(4, 512, device=DEV)
    got, want = ops["stored"](x), ops["dense"](x)
    if ON_GPU:                                                              # tf32 dots on CUDA
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    else:
        # Same weights, f32 sums in another order (the Triton kernel's tiles vs torch's matmul): each
        # output within a few f32 roundings of what its terms add up to, sum |x| |w| (measured up to
        # 3.2e-7 of it over 15 draws). Not relative to the output, which cancellation can make small.
        terms = x.abs() @ ref.abs().T
        assert ((got - want).abs() <= 4 * F32_EPS * 512 ** 0.5 * terms).all()
