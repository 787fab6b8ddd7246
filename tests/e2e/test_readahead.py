"""Read-ahead and the fetch engine on real mounts of the session Orthanc.

Asserted: what the server was asked for (its own request log) against what was
read, and every byte read; never how long it took.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LocalOrthanc, SampleArchive
from tests.support.harness import LinkFactory, MountFactory
from tests.support.sample import SampleFile

INSTANCE = re.compile(r"GET /dicom-web/studies/[0-9.]+/series/[0-9.]+/instances/([0-9.]+)$")
SERIES = re.compile(r"GET /dicom-web/studies/[0-9.]+/series/[0-9.]+$")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 60 MB filesystem of its own (tmpfs), as a nearly full disk for the cache."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m,mode=0700", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def by_name(files: list[SampleFile]) -> list[SampleFile]:
    """In the order a shell glob (``cat *.dcm``) opens them."""
    return sorted(files, key=lambda entry: entry.sop_uid + ".dcm")


def path_of(root: Path, entry: SampleFile) -> Path:
    return root / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"


def test_nearly_full_disk_fetches_about_what_is_read(
        mount_factory: MountFactory, archive: SampleArchive, orthanc: LocalOrthanc,
        small_disk: Path) -> None:
    """A 60 MB disk under a 210 MB series: reading 100 of its files in a row costs the
    server about those 100 files, not the series again and again (read-ahead stays
    within what the disk can keep, and never fetches again what it fetched)."""
    series = archive.series_files(archive.series_uid("ct"))
    read = by_name(series)[:100]
    sizes = {entry.sop_uid: entry.size for entry in series}
    mount = mount_factory(cache_dir=small_disk / "cache")
    mark = orthanc.mark()
    for entry in read:
        assert path_of(mount.path, entry).read_bytes() == archive.read(entry), entry.sop_uid
    mount.unmount()  # ends every transfer: what was asked for is all in the log now
    requests = orthanc.requests_since(mark)
    asked = [m.group(1) for r in requests if (m := INSTANCE.fullmatch(r))]
    streams = [r for r in requests if SERIES.fullmatch(r)]
    sent = sum(sizes[uid] for uid in asked) + len(streams) * sum(sizes.values())
    wanted = sum(entry.size for entry in read)
    print(f"read {wanted} bytes; server asked for {sent} ({sent / wanted:.2f}x): "
          f"{len(asked)} instances ({len(set(asked))} distinct), {len(streams)} series")
    assert streams == []  # the series does not fit: no stream of it
    assert len(asked) == len(set(asked))  # nothing fetched twice
    assert {entry.sop_uid for entry in read} <= set(asked)
    assert sent <= 1.2 * wanted


def test_long_link_walk_runs_parallel_instance_requests(
        mount_factory: MountFactory, archive: SampleArchive, orthanc: LocalOrthanc,
        link_factory: LinkFactory) -> None:
    """Across a long link (20 ms one way, 25 MB/s per connection) a series walk is
    fetched in parallel instance requests on several connections, each file once and
    none beyond what is read plus the read-ahead window, every byte right."""
    series = archive.series_files(archive.series_uid("ct"))
    read = by_name(series)[:60]
    link = link_factory(orthanc.url, delay=0.020, rate=25e6)
    mount = mount_factory(link.url("/dicom-web"))
    link.reset()
    for entry in read:
        assert path_of(mount.path, entry).read_bytes() == archive.read(entry), entry.sop_uid
    mount.unmount()
    lines = link.counters.request_lines
    asked = [m.group(1) for line in lines
             if (m := INSTANCE.fullmatch(line.removesuffix(" HTTP/1.1")))]
    print(f"{len(lines)} requests on {link.counters.connections} connections; "
          f"{len(asked)} instances for {len(read)} read; {link.counters.bytes_down} bytes")
    assert not any(SERIES.fullmatch(line.removesuffix(" HTTP/1.1")) for line in lines)
    assert len(asked) == len(set(asked))  # each instance once
    assert {entry.sop_uid for entry in read} <= set(asked)
    assert len(asked) <= len(read) + 32  # at most the window (2 x 16 connections) beyond
    assert link.counters.connections >= 4  # in parallel
