"""``dicomfs status``: what each running mount is doing, without ``--metrics-address``.

A mount rewrites a small private file, ``status-<pid>.json`` in its server's cache folder
(0600, in a 0700 folder, replaced atomically), once a second while its figures change: its
server, mount point, start time, and the totals of :mod:`dicomfs.metrics` with throughput
over the last WINDOW seconds and the last warnings of its log. ``dicomfs status`` finds
these files below the cache folder, keeps those of live mounts, and shows them. A file
beats a socket here: nothing to serve, no path length limit, and still readable when the
mount hangs (its age then says so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from dicomfs import metrics
from dicomfs.errors import CacheError
from dicomfs.progress import human_bytes
from dicomfs.store import Store, pid_alive

log = logging.getLogger(__name__)

WINDOW = 10  # seconds of throughput
INTERVAL = 1.0
RECENT = 5  # last warnings and errors shown
PREFIX = "status-"


class RecentLog(logging.Handler):
    """Keeps the last warnings and errors of the log, as the log shows them (the log
    names no patient at its default level, so neither does this)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": record.created, "level": record.levelname,
                             "logger": record.name, "message": record.getMessage()[:300]})


@dataclass(frozen=True)
class MountInfo:
    """What a mount is, as opposed to what it does."""

    url: str
    mountpoint: str
    metrics: str | None = None


def file_name(pid: int) -> str:
    return f"{PREFIX}{pid}.json"


class Publisher:
    """Samples the metrics once a second and rewrites the status file when they change."""

    def __init__(self, store: Store, info: MountInfo, recent: RecentLog) -> None:
        self.store = store
        self.info = info
        self.recent = recent
        self.started = time.time()
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=WINDOW + 1)

    def snapshot(self) -> dict[str, Any]:
        """The figures now, as ``dicomfs status --json`` shows them."""
        now = time.monotonic()
        received, requests = metrics.total(metrics.RESPONSE_BYTES), \
            metrics.total(metrics.REQUESTS)
        self._samples.append((now, received, requests))
        then, received_then, requests_then = self._samples[0]
        span = now - then
        hits, misses = metrics.total(metrics.CACHE_HITS), metrics.total(metrics.CACHE_MISSES)
        engine, cache = metrics.GAUGES.engine, metrics.GAUGES.cache
        return {
            "pid": os.getpid(), "url": self.info.url, "mountpoint": self.info.mountpoint,
            "cache_folder": str(self.store.folder), "metrics": self.info.metrics,
            "started": self.started,
            "requests": requests, "failed_requests": _failed_requests(),
            "received_bytes": received,
            "throughput_bytes_per_second": (received - received_then) / span if span else 0.0,
            "requests_per_second": (requests - requests_then) / span if span else 0.0,
            "window_seconds": round(span, 1),
            "cache": {"hits": hits, "misses": misses,
                      "hit_rate": hits / (hits + misses) if hits + misses else None,
                      "bytes": cache.used if cache else None,
                      "limit_bytes": cache.max_bytes if cache else None,
                      "evictions": metrics.total(metrics.CACHE_EVICTIONS)},
            "transfers": {"in_flight": engine.in_flight if engine else 0,
                          "queued": engine.queued if engine else 0,
                          "limit": engine.limit if engine else None},
            "fuse": {"operations": metrics.total(metrics.FUSE_OPERATIONS),
                     "errors": metrics.total(metrics.FUSE_ERRORS)},
            "last_errors": list(self.recent.records),
        }

    async def run(self) -> None:
        """Publish until cancelled; the file goes with the mount."""
        self._clean()
        name = file_name(os.getpid())
        last = None
        try:
            while True:
                figures = self.snapshot()
                changed = {k: v for k, v in figures.items() if k != "window_seconds"}
                if changed != last:
                    data = json.dumps({**figures, "written": time.time()}).encode()
                    try:
                        await trio.to_thread.run_sync(self.store.save_note, name, data)
                        last = changed
                    except CacheError as exc:  # a full disk: the mount goes on regardless
                        log.debug("status file not written: %s", exc)
                await trio.sleep(INTERVAL)
        finally:
            with contextlib.suppress(OSError):
                (self.store.folder / name).unlink()

    def _clean(self) -> None:
        """Drop the files of mounts that died without removing theirs (kill -9)."""
        for path in self.store.folder.glob(f"{PREFIX}*.json"):
            pid = path.stem.removeprefix(PREFIX)
            if pid.isdigit() and not pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    path.unlink()


def _failed_requests() -> float:
    """Requests that got no answer or a server error."""
    return sum(sample.value for metric in metrics.REQUESTS.collect()
               for sample in metric.samples if sample.name.endswith("_total")
               and not sample.labels["status"].startswith(("1", "2", "3", "4")))


# -- reading --------------------------------------------------------------------------------


def dicomfs_mounts() -> list[str]:
    """Mount points of this user's dicomfs mounts, from /proc/mounts."""
    found = []
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 4 and fields[2] == "fuse.dicomfs" and \
                    f"user_id={os.getuid()}" in fields[3].split(","):
                found.append(_unescape(fields[1]))
    return found


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def running(cache_root: Path) -> Iterator[dict[str, Any]]:
    """The status of every live mount whose server folder is below ``cache_root``."""
    mounted = set(dicomfs_mounts())
    for path in sorted(cache_root.glob(f"*/{PREFIX}*.json")):
        try:
            figures = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # just removed by an unmount
        if not isinstance(figures, dict):
            continue
        pid = figures.get("pid")
        if isinstance(pid, int) and pid > 0 and pid_alive(pid) and \
                figures.get("mountpoint") in mounted:
            yield figures


def describe(figures: dict[str, Any], now: float | None = None) -> str:
    """A person's view of one mount's figures."""
    now = time.time() if now is None else now
    cache, transfers, fuse = figures["cache"], figures["transfers"], figures["fuse"]
    rate = cache["hit_rate"]
    lines = [
        f"{figures['mountpoint']}  (pid {figures['pid']}, up "
        f"{_duration(now - figures['started'])})",
        f"  server       {figures['url']}",
        f"  cache        {figures['cache_folder']}: {human_bytes(cache['bytes'] or 0)} of "
        f"{human_bytes(cache['limit_bytes'] or 0)}, {cache['evictions']:.0f} evicted",
        f"  requests     {figures['requests']:.0f} ({figures['failed_requests']:.0f} failed), "
        f"{human_bytes(figures['received_bytes'])} received",
        f"  now          {human_bytes(figures['throughput_bytes_per_second'])}/s, "
        f"{figures['requests_per_second']:.1f} requests/s "
        f"(last {figures['window_seconds']:.0f} s, as of "
        f"{_duration(now - figures['written'])} ago)",
        f"  cache hits   {cache['hits']:.0f} of {cache['hits'] + cache['misses']:.0f} opens"
        + (f" ({rate:.0%})" if rate is not None else ""),
        f"  transfers    {transfers['in_flight']} in flight, {transfers['queued']} queued "
        f"(at most {transfers['limit']} at once)",
        f"  fuse         {fuse['operations']:.0f} operations, {fuse['errors']:.0f} errors",
    ]
    if figures.get("metrics"):
        lines.append(f"  metrics      {figures['metrics']}")
    if figures["last_errors"]:
        lines.append("  last errors")
        lines += [f"    {time.strftime('%H:%M:%S', time.localtime(e['time']))} {e['level']} "
                  f"{e['message']}" for e in figures["last_errors"]]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds // 60 % 60:02d}m"
