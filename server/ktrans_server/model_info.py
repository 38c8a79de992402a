"""Facts about the loaded model that clients list (Ollama's /api/tags, /api/show): size on disk,
a digest, parameter count and quantization, read from the weight files' tables (no data read).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger("ktrans.server")


@dataclass
class ModelFacts:
    size: int = 0                  # bytes of the weight files
    digest: str = ""               # sha256 over the files' names, sizes and modification times
    parameter_size: str = ""       # "671B", "7.6B", "1.2M"
    quantization_level: str = ""   # "Q4_K_M", "BF16", ...
    format: str = ""               # "gguf" | "safetensors"


def human_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v >= 100 else f"{v:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def model_facts(weights) -> ModelFacts:
    """From a ktrans.weights WeightSource (names() and info() read only tensor tables).
    NOTE: the digest identifies the files as they are on disk without hashing hundreds of GB;
    it changes whenever a file is replaced."""
    infos = [weights.info(n) for n in weights.names()]
    files = sorted({i.file for i in infos if i.file})
    h = hashlib.sha256()
    size = 0
    for f in files:
        st = os.stat(f)
        size += st.st_size
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    params = 0
    by_type: Counter = Counter()
    for i in infos:
        n = 1
        for d in i.shape:
            n *= int(d)
        params += n
        by_type[i.qtype] += i.nbytes
    fmt = "gguf" if any(f.endswith(".gguf") for f in files) else "safetensors"
    return ModelFacts(size=size, digest=f"sha256:{h.hexdigest()}", parameter_size=human_count(params),
                      quantization_level=_gguf_file_type(weights) or _main_type(by_type), format=fmt)


def _main_type(by_type: Counter) -> str:
    return by_type.most_common(1)[0][0].upper() if by_type else ""


def _gguf_file_type(weights) -> str:
    reader = getattr(weights, "reader", None)
    ft = reader.get("general.file_type") if reader is not None else None
    if not isinstance(ft, int):
        return ""
    try:
        import gguf

        name = gguf.LlamaFileType(ft).name
    except (ImportError, ValueError):
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
