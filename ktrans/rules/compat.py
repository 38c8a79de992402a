"""KTransformers rule files: their class paths and placement kwargs translated to ktrans terms.

KTransformers names Python classes (`ktransformers.operators.experts.KTransformersExperts`) and
places modules through kwargs (`generate_device`, `prefill_device`, `generate_op`, `out_device`,
`transfer_map`, ...). Those files load here without importing anything: each known class maps to
a ktrans operator (or to `default`, keeping the HF module), and the kwargs become a device plus
operator kwargs. What has no ktrans meaning is dropped with a note that `ktrans rules explain`
prints. docs/rules.md lists the table.
"""

from __future__ import annotations

from ktrans.errors import KtransError

KT_PREFIX = "ktransformers."

# "<module>.<Class>" under ktransformers.operators -> ktrans operator ("experts": see generate_op).
KT_OPERATORS = {
    "experts.KTransformersExperts": "experts",
    "experts.KTransformersExpertsV2": "experts",
    "experts.KExpertsCPU": "cpu_experts",
    "experts.KExpertsTorch": "torch_experts",
    "experts.KExpertsMarlin": "torch_experts",
    "experts.KDeepseekV2MoE": "moe_block",
    "experts.KDeepseekV3MoE": "moe_block",
    "experts.KDeepseekV3MoEV2": "moe_block",
    "experts.KQwen2MoeSparseMoeBlock": "moe_block",
    "experts.KQwen2MoeSparseMoeBlockV2": "moe_block",
    "experts.KQwen3MoeSparseMoeBlockV2": "moe_block",
    "experts.KMistralSparseMoEBlock": "moe_block",
    "attention.KDeepseekV2Attention": "mla_attention",
    "balance_serve_attention.flashinfer_attn": "mla_attention",
    "balance_serve_attention.KQwen2MoeAttention": "gqa_attention",
    "balance_serve_attention.KQwen3MoeAttention": "gqa_attention",
    "linear.KTransformersLinear": "linear",
    "linear.KLinearTorch": "linear",
    "linear.KLinearMarlin": "linear",
    "linear.VLinearMarlin": "linear",
    # The HF module already does what these do once it sits on the right device.
    "gate.KMoEGate": "default",
    "gate.KMoEGateQwen2Moe": "default",
    "models.KDeepseekV2Model": "default",
    "models.KQwen2MoeModel": "default",
    "models.KLlamaModel": "default",
    "RoPE.*": "default",
    "layernorm.*": "default",
    "mlp.*": "default",
}

# generate_op of the experts wrapper -> ktrans operator (KTransformers' default is KExpertsCPU).
KT_EXPERT_OPS = {"KExpertsCPU": "cpu_experts", "KExpertsTorch": "torch_experts", "KExpertsMarlin": "torch_experts"}
# `backend` of KExpertsCPU -> cpu_experts backend.
KT_BACKENDS = {"llamafile": "gguf", "AMXInt8": "amx_int8", "AMXBF16": "amx_bf16"}

# ktrans operators that own their whole subtree: a KTransformers rule mapped to one of them is
# non-recursive (KTransformers' attention/linear/experts loaded their children themselves).
KT_SUBTREE_OPS = ("mla_attention", "gqa_attention", "linear", "cpu_experts", "torch_experts")

# KTransformers' own modeling classes (match.class) -> transformers-5 class names.
KT_MATCH_ALIASES = {
    "MoEGate": ("DeepseekV3TopkRouter", "DeepseekV2TopkRouter"),
    "DeepseekV2MoE": ("DeepseekV2Moe",),
    "DeepseekV2YarnRotaryEmbedding": ("DeepseekV2RotaryEmbedding",),
    "DeepseekV3YarnRotaryEmbedding": ("DeepseekV3RotaryEmbedding",),
}

# Kwargs that only steer KTransformers' own machinery; ktrans has no use for them.
_IGNORED = {
    "prefill_op": "ktrans runs prefill and decode with the same operator",
    "out_device": "operators return results on the device of their input",
    "per_layer_prefill_intput_threshold": "ktrans has no layer-wise prefill",
    "generate_op": "the operator's backend is chosen from its device",
}


def is_kt_class(text: str) -> bool:
    return text.startswith(KT_PREFIX)


def kt_operator(text: str, where: str) -> str:
    """The ktrans operator (or "default"/"experts") a `ktransformers.operators...` class maps to."""
    parts = text.split(".")
    key = ".".join(parts[-2:])
    op = KT_OPERATORS.get(key) or KT_OPERATORS.get(f"{parts[-2]}.*")
    if parts[:2] != ["ktransformers", "operators"] or op is None:
        known = ", ".join(f"ktransformers.operators.{k}" for k in KT_OPERATORS)
        raise KtransError(f"{where}: KTransformers class '{text}' has no ktrans equivalent; known: {known}. "
                          f"Use a ktrans operator name instead, or --trust-rules to import a class that "
                          f"subclasses ktrans.operators.Operator")
    return op


def kt_match_names(text: str) -> tuple[str, ...]:
    """Class names a KTransformers `match.class` path stands for in transformers' module trees."""
    short = text.rsplit(".", 1)[-1]
    return KT_MATCH_ALIASES.get(short, (short,))


def translate_kwargs(op: str, kwargs: dict, device, where: str, kt_class: bool):
    """Split KTransformers placement kwargs out of `kwargs`.

    Returns (op, device, kwargs, transfer_map, notes). `device` (the rule's own `replace.device`)
    and `generate_device` must agree when both are given.
    """
    kwargs = dict(kwargs)
    notes: list[str] = []
    gen = kwargs.pop("generate_device", None)
    prefill = kwargs.pop("prefill_device", None)
    if device is not None and gen is not None and str(device) != str(gen):
        raise KtransError(f"{where}: replace.device '{device}' and kwargs.generate_device '{gen}' disagree; "
                          f"give one of them")
    device = device if device is not None else (gen if gen is not None else prefill)
    if prefill is not None and gen is not None and str(prefill) != str(gen):
        notes.append(f"prefill_device '{prefill}' ignored: ktrans runs prefill and decode on '{gen}'")
    transfer_map = kwargs.pop("transfer_map", None)
    if op == "experts":
        gen_op = kwargs.pop("generate_op", "KExpertsCPU")
        if gen_op not in KT_EXPERT_OPS:
            raise KtransError(f"{where}: generate_op '{gen_op}' has no ktrans equivalent; "
                              f"expected one of {', '.join(KT_EXPERT_OPS)}")
        op = KT_EXPERT_OPS[gen_op]
    if "backend" in kwargs and kt_class:
        backend = kwargs.pop("backend")
        if op == "cpu_experts" and backend in KT_BACKENDS:
            kwargs["backend"] = KT_BACKENDS[backend]
        else:
            notes.append(f"backend '{backend}' ignored: no ktrans equivalent for {op}")
    for key, why in _IGNORED.items():
        if key in kwargs:
            notes.append(f"{key} '{kwargs.pop(key)}' ignored: {why}")
    return op, device, kwargs, transfer_map, notes
