"""The harness itself: private Orthanc, request log and mount fixture.

Every other test trusts these pieces, so they are checked against the real Orthanc; the mount
fixture is exercised with a tiny stand-in FUSE filesystem so it is known to work before (and
independently of) dicomfs's own CLI. The sample archive is checked in
tests/unit/test_sample_archive.py.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support import LocalOrthanc, SampleArchive
from tests.support.mounts import is_mounted

if TYPE_CHECKING:
    from tests.support.harness import Mount, MountFactory, OrthancFactory


DICOM_JSON = {"Accept": "application/dicom+json"}


# --------------------------------------------------------------------------- Orthanc


def _values(items: list[dict], tag: str) -> set[str]:
    return {item[tag]["Value"][0] for item in items}


def test_orthanc_has_every_instance(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    with httpx.Client(base_url=orthanc.dicomweb_url, headers=DICOM_JSON, timeout=60) as http:
        studies = http.get("/studies", params={"limit": 10000}).json()
        assert _values(studies, "0020000D") == set(archive.studies)
        for study in studies:
            uid = study["0020000D"]["Value"][0]
            assert study["00201208"]["Value"][0] == archive.studies[uid]
            instances = http.get(f"/studies/{uid}/instances").json()
            assert _values(instances, "00080018") == {f.sop_uid for f in archive.study_files(uid)}
        series = http.get(f"/studies/{archive.study_uid('ct')}/series").json()
        assert _values(series, "0020000E") == {archive.series_uid("ct")}
    assert orthanc.statistics()["CountInstances"] == len(archive.files)


def test_orthanc_names_are_utf8(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    """DefaultEncoding Utf8: non-Latin names must come back intact over QIDO."""
    for label in ("slash-name", "charset/chrRuss.dcm", "charset/chrGreek.dcm"):
        expected = archive.with_label(label)[0]
        answer = httpx.get(
            f"{orthanc.dicomweb_url}/studies",
            params={"StudyInstanceUID": expected.study_uid},
            headers=DICOM_JSON,
        )
        name = answer.json()[0]["00100010"]["Value"][0]["Alphabetic"]
        assert name == expected.patient_name


def test_orthanc_stores_files_unchanged(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    one_per_syntax = {f.transfer_syntax: f for f in archive.files}
    for f in one_per_syntax.values():
        assert orthanc.instance_file(f.sop_uid) == archive.read(f), f.label


def test_requests_since_sees_dicomweb_requests(orthanc: LocalOrthanc,
                                               archive: SampleArchive) -> None:
    study = archive.study_uid("ct")
    mark = orthanc.mark()
    assert orthanc.requests_since(mark) == []
    answer = httpx.get(
        f"{orthanc.dicomweb_url}/studies/{study}/series", params={"limit": 5}, headers=DICOM_JSON
    )
    assert answer.status_code == 200
    assert orthanc.requests_since(mark) == [f"GET /dicom-web/studies/{study}/series"]
    orthanc.statistics()
    assert orthanc.requests_since(mark, prefix="/dicom-web/") == [
        f"GET /dicom-web/studies/{study}/series"
    ]
    assert orthanc.requests_since(mark)[-1] == "GET /statistics"


def test_orthanc_with_authentication(orthanc_factory: OrthancFactory) -> None:
    server = orthanc_factory(users={"alice": "wonderland"})
    assert httpx.get(f"{server.dicomweb_url}/studies").status_code == 401
    assert httpx.get(f"{server.dicomweb_url}/studies", auth=("alice", "nope")).status_code == 401
    ok = httpx.get(f"{server.dicomweb_url}/studies", auth=("alice", "wonderland"))
    assert ok.status_code in (200, 204)
    assert server.statistics()["CountInstances"] == 0


# --------------------------------------------------------------------------- mount fixture

# A read-only FUSE filesystem with one file, taking the same command line as dicomfs mount.
FAKE_DICOMFS = textwrap.dedent(
    """
    import errno, stat, sys
    import pyfuse3, trio

    class Hello(pyfuse3.Operations):
        data = b"hello\\n"

        async def getattr(self, inode, ctx=None):
            entry = pyfuse3.EntryAttributes()
            if inode == pyfuse3.ROOT_INODE:
                entry.st_mode = stat.S_IFDIR | 0o755
            elif inode == 2:
                entry.st_mode, entry.st_size = stat.S_IFREG | 0o444, len(self.data)
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            entry.st_ino = inode
            return entry

        async def lookup(self, parent, name, ctx=None):
            if parent == pyfuse3.ROOT_INODE and name == b"hello.txt":
                return await self.getattr(2)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):
            return inode

        async def readdir(self, fh, start, token):
            if start == 0:
                pyfuse3.readdir_reply(token, b"hello.txt", await self.getattr(2), 1)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh, offset, size):
            return self.data[offset:offset + size]

    args = sys.argv[1:]
    print("fake dicomfs", *args, flush=True)
    mountpoint = args[args.index("mount") + 2]
    pyfuse3.init(Hello(), mountpoint, {"fsname=fakedicomfs", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
    print("fake dicomfs unmounted", flush=True)
    """
)


@pytest.fixture
def fake_dicomfs(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_dicomfs.py"
    script.write_text(FAKE_DICOMFS)
    return [sys.executable, str(script)]


def test_mount_factory_mounts_and_cleans_up(
    mount_factory: MountFactory, fake_dicomfs: list[str], tmp_path: Path
) -> None:
    shared = tmp_path / "shared-cache"
    first = mount_factory(
        "http://127.0.0.1:9/dicom-web",
        cache_dir=shared,
        command=fake_dicomfs,
        args=["--extra", "1"],
    )
    second = mount_factory("http://127.0.0.1:9/dicom-web", cache_dir=shared, command=fake_dicomfs)
    assert first.path != second.path and first.cache_dir == second.cache_dir == shared
    assert (first.path / "hello.txt").read_bytes() == b"hello\n"
    assert os.listdir(second.path) == ["hello.txt"]
    command_line = first.log().splitlines()[0]
    assert "--foreground --cache-dir" in command_line
    assert command_line.endswith("--log-level debug --extra 1")

    first.unmount()
    assert not is_mounted(first.path) and first.proc.poll() is not None
    assert "fake dicomfs unmounted" in first.log()


def test_mount_factory_cleans_up_after_a_killed_daemon(
    mount_factory: MountFactory, fake_dicomfs: list[str]
) -> None:
    mount = mount_factory("http://127.0.0.1:9/dicom-web", command=fake_dicomfs)
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait()
    assert is_mounted(mount.path)  # stale: "transport endpoint is not connected"
    mount.unmount()
    assert not is_mounted(mount.path)


def test_mount_factory_reports_an_early_exit(mount_factory: MountFactory) -> None:
    crash = [sys.executable, "-c", "import sys; print('no such server'); sys.exit(3)"]
    with pytest.raises(pytest.fail.Exception, match=r"status 3(.|\n)*no such server"):
        mount_factory("http://127.0.0.1:9/dicom-web", command=crash, timeout=10)


def test_mnt_mounts_the_session_orthanc(mnt: Mount, orthanc: LocalOrthanc) -> None:
    """The real ``dicomfs mount`` under the fixture: it answers, and its requests are seen."""
    mark = orthanc.mark()
    assert mnt.proc.poll() is None
    names = os.listdir(mnt.path)
    assert names
    for name in names:  # one level down is enough to make dicomfs ask the server something
        if (mnt.path / name).is_dir():
            os.listdir(mnt.path / name)
    assert orthanc.requests_since(mark, prefix="/dicom-web/")
