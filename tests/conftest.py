"""Harness shared by every test: sample archive, private Orthanc, FUSE mounts.

Fixtures:

* ``archive`` (session): the sample archive (:func:`tests.support.build_archive`, 400 CT
  slices), cached across sessions in ``<repo>/.cache/testdata`` (``DICOMFS_TESTDATA`` moves it).
* ``orthanc`` (session): a :class:`~tests.support.LocalOrthanc` with temporary storage, loaded
  with the archive. Fails (never skips) when Orthanc is missing.
* ``orthanc_factory`` (function): more Orthancs, e.g. with ``users=`` for authentication tests.
* ``scale_server`` (session): a private Orthanc holding the generated archive of
  :data:`SCALE_STUDIES` one-instance studies (:mod:`tests.support.scale`), loaded once into
  ``TESTDATA_DIR/scale`` and copied for each session (about 20 s the first time, 2-4 s after).
* ``tiny_pacs`` (session): a second, independent server (:class:`~tests.support.tinypacs.
  LocalTinyPacs`) loaded over STOW-RS with :func:`tiny_pacs_files` of the archive; fails (never
  skips) when tiny-pacs is missing. ``tiny_pacs_factory`` (function) starts more, e.g. with
  ``tokens=`` for bearer-token authentication.
* ``mount_factory`` (function): ``mount_factory(url=None, *, cache_dir=None, args=())`` runs
  ``python -m dicomfs mount URL MOUNTPOINT --foreground --cache-dir ... --log-level debug``
  and returns a :class:`Mount` once the mount answers; every mount is torn down afterwards,
  even when the test failed, and its log is attached to the failure report.
* ``mnt`` (function): one default mount of the session Orthanc.
* ``link_factory`` (function): ``link_factory(url, delay=0.020, rate=25e6)`` starts a
  :class:`~tests.support.netem.LinkProxy` (an emulated network link) in front of ``url``;
  mount ``link.url()`` and read ``link.counters``. Every link is stopped after the test.

FUSE is required: the session stops at once, with a non-zero status, without /dev/fuse or
fusermount3. Tests are never skipped for a missing tool: a green run means they all ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests.support import LocalOrthanc, OrthancError, SampleArchive, SampleFile, build_archive
from tests.support.mounts import force_unmount, is_mounted, run_quietly
from tests.support.netem import LinkProxy
from tests.support.orthanc import find_orthanc
from tests.support.scale import copied_scale_orthanc
from tests.support.tinypacs import LocalTinyPacs, TinyPacsError

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA_DIR = Path(os.environ.get("DICOMFS_TESTDATA") or REPO_ROOT / ".cache" / "testdata")
CT_SLICES = 400
SCALE_STUDIES = 3000  # enough for paged listings (page size 1000) and sparse days
MOUNT_TIMEOUT = 20.0


# --------------------------------------------------------------------------- session checks


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop before any test when FUSE is unusable: every later failure would be noise."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse does not exist (FUSE kernel support missing in this machine)")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (Debian package 'fuse3'; scripts/test)")
    if problems:
        pytest.exit("dicomfs tests need FUSE: " + "; ".join(problems), returncode=3)


# --------------------------------------------------------------------------- archive, Orthanc


@pytest.fixture(scope="session")
def archive() -> SampleArchive:
    """The sample archive, built once and reused by later sessions."""
    return build_archive(TESTDATA_DIR, ct_slices=CT_SLICES)


def _start_orthanc(storage: Path, **kwargs: Any) -> LocalOrthanc:
    if find_orthanc() is None:
        pytest.fail(
            "Orthanc is not installed: run scripts/test (installs Debian 'orthanc "
            "orthanc-dicomweb') or apt-get install them",
            pytrace=False,
        )
    server = LocalOrthanc(storage, **kwargs)
    try:
        return server.start()
    except OrthancError as exc:
        pytest.fail(f"Orthanc did not start: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def orthanc(archive: SampleArchive,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    """A private Orthanc holding the whole archive, for the whole session."""
    server = _start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        server.load_archive(archive)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def scale_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    """A private Orthanc holding the generated archive of SCALE_STUDIES studies."""
    if find_orthanc() is None:
        pytest.fail("Orthanc is not installed: run scripts/test or apt-get install orthanc "
                    "orthanc-dicomweb", pytrace=False)
    try:
        with copied_scale_orthanc(TESTDATA_DIR / "scale", SCALE_STUDIES,
                                  tmp_path_factory.mktemp("scale")) as server:
            yield server
    except OrthancError as exc:
        pytest.fail(f"the scale Orthanc did not start or load: {exc}", pytrace=False)


class OrthancFactory(Protocol):
    def __call__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        load: SampleArchive | None = None,
    ) -> LocalOrthanc: ...


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Start extra Orthancs (empty unless ``load=archive``); all stopped after the test."""
    servers: list[LocalOrthanc] = []

    def factory(
        *,
        users: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        load: SampleArchive | None = None,
    ) -> LocalOrthanc:
        server = _start_orthanc(tmp_path / f"orthanc{len(servers)}", users=users, config=config)
        servers.append(server)
        if load is not None:
            server.load_archive(load)
        return server

    yield factory
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------- tiny-pacs

BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def tiny_pacs_files(archive: SampleArchive) -> list[SampleFile]:
    """What the tiny-pacs fixtures load: every study of the archive (the MR series to page
    through, the non-ASCII names, every transfer syntax it stores) but the 200 MB CT series,
    which pages no better and would slow the suite, deflated objects, which tiny-pacs
    refuses over STOW-RS (409), and raw big-endian datasets, which it wraps in a file meta
    saying explicit VR little endian: an object neither pydicom nor dicomfs can read
    (dicomfs answers EIO for it)."""
    return [f for f in archive.files if f.label != "ct" and f.transfer_syntax != DEFLATED
            and not (f.transfer_syntax == BIG_ENDIAN and archive.read(f)[128:132] != b"DICM")]


def _start_tiny_pacs(storage: Path, tokens: Sequence[str] = ()) -> LocalTinyPacs:
    server = LocalTinyPacs(storage, tokens=tokens)
    try:
        return server.start()
    except TinyPacsError as exc:
        pytest.fail(f"tiny-pacs did not start: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_pacs(archive: SampleArchive, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[LocalTinyPacs]:
    """A private tiny-pacs holding :func:`tiny_pacs_files`, for the whole session."""
    server = _start_tiny_pacs(tmp_path_factory.mktemp("tiny-pacs"))
    try:
        server.upload(archive.path(f) for f in tiny_pacs_files(archive))
        yield server
    finally:
        server.stop()


class TinyPacsFactory(Protocol):
    def __call__(self, *, tokens: Sequence[str] = (),
                 load: Sequence[SampleFile] = ()) -> LocalTinyPacs: ...


@pytest.fixture
def tiny_pacs_factory(archive: SampleArchive, tmp_path: Path) -> Iterator[TinyPacsFactory]:
    """Start extra tiny-pacs servers holding ``load``; all stopped after the test."""
    servers: list[LocalTinyPacs] = []

    def factory(*, tokens: Sequence[str] = (),
                load: Sequence[SampleFile] = ()) -> LocalTinyPacs:
        server = _start_tiny_pacs(tmp_path / f"tiny-pacs{len(servers)}", tokens)
        servers.append(server)
        server.upload(archive.path(f) for f in load)
        return server

    yield factory
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------- mounts


def _answers(path: Path, timeout: float) -> bool:
    """``os.path.ismount(path)`` without hanging the test on a daemon that never answers."""
    result: list[bool] = []
    probe = threading.Thread(target=lambda: result.append(os.path.ismount(path)), daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(result and result[0])


@dataclass
class Mount:
    """A running ``dicomfs mount`` process and its mount point."""

    path: Path
    proc: subprocess.Popen[bytes]
    cache_dir: Path
    log_path: Path
    url: str
    args: tuple[str, ...]
    _closed: bool = field(default=False, repr=False)

    def log(self) -> str:
        """Everything the mount process printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def unmount(self) -> None:
        """Unmount and end the process; idempotent; never leaves a mount behind.

        Order: a normal ``fusermount3 -u`` (the daemon sees it and exits by itself), then
        SIGTERM, then SIGKILL, then ``fusermount3 -u -z`` / ``umount -l`` of whatever is left.
        """
        if self._closed:
            return
        self._closed = True
        if is_mounted(self.path):
            run_quietly(["fusermount3", "-u", str(self.path)])
        _end_process(self.proc)
        if not force_unmount(self.path):
            raise RuntimeError(f"{self.path} is still mounted after every way to unmount it")


def _end_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    for step in (None, proc.terminate, proc.kill):
        if step is not None:
            step()
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


MOUNTS_KEY = pytest.StashKey[list[Mount]]()


class MountFactory(Protocol):
    def __call__(
        self,
        url: str | None = None,
        *,
        cache_dir: Path | None = None,
        args: Sequence[str] = (),
        mountpoint: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = MOUNT_TIMEOUT,
        command: Sequence[str] | None = None,
    ) -> Mount: ...


@pytest.fixture
def mount_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MountFactory]:
    """Start ``dicomfs mount`` processes; all unmounted and ended after the test.

    ``url`` defaults to the session Orthanc's DICOMweb root. ``cache_dir`` may be shared by
    two mounts; by default each mount gets its own. ``args`` are extra CLI arguments, ``env``
    extra environment variables. ``command`` replaces ``[python, -m, dicomfs]`` (harness tests).
    """
    mounts: list[Mount] = []
    request.node.stash[MOUNTS_KEY] = mounts

    def factory(
        url: str | None = None,
        *,
        cache_dir: Path | None = None,
        args: Sequence[str] = (),
        mountpoint: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = MOUNT_TIMEOUT,
        command: Sequence[str] | None = None,
    ) -> Mount:
        if url is None:
            url = request.getfixturevalue("orthanc").dicomweb_url
        work = tmp_path / f"mount{len(mounts)}"
        work.mkdir()
        path = Path(mountpoint) if mountpoint else work / "mnt"
        path.mkdir(parents=True, exist_ok=True)
        cache = Path(cache_dir) if cache_dir else work / "cache"
        log_path = work / "dicomfs.log"
        argv = [*(command or [sys.executable, "-m", "dicomfs"]), "mount", url, str(path)]
        argv += ["--foreground", "--cache-dir", str(cache), "--log-level", "debug", *args]
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
        )
        with open(log_path, "wb") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
                env=child_env,
            )
        mount = Mount(path, proc, cache, log_path, url, tuple(args))
        mounts.append(mount)  # before waiting: a failed start is torn down and reported too
        _wait_for_mount(mount, timeout)
        return mount

    yield factory
    errors = []
    for mount in reversed(mounts):
        try:
            mount.unmount()
        except RuntimeError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


def _wait_for_mount(mount: Mount, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if mount.proc.poll() is not None:
            pytest.fail(
                f"dicomfs mount exited with status {mount.proc.returncode} before "
                f"{mount.path} was mounted; its log:\n{mount.log_tail()}",
                pytrace=False,
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if is_mounted(mount.path) and _answers(mount.path, remaining):
            return
        time.sleep(0.05)
    pytest.fail(
        f"{mount.path} not mounted after {timeout:.0f} s; dicomfs log:\n{mount.log_tail()}",
        pytrace=False,
    )


@pytest.fixture
def mnt(mount_factory: MountFactory) -> Mount:
    """The session Orthanc mounted with default options."""
    return mount_factory()



# --------------------------------------------------------------------------- server truth


def qido_uids(client: httpx.Client | str, path: str, key: str) -> set[str]:
    """The UIDs a QIDO-RS search answers (``client`` on the DICOMweb root, or its URL): the
    server's truth a listing must match. 204 and ``[]`` both mean none."""
    answer = (httpx.get(client + path, params={"limit": "100000"}) if isinstance(client, str)
              else client.get(path, params={"limit": "100000"}))
    answer.raise_for_status()
    return {item[key]["Value"][0] for item in answer.json()} if answer.content else set()


def check_listings_equal_qido(root: Path, client: httpx.Client | str, *,
                              metadata: bool) -> None:
    """Every folder of ``root/studies`` lists what QIDO answers, and ``metadata.json`` in
    each study and series folder exactly when ``metadata`` (the server offers it)."""
    extra = {"metadata.json"} if metadata else set()
    studies = qido_uids(client, "/studies", "0020000D")
    assert studies
    assert set(os.listdir(root / "studies")) == studies
    for study in studies:
        series = qido_uids(client, f"/studies/{study}/series", "0020000E")
        assert set(os.listdir(root / "studies" / study)) == series | extra
        for one in series:
            instances = qido_uids(client, f"/studies/{study}/series/{one}/instances",
                                  "00080018")
            names = set(os.listdir(root / "studies" / study / one))
            assert names == {f"{uid}.dcm" for uid in instances} | extra


# --------------------------------------------------------------------------- emulated links


class LinkFactory(Protocol):
    def __call__(self, target: str, *, delay: float = 0.0,
                 rate: float | None = None) -> LinkProxy: ...


@pytest.fixture
def link_factory() -> Iterator[LinkFactory]:
    """Start link-emulating proxies (one-way ``delay`` in seconds, ``rate`` in bytes/s per
    connection, None for no cap) in front of a URL or ``host:port``; all stopped after the
    test."""
    links: list[LinkProxy] = []

    def factory(target: str, *, delay: float = 0.0, rate: float | None = None) -> LinkProxy:
        link = LinkProxy(target, delay=delay, rate=rate).start()
        links.append(link)
        return link

    yield factory
    for link in links:
        link.stop()


# --------------------------------------------------------------------------- failure reports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the log tail of every mount a failing test used to its report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for mount in item.stash.get(MOUNTS_KEY, []):
            report.sections.append((f"dicomfs log {mount.path} ({report.when})", mount.log_tail()))
