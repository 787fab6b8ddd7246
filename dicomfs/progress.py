"""A terminal progress bar for long transfers: bytes, instances, rate and time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO

REFRESH_SECONDS = 0.2
BAR_WIDTH = 24


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class Progress:
    """Counts instances and bytes toward a known total of instances.

    Redraws in place on a terminal; elsewhere (a log, a pipe) it prints only the
    final line, so scripts do not fill their logs with carriage returns.
    """

    def __init__(self, total: int, *, done: int = 0, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.done = done
        self.bytes = 0
        self.stream = stream
        self._started = time.monotonic()
        self._drawn = 0.0
        self._live = stream.isatty()

    def add(self, size: int) -> None:
        self.done += 1
        self.bytes += size
        if self._live and time.monotonic() - self._drawn >= REFRESH_SECONDS:
            self._draw(end="\r")

    def finish(self) -> None:
        self._draw(end="\n")

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self.bytes / elapsed
        share = self.done / self.total if self.total else 1.0
        filled = int(BAR_WIDTH * share)
        left = ""
        if 0 < share < 1 and self.bytes:
            remaining = elapsed * (1 - share) / share
            left = f", {remaining:.0f} s left"
        return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} "
                f"instances, {human_bytes(self.bytes)} at {human_bytes(rate)}/s{left}")

    def _draw(self, end: str) -> None:
        self._drawn = time.monotonic()
        self.stream.write(self.line().ljust(79) + end)
        self.stream.flush()
