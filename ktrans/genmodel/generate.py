"""`generate_model`: write a complete random model directory (config, tokenizer, GGUF, safetensors).

Everything is written into a temporary directory beside OUT and renamed into place at the end,
so a failure or Ctrl+C never leaves a half-written model behind. Tensors are generated, quantized
and read back chunk by chunk on a thread pool and written in order, so memory stays bounded by a
few chunks per thread whatever the model size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ktrans.config.arch import build_meta_model, get_arch
from ktrans.errors import KtransError
from ktrans.genmodel import plan as planmod
from ktrans.genmodel.gguf_out import GGUFStream, nbytes
from ktrans.genmodel.presets import QUANT_CHOICES
from ktrans.genmodel.presets import preset_config
from ktrans.genmodel.safetensors_out import SafetensorsStream, checkpoint_name
from ktrans.genmodel.tokenizer import build_tokenizer, trained_vocab_size

SHARD_BYTES = 4 << 30      # safetensors shard size, as large HF checkpoints split theirs
_CONFIG_DTYPE = {"bf16": "bfloat16", "f16": "float16"}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise KtransError(f"output path '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KtransError(f"output directory '{out}' is not empty; pass --force to replace it")
    parent = out.resolve().parent
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise KtransError(f"cannot write '{out}': parent directory '{parent}' is not writable")


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parent directories (like mkdir -p); returns those created, deepest last."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except OSError as e:
            raise KtransError(f"cannot create directory '{d}': {e.strerror}") from None
    return list(reversed(missing))


def _write_config(tmp: Path, cfg: dict, tok, quant_name: str) -> dict:
    if cfg.get("vocab_size") is None:
        cfg["vocab_size"] = len(tok.tokens)
    stop = tok.stop_ids()
    eos = stop if len(stop) > 1 else tok.eos_id       # GLM: [<|endoftext|>, <|user|>, <|observation|>]
    cfg["bos_token_id"] = tok.bos_id
    cfg["eos_token_id"] = eos
    if tok.pad_id is not None:
        cfg["pad_token_id"] = tok.pad_id
    cfg["dtype"] = _CONFIG_DTYPE.get(quant_name, "float32")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": eos, "do_sample": False}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return cfg


def _hf_shapes(config) -> dict[str, tuple[int, ...]]:
    model = build_meta_model(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    return shapes


def _write_tensors(units, gg: GGUFStream, st: SafetensorsStream | None, *, seed: int, config,
                   nthreads: int, on_bytes=None) -> None:
    """Produce every chunk on a thread pool (bounded look-ahead) and write them in order."""
    jobs = ((u, p) for u in units for p in planmod.chunks(u))
    window = 2 * nthreads
    with ThreadPoolExecutor(max_workers=nthreads) as pool:
        pending: deque = deque()

        def submit_next() -> bool:
            job = next(jobs, None)
            if job is None:
                return False
            pending.append(pool.submit(planmod.produce, job[0], job[1], seed, config, st is not None))
            return True

        while len(pending) < window and submit_next():
            pass
        try:
            while pending:
                raws, st_data = pending.popleft().result()
                submit_next()
                for raw in raws:
                    gg.write(raw)
                    if on_bytes:
                        on_bytes(raw.nbytes)
                if st is not None and st_data is not None:   # (an expert half that only feeds GGUF)
                    st.write(st_data)
        except BaseException:
            for f in pending:           # Ctrl+C / error: drop queued chunks, wait only for running ones
                f.cancel()
            raise


def _generate_into(tmp: Path, arch: str, preset: str, quant_name: str, layers, seed: int,
                   with_safetensors: bool, nthreads: int, shard_bytes: int, on_bytes=None) -> None:
    import transformers

    spec = get_arch(arch)
    cfg = preset_config(arch, preset, layers)
    tok = build_tokenizer(arch, tmp, preset)
    cfg = _write_config(tmp, cfg, tok, quant_name)
    config = transformers.AutoConfig.from_pretrained(tmp)
    units = planmod.build_plan(config, spec.gguf_arch, quant_name, _hf_shapes(config))
    gg = GGUFStream(tmp / "model.gguf", spec.gguf_arch, name=f"ktrans-{arch}-{preset}", quant_name=quant_name,
                    cfg=cfg, config=config, tok=tok, tensors=[t for u in units for t in u.gguf])
    st = None
    try:
        if with_safetensors:
            st = SafetensorsStream(tmp, [(checkpoint_name(n, spec.model_type), s, d)
                                         for u in units for n, s, d in u.st], shard_bytes)
        _write_tensors(units, gg, st, seed=seed, config=config, nthreads=nthreads, on_bytes=on_bytes)
        gg.close()
        if st is not None:
            st.close()
    except BaseException:
        gg.abort()
        if st is not None:
            st.abort()
        raise


def total_gguf_bytes(arch: str, preset: str, quant_name: str, layers: int | None = None) -> int:
    """Bytes of tensor data the GGUF of this model will hold (for progress bars and benchmarks)."""
    import transformers

    cfg = preset_config(arch, preset, layers)
    cfg["vocab_size"] = cfg.get("vocab_size") or trained_vocab_size(arch, preset)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    units = planmod.build_plan(config, get_arch(arch).gguf_arch, quant_name, _hf_shapes(config))
    return sum(nbytes(q, s) for u in units for _, s, q in u.gguf)


def generate_model(out_dir, *, arch: str, preset: str, quant: str, layers: int | None = None,
                   seed: int = 0, with_safetensors: bool = False, force: bool = False, nthreads: int = 0,
                   shard_bytes: int = SHARD_BYTES, on_bytes=None) -> Path:
    """Write a random model of `arch`/`preset` into `out_dir`; returns its path.

    `on_bytes(n)` is called after each GGUF chunk is written (progress reporting)."""
    get_arch(arch)
    preset_config(arch, preset, layers)          # validates preset and layers before touching disk
    if quant not in QUANT_CHOICES:
        raise KtransError(f"unknown quant type '{quant}'; expected one of: {', '.join(QUANT_CHOICES)}")
    if nthreads < 0:
        raise KtransError(f"--threads must be 0 (all cores) or more, got {nthreads}")
    out = Path(out_dir)
    _check_out(out, force)
    nthreads = nthreads or os.cpu_count() or 1
    created = _make_parents(out.resolve().parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    except OSError as e:
        _remove_dirs(created)
        raise KtransError(f"cannot write '{out}': {e.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                # mkdtemp makes it private; OUT gets the usual mode
    try:
        _generate_into(tmp, arch, preset, quant, layers, seed, with_safetensors, nthreads, shard_bytes, on_bytes)
        _replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        if isinstance(e, OSError):          # disk full, quota, permissions changed under us
            raise KtransError(f"writing '{out}' failed: {e.strerror or e}") from e
        raise
    return out


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):      # deepest first; only the (now empty) ones we made
        try:
            d.rmdir()
        except OSError:
            break


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; an existing OUT (--force) is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time() * 1000)}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
