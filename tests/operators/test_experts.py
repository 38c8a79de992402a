"""cpu_experts / torch_experts vs transformers' own fused experts module on the same weights;
every stored format vs plain torch on gguf-py's dequantization of the same bytes (an oracle outside
ktrans); submit/sync, NUMA layouts, thread counts, planned bytes, bad kwargs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from ktrans.errors import KtransError
from ktrans.operators.experts import KERNEL_QTYPES
from ktrans.operators.registry import get_operator
from ktrans.weights import quant
from ktrans.weights.source import RawTensor
from tests.operators.hf_tiny import StateDictSource, model_source, tiny_hf_model
from tests.tolerances import F32_ATOL, F32_RTOL, MOE_NMSE, MOE_PACKED_NMSE, MOE_REFERENCE_NMSE

ARCHS = ["deepseek_v3", "qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "glm4_moe", "minimax_m2", "qwen3_next",
         "qwen3_5_moe"]
KEY = "model.layers.1.mlp.experts"


def make(arch, name="cpu_experts", source=None, **kwargs):
    config, model = tiny_hf_model(arch)
    hf = model.model.layers[1].mlp.experts
    op = get_operator(name)(key=KEY, orig_module=hf, config=config, device="cpu", **kwargs)
    op.load_weights(source(model) if source else model_source(model))
    return config, hf, op


def routing(config, hf, t):
    e, k = hf.gate_up_proj.shape[0], config.num_experts_per_tok
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])                         # [T, k]
    return ids, torch.rand(t, k)


def nmse(a, b):
    return float((a.double() - b.double()).pow(2).sum() / b.double().pow(2).sum())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["cpu_experts", "torch_experts"])
def test_matches_hf_experts(arch, name):
    config, hf, op = make(arch, name)
    for t in (1, 17):
        x = torch.randn(t, config.hidden_size)
        ids, w = routing(config, hf, t)
        with torch.no_grad():
            ref = hf(x, ids, w)
            for got in (op(x, ids, w), op.forward_native(x, ids, w)):
                assert got.dtype == x.dtype and got.shape == ref.shape
                torch.testing.assert_close(got, ref, rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


def test_bf16_input_skip_and_submit_sync():
    config, hf, op = make("qwen3_moe")
    x = torch.randn(9, config.hidden_size).bfloat16()
    ids, w = routing(config, hf, 9)
    ids[2, 0] = -1                                                                         # negative: skipped
    ref = op.forward_native(x.float(), ids, w)
    handle = op.submit(x, ids, w)
    got = op.sync(handle)
    assert got.dtype == torch.bfloat16
    assert nmse(got.float(), ref) < MOE_NMSE["bf16"]
    keep = ids.clone()
    keep[2, 0] = keep[2, 1]
    w2 = w.clone()
    w2[2, 0] = 0.0                                                                         # same as skipping
    assert nmse(op(x, keep, w2).float(), ref) < MOE_NMSE["bf16"]


@pytest.mark.parametrize("kwargs", [dict(numa="replicate", numa_nodes=2), dict(numa="split", numa_nodes=2),
                                    dict(cpu_infer=1), dict(backend="torch"), dict(max_chunk=4)])
def test_layouts_and_backends(kwargs):
    config, hf, op = make("deepseek_v3", **kwargs)
    x = torch.randn(11, config.hidden_size)
    ids, w = routing(config, hf, 11)
    with torch.no_grad():
        torch.testing.assert_close(op(x, ids, w), hf(x, ids, w), rtol=F32_RTOL * 10, atol=F32_ATOL * 10)


@pytest.mark.parametrize("backend", list(MOE_PACKED_NMSE))
def test_packed_backends_against_native(backend):
    config, hf, op = make("qwen3_moe", backend=backend)
    x = torch.randn(20, config.hidden_size)
    ids, w = routing(config, hf, 20)
    assert nmse(op(x, ids, w), op.forward_native(x, ids, w)) < MOE_PACKED_NMSE[backend]


class Q8Source(StateDictSource):
    """Expert stacks stored as q8_0 blocks, the way a GGUF file hands them over."""

    def expert_stack(self, layer, proj):
        raw = super().expert_stack(layer, proj)
        f32 = raw.data.view(np.float32).reshape(raw.shape)
        return RawTensor("q8_0", raw.shape, quant.quantize(np.ascontiguousarray(f32), "q8_0").reshape(-1))


def test_quantized_stack_against_native():
    config, hf, op = make("qwen3_moe", source=lambda m: Q8Source(dict(m.state_dict())))
    x = torch.randn(5, config.hidden_size)
    ids, w = routing(config, hf, 5)
    assert nmse(op(x, ids, w), op.forward_native(x, ids, w)) < MOE_NMSE["q8_0"]


# --- an oracle outside ktrans: gguf-py's dequantization of the stored blocks + plain torch ---

def gguf_py_dequant(raw: RawTensor) -> torch.Tensor:
    """The stored expert stack [E, rows, cols] as gguf-py (llama.cpp's reference numpy code) reads it."""
    rows = int(np.prod(raw.shape[:-1]))
    data = np.ascontiguousarray(raw.data).view(np.uint8).reshape(rows, -1)
    vals = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[raw.qtype.upper()])
    return torch.from_numpy(np.asarray(vals, dtype=np.float32).reshape(raw.shape))


def reference_moe(x, ids, w, gate, up, down) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t]), e = ids[t, j], in
    float64, one token and slot at a time."""
    x, gate, up, down = x.double(), gate.double(), up.double(), down.double()
    out = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            out[t] += float(w[t, j]) * (down[e] @ h)
    return out


class BlockSource(StateDictSource):
    """Expert stacks stored as `qtype` (ktrans's quantizer writes llama.cpp's block layout)."""

    def __init__(self, tensors, qtype):
        super().__init__(tensors)
        self.qtype = qtype

    def expert_stack(self, layer, proj):
        raw = super().expert_stack(layer, proj)
        f32 = np.ascontiguousarray(raw.data.view(np.float32).reshape(raw.shape))
        return RawTensor(self.qtype, raw.shape, quant.quantize(f32, self.qtype).reshape(-1))


def _wide_experts(qtype):
    """A Qwen3-MoE experts module with rows of 256 values (whole K-quant super-blocks), E=8, k=3,
    its weights stored as `qtype`."""
    config = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=256, moe_intermediate_size=256,
                                         intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, num_experts=8, num_experts_per_tok=3)
    e, h, i = 8, 256, 256
    tensors = {f"{KEY}.gate_up_proj": torch.randn(e, 2 * i, h) * 0.1, f"{KEY}.down_proj": torch.randn(e, h, i) * 0.1}
    with torch.device("meta"):
        hf = transformers.Qwen3MoeForCausalLM(config).model.layers[1].mlp.experts
    return config, hf, BlockSource(tensors, qtype)


@pytest.mark.parametrize("qtype", KERNEL_QTYPES)
def test_every_format_against_gguf_py_and_plain_torch(qtype):
    """cpu_experts on blocks of each format vs plain torch on gguf-py's dequantization of the same
    bytes: forward_native (our dequantization) to f32 accuracy, the C++ kernels (activations
    quantized for the block dot products) within the format's MOE_NMSE — decode and prefill."""
    config, hf, source = _wide_experts(qtype)
    op = get_operator("cpu_experts")(key=KEY, orig_module=hf, config=config, device="cpu", backend="gguf")
    op.load_weights(source)
    gate, up, down = (gguf_py_dequant(source.expert_stack(1, p)) for p in ("gate", "up", "down"))
    for t in (1, 19):
        x = torch.randn(t, config.hidden_size)
        ids, w = routing(config, hf, t)
        ref = reference_moe(x, ids, w, gate, up, down)
        assert nmse(op.forward_native(x, ids, w), ref) < MOE_REFERENCE_NMSE, "ktrans's dequantization differs from gguf-py's"
        assert nmse(op(x, ids, w), ref) < MOE_NMSE[qtype]


def test_planned_bytes_counts_numa_copies():
    config, model = tiny_hf_model("qwen3_moe")
    hf = model.model.layers[1].mlp.experts
    e, two_i, h = hf.gate_up_proj.shape
    one = e * 3 * (two_i // 2) * h * 4                                                     # f32 experts
    cls = get_operator("cpu_experts")
    src = model_source(model)
    plan = lambda **kw: cls.planned_bytes(key=KEY, orig_module=hf, config=config, device="cpu", kwargs=kw, weights=src)
    assert plan(numa="split", numa_nodes=2) == {"cpu": one}
    assert plan(numa="replicate", numa_nodes=2) == {"cpu": 2 * one}
    assert plan(numa="auto", numa_nodes=2) == {"cpu": 2 * one}                             # fits: replicate
    _, _, op = make("qwen3_moe", numa="replicate", numa_nodes=2)
    assert op._moe.weight_bytes == 2 * one


@pytest.mark.parametrize("kwargs, match", [(dict(backend="avx9"), "backend 'avx9'"), (dict(numa="both"), "numa"),
                                           (dict(cpu_infer=0), "cpu_infer"), (dict(threads=2), "unknown kwargs")])
def test_bad_kwargs(kwargs, match):
    config, model = tiny_hf_model("qwen3_moe")
    with pytest.raises(KtransError, match=match):
        get_operator("cpu_experts")(key=KEY, orig_module=model.model.layers[1].mlp.experts, config=config,
                                    device="cpu", **kwargs)


def test_bad_expert_id_is_a_ktrans_error():
    config, hf, op = make("qwen3_moe")
    ids = torch.tensor([[0, 99]])
    with pytest.raises(KtransError, match="expert id 99"):
        op(torch.randn(1, config.hidden_size), ids, torch.rand(1, 2))


def test_gguf_file_mixed_formats(tiny_model):
    """A real GGUF (q4_k_m: q4_k gate/up, q6_k down) through expert_stack, as stored."""
    import transformers

    from ktrans.weights.source import open_weights

    src = open_weights(None, str(tiny_model("qwen3_moe", "q4_k_m", with_safetensors=False) / "model.gguf"))
    config = src.config()
    with torch.device("meta"):
        model = transformers.Qwen3MoeForCausalLM(config)
    hf = model.model.layers[1].mlp.experts
    op = get_operator("cpu_experts")(key=KEY, orig_module=hf, config=config, device="cpu", backend="auto")
    op.load_weights(src)
    ref_op = get_operator("torch_experts")(key=KEY, orig_module=hf, config=config, device="cpu")
    ref_op.load_weights(src)
    x = torch.randn(7, config.hidden_size)
    ids, w = routing(config, hf, 7)
    got = op(x, ids, w)
    assert nmse(got, ref_op(x, ids, w)) < MOE_NMSE["q4_k"]
    stacks = [gguf_py_dequant(src.expert_stack(1, p)) for p in ("gate", "up", "down")]
    assert {src.expert_stack(1, p).qtype for p in ("gate", "down")} == {"q4_k", "q6_k"}
    assert nmse(got, reference_moe(x, ids, w, *stacks)) < MOE_NMSE["q4_k"]
    stored = src.info(f"{KEY}.gate_up_proj").nbytes + src.info(f"{KEY}.down_proj").nbytes
    planned = type(op).planned_bytes(key=KEY, orig_module=hf, config=config, device="cpu",
                                     kwargs={"numa": "replicate", "numa_nodes": 1}, weights=src)
    assert planned == {"cpu": stored} and op._moe.weight_bytes == stored


def test_spin_setting(monkeypatch):
    from ktrans.operators.experts import DEFAULT_SPIN_US, pool_spin_us

    monkeypatch.delenv("KTRANS_SPIN_US", raising=False)
    assert pool_spin_us() == DEFAULT_SPIN_US
    monkeypatch.setenv("KTRANS_SPIN_US", "5000")
    assert pool_spin_us() == 5000
    for bad in ("-1", "fast", "1.5"):
        monkeypatch.setenv("KTRANS_SPIN_US", bad)
        with pytest.raises(KtransError, match="KTRANS_SPIN_US"):
            pool_spin_us()
