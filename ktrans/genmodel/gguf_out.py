"""GGUF side of gen-model: per-tensor quant types (incl. llama.cpp's Q4_K_M recipe), llama.cpp
metadata, and a streaming writer that never holds more than one chunk of a tensor.

The header, key-values and tensor infos are written by `gguf.GGUFWriter`; tensor data is then
appended chunk by chunk (each tensor padded to the file's alignment, as GGUFWriter lays it out).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from ktrans.config.arch import arch_from_config
from ktrans.genmodel.presets import QUANT_CHOICES  # noqa: F401  (re-exported for writers' callers)
from ktrans.weights import names, quant

FLOAT_TYPES = ("f32", "f16", "bf16")

# llama.cpp's fallback when a row is not a whole number of 256-value K-quant super-blocks
# (llama_tensor_get_type). NOTE: llama.cpp uses q5_1 for q5_k; ktrans has no q5_1, so q8_0.
_FALLBACK = {"q4_k": "q5_0", "q5_k": "q8_0", "q6_k": "q8_0"}

_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S, "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE,
}
_EXPERTS = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_exps\.weight$")


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third one between them.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _q4_k_m(name: str, n_layer: int, n_expert: int, tied: bool) -> str:
    """llama.cpp's Q4_K_M mixture (llama_tensor_get_type): q4_k, with q6_k for the output head,
    for attn_v and ffn_down in the layers `_use_more_bits` picks, q8_0 attn_k / attn_v and q5_k
    attn_output for 8-expert models (Mixtral, and any other with 8 experts)."""
    m = re.match(r"blk\.(\d+)\.", name)
    layer = int(m.group(1)) if m else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "q6_k"
    if "attn_k.weight" in name and n_expert == 8:
        return "q8_0"
    if "attn_v.weight" in name or "attn_qkv.weight" in name:    # (llama.cpp counts attn_qkv as an attn_v)
        if n_expert == 8:
            return "q8_0"
        return "q6_k" if _use_more_bits(layer, n_layer) else "q4_k"
    if "ffn_down" in name:
        return "q6_k" if _use_more_bits(layer, n_layer) else "q4_k"
    if "attn_output.weight" in name and n_expert == 8:
        return "q5_k"
    return "q4_k"


def tensor_qtype(name: str, shape: tuple[int, ...], quant_name: str, config) -> str:
    """Storage type of GGUF tensor `name` for a --quant choice (a type or the q4_k_m recipe)."""
    # NOTE: as llama.cpp: 1-D tensors, biases (gpt-oss's expert biases are 2-D), the routers and
    # the DeltaNet's conv kernels stay f32 (tiny, and routing is sensitive).
    if len(shape) == 1 or name.endswith((".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight",
                                         "ssm_conv1d.weight")):
        return "f32"
    if quant_name in FLOAT_TYPES:
        return quant_name
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if quant_name == "q4_k_m":
        # NOTE: llama.cpp counts the layers of the file, MTP blocks included (n_layer_all).
        n_layer = names.block_count(config, arch_from_config(config).gguf_arch)
        t = _q4_k_m(name, n_layer, names.num_experts(config), tied)
    elif quant_name == "mxfp4":
        t = "mxfp4" if _EXPERTS.match(name) else "q8_0"
    else:
        t = quant_name
    cols = shape[-1]
    if cols % quant.QTYPES[t].block_size:
        t = _FALLBACK.get(t, "f16")
        if cols % quant.QTYPES[t].block_size:
            t = "f16"
    return t


def nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * quant.row_bytes(qtype, shape[-1])


def _rope_meta(w: gguf.GGUFWriter, arch: str, cfg: dict, rope_dim: int | None) -> None:
    theta = cfg["rope_theta"] if "rope_theta" in cfg else cfg["rope_parameters"]["rope_theta"]
    w.add_float32(f"{arch}.rope.freq_base", float(theta))
    if rope_dim is not None:
        w.add_uint32(f"{arch}.rope.dimension_count", rope_dim)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("type", rs.get("rope_type")) == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", float(rs["factor"]))
    if rs and rs.get("type", rs.get("rope_type")) == "yarn":
        w.add_string(f"{arch}.rope.scaling.type", "yarn")
        w.add_float32(f"{arch}.rope.scaling.factor", float(rs["factor"]))
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", int(rs["original_max_position_embeddings"]))
        if rs.get("mscale_all_dim"):
            w.add_float32(f"{arch}.rope.scaling.yarn_log_multiplier", 0.1 * float(rs["mscale_all_dim"]))
        # as llama.cpp's converter writes them (Kimi-K2: 1 and 1, not YaRN's usual 32 and 1)
        for key in ("beta_fast", "beta_slow"):
            if rs.get(key) is not None:
                w.add_float32(f"{arch}.rope.scaling.yarn_{key}", float(rs[key]))


def _arch_meta(w: gguf.GGUFWriter, arch: str, cfg: dict, config) -> None:
    vtype = {"u32": w.add_uint32, "f32": w.add_float32, "bool": w.add_bool}
    for mk in names.metadata_table(arch):
        v = names.metadata_value(config, arch, mk)
        if v is not None:
            vtype[mk.vtype](f"{arch}.{mk.key}", float(v) if mk.vtype == "f32" else v)
    if arch == "deepseek2":
        r, rope = config.kv_lora_rank, config.qk_rope_head_dim
        w.add_uint32(f"{arch}.attention.head_count_kv", 1)
        w.add_uint32(f"{arch}.attention.q_lora_rank", config.q_lora_rank or 0)
        w.add_uint32(f"{arch}.attention.key_length", r + rope)
        w.add_uint32(f"{arch}.attention.value_length", r)
        w.add_uint32(f"{arch}.attention.key_length_mla", config.qk_nope_head_dim + rope)
        sigmoid = cfg.get("scoring_func") == "sigmoid"
        w.add_uint32(f"{arch}.expert_gating_func", int(gguf.ExpertGatingFuncType.SIGMOID if sigmoid
                                                       else gguf.ExpertGatingFuncType.SOFTMAX))
        _rope_meta(w, arch, cfg, None)      # rope.dimension_count is in the table (qk_rope_head_dim)
    else:
        if arch in ("glm4moe", "minimax-m2"):
            w.add_uint32(f"{arch}.expert_gating_func", int(gguf.ExpertGatingFuncType.SIGMOID))
        _rope_meta(w, arch, cfg, names.rotary_dim(config))
    if arch == "gemma3":
        _gemma3_meta(w, arch, config)
    if arch in ("qwen3next", "qwen35moe"):
        _qwen3_hybrid_meta(w, arch, cfg, config)


def _qwen3_hybrid_meta(w: gguf.GGUFWriter, arch: str, cfg: dict, config) -> None:
    """The Gated DeltaNet's inner size, which layers are linear attention, and Qwen3.5's M-RoPE
    sections, as llama.cpp's converter writes them (names.py DERIVED_METADATA)."""
    w.add_uint32(f"{arch}.ssm.inner_size", config.linear_value_head_dim * config.linear_num_value_heads)
    if "layer_types" in cfg:
        w.add_array(f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in config.layer_types])
    w.add_uint32(f"{arch}.full_attention_interval", int(cfg.get("full_attention_interval", 4)))
    if arch == "qwen35moe":
        sections = list(names.rope_parameters(config)[0].get("mrope_section") or [11, 11, 10])
        w.add_array(f"{arch}.rope.dimension_sections", (sections + [0, 0, 0, 0])[:4])


def _gemma3_meta(w: gguf.GGUFWriter, arch: str, config) -> None:
    """The local layers' rope base; which layers slide, and the attention scale, where llama.cpp's
    defaults (every 6th layer global; gemma3_query_scalar) do not say them (names.py
    DERIVED_METADATA)."""
    local = names.rope_parameters(config)[1]
    if local is not None:
        w.add_float32(f"{arch}.rope.freq_base_swa", float(local["rope_theta"]))
    slides = [t == "sliding_attention" for t in config.layer_types]
    if slides != [i % 6 < 5 for i in range(len(slides))]:
        w.add_array(f"{arch}.attention.sliding_window_pattern", slides)
    implied = names.gemma3_query_scalar(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                                        config.head_dim)
    if config.query_pre_attn_scalar != implied:         # e.g. Gemma 3 27B cut to fewer layers
        w.add_float32(f"{arch}.attention.scale", float(config.query_pre_attn_scalar) ** -0.5)


def _tokenizer_meta(w: gguf.GGUFWriter, tok, vocab_size: int) -> None:
    # NOTE: llama.cpp needs one token per embedding row; rows past the trained vocabulary get
    # placeholder tokens of type UNUSED (never produced by encoding).
    pad = vocab_size - len(tok.tokens)
    tokens = list(tok.tokens) + [f"[PAD{i}]" for i in range(len(tok.tokens), vocab_size)]
    if tok.types is not None:
        types = list(tok.types) + [gguf.TokenType.UNUSED] * pad
    else:
        types = [gguf.TokenType.NORMAL] * len(tok.tokens) + [gguf.TokenType.UNUSED] * pad
        for i in tok.special_ids:
            types[i] = gguf.TokenType.CONTROL
    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)       # names the split the BPE was trained with (tokenizer.py)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    if tok.model == "llama":           # sentencepiece: scores, no merges, no space prepended (Gemma)
        w.add_token_scores([float(x) for x in tok.scores] + [0.0] * pad)
        w.add_add_space_prefix(False)
    else:
        w.add_token_merges(tok.merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    if tok.eot_id is not None and tok.eot_in_gguf:
        w.add_eot_token_id(tok.eot_id)
    if tok.eom_id is not None:
        w.add_eom_token_id(tok.eom_id)
    if tok.pad_id is not None:
        w.add_pad_token_id(tok.pad_id)
    if tok.unk_id is not None:
        w.add_unk_token_id(tok.unk_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template)


class GGUFStream:
    """Write a GGUF file whose tensor list is known up front; data arrives chunk by chunk, in order."""

    def __init__(self, path: Path, arch: str, *, name: str, quant_name: str, cfg: dict, config, tok,
                 tensors: list[tuple[str, tuple[int, ...], str]]):
        w = gguf.GGUFWriter(path, arch)
        w.add_name(name)
        w.add_file_type(int(_FILE_TYPE[quant_name]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _arch_meta(w, arch, cfg, config)
        _tokenizer_meta(w, tok, config.vocab_size)
        for tname, shape, qtype in tensors:
            w.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes(qtype, shape),
                              raw_dtype=gguf.GGMLQuantizationType(quant.QTYPES[qtype].ggml_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self.align = w.data_alignment
        w.close()
        self._f = open(path, "r+b")
        self._f.seek(0, 2)
        self._pad()
        self._left = [nbytes(q, s) for _, s, q in tensors]   # bytes still due per tensor, in order
        self._i = 0

    def _pad(self) -> None:
        pos = self._f.tell()
        self._f.write(b"\0" * ((-pos) % self.align))

    def write(self, raw: np.ndarray) -> None:
        """Append the next chunk (uint8 bytes) of the current tensor."""
        self._f.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
        self._left[self._i] -= raw.nbytes
        assert self._left[self._i] >= 0, "more bytes than the tensor holds"
        if self._left[self._i] == 0:
            self._i += 1
            self._pad()

    def close(self) -> None:
        assert self._i == len(self._left), "GGUF closed before every tensor was written"
        self._f.close()

    def abort(self) -> None:
        self._f.close()
