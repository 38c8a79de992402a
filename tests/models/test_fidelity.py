"""Fidelity: ModelRunner (rules → operators → paged KV) generates exactly what transformers'
own model generates on the same weights, for every architecture.

Two sources of weights:
- gen-model's tiny models (tests/models_fixture.py), run with the shipped rule files on the CPU:
  ktrans reads model.gguf, transformers loads the --with-safetensors copy (which holds the GGUF's
  values, dequantized for quant types);
- a tiny random model saved by transformers itself (save_pretrained), read by ktrans through
  SafetensorsSource, with rules that put only our attention and MoE-block operators in.
With f32 weights greedy generation of 32 tokens must be identical token for token, and every
step's logits must agree within FIDELITY_F32_RTOL/ATOL; with quantized weights the logits must
stay within QUANT_LOGITS_NMSE of transformers on the dequantized values.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from ktrans.engine.batch import ForwardBatch
from ktrans.engine.model_runner import ModelRunner
from ktrans.operators.moe_block import MoEBlock
from tests.operators.hf_tiny import tiny_hf_model
from tests.routing import Reference, force_reference_routing, force_reference_routing_hf
from tests.tolerances import (BF16_LOGITS_NMSE, BF16_VS_HF_BF16, FIDELITY_F32_ATOL, FIDELITY_F32_NMSE,
                              FIDELITY_F32_RTOL, QUANT_LOGITS_NMSE, ROUTING_LOGIT_DRIFT)

ARCHS = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "qwen2", "llama", "gpt_oss", "glm4_moe",
         "minimax_m2", "gemma3", "qwen3_next", "qwen3_5_moe"]
MOE_CLASS = {"deepseek_v3": "DeepseekV3MoE", "deepseek_v2": "DeepseekV2Moe", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
             "qwen2_moe": "Qwen2MoeSparseMoeBlock", "mixtral": "MixtralSparseMoeBlock", "gpt_oss": "GptOssMLP",
             "glm4_moe": "Glm4MoeMoE", "minimax_m2": "MiniMaxM2SparseMoeBlock",
             "qwen3_next": "Qwen3NextSparseMoeBlock", "qwen3_5_moe": "Qwen3_5MoeSparseMoeBlock"}
HYBRID = ("qwen3_next", "qwen3_5_moe")      # Gated DeltaNet layers beside the attention layers
NEW_TOKENS = 32


def rules_for(arch: str) -> str:
    """Our attention (and MoE block) operators on every layer; everything else kept."""
    attn = "mla_attention" if arch.startswith("deepseek") else "gqa_attention"
    text = f"- match: {{name: '\\.self_attn$'}}\n  replace: {{class: {attn}}}\n  recursive: false\n"
    if arch in MOE_CLASS:
        text += f"- match: {{name: '\\.mlp$', class: {MOE_CLASS[arch]}}}\n  replace: {{class: moe_block}}\n"
    if arch in HYBRID:
        text += "- match: {name: '\\.linear_attn$'}\n  replace: {class: gated_deltanet}\n  recursive: false\n"
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


_STEPS = itertools.count()


def state_rows() -> torch.Tensor:
    """The one request's recurrent-state rows for its next step (models with linear-attention
    layers; ignored by the others): read the row the previous step wrote, write the other, as the
    engine's commit alternates them (a CUDA-graph step runs twice when it is captured)."""
    k = next(_STEPS) % 2
    return torch.tensor([[k, 1 - k]])


def _one(runner, ids, num_computed, pages):
    """One step of one request: ids are its new tokens; returns logits of the last."""
    n = len(ids)
    batch = ForwardBatch(input_ids=torch.tensor(ids), positions=torch.arange(num_computed, num_computed + n),
                         seq_ids=[0], num_computed=[num_computed], num_new=[n], page_table=pages[None],
                         logits_indices=torch.tensor([n - 1]), state_rows=state_rows())
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


def test_qwen3_5_moe_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """A Qwen3.5-MoE checkpoint as released (Qwen3_5MoeForConditionalGeneration: its text model under
    text_config and model.language_model.*, a vision tower beside it): ktrans reads the text model
    and generates what that text model generates; the vision weights are left unread."""
    config, text = tiny_hf_model("qwen3_5_moe")
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=config.hidden_size,
                  patch_size=4, temporal_patch_size=1, spatial_merge_size=1, num_position_embeddings=16)
    model = transformers.Qwen3_5MoeForConditionalGeneration(
        transformers.Qwen3_5MoeConfig(text_config=config.to_dict(), vision_config=vision)).eval()
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.save_pretrained(tmp_path)
    (tmp_path / "rules.yaml").write_text(rules_for("qwen3_5_moe"))
    runner = _runner(tmp_path)
    assert runner.config.model_type == "qwen3_5_moe_text"
    assert any(n.startswith("model.layers.0.") for n in runner.weights.names())
    assert not any("visual" in n or "language_model" in n for n in runner.weights.names())
    _greedy_matches(runner, text, "qwen3_5_moe")


def _gguf_runner(out, rules=None, fused_decode=True):
    """ModelRunner over model.gguf; rules None = the shipped rule file with --device cpu.

    NOTE: _token_nmse needs fused_decode=False: the fused all-CPU decode step routes in C++, out
    of reach of tests/routing.py's forced routing (tests/operators/test_cpu_decode.py holds the
    fused step to the module path)."""
    return ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cpu", fused_decode=fused_decode,
                       optimize_config_path=rules and str(rules), cache_lens=256, page_size=16, progress=False)


def _token_nmse(runner, model, floor_model=None, prompt=20, decode=4):
    """NMSE of ktrans's logits vs `model`'s (f32) at every position of a random sequence, run as
    one prefill of `prompt` tokens then `decode` single-token steps; paired with the NMSE of
    `floor_model`'s logits (transformers' own lower-precision run), or 0.0. MoE routing flips are
    forced back to the reference's choice (tests/routing.py): returns (errors, flips, drift)."""
    ids = torch.randint(0, model.config.vocab_size, (prompt + decode,))
    rows = [(0, p) for p in range(len(ids))]
    routing = Reference(model.config)
    with torch.no_grad():
        with routing.recording(model, rows):
            ref = model(input_ids=ids[None]).logits[0]
        floor = None
        if floor_model is not None:
            dev = next(floor_model.parameters()).device
            with force_reference_routing_hf(floor_model, routing, rows):
                floor = floor_model(input_ids=ids[None].to(dev)).logits[0].float().cpu()
    pages = torch.arange(runner.num_pages, dtype=torch.int32)
    flips, drift, step, routed = [], [0.0], [], set()
    with force_reference_routing(runner.model, routing, lambda: step, flips, drift, routed):
        step[:] = rows[:prompt]
        batch = ForwardBatch(input_ids=ids[:prompt], positions=torch.arange(prompt), seq_ids=[0], num_computed=[0],
                             num_new=[prompt], page_table=pages[None], logits_indices=torch.arange(prompt),
                             state_rows=state_rows())
        out = [runner.execute(batch).cpu()]
        for n in range(prompt, prompt + decode):
            step[:] = rows[n:n + 1]
            out.append(_one(runner, [int(ids[n])], n, pages)[None].cpu())
    assert routed == {(layer, row) for layer in routing.moe_layers() for row in rows}, \
        "a step bypassed the MoE blocks' routers: its routing could not be held to the reference's"
    got = torch.cat(out)                                                                 # [S, V]
    nmse = lambda a, i: float(((a[i] - ref[i]) ** 2).sum() / (ref[i] ** 2).sum())  # noqa: E731
    errors = [(nmse(got, i), nmse(floor, i) if floor is not None else 0.0) for i in range(len(ids))]
    return errors, flips, drift[0]


def _near_ties_only(flips, drift):
    """Every routing flip is a genuine near-tie of the reference's router (tests/routing.py)."""
    assert drift <= ROUTING_LOGIT_DRIFT, f"router logits {drift:.3f} away from the reference's"
    assert all(f.gap <= f.drift for f in flips), flips


def _reference(out):
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS + ["deepseek_v3/kimi-k2-tiny"])
def test_gguf_f32_shipped_rules_greedy_identical(tiny_model, arch):
    """The shipped rules (CPU experts kernels, our attention/MoE operators) on f32 GGUF weights
    generate what transformers generates from the safetensors copy (also for Kimi-K2's preset:
    DeepSeek-V3 with one expert group, its YaRN and its tokenizer)."""
    arch, _, preset = arch.partition("/")
    out = tiny_model(arch, "f32", preset=preset or "tiny")
    _greedy_matches(_gguf_runner(out), _reference(out), arch)


@pytest.mark.parametrize("arch,quant", [("deepseek_v3", "q4_k"), ("qwen3_moe", "bf16")])
def test_gguf_quantized_exact_operators_and_close_kernels(tiny_model, tmp_path, arch, quant):
    """Quantized/bf16 GGUF weights vs transformers on their dequantized values: with HF's own
    experts module (dequantized f32 compute) greedy tokens and logits match at f32 tolerance;
    with the shipped rules (CPU experts quantize activations for the block dot products) the
    logits at every position stay within QUANT_LOGITS_NMSE, once routing near-ties are forced
    back to the reference's experts."""
    out = tiny_model(arch, quant)
    model = _reference(out)
    (tmp_path / "rules.yaml").write_text(rules_for(arch))
    _greedy_matches(_gguf_runner(out, tmp_path / "rules.yaml"), model, arch)
    errors, flips, drift = _token_nmse(_gguf_runner(out, fused_decode=False), model)
    _near_ties_only(flips, drift)
    worst = max(range(len(errors)), key=lambda i: errors[i][0])
    assert errors[worst][0] < QUANT_LOGITS_NMSE, (f"position {worst}: logits NMSE {errors[worst][0]:.2e} "
                                                 f"(bound {QUANT_LOGITS_NMSE:.0e}); flips {flips}, all {errors}")


@pytest.mark.parametrize("arch", ["qwen3_moe", "gemma3", "qwen3_next", "qwen3_5_moe"])
def test_single_file_gguf_needs_no_model_path(tiny_model, arch):
    """--gguf_path FILE alone: config and tokenizer come from the GGUF metadata (Gemma 3: its
    local layers, both rope bases and the global layers' scaling, the attention scale; Qwen3-Next
    and Qwen3.5: which layers are linear attention, the DeltaNet's head sizes, partial rotary,
    Qwen3.5's M-RoPE sections)."""
    out = tiny_model(arch, "f32")
    runner = ModelRunner(gguf_path=str(out / "model.gguf"), device="cpu", cache_lens=128, page_size=16,
                         progress=False)
    assert runner.config.model_type == _reference(out).config.model_type and runner.tokenizer is not None
    _greedy_matches(runner, _reference(out), arch)


# Layer 0 wholly on the CPU, the other layers on the GPU: hidden states, rotary tables, batch
# metadata and KV pages must follow each layer's device.
SPLIT_EXPERTS_RULE = """  - match: {name: '^model\\.layers\\.\\d+\\.mlp\\.experts$'}
    replace: {class: cpu_experts, device: cpu}
    recursive: false
"""
SPLIT_LAYER0_RULES = """  - match: {name: '^model\\.layers\\.0\\.self_attn$'}
    replace: {class: ATTN, device: cpu}
    recursive: false
  - match: {name: '^model\\.layers\\.0\\.'}
    replace: {class: default, device: cpu}
  - match: {name: '^model\\.layers\\.\\d+\\.self_attn$'}
    replace: {class: ATTN}
    recursive: false
"""


SPLIT_LINEAR_RULES = """  - match: {name: '^model\\.layers\\.\\d+\\.linear_attn$'}
    replace: {class: gated_deltanet}
    recursive: false
"""


def _split_rules(out, default_device: str) -> str:
    """The split rule file for this model: its attention operator, and the experts rule only
    where the model has experts (a rule that places nothing is an error); a hybrid's layer 0 is a
    linear-attention layer, placed with gated_deltanet on the CPU (which keeps its state in the
    cache), as are its other linear layers on the default device."""
    ref = _reference(out)
    attn = "mla_attention" if ref.config.model_type.startswith("deepseek") else "gqa_attention"
    moe = any(n.endswith("mlp.experts") for n, _ in ref.named_modules())
    layer0 = SPLIT_LAYER0_RULES.replace("ATTN", attn)
    if ref.config.model_type in ("qwen3_next", "qwen3_5_moe_text"):
        layer0 = layer0.replace("layers\\.0\\.self_attn$'}\n    replace: {class: gqa_attention, device: cpu}",
                                "layers\\.0\\.linear_attn$'}\n    replace: {class: gated_deltanet, device: cpu}")
        assert "layers\\.0\\.linear_attn" in layer0
        layer0 += SPLIT_LINEAR_RULES
    return f"default_device: {default_device}\nrules:\n" + (SPLIT_EXPERTS_RULE if moe else "") + layer0


def _cache_on(kv, i: int):
    """The device of layer i's cache: its KV pages, or a linear layer's state rows."""
    return (kv.layers[i] or kv.state(i))[0].device


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v2", "minimax_m2", "gemma3", "qwen3_next"])
def test_split_rules_keep_transformers_layers_on_the_cpu(tiny_model, tmp_path, arch):
    """The split rules with every device the CPU: layer 0 stays transformers' own modules (`class:
    default`, its MoE routed by transformers' router), the other layers ktrans's operators. The
    logits stay at f32 agreement with transformers, with every MoE layer's routing (both kinds)
    held to the reference's."""
    out = tiny_model(arch, "f32")
    rules = tmp_path / "split.yaml"
    rules.write_text(_split_rules(out, "cpu"))
    runner = ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cpu", fused_decode=False,
                         optimize_config_path=str(rules), cache_lens=256, page_size=16, progress=False)
    assert not any(isinstance(m, MoEBlock) for n, m in runner.model.named_modules() if ".layers.0." in n + ".")
    errors, flips, drift = _token_nmse(runner, _reference(out))
    _near_ties_only(flips, drift)
    assert max(ours for ours, _ in errors) < FIDELITY_F32_NMSE, errors


@pytest.mark.gpu
@pytest.mark.parametrize("arch,split", [("deepseek_v3", False), ("qwen3_moe", False), ("qwen2", False),
                                        ("qwen3_moe", True), ("deepseek_v2", True), ("glm4_moe", False),
                                        ("minimax_m2", True), ("gemma3", False), ("gemma3", True),
                                        ("qwen3_next", False), ("qwen3_next", True), ("qwen3_5_moe", False)])
def test_cuda_rules_close_to_transformers(tiny_model, tmp_path, arch, split):
    """--device cuda with the shipped rules (attention, KV cache, router and shared experts in
    bf16 on the GPU, routed experts on the CPU, stream-ordered), or with layer 0 on the CPU: logits
    of a prefill and four decode steps stay as close to the f32 reference as transformers' own
    bf16 model on the GPU, once routing near-ties are forced back to the reference's experts."""
    out = tiny_model(arch, "f32")
    rules = None
    if split:
        rules = tmp_path / "split.yaml"
        rules.write_text(_split_rules(out, "cuda"))
    runner = ModelRunner(model_path=str(out), gguf_path=str(out / "model.gguf"), device="cuda",
                         optimize_config_path=rules and str(rules), cache_lens=256, page_size=16, progress=False)
    assert _cache_on(runner.kv, -1).type == "cuda" and (_cache_on(runner.kv, 0).type == "cuda") != split
    errors, flips, drift = _token_nmse(runner, _reference(out), _reference(out).to("cuda", torch.bfloat16))
    _near_ties_only(flips, drift)
    assert all(ours < max(BF16_LOGITS_NMSE, BF16_VS_HF_BF16 * hf) for ours, hf in errors), errors
