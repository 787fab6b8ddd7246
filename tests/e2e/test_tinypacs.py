"""The core mount tests on a second, independent server: tiny-pacs-dicomweb.

tiny-pacs offers neither WADO-RS metadata nor ``/rendered``, ignores ``includefield``, answers
204 to an empty search, 406 to a transfer syntax it cannot give, and rewrites the file meta of
what it stores: every instance is compared with its own retrieve answer, fetched directly.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dicomfs import capabilities
from dicomfs.store import server_folder_name
from tests.support import SampleArchive, SampleFile
from tests.support.harness import check_listings_equal_qido, tiny_pacs_files
from tests.support.tinypacs import LocalTinyPacs

if TYPE_CHECKING:
    from tests.support.harness import Mount, MountFactory, TinyPacsFactory

EXPLICIT_LE = "1.2.840.10008.1.2.1"
ROOT_WITHOUT_RENDERED = ["dates", "patients", "query", "studies"]


def instance_path(root: Path, entry: SampleFile) -> Path:
    return root / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"


def served(server: LocalTinyPacs, entry: SampleFile) -> bytes:
    return server.instance_file(entry.study_uid, entry.series_uid, entry.sop_uid)


@pytest.fixture
def tiny_mnt(mount_factory: MountFactory, tiny_pacs: LocalTinyPacs) -> Mount:
    return mount_factory(tiny_pacs.dicomweb_url)


def test_listings_equal_qido(tiny_mnt: Mount, tiny_pacs: LocalTinyPacs,
                             archive: SampleArchive) -> None:
    check_listings_equal_qido(tiny_mnt.path, tiny_pacs.client, metadata=False)
    assert len(os.listdir(tiny_mnt.path / "studies")) == len(
        {f.study_uid for f in tiny_pacs_files(archive)})
    assert sorted(os.listdir(tiny_mnt.path)) == ROOT_WITHOUT_RENDERED


def test_paging(mount_factory: MountFactory, tiny_pacs: LocalTinyPacs,
                archive: SampleArchive) -> None:
    """Pages of 7: the 30-image MR series and the study list take several each."""
    mount = mount_factory(tiny_pacs.dicomweb_url, args=["--page-size", "7"])
    check_listings_equal_qido(mount.path, tiny_pacs.client, metadata=False)
    mr = archive.with_label("mr")
    folder = mount.path / "studies" / mr[0].study_uid / mr[0].series_uid
    assert sorted(os.listdir(folder)) == sorted(f"{f.sop_uid}.dcm" for f in mr)
    assert len(mr) > 4 * 7


def test_empty_answer_is_204(tiny_mnt: Mount, tiny_pacs: LocalTinyPacs) -> None:
    assert tiny_pacs.client.get("/studies", params={"PatientID": "NOBODY"}).status_code == 204
    assert os.listdir(tiny_mnt.path / "query" / "PatientID=NOBODY") == []


def test_every_instance_is_the_servers_own_answer(tiny_mnt: Mount, tiny_pacs: LocalTinyPacs,
                                                  archive: SampleArchive) -> None:
    rewritten = 0
    for entry in tiny_pacs_files(archive):
        own = served(tiny_pacs, entry)
        assert instance_path(tiny_mnt.path, entry).read_bytes() == own, entry.label
        rewritten += own != archive.read(entry)
    assert rewritten, "tiny-pacs no longer rewrites file meta: compare with the archive too"


def test_a_transfer_syntax_it_cannot_give_is_eio(mount_factory: MountFactory,
                                                 tiny_pacs: LocalTinyPacs,
                                                 archive: SampleArchive) -> None:
    """406 for a JPEG 2000 instance asked as explicit VR little endian: EIO, not cached, and
    the mount goes on serving what it can give."""
    mount = mount_factory(tiny_pacs.dicomweb_url, args=["--transfer-syntax", EXPLICIT_LE])
    j2k = archive.with_label("pydicom/MR_small_jp2klossless.dcm")[0]
    plain = archive.with_label("mr")[0]
    assert plain.transfer_syntax == EXPLICIT_LE
    direct = tiny_pacs.client.get(
        f"/studies/{j2k.study_uid}/series/{j2k.series_uid}/instances/{j2k.sop_uid}",
        headers={"Accept": f"application/dicom; transfer-syntax={EXPLICIT_LE}"})
    assert direct.status_code == 406
    for _ in range(2):
        with pytest.raises(OSError) as caught:
            instance_path(mount.path, j2k).read_bytes()
        assert caught.value.errno == errno.EIO
    assert instance_path(mount.path, plain).read_bytes() == served(tiny_pacs, plain)
    assert not list(mount.cache_dir.rglob(f"{j2k.sop_uid}.dcm"))
    assert "406" in mount.log()


def test_bearer_token(mount_factory: MountFactory, tiny_pacs_factory: TinyPacsFactory,
                      archive: SampleArchive, tmp_path: Path) -> None:
    """tiny-pacs offers static bearer tokens (``auth: token``; basic auth needs a user
    registry it does not ship): the right token mounts, none or a wrong one is refused."""
    token = "tiny-pacs-token-5f1c"
    entry = archive.with_label("mr")[0]
    server = tiny_pacs_factory(tokens=[token], load=[entry])
    mount = mount_factory(server.dicomweb_url, args=["--bearer-token", token])
    assert instance_path(mount.path, entry).read_bytes() == served(server, entry)
    for args in ([], ["--bearer-token", "wrong"]):
        point = tmp_path / f"refused{len(args)}"
        point.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "dicomfs", "mount", server.dicomweb_url, str(point),
             "--cache-dir", str(tmp_path / "cache"), *args],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        assert "refused our credentials" in result.stderr


def test_cp_r_and_tar_and_rsync_of_every_study(tiny_mnt: Mount, tiny_pacs: LocalTinyPacs,
                                               tmp_path: Path) -> None:
    """No file is listed that cannot be opened: whole-folder copies exit 0."""
    studies = sorted(os.listdir(tiny_mnt.path / "studies"))
    for n, study in enumerate(studies):
        source = tiny_mnt.path / "studies" / study
        copy = tmp_path / f"cp{n}"
        result = subprocess.run(["cp", "-r", str(source), str(copy)], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        result = subprocess.run(["tar", "-cf", str(tmp_path / f"{n}.tar"), "-C",
                                 str(source.parent), study], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        copied = {p.relative_to(copy) for p in copy.rglob("*") if p.is_file()}
        assert copied and all(p.suffix == ".dcm" for p in copied)
    for tree in ("patients", "dates"):
        result = subprocess.run(["rsync", "-r", f"{tiny_mnt.path / tree}/",
                                 str(tmp_path / tree)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_what_it_offers_is_learned_once(mount_factory: MountFactory,
                                        tiny_pacs: LocalTinyPacs, tmp_path: Path) -> None:
    """No metadata and no /rendered: learned by the first mount, kept (privately) in the
    cache folder, and a later mount asks nothing about it."""
    cache = tmp_path / "shared-cache"
    mark = tiny_pacs.mark()
    first = mount_factory(tiny_pacs.dicomweb_url, cache_dir=cache)
    probes = [r for r in tiny_pacs.requests_since(mark)
              if r.endswith(("/metadata", "/rendered"))]
    assert len(probes) == 2, probes
    note = cache / server_folder_name(tiny_pacs.dicomweb_url) / capabilities.FILE_NAME
    assert json.loads(note.read_text()) == {"metadata": False, "rendered": False}
    assert stat.S_IMODE(note.stat().st_mode) == 0o600
    assert "offers no WADO-RS metadata (metadata.json) and no rendered images" in first.log()
    first.unmount()

    mark = tiny_pacs.mark()
    again = mount_factory(tiny_pacs.dicomweb_url, cache_dir=cache)
    assert sorted(os.listdir(again.path)) == ROOT_WITHOUT_RENDERED
    study = again.path / "studies" / sorted(os.listdir(again.path / "studies"))[0]
    assert "metadata.json" not in os.listdir(study)
    for missing in (study / "metadata.json", again.path / "rendered"):
        with pytest.raises(FileNotFoundError):
            os.stat(missing)
    assert not [r for r in tiny_pacs.requests_since(mark)
                if r.endswith(("/metadata", "/rendered"))]


def test_prefetch_without_metadata(tiny_pacs: LocalTinyPacs, archive: SampleArchive,
                                   tmp_path: Path) -> None:
    mr = archive.with_label("mr")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "dicomfs", "prefetch", tiny_pacs.dicomweb_url,
         mr[0].study_uid, "--cache-dir", str(cache)], capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert "offers no WADO-RS metadata" in result.stderr
    objects = cache / server_folder_name(tiny_pacs.dicomweb_url) / "objects"
    for entry in archive.study_files(mr[0].study_uid):
        cached = objects / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
        assert cached.read_bytes() == served(tiny_pacs, entry)
    assert not list(objects.rglob("metadata.json"))
