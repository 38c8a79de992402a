"""Serving benchmark: N concurrent streaming clients against a ktrans server.

For each concurrency N (default 1, 2, 4, 8, 16) every client sends the same-length prompt and
asks for a fixed number of output tokens (ignore_eos), N requests at a time, R rounds. Reports
aggregate output tok/s, TTFT p50/p99, TPOT p50 (time per output token after the first) and the
scaling of aggregate throughput over N=1 (the continuous-batching claim). Token arrival is timed
from the streamed `token_ids` (return_token_ids), not from visible text: random-weight models emit
byte sequences that are not valid UTF-8, whose text the server rightly holds back.

    # start a server itself (same model flags as `ktrans serve`), then measure:
    python bench/serve.py --launch -- --gguf_path model.gguf --model_path DIR --max_batch_size 16
    # or measure a running server:
    python bench/serve.py --url http://127.0.0.1:10002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


async def one_request(client: httpx.AsyncClient, prompt: str, out_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": out_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            elif d["choices"] and d["choices"][0].get("token_ids") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else out_tokens
    first = first or end
    return {"ttft": first - t0, "tpot": (end - first) / max(1, n - 1), "tokens": n, "latency": end - t0}


async def run_level(url: str, n: int, rounds: int, prompt: str, out_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        await one_request(client, prompt, 2)  # warm-up
        t0 = time.perf_counter()
        results = []
        for _ in range(rounds):
            results += await asyncio.gather(*[one_request(client, prompt, out_tokens) for _ in range(n)])
        wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in results)
    return {"concurrency": n, "requests": len(results), "output_tok_s": toks / wall,
            "ttft_p50_ms": 1000 * _pct([r["ttft"] for r in results], 50),
            "ttft_p99_ms": 1000 * _pct([r["ttft"] for r in results], 99),
            "tpot_p50_ms": 1000 * statistics.median(r["tpot"] for r in results)}


def make_prompt(url: str, prompt_tokens: int) -> str:
    # A repeated word is one token per repetition for any byte-level BPE worth its name; the
    # server's usage count of the prompt is printed so the length can be checked.
    text = " hello" * prompt_tokens
    r = httpx.post(url + "/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=3600).json()
    print(f"prompt: {r['usage']['prompt_tokens']} tokens", file=sys.stderr)
    return text


def launch(server_args: list[str], port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ktrans", "serve", "--port", str(port), *server_args]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None)
    ap.add_argument("--launch", action="store_true", help="start `ktrans serve` with the args after --")
    ap.add_argument("--port", type=int, default=10077)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="write all results to this file")
    args, rest = ap.parse_known_args()
    rest = [a for a in rest if a != "--"]
    proc = launch(rest, args.port) if args.launch else None
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        prompt = make_prompt(url, args.prompt_tokens)
        rows = [asyncio.run(run_level(url, int(n), args.rounds, prompt, args.output_tokens))
                for n in args.concurrency.split(",")]
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
    base = rows[0]["output_tok_s"]
    print(f"{'N':>3} {'reqs':>5} {'out tok/s':>10} {'xN=1':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9}")
    for r in rows:
        print(f"{r['concurrency']:>3} {r['requests']:>5} {r['output_tok_s']:>10.1f} {r['output_tok_s'] / base:>6.2f} "
              f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms {r['tpot_p50_ms']:>7.1f}ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "server_args": rest, "rows": rows,
                       "machine": os.uname().nodename}, f, indent=1)


if __name__ == "__main__":
    main()
