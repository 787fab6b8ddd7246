"""The benchmark's mounts: dicomfs started as a person would (``dicomfs mount``, timed until
it returns ready) and rclone on Orthanc's WebDAV, each on a mount point of its own, all
undone by :meth:`Mounts.cleanup` even after a failure."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from scripts.benchmarks.common import BenchError, say
from scripts.benchmarks.proc import run_timed
from tests.support.mounts import (
    Mount,
    MountError,
    force_unmount,
    is_mounted,
    mount_dicomfs,
    mount_points,
)


class Mounts:
    """Starts and stops dicomfs and rclone mounts below ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.logs = work / "logs"
        self.active: list[Mount] = []
        self._count = 0
        self._caches = 0

    def _new_point(self, kind: str) -> tuple[Path, Path]:
        self._count += 1
        path = self.work / "mnt" / f"{kind}-{self._count}"
        path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        return path, self.logs / f"{kind}-{self._count}.log"

    def fresh_cache(self) -> Path:
        """A new, empty cache folder."""
        self._caches += 1
        path = self.work / "caches" / str(self._caches)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def dicomfs(self, url: str, cache_dir: Path, args: Sequence[str] = ()) -> Mount:
        """``python -m dicomfs mount URL MNT --cache-dir DIR [ARGS]`` in the background, as a
        person runs it; ``seconds``: until that command returned (the mount is ready then)."""
        path, log = self._new_point("dicomfs")
        try:
            mount = mount_dicomfs(url, path, cache_dir=cache_dir, log_path=log, args=args,
                                  foreground=False, timeout=180)
        except MountError as exc:
            raise BenchError(f"dicomfs mount: {exc}") from None
        self.active.append(mount)
        return mount

    def rclone(self, webdav_url: str) -> Mount:
        """``rclone mount :webdav: MNT --read-only --vfs-cache-mode off --daemon``."""
        path, log = self._new_point("rclone")
        config = self.work / "rclone.conf"
        config.touch()
        cmd = ["rclone", "mount", ":webdav:", str(path), "--webdav-url", webdav_url,
               "--read-only", "--vfs-cache-mode", "off", "--daemon", "--config", str(config),
               "--log-file", str(log)]
        mount = Mount(path, log)
        self.active.append(mount)
        try:
            mount.seconds, _ = run_timed(cmd, "rclone mount", timeout=120,
                                         daemon_log=log.with_suffix(".out"))
        except BenchError as exc:
            raise BenchError(f"{exc}\nrclone log {log}:\n{mount.log_tail(20)}") from None
        mount.pid = find_pid(rf"rclone mount :webdav: {re.escape(str(path))}( |$)")
        if not is_mounted(path):
            raise BenchError(f"rclone said it mounted {path}, but nothing is mounted there")
        return mount

    def unmount(self, mount: Mount) -> None:
        """Unmount, wait for the process to end, remove the mount point."""
        try:
            mount.unmount()
        except MountError as exc:
            raise BenchError(str(exc)) from None
        finally:
            with contextlib.suppress(ValueError):
                self.active.remove(mount)
        with contextlib.suppress(OSError):
            mount.path.rmdir()

    @contextlib.contextmanager
    def mounted(self, mount: Mount) -> Iterator[Mount]:
        try:
            yield mount
        finally:
            self.unmount(mount)

    def cleanup(self) -> None:
        for mount in list(self.active):
            say(f"unmounting {mount.path}")
            try:
                self.unmount(mount)
            except Exception as exc:  # keep going: the rest must be cleaned up too
                say(f"could not unmount {mount.path}: {exc}")


def find_pid(pattern: str, timeout: float = 5.0) -> int | None:
    """The pid of the one process whose command line matches ``pattern`` (pgrep -f): rclone
    detaches itself and does not say."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                              check=False)
        pids = [int(p) for p in done.stdout.split()]
        if len(pids) == 1 or time.monotonic() > deadline:
            return pids[0] if len(pids) == 1 else None
        time.sleep(0.05)


def unmount_stale(work: Path) -> None:
    """Detach mounts a killed earlier run left below ``work`` (before deleting anything)."""
    prefix = str(work) + os.sep
    for point in sorted(mount_points()):
        if point.startswith(prefix):
            say(f"removing a stale mount {point}")
            force_unmount(point)
