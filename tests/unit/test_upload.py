"""Uploads without a mount: the fstab form of the upload options, and the STOW-RS request
itself against the scripted fake server (framing, length, retries, the server's reasons)."""

from __future__ import annotations

import email.parser
import json
from pathlib import Path

import pytest

from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import Conflict, ServerError
from dicomfs.options import build_parser, fuse_helper_argv
from tests.support import demo_uid
from tests.support.fakeserver import Reply, Seen, serving, stow_refusing
from tests.support.tiny import upload_instance

JSON = [("Content-Type", "application/dicom+json")]


def test_fstab_form_takes_the_upload_options() -> None:
    """``mount -t fuse.dicomfs URL DIR -o allow_upload,upload_max_size=1G`` (fstab)."""
    argv = fuse_helper_argv(["http://pacs/dicom-web", "/mnt/pacs", "-o",
                             "rw,allow_upload,upload_max_size=1G,allow_other"])
    args = build_parser().parse_args(argv)
    assert args.allow_upload and args.upload_max_size == 1024**3
    assert args.options == ["allow_other"]


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
        path.write_bytes(upload_instance("stow", 1, n)[3] * n)  # sizes differ
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
    path.write_bytes(upload_instance("conflict")[3])
    fake, _ = stow_refusing(409, 0xA900)
    with serving(fake):
        async with DicomwebClient(ClientConfig(base_url=fake.url, retries=3)) as client:
            with pytest.raises(Conflict, match="data set does not match SOP class"):
                await client.store_instances([path])
