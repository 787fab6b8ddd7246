"""Mount-point helpers shared by the test harness and the demo.

Why not ``os.path.ismount``: it stats the path, which hangs on a wedged FUSE daemon and says
False for a dead one ("transport endpoint is not connected"). ``/proc/self/mountinfo`` sees
live and stale mounts alike without touching them.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

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
