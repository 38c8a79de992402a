"""Fidelity: ModelRunner (rules → operators → paged KV) generates exactly what transformers'
own model generates on the same weights, for every architecture.

Two sources of weights:
- gen-model's tiny models (tests/models_fixture.py): ktrans reads model.gguf, transformers loads
  the --with-safetensors copy (which holds the GGUF's values, dequantized for quant types);
- a tiny random model saved by transformers itself (save_pretrained), read by ktrans through
  SafetensorsSource.
Greedy generation of 32 tokens must be identical token for token, and every step's logits must
agree within FIDELITY_F32_RTOL/ATOL (the compute is f32; quantized weights are compared with the
dequantized reference, so they too are the same numbers).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from ktrans.engine.batch import ForwardBatch
from ktrans.engine.model_runner import ModelRunner
from tests.operators.hf_tiny import tiny_hf_model
from tests.tolerances import FIDELITY_F32_ATOL, FIDELITY_F32_RTOL

ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2"]
MOE_CLASS = {"deepseek_v3": "DeepseekV3MoE", "deepseek_v2": "DeepseekV2Moe", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
             "qwen2_moe": "Qwen2MoeSparseMoeBlock", "mixtral": "MixtralSparseMoeBlock"}
NEW_TOKENS = 32


def rules_for(arch: str) -> str:
    """Our attention (and MoE block) operators on every layer; everything else kept."""
    attn = "mla_attention" if arch.startswith("deepseek") else "gqa_attention"
    text = f"- match: {{name: '\\.self_attn$'}}\n  replace: {{class: {attn}}}\n  recursive: false\n"
    if arch in MOE_CLASS:
        text += f"- match: {{name: '\\.mlp$', class: {MOE_CLASS[arch]}}}\n  replace: {{class: moe_block}}\n"
    return text


@pytest.fixture(scope="module", params=ARCHS)
def saved(request, tmp_path_factory):
    arch = request.param
    config, model = tiny_hf_model(arch)
    out = tmp_path_factory.mktemp(arch)
    model.save_pretrained(out)
    (out / "rules.yaml").write_text(rules_for(arch))
    return arch, model, out


def _runner(out, page_size=4):
    return ModelRunner(model_path=str(out), optimize_config_path=str(out / "rules.yaml"), device="cpu",
                       cache_lens=256, page_size=page_size, progress=False)


def _one(runner, ids, num_computed, pages):
    """One step of one request: ids are its new tokens; returns logits of the last."""
    n = len(ids)
    batch = ForwardBatch(input_ids=torch.tensor(ids), positions=torch.arange(num_computed, num_computed + n),
                         seq_ids=[0], num_computed=[num_computed], num_new=[n], page_table=pages[None],
                         logits_indices=torch.tensor([n - 1]))
    return runner.execute(batch)[0]


def _greedy_matches(runner, model, arch):
    prompt = torch.randint(0, model.config.vocab_size, (9,)).tolist()
    pages = torch.randperm(runner.num_pages)[: -(-(len(prompt) + NEW_TOKENS) // runner.page_size)].int()
    ours, ref = list(prompt), list(prompt)
    logits = _one(runner, prompt, 0, pages)
    for step in range(NEW_TOKENS):
        with torch.no_grad():
            ref_logits = model(input_ids=torch.tensor([ref])).logits[0, -1]
        torch.testing.assert_close(logits, ref_logits, rtol=FIDELITY_F32_RTOL, atol=FIDELITY_F32_ATOL)
        ours.append(int(logits.argmax()))
        ref.append(int(ref_logits.argmax()))
        assert ours == ref, f"{arch}: greedy tokens diverge at step {step}"
        logits = _one(runner, [ours[-1]], len(ours) - 1, pages)


def test_greedy_generation_identical_to_transformers(saved):
    arch, model, out = saved
    _greedy_matches(_runner(out), model, arch)


# every architecture in f32, and other stored types on a spread of architectures
GGUF_CASES = [(a, "f32") for a in ARCHS] + [("deepseek_v3", "q4_k"), ("qwen3_moe", "bf16")]


@pytest.mark.parametrize("arch,quant", GGUF_CASES)
def test_gguf_greedy_identical_to_transformers_on_safetensors_copy(tiny_model, tmp_path, arch, quant):
    out = tiny_model(arch, quant)
    (tmp_path / "rules.yaml").write_text(rules_for(arch))
    runner = ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cpu",
                         optimize_config_path=str(tmp_path / "rules.yaml"), cache_lens=256, page_size=16,
                         progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _greedy_matches(runner, model, arch)


def test_single_file_gguf_needs_no_model_path(tiny_model, tmp_path):
    """--gguf_path FILE alone: config and tokenizer come from the GGUF metadata."""
    out = tiny_model("qwen3_moe", "f32")
    (tmp_path / "rules.yaml").write_text(rules_for("qwen3_moe"))
    runner = ModelRunner(gguf_path=str(out / "model.gguf"), optimize_config_path=str(tmp_path / "rules.yaml"),
                         device="cpu", cache_lens=128, page_size=16, progress=False)
    assert runner.config.model_type == "qwen3_moe" and runner.tokenizer is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _greedy_matches(runner, model, "qwen3_moe")
