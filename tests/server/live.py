"""A real ktrans server in a background thread for the server tests (tiny model, all-CPU rules).

The app is built exactly as `ktrans serve` builds it (same argument parser, same connection
limits), served by uvicorn on a free loopback port, and shut down when the test module ends.
"""

from __future__ import annotations

import argparse
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
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

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

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
