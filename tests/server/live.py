"""A real ktrans server in a background thread for the server tests (tiny model, all-CPU rules).

The app is built exactly as `ktrans serve` builds it (same argument parser, same connection
limits), served by uvicorn on a free loopback port, and shut down when the test module ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time

import httpx
import uvicorn

from ktrans_server.transport import uvicorn_config

from ktrans.cli import serve


class LiveServer:
    def __init__(self, model_dir: str, *extra: str):
        parser = argparse.ArgumentParser()
        serve.add_server_args(parser)
        self.args = parser.parse_args(["--model_path", str(model_dir), "--device", "cpu",
                                       "--cache_lens", "512", "--max_new_tokens", "16", *extra])
        self.load_failures: list[str] = []
        self.app = serve.build_app(self.args, self._load_failed)
        config = uvicorn_config(self.app, "127.0.0.1", 0, serve.connection_limits(self.args), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if self.load_failures:
                break
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        # NOTE: a model that fails to load at once may have stopped the server already.
        sockets = [sock for srv in self.server.servers for sock in srv.sockets]
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}" if sockets else None

    def _load_failed(self, message: str) -> None:
        self.load_failures.append(message)
        self.server.should_exit = True

    @property
    def service(self):
        return self.app.state.service

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/health", timeout=10)
            if r.status_code == 200:
                return
            if self.service.load_error:
                raise RuntimeError(self.service.load_error)
            time.sleep(0.1)
        raise TimeoutError("model did not load")

    def wait_idle(self, timeout: float = 30) -> dict:
        """Engine stats once no request is waiting or running (KV pool back to empty)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.service.engine.stats()
            if (stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_pages_used"] == 0) \
                    or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def gate(self) -> "Gate":
        """Put a Gate between the engine and its model runner (once per server)."""
        core = self.service.engine.engine
        if not isinstance(core.runner, Gate):
            core.runner = Gate(core.runner)
        return core.runner

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        """/metrics as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", headers=headers or {}, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_for(self, what: str, check, timeout: float = 30):
        """Poll `check()` until it returns something truthy (an event the server causes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = check()
            if v:
                return v
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def raw_post(url: str, path: str, body: dict, headers: dict | None = None):
    """A POST sent on a bare socket that the caller closes at will (no client library between)."""
    host, port = url.rsplit("//", 1)[1].split(":")
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock = socket.create_connection((host, int(port)), timeout=30)
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        yield sock
    finally:
        sock.close()


class Gate:
    """Wraps the engine's model runner: while the gate is shut, every forward waits, so the
    engine thread blocks inside its step and a test decides when generation may go on. With the
    gate shut, no request can finish by itself: only an abort frees its KV pages."""

    def __init__(self, runner):
        self.runner = runner
        self.opened = threading.Event()
        self.opened.set()
        self.blocked = threading.Event()        # a forward is waiting at the gate
        self._budget: int | None = None         # forwards let through before the gate shuts

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def shut(self) -> None:
        self.blocked.clear()
        self.opened.clear()

    def open(self) -> None:
        self._budget = None
        self.opened.set()

    def allow(self, n: int) -> None:
        """Let `n` more forwards through, then shut."""
        self.blocked.clear()
        self._budget = n
        self.opened.set()

    def execute(self, batch):
        if self._budget is not None:
            if self._budget == 0:
                self.opened.clear()
            else:
                self._budget -= 1
        if not self.opened.is_set():
            self.blocked.set()
            self.opened.wait()
        return self.runner.execute(batch)
