"""The packed model forward (embed → HF decoder layers with our attention/MoE operators →
norm → lm_head) vs transformers' own forward of the whole sequence, for every architecture:
two requests prefilled together in chunks, then decoded together, give HF's logits (Qwen3-Next and
Qwen3.5: their Gated DeltaNet layers carry each request's state in its state rows between steps)."""

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
from ktrans.operators.rope import materialize_rotary
from tests.operators.hf_tiny import model_source, tiny_hf_model
from tests.tolerances import F32_ATOL, F32_RTOL

ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "llama", "glm4_moe",
         "minimax_m2", "gemma3", "qwen3_next", "qwen3_5_moe"]


def _swap_operators(model, config):
    """Our attention and MoE operators in place of the HF ones (what the shipped rules do)."""
    ours = copy.deepcopy(model)
    source = model_source(model)
    for i, layer in enumerate(ours.model.layers):
        if hasattr(layer, "linear_attn"):
            layer.linear_attn = GatedDeltaNet(key=f"model.layers.{i}.linear_attn", orig_module=layer.linear_attn,
                                              config=config, device="cpu")
            layer.linear_attn.load_weights(source)
        else:
            cls = MLAAttention if config.model_type.startswith("deepseek") else GQAAttention
            layer.self_attn = cls(key=f"model.layers.{i}.self_attn", orig_module=layer.self_attn, config=config,
                                  device="cpu")
            layer.self_attn.load_weights(source)
        if hasattr(layer.mlp, "experts"):
            layer.mlp = MoEBlock(key=f"model.layers.{i}.mlp", orig_module=layer.mlp, config=config, device="cpu")
            layer.mlp.load_weights(source)
    return ours


def _step(ours, rotary, kv, ids, done, new, pages):
    reqs = [r for r in range(len(ids)) if new[r]]
    positions = torch.cat([torch.arange(done[r], done[r] + new[r]) for r in reqs])
    input_ids = torch.cat([ids[r][done[r]:done[r] + new[r]] for r in reqs])
    ends = torch.tensor([new[r] for r in reqs]).cumsum(0) - 1
    batch = ForwardBatch(input_ids=input_ids, positions=positions, seq_ids=reqs,
                         num_computed=[done[r] for r in reqs], num_new=[new[r] for r in reqs],
                         page_table=pages[reqs], logits_indices=ends,
                         state_rows=torch.tensor([[r, r] for r in reqs]))   # (recurrent layers: in place)
    with forward_context(batch, kv) as ctx, torch.no_grad():
        logits = forward_packed(ours, rotary, ctx)
    for r in reqs:
        done[r] += new[r]
    return dict(zip(reqs, logits))


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_forward_matches_hf_logits(arch):
    config, model = tiny_hf_model(arch)
    ours = _swap_operators(model, config)
    rotary = materialize_rotary(model.model.rotary_emb, config, "cpu")
    kv = KVStorage.for_config(config, num_pages=16, page_size=4, dtype=torch.float32, device="cpu")
    kv.reserve_states(2)
    pages = torch.randperm(16)[:12].int().view(2, 6)
    ids = [torch.randint(0, config.vocab_size, (14,)), torch.randint(0, config.vocab_size, (11,))]
    with torch.no_grad():
        ref = [model(input_ids=i[None]).logits[0] for i in ids]                       # [S, V] each
    done = [0, 0]
    got = {0: [], 1: []}
    for new in ([6, 8], [6, 1], [1, 1], [1, 1]):                                      # chunked prefill, then decode both
        for r, row in _step(ours, rotary, kv, ids, done, new, pages).items():
            got[r].append((done[r] - 1, row))
    for r in range(2):
        for pos, row in got[r]:
            torch.testing.assert_close(row, ref[r][pos], rtol=F32_RTOL * 10, atol=F32_ATOL * 100)
