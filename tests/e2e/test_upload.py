"""Uploads: files copied into /upload are stored on the server with STOW-RS.

Against a real, empty Orthanc (so that what is stored is what these tests sent) and real
FUSE mounts: ``cp`` of one instance and ``cp -r`` / ``rsync -r`` of folders store them
byte-identical (checked through Orthanc's REST API and by reading them back through
/studies), bad files make ``cp`` fail and store nothing, a read-only mount refuses with
EROFS. Against the scripted fake server: a 409 makes ``cp`` fail with the server's
reason in the log, and the STOW-RS request itself (framing, length, retries).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support import LocalOrthanc
from tests.support.fakeserver import serving, stow_refusing
from tests.support.tiny import upload_instance

if TYPE_CHECKING:
    from tests.support.harness import Mount, MountFactory, OrthancFactory

UPLOAD = ["--allow-upload"]


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(word) for word in command], capture_output=True, text=True,
                          timeout=120)


def read_back(mount: Mount, study: str, series: str, sop: str) -> bytes:
    """The instance through the mount's /studies, as any reader would find it."""
    assert study in os.listdir(mount.path / "studies")
    assert series in os.listdir(mount.path / "studies" / study)
    assert f"{sop}.dcm" in os.listdir(mount.path / "studies" / study / series)
    return (mount.path / "studies" / study / series / f"{sop}.dcm").read_bytes()


@pytest.fixture
def server(orthanc_factory: OrthancFactory) -> LocalOrthanc:
    """An empty Orthanc: what it holds afterwards, these tests sent."""
    return orthanc_factory()


def test_cp_stores_an_instance_byte_identical(server: LocalOrthanc, mount_factory: MountFactory,
                                              tmp_path: Path) -> None:
    mount = mount_factory(server.dicomweb_url, args=UPLOAD)
    assert sorted(os.listdir(mount.path)) == ["dates", "patients", "query", "rendered",
                                              "studies", "upload"]
    assert os.listdir(mount.path / "studies") == []  # listed (and cached) before the upload
    study, series, sop, data = upload_instance("cp")
    source = tmp_path / "one.dcm"
    source.write_bytes(data)

    done = run("cp", source, mount.path / "upload")
    assert done.returncode == 0, done.stderr
    assert server.instance_file(sop) == data
    assert os.listdir(mount.path / "upload") == []
    assert read_back(mount, study, series, sop) == data
    assert f"upload /upload/one.dcm stored: instance {sop}" in mount.log()


def test_cp_r_and_rsync_store_folders(server: LocalOrthanc, mount_factory: MountFactory,
                                      tmp_path: Path) -> None:
    mount = mount_factory(server.dicomweb_url, args=UPLOAD)
    sent: dict[str, tuple[str, str, bytes]] = {}
    for tool in ("cp", "rsync"):
        folder = tmp_path / tool / "results"
        (folder / "nested").mkdir(parents=True)
        for n, (series, place) in enumerate([(1, folder), (1, folder), (2, folder / "nested")]):
            study, series_uid, sop, data = upload_instance(tool, series, n + 1)
            (place / f"{n}.dcm").write_bytes(data)
            sent[sop] = (study, series_uid, data)
        command = ["cp", "-r"] if tool == "cp" else ["rsync", "-r"]
        done = run(*command, folder, mount.path / "upload")
        assert done.returncode == 0, done.stderr
        assert os.listdir(mount.path / "upload") == []  # stored files and emptied folders go
    assert server.stored_sop_uids() == set(sent)
    for sop, (study, series, data) in sent.items():
        assert server.instance_file(sop) == data
        assert read_back(mount, study, series, sop) == data


def test_bad_files_are_refused_before_sending(server: LocalOrthanc, mount_factory: MountFactory,
                                              tmp_path: Path) -> None:
    mount = mount_factory(server.dicomweb_url, args=UPLOAD)
    _, _, _, data = upload_instance("bad")
    for name, content in [("notes.dcm", b"not DICOM at all\n" * 100),
                          ("cut.dcm", data[:-17]), ("raw.dcm", data[132 + 200:])]:
        source = tmp_path / name
        source.write_bytes(content)
        done = run("cp", source, mount.path / "upload")
        assert done.returncode != 0, name
        assert os.strerror(errno.EINVAL) in done.stderr
        assert f"upload /upload/{name} not stored: refused before sending" in mount.log()
    assert server.stored_sop_uids() == set()
    # A failed upload stays, with its bytes, until removed.
    upload = mount.path / "upload"
    assert sorted(os.listdir(upload)) == ["cut.dcm", "notes.dcm", "raw.dcm"]
    assert (upload / "cut.dcm").read_bytes() == data[:-17]
    for name in ("cut.dcm", "notes.dcm", "raw.dcm"):
        (upload / name).unlink()
    assert os.listdir(upload) == []


def test_too_large_files_are_refused(server: LocalOrthanc, mount_factory: MountFactory,
                                     tmp_path: Path) -> None:
    mount = mount_factory(server.dicomweb_url, args=[*UPLOAD, "--upload-max-size", "1K"])
    source = tmp_path / "big.dcm"
    source.write_bytes(upload_instance("big")[3] + bytes(1024))
    done = run("cp", source, mount.path / "upload")
    assert done.returncode != 0
    assert os.strerror(errno.EFBIG) in done.stderr
    assert server.stored_sop_uids() == set()


def test_writes_elsewhere_and_without_the_option_are_refused(
        server: LocalOrthanc, mount_factory: MountFactory, tmp_path: Path) -> None:
    source = tmp_path / "one.dcm"
    source.write_bytes(upload_instance("ro")[3])
    read_only = mount_factory(server.dicomweb_url)
    assert "upload" not in os.listdir(read_only.path)
    done = run("cp", source, read_only.path / "upload")
    assert done.returncode != 0
    assert os.strerror(errno.EROFS) in done.stderr
    with pytest.raises(OSError) as refused:
        (read_only.path / "upload" / "folder").mkdir()
    assert refused.value.errno == errno.EROFS

    writable = mount_factory(server.dicomweb_url, args=UPLOAD)
    for target in (writable.path / "studies" / "x.dcm", writable.path / "x.dcm"):
        with pytest.raises(OSError) as refused:
            target.write_bytes(b"x")
        assert refused.value.errno == errno.EROFS
    with pytest.raises(OSError) as refused:
        (writable.path / "upload").rmdir()
    assert refused.value.errno == errno.EROFS
    assert server.stored_sop_uids() == set()


def test_a_409_fails_cp_with_the_reason_in_the_log(mount_factory: MountFactory,
                                                   tmp_path: Path) -> None:
    fake, posts = stow_refusing(409, 0x0111)
    source = tmp_path / "dup.dcm"
    source.write_bytes(upload_instance("conflict")[3])
    with serving(fake):
        mount = mount_factory(fake.url, args=UPLOAD)
        done = run("cp", source, mount.path / "upload")
        assert done.returncode != 0
        assert os.strerror(errno.EEXIST) in done.stderr
        assert "duplicate SOP instance (0x0111)" in mount.log()
        assert len(posts) == 1  # a refusal is not retried
        assert os.listdir(mount.path / "upload") == ["dup.dcm"]
