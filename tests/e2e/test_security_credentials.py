"""Credentials that must not leak, and rotating tokens, with real mounts.

* Orthanc with basic authentication: the password (environment, file) and bearer tokens
  (command line, foreground and background) never show in the filesystem process's command
  line or in its log; a wrong password fails the mount with a message about credentials.
* A token-checking proxy rotating its only valid token every ~1.5 s, and a token command:
  reads go on across rotations, the proxy saw 401s and the command ran again.
* A token file read again on 401 and after its lifetime.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from dicomfs.store import server_folder_name
from tests.support import LocalOrthanc, SampleArchive
from tests.support.fakes import TOKEN_COMMAND, Proxy, TokenGate, wait_until
from tests.support.mounts import force_unmount, is_mounted, run_quietly

if TYPE_CHECKING:
    from tests.support.harness import MountFactory, OrthancFactory


PYTHON = sys.executable


def proc_text(pid: int, name: str) -> str:
    """/proc/<pid>/<name> with NULs as spaces ("" if the process is gone)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        return ""


PASSWORD = "s3cret"


ORTHANC_USERS = {"alice": PASSWORD}


def _auth_orthanc(orthanc_factory: OrthancFactory, archive: SampleArchive) -> LocalOrthanc:
    server = orthanc_factory(users=ORTHANC_USERS)
    mr = archive.series_files(archive.series_uid("mr"))[:5]
    server.upload([archive.path(f) for f in mr], sop_uids=[f.sop_uid for f in mr])
    return server


def _read_some(root: Path, archive: SampleArchive, count: int = 3) -> None:
    for entry in archive.series_files(archive.series_uid("mr"))[:count]:
        path = root / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
        assert path.read_bytes() == archive.read(entry)


def _assert_secret_hidden(pid: int, secrets: Iterable[str], log: str, *,
                          environ: bool = False) -> None:
    """Not in the running process's command line, nor in its log (nor its environment)."""
    if log.startswith("$ "):  # the harness's own record of the command it ran
        log = log.split("\n", 1)[1] if "\n" in log else ""
    cmdline = proc_text(pid, "cmdline")
    assert cmdline, f"process {pid} is gone"
    for secret in secrets:
        assert secret not in cmdline, f"{secret!r} in /proc/{pid}/cmdline: {cmdline}"
        assert secret not in log, f"{secret!r} in the log"
        if environ:
            assert secret not in proc_text(pid, "environ"), f"{secret!r} in its environment"


def test_basic_auth_mounts_without_leaking_the_password(
        orthanc_factory: OrthancFactory, archive: SampleArchive, mount_factory: MountFactory,
        tmp_path: Path) -> None:
    server = _auth_orthanc(orthanc_factory, archive)
    basic = httpx.BasicAuth("alice", PASSWORD)._auth_header.removeprefix("Basic ")
    # From the environment.
    mount = mount_factory(server.dicomweb_url, args=["--user", "alice"],
                          env={"DICOMFS_PASSWORD": PASSWORD})
    _read_some(mount.path, archive)
    _assert_secret_hidden(mount.proc.pid, [PASSWORD, basic], mount.log())
    # From a file.
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    mount = mount_factory(server.dicomweb_url,
                          args=["--user", "alice", "--password-file", str(password_file)])
    _read_some(mount.path, archive)
    _assert_secret_hidden(mount.proc.pid, [PASSWORD, basic], mount.log())
    # In the background, the password from the environment does not reach the filesystem
    # process's environment either.
    with background_mount(server.dicomweb_url, tmp_path / "bg", ["--user", "alice"],
                          env={"DICOMFS_PASSWORD": PASSWORD}) as (pid, mountpoint, log):
        _read_some(mountpoint, archive)
        _assert_secret_hidden(pid, [PASSWORD, basic], log.read_text(), environ=True)


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_wrong_password_fails_clearly(orthanc_factory: OrthancFactory, archive: SampleArchive,
                                      tmp_path: Path, foreground: bool) -> None:
    server = _auth_orthanc(orthanc_factory, archive)
    wrong = "not-the-Pa55word"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "cache"
    command = [PYTHON, "-m", "dicomfs", "mount", server.dicomweb_url, str(mountpoint),
               "--user", "alice", "--cache-dir", str(cache)]
    if foreground:
        command.append("--foreground")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "DICOMFS_PASSWORD": wrong},
                                stdin=subprocess.DEVNULL)
    finally:
        force_unmount(mountpoint)
    assert result.returncode != 0
    assert "credentials" in result.stderr, result.stderr
    assert not is_mounted(mountpoint)
    logs = "".join(p.read_text() for p in cache.rglob("*.log"))
    assert wrong not in result.stdout + result.stderr + logs


TOKEN = "Tok3n-0f-9a7b-secret-d1c0mfs"


API_KEY = "k3y-not-for-your-eyes-51"


class background_mount:  # used like a function
    """``dicomfs mount`` without --foreground: yields (pid of the filesystem process,
    mount point, log file) and unmounts, ending that process, afterwards."""

    def __init__(self, url: str, folder: Path, args: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.url = url
        self.mountpoint = folder / "mnt"
        self.cache = folder / "cache"
        self.args = args
        self.env = env or {}
        self.pid: int | None = None

    def __enter__(self) -> tuple[int, Path, Path]:
        self.mountpoint.mkdir(parents=True)
        command = [PYTHON, "-m", "dicomfs", "mount", self.url, str(self.mountpoint),
                   "--cache-dir", str(self.cache), "--log-level", "debug", *self.args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                    env={**os.environ, **self.env}, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, result.stderr
            self.pid = self._find_pid()
        except BaseException:
            self.__exit__()
            raise
        log = self.cache / server_folder_name(self.url) / "mount.log"
        return self.pid, self.mountpoint, log

    def _find_pid(self) -> int:
        wanted = str(self.mountpoint)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                words = proc_text(int(entry.name), "cmdline").split()
                if "dicomfs" in words and wanted in words and "--foreground" in words:
                    return int(entry.name)
        raise AssertionError(f"no filesystem process for {wanted}")

    def _alive(self) -> bool:
        stat = proc_text(self.pid, "stat") if self.pid else ""
        return bool(stat) and stat.split(") ", 1)[-1][:1] not in ("Z", "X")

    def __exit__(self, *exc: object) -> None:
        if is_mounted(self.mountpoint):
            run_quietly(["fusermount3", "-u", str(self.mountpoint)])
        if self.pid is not None and not wait_until(lambda: not self._alive(), 10):
            os.kill(self.pid, signal.SIGTERM)
            if not wait_until(lambda: not self._alive(), 5):
                os.kill(self.pid, signal.SIGKILL)
        force_unmount(self.mountpoint)


def test_bearer_token_never_on_a_command_line(orthanc: LocalOrthanc, archive: SampleArchive,
                                              mount_factory: MountFactory,
                                              tmp_path: Path) -> None:
    gate = TokenGate(tmp_path / "gate", static=TOKEN)
    with Proxy(orthanc.url, gate) as proxy:
        url = proxy.url("/dicom-web")
        # Foreground: the process re-runs itself without the token before it serves.
        mount = mount_factory(url, args=["--bearer-token", TOKEN, "--header",
                                         f"X-Api-Key: {API_KEY}"])
        _read_some(mount.path, archive)
        _assert_secret_hidden(mount.proc.pid, [TOKEN, API_KEY], mount.log())
        # Background: the filesystem process never had it on its command line.
        with background_mount(url, tmp_path / "bg", ["--bearer-token", TOKEN, "--header",
                                                      f"X-Api-Key: {API_KEY}"]
                              ) as (pid, mountpoint, log):
            _read_some(mountpoint, archive)
            _assert_secret_hidden(pid, [TOKEN, API_KEY], log.read_text(), environ=True)
    assert gate.accepted[TOKEN] > 0
    assert gate.rejections == 0, gate.rejected


def test_rotating_token_from_a_command(orthanc: LocalOrthanc, archive: SampleArchive,
                                       mount_factory: MountFactory, tmp_path: Path) -> None:
    gate = TokenGate(tmp_path / "gate", period=1.5, grace=0.5)
    script = tmp_path / "print_token.py"
    script.write_text(TOKEN_COMMAND)
    command = shlex.join([PYTHON, str(script), str(gate.folder)])
    # Many small series: each read asks the server something new.
    files = [f for f in archive.files if f.label.startswith(("pydicom/", "charset/"))
             and f.size < 400_000]
    with Proxy(orthanc.url, gate) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"), args=["--token-command", command])
        started = time.monotonic()
        read = 0
        for entry in files:
            path = (mount.path / "studies" / entry.study_uid / entry.series_uid
                    / f"{entry.sop_uid}.dcm")
            assert path.read_bytes() == archive.read(entry), (entry.label, mount.log_tail(10))
            read += 1
            if gate.index >= 5:
                break
            time.sleep(0.08)
        log = mount.log()
    print(f"\ntoken rotation: {read} reads in {time.monotonic() - started:.1f} s, tokens up to "
          f"t{gate.index}, accepted {dict(gate.accepted)}, rejected {dict(gate.rejected)}, "
          f"command runs {gate.runs()}")
    assert gate.index >= 4, gate.index
    assert gate.rejections >= 2, gate.rejected  # the proxy refused old tokens...
    assert gate.runs() >= 3  # ...and the command ran again for new ones
    assert len([t for t in gate.accepted if t != "t1"]) >= 2, gate.accepted
    assert "obtained a new access token" in log
    assert not any(f"t{i}" in log.split() for i in range(1, gate.index + 1))


def test_token_file_is_read_again_on_401_and_after_its_lifetime(
        orthanc: LocalOrthanc, archive: SampleArchive, mount_factory: MountFactory,
        tmp_path: Path) -> None:
    gate = TokenGate(tmp_path / "gate", static="first")
    token_file = gate.folder / "token"
    files = iter(sorted({f.series_uid: f for f in archive.files
                         if f.label.startswith("pydicom/")}.values(),
                        key=lambda f: f.sop_uid))  # one per series: each read asks anew

    def read_next() -> None:
        entry = next(files)
        path = mount.path / "studies" / entry.study_uid / entry.series_uid / \
            f"{entry.sop_uid}.dcm"
        assert path.read_bytes() == archive.read(entry)

    with Proxy(orthanc.url, gate) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"), args=[
            "--token-file", str(token_file), "--token-lifetime", "1"])
        read_next()
        # A new token, the old one refused at once: the 401 makes the mount read the file.
        gate.static = "second"
        token_file.write_text("second\n")
        read_next()
        assert gate.rejected["first"] >= 1 and gate.accepted["second"] >= 1
        # A new token in the file while the old one still works: once the lifetime has
        # passed (the behaviour under test is time), the mount uses it without a 401.
        token_file.write_text("third\n")
        time.sleep(1.5)
        gate.static = "third"
        read_next()
    assert gate.accepted["third"] >= 1, gate.accepted
    assert gate.rejected["second"] == 0, gate.rejected
