"""GGUF layout against an independent reader: transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`: gguf-py's dequantization, transformers' name tables, its
own un-permutation of llama.cpp's RoPE Q/K rows and its own expert stacking), on gen-model files.

For every gen-model architecture transformers reads from GGUF — llama, qwen2, qwen2moe, qwen3moe
(transformers 5.x, GGUF_CONFIG_MAPPING) — and for f32 and Q4_K_M files:
- config: what transformers reads from the GGUF metadata equals config.json on every field;
- tensors: every parameter ktrans reads (names.py's tables, RoPE row un-permutation, expert
  stacking, all on the stored bytes), dequantized by the same gguf-py, equals transformers'
  parameter bit for bit, and the two name sets are the same;
- tokens: ktrans (ModelRunner on that GGUF) generates what transformers' model loaded from the
  same file generates, token for token, with every step's logits within FIDELITY_F32_RTOL/ATOL
  (f32 file: the shipped rules; Q4_K_M: our attention and MoE-block operators with transformers'
  expert modules on ktrans's dequantized weights — the CPU experts kernels quantize activations,
  which test_fidelity bounds separately);
- tokenizer: transformers' tokenizer built from the GGUF encodes and decodes like ktrans's.

Not covered here, because transformers cannot read them from GGUF:
- DeepSeek-V2/V3 (GGUF arch 'deepseek2'): transformers has no GGUF support for it, so the MLA
  split of kv_b_proj into attn_k_b/attn_v_b has no independent loader to compare with;
- Mixtral: llama.cpp writes it as arch 'llama' with expert tensors; transformers builds a dense
  LlamaForCausalLM from it and drops the experts.
Where transformers' GGUF config mapping lacks a key ktrans writes (expert_feed_forward_length,
expert_shared_feed_forward_length: it leaves the class defaults), the value is read from the same
GGUF with gguf-py and passed in, never taken from config.json.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from ktrans.engine.model_runner import ModelRunner
from ktrans.weights.source import open_weights
from tests.models.test_fidelity import _greedy_matches, rules_for

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# transformers config field -> GGUF key (after the arch prefix) that transformers does not map.
UNMAPPED = {"moe_intermediate_size": "expert_feed_forward_length",
            "shared_expert_intermediate_size": "expert_shared_feed_forward_length"}
TEXT = "Hello, world! 你好，世界。こんにちは 🚀🔥 naïve café ∑x² <think>hmm</think>"
CASES = [(arch, quant) for arch in GGUF_ARCH for quant in ("f32", "q4_k_m")]


def _unmapped_fields(path, arch: str) -> dict:
    reader = gguf.GGUFReader(path)
    out = {}
    for attr, key in UNMAPPED.items():
        field = reader.fields.get(f"{GGUF_ARCH[arch]}.{key}")
        if field is not None:
            out[attr] = int(field.contents())
    return out


@pytest.fixture(scope="module")
def loaded(tiny_model):
    cache = {}

    def load(arch, quant):
        if (arch, quant) not in cache:
            d = tiny_model(arch, quant, with_safetensors=False)
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                d, gguf_file="model.gguf", dtype=torch.float32, **_unmapped_fields(d / "model.gguf", arch)).eval()
            cache[(arch, quant)] = d, ref
        return cache[(arch, quant)]

    return load


@pytest.mark.parametrize("arch,quant", CASES)
def test_config_from_gguf_equals_config_json(loaded, arch, quant):
    d, ref = loaded(arch, quant)
    ours = transformers.AutoConfig.from_pretrained(d)
    assert type(ref.config) is type(ours)
    theirs, mine = ref.config.to_dict(), ours.to_dict()
    skip = {"_name_or_path", "_model_name_or_path", "dtype", "quantization_config", "transformers_version",
            "architectures", "bos_token_id", "pad_token_id", "eos_token_id", "output_router_logits",
            "layer_types"}                  # ids: the tokenizer's business; the rest: loader bookkeeping
    for key in sorted(set(mine) - skip):
        want, got = mine[key], theirs.get(key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), key      # GGUF stores float32
        else:
            assert got == want, key


@pytest.mark.parametrize("arch,quant", CASES)
def test_every_tensor_equals_transformers_bit_for_bit(loaded, arch, quant):
    d, ref = loaded(arch, quant)
    src = open_weights(str(d), str(d / "model.gguf"))
    state = ref.state_dict()
    assert sorted(src.names()) == sorted(state)
    stored = set()
    for name in src.names():
        raw = src.raw(name)
        stored.add(raw.qtype)
        ours = gguf.quants.dequantize(raw.data, gguf.GGMLQuantizationType[raw.qtype.upper()]).reshape(raw.shape)
        theirs = state[name].numpy()
        assert ours.shape == theirs.shape, name
        assert np.array_equal(ours.astype(np.float32), theirs), name
    assert stored == ({"f32"} if quant == "f32" else {"f32", "q4_k", "q6_k"} | ({"q8_0", "q5_k"} if arch.endswith("moe") else set()))


@pytest.mark.parametrize("arch,quant", CASES)
def test_greedy_tokens_equal_transformers_on_the_same_file(loaded, tmp_path, arch, quant):
    d, ref = loaded(arch, quant)
    rules = None
    if quant != "f32":
        rules = tmp_path / "rules.yaml"
        rules.write_text(rules_for(arch))
    runner = ModelRunner(model_path=str(d), gguf_path=str(d / "model.gguf"), device="cpu",
                         optimize_config_path=rules and str(rules), cache_lens=256, page_size=16, progress=False)
    _greedy_matches(runner, ref, arch)


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_tokenizer_from_gguf_matches(tiny_model, arch):
    """NOTE: transformers' GGUF tokenizer for arch 'llama' with a BPE ('gpt2') vocabulary, as
    Llama 3 GGUFs have, leaves bos/eos unset; the ids are compared wherever it sets them."""
    d = tiny_model(arch, "f32", with_safetensors=False)
    theirs = transformers.AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
    # ktrans's tokenizer from the GGUF metadata alone (single-file mode) and from tokenizer.json
    for ours in (open_weights(None, str(d / "model.gguf")).tokenizer(), open_weights(str(d), None).tokenizer()):
        for special in (True, False):
            ids = ours(TEXT, add_special_tokens=special)["input_ids"]
            assert theirs(TEXT, add_special_tokens=special)["input_ids"] == ids
            assert theirs.decode(ids) == ours.decode(ids)
        assert len(theirs) == len(ours)
        for attr in ("eos_token_id", "bos_token_id"):
            if getattr(theirs, attr) is not None:
                assert getattr(theirs, attr) == getattr(ours, attr), attr
