"""Harness of the end-to-end tests: private Orthanc and tiny-pacs servers, FUSE mounts.

Fixtures:

* ``orthanc`` (session): a :class:`~tests.support.LocalOrthanc` with temporary storage, loaded
  with the archive. Fails (never skips) when Orthanc is missing.
* ``orthanc_factory`` (function): more Orthancs, e.g. with ``users=`` for authentication tests.
* ``tiny_pacs`` (session): a second, independent server (:class:`~tests.support.tinypacs.
  LocalTinyPacs`) loaded over STOW-RS with :func:`~tests.support.harness.tiny_pacs_files` of
  the archive; fails (never skips) when tiny-pacs is missing. ``tiny_pacs_factory``
  (function) starts more, e.g. with ``tokens=`` for bearer-token authentication.
* ``mount_factory`` (function): ``mount_factory(url=None, *, cache_dir=None, args=())`` runs
  ``python -m dicomfs mount URL MOUNTPOINT --foreground --cache-dir ... --log-level debug``
  and returns a :class:`~tests.support.harness.Mount` once the mount answers; every mount is
  torn down afterwards, even when the test failed, and its log is attached to the failure
  report.
* ``mnt`` (function): one default mount of the session Orthanc.
* ``link_factory`` (tests/conftest.py): emulated network links in front of a server.

FUSE is required: every test here fails (never skips) without a usable /dev/fuse or without
fusermount3; tests/unit does not need them. Tests are never skipped for a missing tool: a
green run means they all ran.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support import LocalOrthanc, OrthancError, SampleArchive, SampleFile
from tests.support.harness import (
    MOUNT_TIMEOUT,
    TESTDATA_DIR,
    Mount,
    MountFactory,
    OrthancFactory,
    TinyPacsFactory,
    tiny_pacs_files,
)
from tests.support.mounts import MountError, mount_dicomfs
from tests.support.orthanc import find_orthanc
from tests.support.scale import TEST_STUDIES, copied_scale_orthanc
from tests.support.tinypacs import LocalTinyPacs, TinyPacsError

# --------------------------------------------------------------------------- FUSE


def fuse_problems() -> list[str]:
    """Why this machine cannot mount a FUSE filesystem (empty when it can)."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse does not exist (FUSE kernel support missing in this machine)")
    elif not os.access("/dev/fuse", os.R_OK | os.W_OK):
        problems.append("/dev/fuse is not readable and writable by this user")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is not installed (Debian package 'fuse3'; scripts/test)")
    return problems


@pytest.fixture(scope="session", autouse=True)
def fuse() -> None:
    """Fail every end-to-end test at once when FUSE is unusable: every later failure would
    be noise. A session fixture that fails fails each test using it (never skips it)."""
    problems = fuse_problems()
    if problems:
        pytest.fail("dicomfs end-to-end tests need FUSE: " + "; ".join(problems), pytrace=False)


# --------------------------------------------------------------------------- archive, Orthanc


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
def scale_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    """A private Orthanc holding the generated archive of TEST_STUDIES one-instance studies
    (tests/support/scale.py), loaded once into TESTDATA_DIR/scale and copied per session."""
    if find_orthanc() is None:
        pytest.fail("Orthanc is not installed: run scripts/test or apt-get install orthanc "
                    "orthanc-dicomweb", pytrace=False)
    try:
        with copied_scale_orthanc(TESTDATA_DIR / "scale", TEST_STUDIES,
                                  tmp_path_factory.mktemp("scale")) as server:
            yield server
    except OrthancError as exc:
        pytest.fail(f"the scale Orthanc did not start or load: {exc}", pytrace=False)


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

MOUNTS_KEY = pytest.StashKey[list[Mount]]()


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
        try:
            mount = mount_dicomfs(
                url,
                Path(mountpoint) if mountpoint else work / "mnt",
                cache_dir=Path(cache_dir) if cache_dir else work / "cache",
                log_path=work / "dicomfs.log",
                args=["--log-level", "debug", *args],
                env=env,
                timeout=timeout,
                command=command,
            )
        except MountError as exc:  # the helper has torn the failed start down
            pytest.fail(str(exc), pytrace=False)
        mounts.append(mount)
        return mount

    yield factory
    errors = []
    for mount in reversed(mounts):
        try:
            mount.unmount()
        except MountError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


@pytest.fixture
def mnt(mount_factory: MountFactory) -> Mount:
    """The session Orthanc mounted with default options."""
    return mount_factory()


# --------------------------------------------------------------------------- failure reports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the log tail of every mount a failing test used to its report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for mount in item.stash.get(MOUNTS_KEY, []):
            report.sections.append((f"dicomfs log {mount.path} ({report.when})", mount.log_tail()))
