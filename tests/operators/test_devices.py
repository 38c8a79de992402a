"""The same operators in bf16, on the CPU and (marked gpu) on CUDA: the packed model forward's
error against transformers' f32 logits is no worse than transformers' own bf16 model's error on
the same device (times BF16_VS_HF_BF16, or under BF16_LOGITS_NMSE) on every token, routing
near-ties aside (tests/routing.py), and the KV cache lives on the attention device in the compute
dtype."""

from __future__ import annotations

import copy

import pytest
import torch

from ktrans.engine.batch import ForwardBatch, forward_context
from ktrans.kv_cache.storage import KVStorage
from ktrans.operators.attention_gqa import GQAAttention
from ktrans.operators.attention_mla import MLAAttention
from ktrans.operators.gated_deltanet import GatedDeltaNet
from ktrans.operators.model import forward_packed
from ktrans.operators.moe_block import MoEBlock
from tests.operators.hf_tiny import model_source, tiny_hf_model
from tests.routing import Reference, force_reference_routing, force_reference_routing_hf
from tests.tolerances import BF16_LOGITS_NMSE, BF16_VS_HF_BF16, ROUTING_DRIFT_VS_HF_BF16, ROUTING_LOGIT_DRIFT

ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "llama", "glm4_moe",
         "minimax_m2", "gemma3", "qwen3_next", "qwen3_5_moe"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _placed(model, config, device):
    """HF modules converted to bf16 on `device`; our operators loaded there from the f32 weights."""
    ours = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16)
    source = model_source(model)
    for i, layer in enumerate(ours.model.layers):
        if hasattr(layer, "linear_attn"):          # Qwen3-Next / Qwen3.5: Gated DeltaNet in bf16 (state in f32)
            layer.linear_attn = GatedDeltaNet(key=f"model.layers.{i}.linear_attn", orig_module=layer.linear_attn,
                                              config=config, device=device, dtype="bf16")
            layer.linear_attn.load_weights(source)
            continue
        cls = MLAAttention if config.model_type.startswith("deepseek") else GQAAttention
        layer.self_attn = cls(key=f"model.layers.{i}.self_attn", orig_module=layer.self_attn, config=config,
                              device=device, dtype="bf16")
        layer.self_attn.load_weights(source)
        if hasattr(layer.mlp, "experts"):
            layer.mlp = MoEBlock(key=f"model.layers.{i}.mlp", orig_module=layer.mlp, config=config, device=device)
            layer.mlp.load_weights(source)
    return ours


def _nmse(got, ref):
    return float(((got - ref) ** 2).sum() / (ref ** 2).sum())


def _token_errors(arch, device):
    """(ours, transformers-bf16) NMSE vs transformers-f32 for every token of two requests, run
    as a packed chunked prefill then single-token decodes, with MoE routing flips forced to the
    reference's choice (tests/routing.py); and the flips found in ours."""
    config, model = tiny_hf_model(arch)
    ours = _placed(model, config, device)
    kv = KVStorage.for_config(config, num_pages=8, page_size=8, dtype=torch.bfloat16, device=device)
    kv.reserve_states(2)
    ids = [torch.randint(0, config.vocab_size, (12,)), torch.randint(0, config.vocab_size, (5,))]
    hf_bf16 = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16)
    ref_routing = Reference(config)
    hf_drift = [0.0]
    with torch.no_grad():
        ref, floor = [], []
        for r, i in enumerate(ids):
            rows = [(r, p) for p in range(len(i))]
            with ref_routing.recording(model, rows):
                ref.append(model(input_ids=i[None]).logits[0])
            with force_reference_routing_hf(hf_bf16, ref_routing, rows, hf_drift):
                floor.append(hf_bf16(input_ids=i[None].to(device)).logits[0].float().cpu())
    pages = torch.tensor([[3, 5], [0, 7]], dtype=torch.int32)
    errors, flips, drift, step_rows = [], [], [0.0], []
    # step 1: both prompts but the last token; step 2: both last tokens as single-token decodes
    with force_reference_routing(ours, ref_routing, lambda: step_rows, flips, drift):
        for new, done in [([11, 4], [0, 0]), ([1, 1], [11, 4])]:
            step_rows[:] = [(r, p) for r in range(2) for p in range(done[r], done[r] + new[r])]
            batch = ForwardBatch(input_ids=torch.cat([ids[r][done[r]:done[r] + new[r]] for r in range(2)]),
                                 positions=torch.cat([torch.arange(done[r], done[r] + new[r]) for r in range(2)]),
                                 seq_ids=[0, 1], num_computed=done, num_new=new, page_table=pages,
                                 logits_indices=torch.arange(sum(new)), state_rows=torch.tensor([[0, 0], [1, 1]]))
            with forward_context(batch, kv) as ctx, torch.no_grad():
                logits = forward_packed(ours, ours.model.rotary_emb, ctx)
            assert logits.dtype == torch.float32 and logits.device.type == device
            for (r, pos), row in zip(step_rows, logits.cpu()):
                errors.append((_nmse(row, ref[r][pos]), _nmse(floor[r][pos], ref[r][pos])))
    first = next(lay for lay in kv.layers if lay)                 # (a hybrid's layer 0 holds a state, no pages)
    assert first[0].device.type == device and first[0].dtype == torch.bfloat16
    for i in kv.recurrent_layers:
        conv, rec = kv.state(i)
        assert (conv.device.type, conv.dtype) == (device, torch.bfloat16)
        assert (rec.device.type, rec.dtype) == (device, torch.float32)
    return errors, flips, drift[0], hf_drift[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_packed_forward_close_to_hf_f32(arch, device):
    """Every token within max(BF16_LOGITS_NMSE, BF16_VS_HF_BF16 x transformers' own bf16 error),
    once the rare MoE routing flips of bf16 rounding are forced back to the reference's experts;
    each flip must be a genuine near-tie of the reference's router (tests/routing.py), and the
    router logits' drift within max(ROUTING_LOGIT_DRIFT, ROUTING_DRIFT_VS_HF_BF16 x that of
    transformers' bf16 model)."""
    errors, flips, drift, hf_drift = _token_errors(arch, device)
    assert drift <= max(ROUTING_LOGIT_DRIFT, ROUTING_DRIFT_VS_HF_BF16 * hf_drift), \
        f"router logits {drift:.3f} away from the reference's (transformers' bf16 model: {hf_drift:.3f})"
    assert all(f.gap <= f.drift for f in flips), flips
    assert all(ours < max(BF16_LOGITS_NMSE, BF16_VS_HF_BF16 * hf) for ours, hf in errors), errors
