"""The read-through cache's own promises: shared answers, listings, cache-folder failures."""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import pytest
import trio

from dicomfs import dicomjson
from dicomfs.archive import Archive
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.store import Store, server_folder_name
from tests.support import SampleArchive
from tests.support.fakeserver import Reply, Seen, element, serving
from tests.support.harness import MountFactory

STUDY = "1.2.826.0.1.9"


def studies_app(delay: float = 0.0):  # type: ignore[no-untyped-def]
    def app(seen: Seen) -> Reply:
        time.sleep(delay)
        return Reply(200, [("Content-Type", "application/dicom+json")],
                     json.dumps([element(dicomjson.STUDY_UID, STUDY)]).encode())
    return app


async def test_a_waiter_outlives_a_cancelled_owner(tmp_path: Path) -> None:
    """Two readers ask for one listing; the first gives up (its request is cancelled).
    The second gets the listing, never the first one's Cancelled."""
    with serving() as server:
        server.app = studies_app(delay=0.3)
        config = ClientConfig(base_url=server.url, retries=0)
        async with DicomwebClient(config) as client:
            archive = Archive(client, Store(tmp_path / "cache"))
            got: list[list[dicomjson.Dataset]] = []

            async def waiter() -> None:
                got.append(await archive.studies())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)  # runs once the owner below waits for its answer
                with trio.move_on_after(0.1):
                    await archive.studies()
    assert [dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in got[0]] == [STUDY]


async def test_a_listing_is_never_empty_because_its_ttl_ran_out(tmp_path: Path) -> None:
    """With a TTL shorter than the request, the answer must still be the listing (the
    cache entry it was kept in has already expired when it is handed out)."""
    with serving() as server:
        server.app = studies_app()
        async with DicomwebClient(ClientConfig(base_url=server.url, retries=0)) as client:
            archive = Archive(client, Store(tmp_path / "cache"), listing_ttl=1e-9)
            found = await archive.studies()
    assert [dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in found] == [STUDY]


def test_a_cache_folder_removed_under_a_live_mount_gives_eio(
        mount_factory: MountFactory, archive: SampleArchive) -> None:
    """``rm -rf`` of the cache folder (or ``dicomfs cache clear``) while mounted: an
    uncached file then fails with EIO (the file exists, the cache failed), never with
    ENOENT, which the kernel would remember as "no such file"."""
    entry = archive.series_files(archive.series_uid("mr"))[3]
    mount = mount_factory()
    path = mount.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
    assert path.stat().st_size > 0  # the name is known
    shutil.rmtree(mount.cache_dir / server_folder_name(mount.url))
    with pytest.raises(OSError) as caught:
        path.read_bytes()
    assert caught.value.errno == errno.EIO
    assert mount.proc.poll() is None
