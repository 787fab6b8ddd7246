"""Secrets never on a command line: a background mount, given a secret each way a user can,
leaves it in no process's command line or environment that anyone could read in /proc.

Every option of every parser is taken only as spelled in full (``allow_abbrev=False``): with
abbreviations, ``--bearer TOKEN`` meant ``--bearer-token TOKEN`` but escaped the scrubbing of
secret options, and the running mount showed the token to every user in ``ps``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.mounts import force_unmount, is_mounted

if TYPE_CHECKING:
    from tests.support.harness import OrthancFactory, TinyPacsFactory

USER = "reader"
# How each case gives the secret: the command-line words (SECRET stands for it), whether it
# comes in DICOMFS_PASSWORD or a password file, and which server checks it.
CASES = {
    "--bearer-token": (["--bearer-token", "SECRET"], None, "token"),
    "--bearer-token=": (["--bearer-token=SECRET"], None, "token"),
    "--header": (["--header", "Authorization: Bearer SECRET"], None, "token"),
    "--header=": (["--header=Authorization: Bearer SECRET"], None, "token"),
    "--user, DICOMFS_PASSWORD": (["--user", USER], "env", "basic"),
    "--user, --password-file": (["--user", USER, "--password-file", "FILE"], "file", "basic"),
    # An abbreviation is refused (exit 2), so it cannot slip past the scrubbing.
    "--bearer (abbreviated)": (["--bearer", "SECRET"], None, "token"),
}


def readable_process_texts() -> Iterator[tuple[int, str, bytes]]:
    """(pid, "cmdline" or "environ", contents) of every process this test may read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        for what in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry.name}/{what}", "rb") as fh:
                    yield int(entry.name), what, fh.read()
            except OSError:  # ended meanwhile, or not ours to read
                continue


def mount_daemons(point: Path) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the processes serving a mount at ``point``."""
    found = []
    for pid, what, data in readable_process_texts():
        argv = [os.fsdecode(word) for word in data.split(b"\0") if word]
        if what == "cmdline" and "--foreground" in argv and str(point) in argv:
            found.append((pid, argv))
    return found


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("case", list(CASES))
def test_no_process_shows_the_secret(case: str, tiny_pacs_factory: TinyPacsFactory,
                                     orthanc_factory: OrthancFactory, tmp_path: Path) -> None:
    words, password, scheme = CASES[case]
    secret = f"secret-{uuid.uuid4().hex}"
    password_file = tmp_path / "password"
    password_file.write_text(secret + "\n")
    password_file.chmod(0o600)
    if scheme == "token":
        url = tiny_pacs_factory(tokens=[secret]).dicomweb_url
    else:
        url = orthanc_factory(users={USER: secret}).dicomweb_url
    point = tmp_path / "mnt"
    point.mkdir()
    argv = [word.replace("SECRET", secret).replace("FILE", str(password_file))
            for word in words]
    env = {k: v for k, v in os.environ.items() if k != "DICOMFS_PASSWORD"}
    if password == "env":
        env["DICOMFS_PASSWORD"] = secret
    started = subprocess.run(
        [sys.executable, "-m", "dicomfs", "mount", url, str(point),
         "--cache-dir", str(tmp_path / "cache"), *argv],
        capture_output=True, text=True, env=env, timeout=120)
    daemons = mount_daemons(point)
    try:
        if started.returncode == 0:
            assert os.listdir(point / "studies") == []  # the server took the secret
            assert len(daemons) == 1, daemons
            assert "--secrets-fd" in daemons[0][1]  # it came through the pipe
        holders = [(pid, what) for pid, what, data in readable_process_texts()
                   if secret.encode() in data]
        assert holders == [], [(pid, what, Path(f"/proc/{pid}/cmdline").read_bytes())
                               for pid, what in holders]
        if case.endswith("(abbreviated)"):
            assert started.returncode == 2, started.stderr
            assert "unrecognized arguments: --bearer" in started.stderr
            assert not is_mounted(point)
        else:
            assert started.returncode == 0, started.stderr
    finally:
        subprocess.run([sys.executable, "-m", "dicomfs", "unmount", str(point)],
                       capture_output=True)
        for pid, _argv in daemons:
            if not wait_gone(pid):
                os.kill(pid, signal.SIGKILL)
        force_unmount(point)
