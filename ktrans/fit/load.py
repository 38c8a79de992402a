"""`--fit` for the commands that load a model (chat, generate, serve, local_chat.py) and for
`ktrans rules explain --fit`: the machine's profile, the model's saved expert counts, the fitted
rule file and where it was written.
"""

from __future__ import annotations

import os
from ktrans.errors import KtransError
from ktrans.fit import counts as expert_counts
from ktrans.fit.fit import FITTED_DIR, FitResult, fit_rules
from ktrans.fit.placement import FitOptions
from ktrans.fit.profile import Profile, load_cached, profile_path


def current_profile(free_of: set[int] | None = None) -> tuple[Profile, bool]:
    """(profile with live memory, whether its rates were measured). The cached `ktrans probe`
    profile when it matches this hardware; else the instant facts alone (placement needs only
    memory figures; the measured rates add the prefill note). `free_of`: the GPUs whose free
    memory is read (None: all)."""
    from ktrans.fit.probe import facts, with_live_memory

    now = facts(free_of=free_of)
    cached = load_cached(profile_path())
    if cached is not None and cached.fingerprint == now.fingerprint:
        return with_live_memory(cached, free_of=free_of), True
    return now, False


def gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def gib_flag(value: float | None, flag: str) -> int | None:
    if value is None:
        return None
    if value <= 0:
        raise KtransError(f"{flag} {value:g}: expected a positive number of GiB")
    return int(value * 2**30)


def fit_for_load(*, model_path, gguf_path, device: str, cache_lens: int, page_size: int, chunk_size: int,
                 gpu_memory: float | None, say, state_slots: int = 1) -> FitResult:
    """Fit the model the flags name to this machine; FitError (before any weight is read) when
    it cannot fit. `say` gets what was decided and where the rule file is. `state_slots`: requests
    run at once (--max_batch_size)."""
    from ktrans.cli.model_args import cache_dir
    from ktrans.weights.source import open_weights

    weights = open_weights(model_path, gguf_path)
    try:
        config = _config(weights, model_path)
        mid = expert_counts.model_id(model_path, gguf_path)
        profile, _ = current_profile({gpu_index(device)})
        opts = FitOptions(gpu_index=gpu_index(device), gpu_memory=gib_flag(gpu_memory, "--gpu_memory"))
        counts = expert_counts.load(mid)
        result = fit_rules(config, weights, profile=profile, opts=opts, cache_lens=cache_lens, page_size=page_size,
                           chunk_size=chunk_size, counts=counts, out_dir=cache_dir() / FITTED_DIR,
                           label=os.path.basename(mid.rstrip("/")) if mid else "the model", key=mid,
                           state_slots=state_slots)
    finally:
        weights.close()
    result.check()
    say(f"Placement fitted to this machine (--fit): {result.path}")
    for line in result.notes:
        say(f"  {line}")
    say("  See it: ktrans rules explain --optimize_config_path <that file> with the same model flags; "
        "keep it with --optimize_config_path.")
    return result


def _config(weights, model_path):
    """The model's config as the runner reads it: the weights' metadata, else config.json."""
    config = weights.config()
    if config is None and model_path and os.path.isdir(model_path):
        from transformers import AutoConfig

        from ktrans.config.arch import text_model_config

        config = text_model_config(AutoConfig.from_pretrained(model_path))
    if config is None:
        raise KtransError("the weights carry no model config; pass --model_path with the HF config.json directory")
    return config
