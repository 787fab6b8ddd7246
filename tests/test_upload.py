"""Uploads: files copied into /upload are stored on the server with STOW-RS.

Against a real, empty Orthanc (so that what is stored is what these tests sent) and real
FUSE mounts: ``cp`` of one instance and ``cp -r`` / ``rsync -r`` of folders store them
byte-identical (checked through Orthanc's REST API and by reading them back through
/studies), bad files make ``cp`` fail and store nothing, a read-only mount refuses with
EROFS. Against the scripted fake server: a 409 makes ``cp`` fail with the server's
reason in the log, and the STOW-RS request itself (framing, length, retries).
"""

from __future__ import annotations

import email.parser
import errno
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dicomfs.cli import build_parser, fuse_helper_argv
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import Conflict, ServerError
from tests.support import LocalOrthanc, demo_uid
from tests.support.fakeserver import FakeServer, Reply, Seen, serving
from tests.support.tiny import tiny_instance

if TYPE_CHECKING:
    from tests.support.harness import Mount, MountFactory, OrthancFactory

UPLOAD = ["--allow-upload"]
JSON = [("Content-Type", "application/dicom+json")]


def instance(name: str, series: int = 1, number: int = 1) -> tuple[str, str, str, bytes]:
    """(study, series, SOP Instance UID, Part 10 bytes) of a new tiny instance."""
    study = demo_uid(f"upload/{name}")
    series_uid = demo_uid(f"upload/{name}/{series}")
    sop = demo_uid(f"upload/{name}/{series}/{number}")
    return study, series_uid, sop, tiny_instance(study_uid=study, series_uid=series_uid,
                                                 sop_uid=sop, instance_number=number)


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
    study, series, sop, data = instance("cp")
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
            study, series_uid, sop, data = instance(tool, series, n + 1)
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
    _, _, _, data = instance("bad")
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
    source.write_bytes(instance("big")[3] + bytes(1024))
    done = run("cp", source, mount.path / "upload")
    assert done.returncode != 0
    assert os.strerror(errno.EFBIG) in done.stderr
    assert server.stored_sop_uids() == set()


def test_writes_elsewhere_and_without_the_option_are_refused(
        server: LocalOrthanc, mount_factory: MountFactory, tmp_path: Path) -> None:
    source = tmp_path / "one.dcm"
    source.write_bytes(instance("ro")[3])
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


def test_fstab_form_takes_the_upload_options() -> None:
    """``mount -t fuse.dicomfs URL DIR -o allow_upload,upload_max_size=1G`` (fstab)."""
    argv = fuse_helper_argv(["http://pacs/dicom-web", "/mnt/pacs", "-o",
                             "rw,allow_upload,upload_max_size=1G,allow_other"])
    args = build_parser().parse_args(argv)
    assert args.allow_upload and args.upload_max_size == 1024**3
    assert args.options == ["allow_other"]


def stow_refusing(status: int, reason_code: int) -> tuple[FakeServer, list[Seen]]:
    """A fake server with no studies that refuses every STOW-RS request."""
    posts: list[Seen] = []

    def app(seen: Seen) -> Reply:
        if seen.method == "POST":
            posts.append(seen)
            sop = demo_uid("upload/conflict/1/1")
            failed = {"00081198": {"vr": "SQ", "Value": [{
                "00081155": {"vr": "UI", "Value": [sop]},
                "00081197": {"vr": "US", "Value": [reason_code]}}]}}
            return Reply(status, JSON, json.dumps(failed).encode())
        return Reply(200, JSON, b"[]")

    fake = FakeServer()
    fake.app = app
    return fake, posts


def test_a_409_fails_cp_with_the_reason_in_the_log(mount_factory: MountFactory,
                                                   tmp_path: Path) -> None:
    fake, posts = stow_refusing(409, 0x0111)
    source = tmp_path / "dup.dcm"
    source.write_bytes(instance("conflict")[3])
    with serving(fake):
        mount = mount_factory(fake.url, args=UPLOAD)
        done = run("cp", source, mount.path / "upload")
        assert done.returncode != 0
        assert os.strerror(errno.EEXIST) in done.stderr
        assert "duplicate SOP instance (0x0111)" in mount.log()
        assert len(posts) == 1  # a refusal is not retried
        assert os.listdir(mount.path / "upload") == ["dup.dcm"]


# -------------------------------------------------------------------- the STOW-RS request


def multipart_parts(seen: Seen) -> list[bytes]:
    """The parts of a multipart/related request body, checked against its headers."""
    assert seen.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    assert int(seen.headers["content-length"]) == len(seen.body)
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + seen.headers["content-type"].encode() + b"\r\n\r\n" + seen.body)
    parts = message.get_payload()
    assert isinstance(parts, list)
    return [part.get_payload(decode=True) for part in parts]


async def test_store_instances_streams_the_files_and_retries_server_errors(
        tmp_path: Path) -> None:
    files = []
    for n in (1, 2):
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(instance("stow", 1, n)[3] * n)  # sizes differ
        files.append(path)
    stored = {"00081199": {"vr": "SQ", "Value": [
        {"00081155": {"vr": "UI", "Value": [demo_uid("upload/stow/1/1")]}}]}}
    with serving() as fake:
        fake.replies(Reply(503, body=b"busy"), Reply(200, JSON, json.dumps(stored).encode()))
        async with DicomwebClient(ClientConfig(base_url=fake.url, retries=1)) as client:
            result = await client.store_instances(files)
        assert result.stored == {demo_uid("upload/stow/1/1")}
        posts = [seen for seen in fake.seen if seen.method == "POST"]
        assert [seen.path for seen in posts] == ["/dicom-web/studies"] * 2
        for seen in posts:  # sent again whole after the 503
            assert multipart_parts(seen) == [path.read_bytes() for path in files]

        fake.replies(Reply(503, body=b"still busy"))
        async with DicomwebClient(ClientConfig(base_url=fake.url, retries=1)) as client:
            with pytest.raises(ServerError, match="still busy"):
                await client.store_instances(files[:1])


async def test_store_instances_reports_the_servers_reasons(tmp_path: Path) -> None:
    path = tmp_path / "one.dcm"
    path.write_bytes(instance("conflict")[3])
    fake, _ = stow_refusing(409, 0xA900)
    with serving(fake):
        async with DicomwebClient(ClientConfig(base_url=fake.url, retries=3)) as client:
            with pytest.raises(Conflict, match="data set does not match SOP class"):
                await client.store_instances([path])
