"""Prefill and decode of ktrans beside llama.cpp, same GGUF file, same thread count, same run:
all-CPU (default), or with `--device cuda` the hybrid placement of both (ktrans: the shipped
rules, routed experts on the CPU and the rest on the GPU; llama.cpp: its CUDA build with
`-ngl 99 --n-cpu-moe 99`, every layer on the GPU but the MoE experts' weights).

For each model (a GGUF file, or a gen-model preset generated on first use) and each round:
  llama.cpp: `llama-bench -m FILE -t N -p P -n G -r R -o json` (its pp = prefill of P tokens into
             an empty context, tg = G single-token decode steps from an empty context);
  ktrans:    the same two tests through ModelRunner with the shipped all-CPU rules (GGUF blocks
             in the C++ kernels; decode-only steps through the fused step), thread pool of N,
             torch on N threads for prefill: pp = one P-token step into an empty cache, tg = G
             one-token steps from an empty cache, each repeated R times after a warm-up.
Printed side by side (tok/s, median and best of each round's R samples, then of every round's:
on a machine shared with other jobs the best is the least disturbed run of each), plus ktrans's model load time in the
same process after a first load (imports and page cache warm) and the first, cold-import load.
llama.cpp runs first within a round, ktrans second; rounds repeat the pair.

    python bench/e2e_llamacpp.py --llama-bench /tmp/llama/bin/llama-bench \
        --preset qwen2:qwen2-0.5b --quant q4_k_m --preset qwen3_moe:small --preset deepseek_v2:small
    python bench/e2e_llamacpp.py --llama-bench ... --gguf ~/models/Qwen2-0.5B-Instruct-Q4_K_M.gguf

Build llama.cpp's CPU peer with /work/shared/tools/llama-cpp.sh (src, then build TGZ OUT; add
`cuda` for the hybrid peer where nvcc exists).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import ensure_model, resolve_preset  # noqa: E402

from ktrans.engine.batch import ForwardBatch  # noqa: E402
from ktrans.engine.model_runner import ModelRunner  # noqa: E402
from ktrans.errors import KtransError  # noqa: E402


# llama.cpp's hybrid placement: every layer on the GPU except the MoE experts' weights.
HYBRID_ARGS = ["-ngl", "99", "--n-cpu-moe", "99"]


def llama_bench(exe: str, gguf: str, threads: int, p: int, n: int, reps: int, extra: list[str] = ()) -> dict:
    """{'pp': [tok/s samples], 'tg': [...]} from llama-bench's JSON output."""
    cmd = [exe, "-m", gguf, "-t", str(threads), "-p", str(p), "-n", str(n), "-r", str(reps), "-o", "json", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise KtransError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-400:]}")
    out = {}
    for row in json.loads(res.stdout):
        key = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        out[key] = [float(x) for x in row.get("samples_ts") or [row["avg_ts"]]]
    return out


class Ours:
    """ktrans on one GGUF through ModelRunner, measured the way llama-bench measures."""

    def __init__(self, gguf: str, threads: int, cache: int, device: str = "cpu"):
        t0 = time.perf_counter()
        self.runner = self._load(gguf, threads, cache, device)
        self.first_load_s = time.perf_counter() - t0
        self.runner.close()
        t0 = time.perf_counter()
        self.runner = self._load(gguf, threads, cache, device)
        self.load_s = time.perf_counter() - t0                # imports and page cache warm
        self.runner.warm_up()                                 # as the engine does: kernels compiled
        self.pages = torch.arange(self.runner.num_pages, dtype=torch.int32)

    @staticmethod
    def _load(gguf, threads, cache, device) -> ModelRunner:
        return ModelRunner(gguf_path=gguf, device=device, cpu_infer=threads, cache_lens=cache, page_size=64,
                           progress=False)

    def _step(self, ids: list[int], done: int) -> torch.Tensor:
        n = len(ids)
        return self.runner.execute(ForwardBatch(
            input_ids=torch.tensor(ids), positions=torch.arange(done, done + n), seq_ids=[0], num_computed=[done],
            num_new=[n], page_table=self.pages[None], logits_indices=torch.tensor([n - 1])))

    def pp(self, p: int) -> float:
        ids = torch.randint(0, self.runner.config.vocab_size, (p,)).tolist()
        t0 = time.perf_counter()
        self._step(ids, 0)
        return p / (time.perf_counter() - t0)

    def tg(self, n: int) -> float:
        vocab = self.runner.config.vocab_size
        t0 = time.perf_counter()
        for i in range(n):
            self._step([(i * 7919) % vocab], i)
        return n / (time.perf_counter() - t0)


def _row(label, gguf, rnd, test, args, mine, theirs, ours, fused) -> dict:
    med = statistics.median
    row = dict(model=label, gguf=gguf, round=rnd, test=test, threads=args.threads,
               ktrans_median=med(mine), ktrans_best=max(mine), llama_median=med(theirs) if theirs else None,
               llama_best=max(theirs) if theirs else None, ktrans_load_s=ours.load_s,
               ktrans_first_load_s=ours.first_load_s, fused_decode=fused, ktrans_samples=mine, llama_samples=theirs)
    ratio = (f"{row['ktrans_median'] / row['llama_median']:5.2f}x {row['ktrans_best'] / row['llama_best']:5.2f}x"
             if theirs else "    -     -")
    lm = f"{row['llama_median']:9.1f} {row['llama_best']:9.1f}" if theirs else f"{'-':>9s} {'-':>9s}"
    print(f"{label:30s} {str(rnd):>3s} {test:>6s} {row['ktrans_median']:9.1f} {row['ktrans_best']:9.1f} {lm} {ratio}",
          flush=True)
    return row


def run_model(args, gguf: str, label: str) -> list[dict]:
    rows = []
    ours = Ours(gguf, args.threads, args.p + args.n + 64, args.device)
    fused = ours.runner.cpu_step is not None or bool(ours.runner.graphs and ours.runner.graphs.enabled)
    extra = HYBRID_ARGS if args.device == "cuda" else []
    ours.pp(min(64, args.p)), ours.tg(4)                                                  # warm-up
    tests = (("pp", args.p), ("tg", args.n))
    every: dict[str, tuple[list, list]] = {f"{t}{n}": ([], []) for t, n in tests}
    for rnd in range(args.rounds):
        peer = (llama_bench(args.llama_bench, gguf, args.threads, args.p, args.n, args.reps, extra)
                if args.llama_bench else {})
        mine = {"pp": [ours.pp(args.p) for _ in range(args.reps)], "tg": [ours.tg(args.n) for _ in range(args.reps)]}
        for test, size in tests:
            name = f"{test}{size}"
            every[name][0].extend(mine[test]), every[name][1].extend(peer.get(test, []))
            rows.append(_row(label, gguf, rnd, name, args, mine[test], peer.get(test, []), ours, fused))
    for name, (mine, theirs) in every.items():  # every round's samples together
        rows.append(_row(label, gguf, "all", name, args, mine, theirs, ours, fused))
    print(f"{label}: ktrans load {ours.load_s:.2f} s warm (first load in the process, imports included: "
          f"{ours.first_load_s:.2f} s); fused decode step / CUDA graphs: {'yes' if fused else 'no'}", flush=True)
    ours.runner.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", action="append", default=[], help="GGUF file; repeatable")
    p.add_argument("--preset", action="append", default=[], help="gen-model preset (or ARCH:PRESET); repeatable")
    p.add_argument("--quant", default="q4_k", help="gen-model quant type of generated presets (default q4_k)")
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench (omit to measure ktrans only)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: both all-CPU; cuda: both hybrid (experts on the CPU, the rest on the GPU)")
    p.add_argument("--threads", "-t", type=int, default=os.cpu_count() or 1)
    p.add_argument("-p", type=int, default=512, help="prompt tokens of the prefill test")
    p.add_argument("-n", type=int, default=64, help="tokens of the decode test")
    p.add_argument("--reps", "-r", type=int, default=3, help="repetitions per test and round")
    p.add_argument("--rounds", type=int, default=2, help="llama.cpp-then-ktrans rounds")
    p.add_argument("--model-root", default=os.path.expanduser("~/.cache/ktrans/bench-models"))
    p.add_argument("--out", default=None, help="append one JSON line per measurement to this file")
    args = p.parse_args(argv)
    if not args.gguf and not args.preset:
        p.error("give --gguf FILE and/or --preset PRESET")
    torch.set_num_threads(args.threads)
    models = [(g, Path(g).parent.name if Path(g).name == "model.gguf" else Path(g).name) for g in args.gguf]
    for text in args.preset:
        arch, preset = resolve_preset(text)
        d = ensure_model(Path(args.model_root), arch, preset, args.quant, None)
        models.append((str(d / "model.gguf"), f"{arch}:{preset}-{args.quant}"))
    print(f"torch {torch.__version__}; {args.threads} threads; tok/s, median and best of {args.reps} per round, "
          f"then of all rounds; ratio ktrans / llama.cpp of the medians and of the bests")
    print(f"{'model':30s} {'rd':>3s} {'test':>6s} {'ktrans':>9s} {'best':>9s} {'llama.cpp':>9s} {'best':>9s} ratio")
    for gguf, label in models:
        rows = run_model(args, gguf, label)
        if args.out:
            with open(args.out, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KtransError as e:
        print(f"bench/e2e_llamacpp.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
