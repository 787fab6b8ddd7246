"""Mounts for the tests, the demo and the benchmark: start ``dicomfs mount``, wait until it
answers, unmount (by force if need be), keep its log; and the mount-point checks under them.

Why not ``os.path.ismount``: it stats the path, which hangs on a wedged FUSE daemon and says
False for a dead one ("transport endpoint is not connected"). ``/proc/self/mountinfo`` sees
live and stale mounts alike without touching them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def mount_points() -> set[str]:
    """Mount points of this process's mount namespace."""
    with open("/proc/self/mountinfo", "rb") as fh:
        fields = [line.split(b" ")[4] for line in fh]
    return {
        os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), raw)) for raw in fields
    }


def _canonical(path: Path | str) -> str:
    """``path`` as mountinfo spells it, resolving symlinks in its parent only: stat-ing the
    mount point itself could hang on a wedged daemon."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_mounted(path: Path | str) -> bool:
    """True when ``path`` is a mount point, alive or stale."""
    return _canonical(path) in mount_points()


def force_unmount(path: Path | str) -> bool:
    """Detach whatever is mounted on ``path`` (lazily if busy); True when nothing is left.

    Tries a plain ``fusermount3 -u`` first, then ``fusermount3 -u -z``, then ``umount -l``.
    """
    target = _canonical(path)
    attempts: Sequence[Sequence[str]] = (
        ["fusermount3", "-u", target],
        ["fusermount3", "-u", "-z", target],
        ["umount", "-l", target],
    )
    for cmd in attempts:
        if not is_mounted(target):
            return True
        run_quietly(cmd)
    return not is_mounted(target)


def run_quietly(cmd: Sequence[str], timeout: float = 10.0) -> int | None:
    """Run a command, ignoring its output; its status, or None if missing or too slow."""
    try:
        done = subprocess.run(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.returncode


class MountError(RuntimeError):
    """A mount did not come up, or could not be taken down; the message holds its log's tail."""


@dataclass(eq=False)
class Mount:
    """A FUSE mount and the process serving it: ``dicomfs mount`` (see :func:`mount_dicomfs`) or
    another tool's daemon (the benchmark's rclone), found by ``pid``.

    ``proc`` is set when this process started the server in the foreground, so it reaps it;
    a daemon that detached itself is known by ``pid`` only.
    """

    path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    url: str = ""
    cache_dir: Path | None = None
    args: tuple[str, ...] = ()
    seconds: float = 0.0  # from the start until mounted (a daemon: until its launcher returned)
    _closed: bool = field(default=False, repr=False)

    def log(self) -> str:
        """Everything the mount process logged so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def unmount(self) -> None:
        """Unmount and end the process; idempotent; never leaves a mount behind.

        Order: a normal ``fusermount3 -u`` (the daemon sees it and exits by itself), then
        SIGTERM, then SIGKILL, then :func:`force_unmount` of whatever is left.
        """
        if self._closed:
            return
        self._closed = True
        if is_mounted(self.path):
            run_quietly(["fusermount3", "-u", str(self.path)], timeout=60)
        if self.proc is not None:
            _end_child(self.proc)
        elif self.pid is not None:
            _end_pid(self.pid)
        if not force_unmount(self.path):
            raise MountError(f"{self.path} is still mounted after every way to unmount it")


def mount_dicomfs(
    url: str,
    path: Path,
    *,
    cache_dir: Path,
    log_path: Path,
    args: Sequence[str] = (),
    foreground: bool = True,
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    code: Path = REPO_ROOT,
) -> Mount:
    """Run ``python -m dicomfs mount URL PATH``; the :class:`Mount` once it answers.

    ``foreground``: a ``--foreground`` child of this process, logging (its command line first)
    into ``log_path``; else the CLI's own background start (``--log-file``), which returns
    once the mount is ready: what a person runs, and what the benchmark times. ``command``
    replaces ``[python, -m, dicomfs]`` (the harness tests' fakes); ``code`` is the checkout
    the child imports dicomfs from. MountError, with the log's tail, when it does not come up;
    nothing is left mounted then.
    """
    path.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [*(command or [sys.executable, "-m", "dicomfs"]), "mount", url, str(path)]
    if foreground:
        argv += ["--foreground", "--cache-dir", str(cache_dir), *args]
    else:
        argv += ["--cache-dir", str(cache_dir), "--log-file", str(log_path), *args]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(code), child_env.get("PYTHONPATH", "")) if p
    )
    # cwd: ``python -m`` imports from its working directory first, which must not be a
    # checkout other than ``code``.
    cwd = log_path.parent
    mount = Mount(path, log_path, url=url, cache_dir=cache_dir, args=tuple(args))
    try:
        if foreground:
            with open(log_path, "wb") as log:
                log.write(("$ " + " ".join(argv) + "\n").encode())
                log.flush()
                started = time.perf_counter()
                mount.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=cwd, env=child_env,
                )
            mount.pid = mount.proc.pid
            _wait_for_mount(mount, timeout, started)
        else:
            _launch(mount, argv, cwd, child_env, timeout)
    except BaseException:
        with contextlib.suppress(MountError):
            mount.unmount()
        raise
    return mount


def _launch(mount: Mount, argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> None:
    """The background start: the launcher returns once the mount is ready or has failed."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=cwd, env=env,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        mount.pid = _serving_pid(mount.path)
        raise MountError(
            f"dicomfs mount did not return within {timeout:.0f} s; its log:\n{mount.log_tail(20)}"
        ) from None
    mount.seconds = time.perf_counter() - started
    mount.pid = _serving_pid(mount.path)
    if done.returncode != 0:
        raise MountError(
            f"dicomfs mount exited with status {done.returncode} "
            f"({(done.stderr or done.stdout).strip()[-1500:] or 'no output'}); "
            f"its log:\n{mount.log_tail(20)}"
        )
    if mount.pid is None:
        raise MountError(f"dicomfs mount said ready, but no one process serves {mount.path}")


def _wait_for_mount(mount: Mount, timeout: float, started: float) -> None:
    assert mount.proc is not None
    deadline = time.monotonic() + timeout
    while True:
        if mount.proc.poll() is not None:
            raise MountError(
                f"dicomfs mount exited with status {mount.proc.returncode} before "
                f"{mount.path} was mounted; its log:\n{mount.log_tail()}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if is_mounted(mount.path) and _answers(mount.path, remaining):
            mount.seconds = time.perf_counter() - started
            return
        time.sleep(0.05)
    raise MountError(
        f"{mount.path} not mounted after {timeout:.0f} s; its log:\n{mount.log_tail()}"
    )


def _answers(path: Path, timeout: float) -> bool:
    """``os.path.ismount(path)`` without hanging on a daemon that never answers."""
    result: list[bool] = []
    probe = threading.Thread(target=lambda: result.append(os.path.ismount(path)), daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(result and result[0])


def _serving_pid(path: Path) -> int | None:
    """The pid of the one ``--foreground`` dicomfs process serving ``path``, if exactly one.

    Read from /proc: the background start does not say which process it left behind.
    """
    found = [pid for pid, argv in _processes() if "--foreground" in argv and str(path) in argv
             and "mount" in argv]
    return found[0] if len(found) == 1 else None


def _processes() -> Iterator[tuple[int, list[str]]]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(entry.path, "cmdline").read_bytes()
                yield int(entry.name), [os.fsdecode(a) for a in raw.split(b"\0")]


def _process_state(pid: int) -> str | None:
    """The state letter of a process (``Z`` for a zombie), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_state(pid) in (None, "Z"):
            return True
        time.sleep(0.02)
    return False


def _end_pid(pid: int, grace: float = 10.0) -> None:
    """Wait for a process this one did not start to exit by itself, then SIGTERM, then SIGKILL."""
    if _wait_gone(pid, grace):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_gone(pid, 5.0):
            return


def _end_child(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    for step in (None, proc.terminate, proc.kill):
        if step is not None:
            step()
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
