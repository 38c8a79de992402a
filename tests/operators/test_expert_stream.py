"""Streamed prefill of CPU-placed experts (ktrans.operators.expert_stream) against plain torch on
gguf-py's dequantization of the same stored bytes (an oracle outside ktrans): every streamed
format, groups smaller than the layer (several pinned/device slots in turn), experts with no
tokens (skipped) in the middle of a group's range, skipped slots; which layers can stream and
the gpu_prefill kwarg. On a CPU-only machine the stream runs with device="cpu" (same grouping,
dequantization and math, no copies); the gpu-marked tests run the real stream on CUDA and the
cpu_experts operator's switch at its threshold."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ktrans.errors import KtransError
from ktrans.operators.expert_stream import STREAM_QTYPES, StoredExperts, StreamedExperts, dequantize_stored
from ktrans.operators.experts import torch_moe
from ktrans.weights import quant
from tests.operators.test_experts import make
from tests.tolerances import F32_ATOL, F32_RTOL, MOE_NMSE

E, H, I, K = 8, 256, 512, 3


def _stored(qtypes, e=E, h=H, i=I):
    """Random experts stored in `qtypes` (gate, up, down; read-only, as a mapped file is) and
    their gguf-py dequantization as f32 (gate [E, I, H], up, down [E, H, I])."""
    raws, ref = [], []
    for qtype, (rows, cols) in zip(qtypes, ((i, h), (i, h), (h, i))):
        w = np.ascontiguousarray(np.random.randn(e, rows, cols) * 0.05, dtype=np.float32)
        if qtype in ("f32", "f16", "bf16"):
            t = torch.from_numpy(w).to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[qtype])
            data = t.contiguous().view(torch.uint8).numpy().copy()
            ref.append(t.float())
        else:
            data = quant.quantize(w, qtype)
            deq = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, qtype.upper()))
            ref.append(torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32)).view(e, rows, cols))
        data = data.reshape(-1)
        data.flags.writeable = False
        raws.append((qtype, data))
    return raws, ref


def _routes(t, e=E, k=K, leave_out=(2, 5)):
    """Top-k ids avoiding `leave_out` (experts with no tokens), a few skipped slots, weights."""
    allowed = torch.tensor([x for x in range(e) if x not in leave_out])
    ids = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(t)])
    ids[::7, 0] = -1
    return ids, torch.rand(t, k)


@pytest.mark.parametrize("qtypes", [("q4_k", "q4_k", "q6_k"), ("q5_k", "q5_k", "q8_0"), ("q8_0",) * 3,
                                    ("bf16",) * 3, ("f32", "f16", "f32")])
@pytest.mark.parametrize("budget_experts", [1, 3, E])
def test_stream_matches_torch_on_gguf_dequantization(qtypes, budget_experts):
    raws, (gate, up, down) = _stored(qtypes)
    stored = StoredExperts.of(raws, E, H, I)
    assert isinstance(stored, StoredExperts), stored
    per = 2 * stored.expert_bytes() + 3 * I * H * 2 + I * H * 4
    streamed = StreamedExperts(stored, budget_experts * per)
    assert streamed.group == budget_experts
    x = torch.randn(37, H)
    ids, w = _routes(37)
    got = streamed.run(x, ids, w)
    ref = torch_moe(x, ids, w, gate, up, down)
    torch.testing.assert_close(got, ref, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


def test_dequantize_stored_is_gguf_bit_exact():
    for qtype in ("q4_k", "q5_k", "q6_k", "q8_0"):
        raws, ref = _stored((qtype,) * 3)
        data = torch.from_numpy(raws[0][1].copy())
        got = dequantize_stored(qtype, data, E * I, H, torch.float32).view(E, I, H)
        assert torch.equal(got, ref[0]), qtype


def test_layers_that_cannot_stream_say_why():
    raws, _ = _stored(("q4_k", "q4_k", "q6_k"))
    copy = [(q, a.copy()) for q, a in raws]                                   # writable: a copy made at load
    assert "second copy" in StoredExperts.of(copy, E, H, I)
    other = [("q4_0", raws[0][1])] + raws[1:]
    why = StoredExperts.of(other, E, H, I)
    assert isinstance(why, str) and "q4_0" in why and "q4_k" in why
    assert set(STREAM_QTYPES) >= {"q4_k", "q5_k", "q6_k", "q8_0", "bf16"}


def test_no_token_routed_gives_zeros():
    raws, _ = _stored(("q8_0",) * 3)
    streamed = StreamedExperts(StoredExperts.of(raws, E, H, I), 1 << 30)
    out = streamed.run(torch.randn(4, H), torch.full((4, K), -1), torch.rand(4, K))
    assert torch.equal(out, torch.zeros(4, H))


@pytest.mark.parametrize("value", ["sometimes", 0, -3, True, 1.5])
def test_gpu_prefill_kwarg_checked(value):
    with pytest.raises(KtransError, match="gpu_prefill must be auto, off or a number of tokens"):
        make("qwen3_moe", gpu_prefill=value)
    with pytest.raises(KtransError, match="gpu_prefill_mb must be a positive number of MiB"):
        make("qwen3_moe", gpu_prefill_mb=0)


def test_operator_keeps_what_it_streams(tiny_model):
    """Experts stacked in a GGUF file are kept (views of the mapping); experts given as an in-memory
    state dict are copies: kept out of the stream, with the reason; gpu_prefill: off (the default)
    keeps nothing."""
    from ktrans.engine.model_runner import ModelRunner

    _, _, op = make("qwen3_moe", backend="gguf", gpu_prefill="auto")
    assert op.streamed is None and "second copy" in op.stream_why_not
    _, _, off = make("qwen3_moe", backend="gguf")
    assert off.streamed is None and off.stream_why_not == "gpu_prefill: off"
    d = tiny_model("qwen3_moe", "q4_k", with_safetensors=False)
    rules = d / "stream.yaml"
    rules.write_text("default_device: cpu\nrules:\n  - match: {name: '\\.mlp\\.experts$'}\n"
                     "    replace: {class: cpu_experts, kwargs: {gpu_prefill: 512}}\n")
    runner = ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cpu", cache_lens=64,
                         page_size=16, progress=False, optimize_config_path=str(rules))
    ops = [m for m in runner.model.modules() if type(m).__name__ == "CPUExperts"]
    assert ops and all(o.streamed is not None and o.gpu_prefill == 512 for o in ops), [o.stream_why_not for o in ops]
    ops[0].set_gpu_prefill("off")
    assert ops[0].stream_from(torch.device("cuda", 0)) is None
    _, _, later = make("qwen3_moe", backend="gguf")
    later.set_gpu_prefill(300)                                     # kept on demand; a copy still cannot stream
    assert later.streamed is None and "second copy" in later.stream_why_not


def test_gpt_oss_experts_do_not_stream(tiny_model):
    """Its clamped SwiGLU and expert biases are not in the streamed path: its layers stay on the
    CPU kernels for every chunk, and say why (q8_0 experts, a streamed format, stored stacked)."""
    from ktrans.engine.model_runner import ModelRunner

    d = tiny_model("gpt_oss", "q8_0", with_safetensors=False)
    rules = d / "stream.yaml"
    rules.write_text("default_device: cpu\nrules:\n  - match: {name: '\\.mlp\\.experts$'}\n"
                     "    replace: {class: cpu_experts, kwargs: {gpu_prefill: 512}}\n")
    runner = ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cpu", cache_lens=64,
                         page_size=16, progress=False, optimize_config_path=str(rules))
    ops = [m for m in runner.model.modules() if type(m).__name__ == "CPUExperts"]
    assert ops and all(o.streamed is None and "swiglu_oai with biases" in o.stream_why_not for o in ops)
    assert ops[0].stream_from(torch.device("cuda", 0)) is None


@pytest.mark.gpu
def test_stream_on_cuda_matches_cpu_experts(tiny_model):
    """cpu_experts over a GGUF file: a CUDA chunk above the threshold is streamed and computed on
    the GPU (bf16), and agrees with the CPU kernels on the same chunk."""
    from ktrans.engine.model_runner import ModelRunner

    d = tiny_model("qwen3_moe", "q4_k", with_safetensors=False)
    runner = ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cuda", cache_lens=512,
                         page_size=16, progress=False, cuda_graphs=False)
    ops = [m for m in runner.model.modules() if type(m).__name__ == "CPUExperts"]
    op = ops[0]
    assert op.streamed is None                                    # the shipped rules load with gpu_prefill off
    op.set_gpu_prefill(129)
    assert op.streamed is not None, op.stream_why_not
    t, k = 300, runner.config.num_experts_per_tok
    x = torch.randn(t, op.hidden_size, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(op.num_experts)[:k] for _ in range(t)]).cuda()
    w = torch.rand(t, k, device="cuda")
    assert op.stream_from(x.device) == 129
    streamed = op(x, ids, w).float()
    op.set_gpu_prefill("off")
    assert op.stream_from(x.device) is None
    cpu = op(x, ids, w).float()
    # the CPU kernels quantize activations to 8 bits (q4_k's bound); the stream rounds to bf16
    assert float((streamed - cpu).pow(2).sum() / cpu.pow(2).sum()) < MOE_NMSE["q4_k"]
    small = op(x[:100], ids[:100], w[:100])                         # below the stream limit: the CPU path
    assert small.shape == (100, op.hidden_size)
