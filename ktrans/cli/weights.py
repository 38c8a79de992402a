"""`ktrans weights`: what a GGUF file / split set / directory or HF checkpoint holds, and whether
it is complete for its config (every parameter present, with the shape the config implies)."""

from __future__ import annotations

from collections import Counter

from ktrans.errors import KtransError


def register(sub) -> None:
    p = sub.add_parser("weights", help="describe model weights and check them against the config",
                       description="Describe GGUF / safetensors weights: files, architecture, where the config "
                                   "and tokenizer come from, bytes per stored type. With --check, verify that "
                                   "every parameter the config implies is present with the right shape.")
    p.add_argument("--model_path", help="HF model directory (config, tokenizer, or safetensors weights)")
    p.add_argument("--gguf_path", help="GGUF file, any part of a split set, or a directory of GGUF files")
    p.add_argument("--check", action="store_true", help="read every tensor's entry and compare with the config")
    p.set_defaults(func=run)


def _files(src) -> tuple[list[str], int]:
    if hasattr(src, "reader"):
        return [f.path for f in src.reader.files], src.reader.nbytes
    names = src.names()
    files = sorted({src.info(n).file for n in names})
    return files, sum(src.info(n).nbytes for n in names)


def describe(src) -> list[str]:
    from ktrans.weights.progress import human_bytes

    files, nbytes = _files(src)
    cfg = src.config()
    lines = [f"weights: {type(src).__name__} over {len(files)} file(s), {human_bytes(nbytes)}"]
    lines += [f"  {f}" for f in files[:8]] + ([f"  ... {len(files) - 8} more"] if len(files) > 8 else [])
    if hasattr(src, "arch"):
        origin = f"--model_path {src.hf_dir}" if src.hf_dir else "GGUF metadata (single-file mode)"
        lines.append(f"GGUF architecture: {src.arch}; config and tokenizer from {origin}")
    if cfg is None:
        lines.append("config: none in these files (pass --model_path)")
    else:
        lines.append(f"config: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                     f"vocab {cfg.vocab_size}")
    by_type = Counter()
    for n in src.names():
        info = src.info(n)
        by_type[info.qtype] += info.nbytes
    lines.append("parameters by stored type: " + ", ".join(f"{q} {human_bytes(b)}" for q, b in by_type.most_common()))
    return lines


def check(src) -> list[str]:
    """Problems: parameters the config implies that are missing or mis-shaped (empty if none)."""
    problems = []
    for name in src.expected_shapes():
        if name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
            continue                                   # computed from the config, never stored
        if name == "lm_head.weight" and getattr(src.config(), "tie_word_embeddings", False):
            continue
        try:
            src.info(name)
        except KtransError as e:
            problems.append(str(e))
    return problems


def run(args) -> int:
    from ktrans.weights import open_weights

    src = open_weights(args.model_path, args.gguf_path)
    print("\n".join(describe(src)))
    if not args.check:
        return 0
    if src.config() is None:
        raise KtransError("--check needs a config: pass --model_path with the HF config.json directory")
    problems = check(src)
    for p in problems:
        print(f"problem: {p}")
    print(f"check: {len(src.expected_shapes())} parameters expected, {len(problems)} problem(s)")
    return 1 if problems else 0
