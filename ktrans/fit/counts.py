"""Expert activation counts: how often the router chose each routed expert of each layer.

Every `moe_block` keeps a counter on its own device (`expert_counts`, one scatter-add per step,
captured in CUDA graphs like the rest of the step). `collect()` reads and clears them; `save()`
adds them to the model's count file beside the machine profile
(<cache>/expert-counts/<model>.json), where `--fit` reads them to put the most used experts in
spare VRAM. Counts come from serving (saved when chat, generate or serve ends) and from
`ktrans probe --experts MODEL` (a calibration run over a built-in text).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ktrans.errors import KtransError

COUNTS_DIR = "expert-counts"


def model_id(model_path: str | None, gguf_path: str | None) -> str | None:
    """What identifies a model's weights: the real path of its GGUF (or HF directory)."""
    path = gguf_path or model_path
    return os.path.realpath(os.path.expanduser(path)) if path else None


def counts_path(mid: str, cache: Path | None = None) -> Path:
    if cache is None:
        from ktrans.cli.model_args import cache_dir

        cache = cache_dir()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(mid).name)[:80]
    return Path(cache) / COUNTS_DIR / f"{stem}-{hashlib.sha1(mid.encode()).hexdigest()[:10]}.json"


def collect(model) -> dict[int, list[int]]:
    """Layer -> counts per expert since the last collect(); the counters restart at zero."""
    import torch

    from ktrans.rules.matcher import layer_of

    out = {}
    for name, mod in model.named_modules():
        c = getattr(mod, "expert_counts", None)
        if isinstance(c, torch.Tensor) and layer_of(name) is not None:
            out[layer_of(name)] = c.tolist()
            c.zero_()
    return dict(sorted(out.items()))


def load(mid: str | None, cache: Path | None = None) -> dict[int, list[int]] | None:
    """Saved counts of a model, or None (none yet, or an unreadable file: placement goes on
    without them)."""
    if mid is None:
        return None
    try:
        data = json.loads(counts_path(mid, cache).read_text())
        return {int(k): [int(x) for x in v] for k, v in data["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save(mid: str, counts: dict[int, list[int]], source: str, cache: Path | None = None) -> Path:
    """Add `counts` to the model's file (written atomically); `source` ("serving",
    "calibration") is tallied in the file so a reader knows where the numbers came from."""
    path = counts_path(mid, cache)
    data = {"model": mid, "layers": {}, "sources": {}}
    try:
        old = json.loads(path.read_text())
        if isinstance(old.get("layers"), dict):
            data = old
    except (OSError, ValueError):
        pass
    for layer, c in counts.items():
        prev = data["layers"].get(str(layer), [])
        if len(prev) != len(c):
            prev = [0] * len(c)                  # a different expert count: the model changed, restart
        data["layers"][str(layer)] = [a + b for a, b in zip(prev, c)]
    slots = sum(sum(c) for c in counts.values())
    data["sources"][source] = data["sources"].get(source, 0) + slots
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise KtransError(f"cannot write expert counts {path}: {e.strerror}") from None
    return path


def save_collected(model, mid: str | None, source: str = "serving") -> Path | None:
    """Collect the model's counts and add them to its file (None: no model id or nothing counted).
    A failure is logged, not raised: the counts are a hint, never a reason to fail a command."""
    import logging

    if mid is None:
        return None
    try:
        counts = collect(model)
        return save(mid, counts, source) if any(sum(c) for c in counts.values()) else None
    except (KtransError, OSError) as e:
        logging.getLogger("ktrans").warning("expert counts not saved: %s", e)
        return None
