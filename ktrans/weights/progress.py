"""Loading feedback: a rich progress bar (tensors, bytes, bytes/s) for loads that take over a
second, and a one-line summary at the end saying where the bytes went (CPU RAM / each GPU).

Used as `with weights.loading(total_bytes=...) as p: ...`; every tensor()/raw() read made on the
source inside the block is recorded. Short loads print only the summary, so tests and tiny models
stay quiet.
"""

from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TransferSpeedColumn)

SHOW_AFTER_S = 1.0   # a bar for a load shorter than this would only flicker


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def device_label(device: str) -> str:
    return "CPU RAM" if device.startswith("cpu") else device


class LoadProgress:
    """Counts tensors and bytes per destination device while a load runs."""

    def __init__(self, source=None, *, total_bytes: int | None = None, enabled: bool = True,
                 console: Console | None = None, show_after_s: float = SHOW_AFTER_S):
        self.source = source
        self.total_bytes = total_bytes
        self.enabled = enabled
        self.console = console or Console(file=sys.stderr)
        self.show_after_s = show_after_s
        self.num_tensors = 0
        self.num_bytes = 0
        self.by_device: dict[str, int] = {}
        self._lock = threading.Lock()
        self._bar: Progress | None = None
        self._task = None
        self._t0 = 0.0
        self.seconds = 0.0

    def __enter__(self) -> "LoadProgress":
        self._t0 = time.perf_counter()
        if self.source is not None:
            self.source.progress = self
        return self

    def record(self, nbytes: int, device: str = "cpu") -> None:
        """One tensor of `nbytes` read and placed on `device`."""
        with self._lock:
            self.num_tensors += 1
            self.num_bytes += nbytes
            label = device_label(device)
            self.by_device[label] = self.by_device.get(label, 0) + nbytes
            if not self.enabled:
                return
            if self._bar is None and time.perf_counter() - self._t0 >= self.show_after_s:
                self._start_bar()
            if self._bar is not None:
                self._bar.update(self._task, completed=self.num_bytes,
                                 description=f"loading weights: {self.num_tensors} tensors")

    def _start_bar(self) -> None:
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task("loading weights", total=self.total_bytes, completed=self.num_bytes)

    def summary(self) -> str:
        rate = self.num_bytes / self.seconds if self.seconds > 0 else 0.0
        where = ", ".join(f"{dev} {human_bytes(b)}" for dev, b in sorted(self.by_device.items()))
        return (f"loaded {self.num_tensors} tensors, {human_bytes(self.num_bytes)} in {self.seconds:.2f} s "
                f"({human_bytes(rate)}/s)" + (f": {where}" if where else ""))

    def __exit__(self, exc_type, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self._bar is not None:
            self._bar.stop()
        if self.source is not None:
            self.source.progress = None
        if self.enabled and exc_type is None:
            self.console.print(self.summary(), highlight=False)
