"""Soak: minutes of mixed, partly hostile clients against a real `ktrans serve` process.

Clients, chosen at random by every worker until the time is up: plain and streamed chats,
completions that echo a unique nonce (an answer delivered to the wrong client shows at once),
streams cancelled midway, slow readers, oversized and malformed bodies, half-sent headers, forced
tool calls and JSON-schema answers. Beside them a prober times GET /health and a sampler reads
the server's RSS. At the end: the KV pool must be empty, a sample of answers re-run alone must
come out the same, and the summary says whether each acceptance bound held:

    0 lost or mixed-up responses · KV pages back to 0 · RSS within 10 % (after warm-up) ·
    /health under 100 ms throughout

Each probe also records, over its own span (Linux: /proc schedstat and /proc/stat), what the
server's event-loop thread did: CPU time, time runnable but waiting for a core (run-queue wait),
the engine thread's same two figures, the whole server's CPU time, the prober's own run-queue
wait and how busy the machine's CPUs were. A probe over 100 ms is then put down to one cause:
"waiting for a CPU" (the loop or the prober was runnable but had no core: the machine was
saturated), "event loop busy" (the loop ran ktrans code), or "blocked" (the loop neither ran
nor waited for a core: the GIL or a lock held by another thread).
The server and the prober run in sessions of their own: Linux's autogroup scheduler shares the
CPU between sessions, so the clients' CPU time does not come out of the server's share (as on a
real deployment, where clients are elsewhere).

    python bench/soak.py                     # 10 minutes on a generated tiny model
    python bench/soak.py --minutes 1 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

# Qwen2.5's tool-call template, cut to what tools need (the generated model's own has none).
HERMES = (
    "{%- if tools %}<|im_start|>system\n# Tools\n\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags.<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1,
                                                                            "maximum": 7}},
    "required": ["unit", "days"], "additionalProperties": False}}}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
KINDS = {"plain": 6, "stream": 5, "echo": 4, "cancel": 3, "slow": 1, "oversized": 1, "malformed": 2,
         "half_headers": 1, "tool": 2, "json": 2}


class Soak:
    def __init__(self, url: str, pid: int | None, seconds: float, concurrency: int):
        self.url, self.pid, self.seconds, self.concurrency = url, pid, seconds, concurrency
        self.outcomes: Counter = Counter()
        self.failures: list[str] = []
        self.health_ms: list[float] = []
        self.probes: list[dict] = []
        self.rss: list[tuple[float, int]] = []
        self.loadavg: list[float] = []
        self.machine: dict = {}
        self.samples: list[tuple[dict, str]] = []
        self.t0 = time.monotonic()

    def fail(self, kind: str, why: str) -> None:
        self.outcomes[f"{kind}:FAILED"] += 1
        if len(self.failures) < 50:
            self.failures.append(f"{kind}: {why}")

    def ok(self, kind: str) -> None:
        self.outcomes[kind] += 1

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as c:
            deadline = self.t0 + self.seconds
            tasks = [self.worker(c, w, deadline) for w in range(self.concurrency)]
            # The prober runs in its own process and session: timed from inside this busy client,
            # /health would also measure the client's own event loop and its share of the CPU.
            with multiprocessing.Pool(1, initializer=os.setsid) as pool:
                probe = pool.apply_async(probe_health, (self.url, self.seconds, self.pid))
                machine0 = _machine_cpu()
                await asyncio.gather(self.sampler(deadline), *tasks)
                self.machine = _machine_summary(machine0, _machine_cpu(), self.loadavg)
                self.probes, bad = probe.get(timeout=self.seconds + 120)
                self.health_ms = [p["ms"] for p in self.probes]
            for status in bad:
                self.fail("health", f"{status}")

    async def worker(self, c: httpx.AsyncClient, w: int, deadline: float) -> None:
        rng = random.Random(w)
        kinds, weights = zip(*KINDS.items())
        i = 0
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            i += 1
            try:
                await getattr(self, kind)(c, f"w{w}-{i}", rng)
            except Exception as e:           # noqa: BLE001 — every surprise is a counted failure
                self.fail(kind, f"{type(e).__name__}: {e}")

    # -- the clients -----------------------------------------------------------------------
    def _chat(self, tag: str, rng: random.Random, **extra) -> dict:
        return {"model": "soak", "messages": [{"role": "user", "content": f"Soak {tag}: " + "word " * rng.randint(0, 40)}],
                "max_tokens": rng.randint(1, 32), "temperature": 0.7, "seed": rng.randrange(1 << 30), **extra}

    async def _post(self, c, path: str, body: dict) -> httpx.Response:
        for _ in range(100):                 # the queue is bounded: 503 + Retry-After means later
            r = await c.post(path, json=body)
            if r.status_code != 503:
                return r
            await asyncio.sleep(0.1)
        return r

    async def plain(self, c, tag, rng):
        body = self._chat(tag, rng)
        r = await self._post(c, "/v1/chat/completions", body)
        if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
            return self.fail("plain", f"{r.status_code} {r.text[:200]}")
        if len(self.samples) < 40:
            self.samples.append((body, r.json()["choices"][0]["message"]["content"]))
        self.ok("plain")

    async def echo(self, c, tag, rng):
        prompt = f"Nonce {tag}-{rng.randrange(1 << 40):x}."
        body = {"model": "soak", "prompt": prompt, "max_tokens": rng.randint(1, 16), "echo": True, "temperature": 1}
        r = await self._post(c, "/v1/completions", body)
        if r.status_code != 200 or not r.json()["choices"][0]["text"].startswith(prompt):
            return self.fail("echo", f"answer for another request? {r.status_code} {r.text[:200]}")
        self.ok("echo")

    async def _stream(self, c, body: dict, on_event=None) -> tuple[int, list[dict]]:
        async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return r.status_code, []
            events = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if on_event is not None and not await on_event(len(events)):
                        return 200, events
                elif line == "data: [DONE]":
                    events.append({"done": True})
            return 200, events

    async def stream(self, c, tag, rng):
        status, events = await self._stream(c, self._chat(tag, rng))
        if status == 503:
            return self.ok("stream_busy")
        ids = {e["id"] for e in events if "id" in e}
        if status != 200 or not events or events[-1] != {"done": True} or len(ids) != 1:
            return self.fail("stream", f"{status}, {len(events)} events, ids {ids}")
        self.ok("stream")

    async def cancel(self, c, tag, rng):
        stop_after = rng.randint(1, 4)

        async def go_on(n):
            return n < stop_after
        await self._stream(c, self._chat(tag, rng, max_tokens=64, ignore_eos=True), go_on)
        self.ok("cancel")

    async def slow(self, c, tag, rng):
        async def dawdle(n):
            await asyncio.sleep(0.2)
            return True
        status, events = await self._stream(c, self._chat(tag, rng, max_tokens=16), dawdle)
        if status not in (200, 503) or (status == 200 and events[-1] != {"done": True}):
            return self.fail("slow", f"{status}")
        self.ok("slow")

    async def oversized(self, c, tag, rng):
        r = await c.post("/v1/chat/completions", content=b'{"messages": "' + b"x" * (2 << 20) + b'"}',
                         headers={"Content-Type": "application/json"})
        if r.status_code != 413:
            return self.fail("oversized", f"{r.status_code}")
        self.ok("oversized")

    async def malformed(self, c, tag, rng):
        bodies = [b"{not json", b"[1, 2]", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
                  json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode()]
        r = await c.post("/v1/chat/completions", content=rng.choice(bodies), headers={"Content-Type": "application/json"})
        if r.status_code != 400 or not r.json()["error"]["message"]:
            return self.fail("malformed", f"{r.status_code}")
        self.ok("malformed")

    async def half_headers(self, c, tag, rng):
        host, port = self.url.rsplit("//", 1)[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 60)     # the server closes it after its deadline
        writer.close()
        if not reply.startswith(b"HTTP/1.1 408"):
            return self.fail("half_headers", repr(reply[:80]))
        self.ok("half_headers")

    async def tool(self, c, tag, rng):
        body = self._chat(tag, rng, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80)
        r = await self._post(c, "/v1/chat/completions", body)
        choice = r.json()["choices"][0] if r.status_code == 200 else {}
        calls = (choice.get("message") or {}).get("tool_calls") or []
        if choice.get("finish_reason") != "tool_calls" or len(calls) != 1:
            return self.fail("tool", f"{r.status_code} {r.text[:200]}")
        args = json.loads(calls[0]["function"]["arguments"])
        if args.get("unit") not in ("c", "f") or not 1 <= args.get("days", 0) <= 7:
            return self.fail("tool", f"arguments {args}")
        self.ok("tool")

    async def json(self, c, tag, rng):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
        r = await self._post(c, "/v1/chat/completions", self._chat(tag, rng, response_format=fmt, max_tokens=40))
        choice = r.json()["choices"][0] if r.status_code == 200 else {}
        try:
            obj = json.loads(choice["message"]["content"])
            good = set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 99
        except (KeyError, ValueError, TypeError):
            good = False
        if not good:
            return self.fail("json", f"{r.status_code} {r.text[:200]}")
        self.ok("json")

    # -- watchers --------------------------------------------------------------------------
    async def sampler(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.pid is not None:
                self.rss.append((time.monotonic() - self.t0, _rss_bytes(self.pid)))
            self.loadavg.append(os.getloadavg()[0])
            await asyncio.sleep(2)


def probe_health(url: str, seconds: float, pid: int | None = None) -> tuple[list[dict], list[int]]:
    """GET /health every 0.25 s: per probe its latency in ms and what the server's threads and
    the machine did meanwhile (ProbeClock); any status other than 200 is listed."""
    probes, bad = [], []
    clock = ProbeClock(pid)
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            before = clock.read()
            t = time.perf_counter()
            r = c.get("/health")
            ms = (time.perf_counter() - t) * 1000
            probes.append({"ms": ms, **clock.delta(before, clock.read())})
            if r.status_code != 200:
                bad.append(r.status_code)
            time.sleep(0.25)
    return probes, bad


def _schedstat(path: str) -> tuple[float, float] | None:
    """(CPU time, run-queue wait) of one thread in ms; None where the kernel does not say."""
    try:
        run, wait, _ = Path(path).read_text().split()
        return int(run) / 1e6, int(wait) / 1e6
    except (OSError, ValueError):
        return None


def _machine_cpu() -> tuple[int, int, int]:
    """(busy, total) jiffies of all CPUs together, and the number of runnable tasks now."""
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return 0, 0, 0
    fields = [int(x) for x in text.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]                     # idle + iowait
    running = int(re.search(r"procs_running (\d+)", text).group(1))
    return sum(fields[:8]) - idle, sum(fields[:8]), running


class ProbeClock:
    """What the server's threads and the machine did during one probe (Linux /proc; elsewhere
    the figures are None). The event loop is the server's main thread (tid = pid); the engine
    thread is the one named ktrans-engine."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.engine_tid: str | None = None

    def _engine(self) -> str | None:
        if self.engine_tid is None and self.pid is not None:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                try:
                    if Path(f"/proc/{self.pid}/task/{tid}/comm").read_text().strip() == "ktrans-engine":
                        self.engine_tid = tid
                except OSError:
                    pass
        return self.engine_tid

    def read(self) -> dict:
        out = {"prober": _schedstat("/proc/thread-self/schedstat"), "machine": _machine_cpu()}
        if self.pid is None:
            return out
        task = f"/proc/{self.pid}/task"
        out["loop"] = _schedstat(f"{task}/{self.pid}/schedstat")
        out["engine"] = _schedstat(f"{task}/{self._engine()}/schedstat") if self._engine() else None
        try:
            out["server_cpu"] = sum(s[0] for t in os.listdir(task) if (s := _schedstat(f"{task}/{t}/schedstat")))
        except OSError:
            out["server_cpu"] = None
        return out

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        def d(key, i):
            return None if a.get(key) is None or b.get(key) is None else round(b[key][i] - a[key][i], 1)
        (busy0, total0, _), (busy1, total1, running) = a["machine"], b["machine"]
        return {"loop_cpu": d("loop", 0), "loop_wait": d("loop", 1), "engine_cpu": d("engine", 0),
                "engine_wait": d("engine", 1), "prober_wait": d("prober", 1),
                "server_cpu": None if a.get("server_cpu") is None or b.get("server_cpu") is None
                else round(b["server_cpu"] - a["server_cpu"], 1),
                "machine_busy_pct": round(100 * (busy1 - busy0) / (total1 - total0)) if total1 > total0 else None,
                "procs_running": running}


def slow_probe_cause(p: dict) -> str:
    """Why a probe was slow, from its own figures (see the module's docstring)."""
    if p.get("loop_wait") is None:
        return "unknown (no /proc schedstat)"
    if p["loop_wait"] + (p.get("prober_wait") or 0) >= p["ms"] / 2:
        return "waiting for a CPU"
    if p["loop_cpu"] >= p["ms"] / 2:
        return "event loop busy"
    return "blocked (GIL or lock)"


def _machine_summary(a: tuple[int, int, int], b: tuple[int, int, int], loadavg: list[float]) -> dict:
    return {"cpus": os.cpu_count(),
            "busy_pct": round(100 * (b[0] - a[0]) / (b[1] - a[1])) if b[1] > a[1] else None,
            "load_avg_1min": [min(loadavg), max(loadavg)] if loadavg else None}


def _rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


async def _finish(soak: Soak) -> dict:
    """After the traffic: the pool must drain, and sampled answers must be reproducible alone."""
    async with httpx.AsyncClient(base_url=soak.url, timeout=120) as c:
        stats = {}
        for _ in range(600):
            stats = (await c.get("/health")).json()
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_pages_used"] == 0:
                break
            await asyncio.sleep(0.1)
        mismatched = 0
        for body, text in soak.samples:
            r = await c.post("/v1/chat/completions", json=body)
            mismatched += r.json()["choices"][0]["message"]["content"] != text
    return {"stats": stats, "mismatched": mismatched}


def summarize(soak: Soak, end: dict) -> dict:
    warm = [b for t, b in soak.rss if t >= min(60.0, soak.seconds * 0.2)] or [b for _, b in soak.rss]
    rss = {"after_warmup_mib": warm[0] / 2**20, "max_mib": max(warm) / 2**20, "end_mib": warm[-1] / 2**20} if warm else {}
    h = sorted(soak.health_ms)
    failed = sum(v for k, v in soak.outcomes.items() if k.endswith(":FAILED"))
    out = {
        "seconds": soak.seconds, "concurrency": soak.concurrency,
        "requests": sum(soak.outcomes.values()), "outcomes": dict(sorted(soak.outcomes.items())),
        "failed": failed, "failures": soak.failures[:10], "mismatched_on_rerun": end["mismatched"],
        "kv_pages_used_at_end": end["stats"].get("kv_pages_used"),
        "health_ms": {"n": len(h), "p50": statistics.median(h) if h else None,
                      "p99": h[int(0.99 * (len(h) - 1))] if h else None, "max": h[-1] if h else None,
                      "over_100": sum(x >= 100 for x in h)},
        "rss": rss,
        "slow_probes": _slow_probes(soak.probes),
        "machine": {**soak.machine, "server_cpu_s": _server_cpu_s(soak.pid)},
    }
    out["pass"] = {
        "no_lost_or_mixed": failed == 0 and end["mismatched"] == 0,
        "kv_pages_back_to_zero": end["stats"].get("kv_pages_used") == 0,
        "rss_within_10pct": bool(rss) and rss["max_mib"] <= 1.10 * rss["after_warmup_mib"],
        "health_under_100ms": bool(h) and h[-1] < 100,
    }
    return out


def _slow_probes(probes: list[dict]) -> dict:
    """Probes of 100 ms or more, each with its cause and figures (the 20 slowest listed)."""
    slow = sorted((p for p in probes if p["ms"] >= 100), key=lambda p: -p["ms"])
    for p in slow:
        p["cause"] = slow_probe_cause(p)
        p["ms"] = round(p["ms"], 1)
    return {"n": len(slow), "by_cause": dict(Counter(p["cause"] for p in slow)), "slowest": slow[:20]}


def _server_cpu_s(pid: int | None) -> float | None:
    """The server process's CPU time so far (user + system), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)
    except (OSError, ValueError, IndexError, TypeError):
        return None


def launch(args) -> tuple[subprocess.Popen, str]:
    from ktrans.genmodel import generate_model

    work = Path(tempfile.mkdtemp(prefix="ktrans-soak-"))
    model = work / "model"
    generate_model(model, arch=args.arch, preset="tiny", quant="f32", seed=args.seed, with_safetensors=False)
    (work / "hermes.jinja").write_text(HERMES)
    cmd = [sys.executable, "-m", "ktrans", "serve", "--model_path", str(model), "--device", "cpu", "--port", "0",
           "--chat-template", str(work / "hermes.jinja"), "--cache_lens", "4096", "--max_batch_size", "8",
           "--max-queue", "32", "--max_new_tokens", "64", "--max-body-mb", "1", "--header-timeout", "5",
           "--body-timeout", "5", "--send-timeout", "30", "--log-level", "warning"]
    # NOTE: a session of its own, so that under Linux's autogroup scheduling the clients' CPU time
    # is not taken from the server's share of the machine.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = open(work / "server.log", "w")
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            break
    else:
        raise SystemExit(f"the server did not start (exit {proc.wait()})")
    url = m.group(1)
    # The rest of the server's log goes to a file (a full pipe would stall the server).
    threading.Thread(target=lambda: log.writelines(proc.stderr), daemon=True).start()
    print(f"soak: server at {url}, log in {work / 'server.log'}", file=sys.stderr)
    for _ in range(600):
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the model did not load")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--arch", default="qwen3_moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write the summary here too")
    args = p.parse_args(argv)
    proc, url = launch(args)
    try:
        soak = Soak(url, proc.pid, args.minutes * 60, args.concurrency)
        asyncio.run(soak.run())
        summary = summarize(soak, asyncio.run(_finish(soak)))
    finally:
        proc.terminate()
        proc.wait(30)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if all(summary["pass"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
