"""Latency on real mounts: files readable while they arrive, paths opened in few requests.

Asserted: what the server was asked for and sent (its request log, a proxy's byte
count), what the reader got, what the cache kept; never how long anything took.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomfs.store import server_folder_name
from tests.support import LocalOrthanc, SampleArchive, demo_uid
from tests.support.fakes import Cut, Forward, Proxy, Request, wait_until
from tests.support.harness import LinkFactory, MountFactory

MiB = 1024 * 1024
FRAMES = 160  # 160 frames of 512 x 512 x 2 bytes: an 84 MB multi-frame instance


@pytest.fixture(scope="module")
def big_instance(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    """A multi-frame CT object of 84 MB (breast tomosynthesis and enhanced CT objects
    are of this kind; whole-slide images are larger)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = demo_uid("streaming/big/instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, demo_uid(
        "streaming/big/instance")
    ds.StudyInstanceUID = demo_uid("streaming/big/study")
    ds.SeriesInstanceUID = demo_uid("streaming/big/series")
    ds.PatientName, ds.PatientID, ds.Modality = "Big^Object", "BIG-1", "CT"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    pixels = np.random.default_rng(7).integers(0, 4000, size=(FRAMES, 512, 512),
                                                 dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


@pytest.fixture
def big_on_orthanc(orthanc: LocalOrthanc, big_instance: tuple[Path, Dataset]
                   ) -> Iterator[tuple[Path, Dataset]]:
    path, ds = big_instance
    orthanc.upload([path], sop_uids=[ds.SOPInstanceUID])
    yield path, ds


def mounted_path(root: Path, ds: Dataset) -> Path:
    return (root / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm")


def cached(mount_cache: Path, url: str) -> list[Path]:
    return list((mount_cache / server_folder_name(url) / "objects").rglob("*.dcm"))


def test_first_bytes_of_a_big_file_come_before_the_rest_and_closing_stops_it(
        mount_factory: MountFactory, orthanc: LocalOrthanc, link_factory: LinkFactory,
        big_on_orthanc: tuple[Path, Dataset]) -> None:
    """``head -c 64K`` of an 84 MB instance over a 25 MB/s link: the bytes are right,
    the transfer stops once the reader has closed (the server sent a fraction), and
    nothing partial is cached; opened again, it is read whole and identical."""
    path, ds = big_on_orthanc
    data = path.read_bytes()
    link = link_factory(orthanc.url, delay=0.005, rate=25e6)
    url = link.url("/dicom-web")
    mount = mount_factory(url)
    target = mounted_path(mount.path, ds)
    link.reset()
    with open(target, "rb") as f:
        assert f.read(64 * 1024) == data[:64 * 1024]
    folder = mount.cache_dir / server_folder_name(url) / "tmp"
    assert wait_until(lambda: not any(folder.iterdir()), 20), list(folder.iterdir())
    sent = link.counters.bytes_down
    print(f"first 64 KiB of {len(data)} bytes: the server sent {sent}")
    assert sent < len(data) // 2  # stopped early (a plain download sends it all)
    assert cached(mount.cache_dir, url) == []  # a partial file is never cached
    assert target.read_bytes() == data  # a later open reads it whole
    assert wait_until(lambda: len(cached(mount.cache_dir, url)) == 1, 20)  # and keeps it


def test_a_stat_then_read_tool_copies_the_whole_file(
        mount_factory: MountFactory, big_on_orthanc: tuple[Path, Dataset],
        tmp_path: Path) -> None:
    """``cp`` takes the size from stat (an estimate before the first open); the copy is
    whole all the same, and the size is exact from the open on."""
    path, ds = big_on_orthanc
    mount = mount_factory()
    target = mounted_path(mount.path, ds)
    estimate = target.stat().st_size
    copy = tmp_path / "copy.dcm"
    subprocess.run(["cp", str(target), str(copy)], check=True)
    assert copy.read_bytes() == path.read_bytes()
    assert target.stat().st_size == path.stat().st_size != estimate


def test_a_transfer_cut_mid_file_gives_eio_and_caches_nothing(
        mount_factory: MountFactory, orthanc: LocalOrthanc,
        big_on_orthanc: tuple[Path, Dataset]) -> None:
    """The server's answer breaks at 40 %: the bytes before are right, a read of the
    first missing byte fails with EIO, never a wrong byte, and nothing is cached."""
    path, ds = big_on_orthanc
    data = path.read_bytes()

    def policy(request: Request) -> Cut | Forward:
        if request.target.split("?")[0].endswith(ds.SOPInstanceUID):
            return Cut(fraction=0.4, limit=0)
        return Forward()

    with Proxy(orthanc.url, policy) as proxy:
        url = proxy.url("/dicom-web")
        mount = mount_factory(url, args=["--retries", "0"])
        with open(mounted_path(mount.path, ds), "rb") as f:
            head = f.read(MiB)
            assert head == data[:MiB]
            with pytest.raises(OSError) as caught:
                f.read()
        assert caught.value.errno == errno.EIO
        assert cached(mount.cache_dir, url) == []


def test_opening_a_path_asks_two_round_trips_of_requests(
        mount_factory: MountFactory, orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    """On a fresh mount, ``open`` of /studies/S/SE/I.dcm asks: the study (and, at the
    same time, its series listing), then the instance (and, at the same time, its
    retrieve); no series query of its own, and each thing once."""
    entry = archive.series_files(archive.series_uid("ct"))[137]
    mount = mount_factory()
    mark = orthanc.mark()
    path = mount.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
    assert path.read_bytes()[:132] == archive.read(entry)[:132]
    requests = orthanc.requests_since(mark)
    study = f"GET /dicom-web/studies/{entry.study_uid}"
    assert sorted(requests) == sorted([
        "GET /dicom-web/studies",  # the study, by StudyInstanceUID
        f"{study}/series",  # its series listing, alongside
        f"{study}/series/{entry.series_uid}/instances",  # the instance, by SOPInstanceUID
        f"{study}/series/{entry.series_uid}/instances/{entry.sop_uid}",  # its retrieve
    ]), requests
