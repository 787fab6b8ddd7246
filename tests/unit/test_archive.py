"""The read-through cache's own promises against a scripted server: shared answers, listings."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import trio

from dicomfs import dicomjson
from dicomfs.archive import Archive
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.store import Store
from tests.support.fakeserver import Reply, Seen, element, serving

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
        async with DicomwebClient(config) as client, trio.open_nursery() as running:
            archive = Archive(client, Store(tmp_path / "cache"))
            await running.start(archive.run)
            got: list[list[dicomjson.Dataset]] = []

            async def waiter() -> None:
                got.append(await archive.studies())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)  # runs once the owner below waits for its answer
                with trio.move_on_after(0.1):
                    await archive.studies()
            running.cancel_scope.cancel()
    assert [dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in got[0]] == [STUDY]


async def test_a_listing_is_never_empty_because_its_ttl_ran_out(tmp_path: Path) -> None:
    """With a TTL shorter than the request, the answer must still be the listing (the
    cache entry it was kept in has already expired when it is handed out)."""
    with serving() as server:
        server.app = studies_app()
        async with DicomwebClient(ClientConfig(base_url=server.url, retries=0)) as client, \
                trio.open_nursery() as running:
            archive = Archive(client, Store(tmp_path / "cache"), listing_ttl=1e-9)
            await running.start(archive.run)
            found = await archive.studies()
            running.cancel_scope.cancel()
    assert [dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in found] == [STUDY]




async def test_a_saved_listing_standing_in_offline_keeps_its_age(tmp_path: Path) -> None:
    """Offline, an old saved listing is served; it must not come back as a young one
    (which would keep later mounts from asking the server for a TTL)."""
    store = Store(tmp_path / "cache")
    name = "studies?[]"
    store.save_listing(name, json.dumps([element(dicomjson.STUDY_UID, STUDY)]).encode())
    old = time.time() - 3600
    path = store._listing_path(name)
    os.utime(path, (old, old))
    config = ClientConfig(base_url="http://127.0.0.1:9", retries=0, connect_timeout=2.0)
    async with DicomwebClient(config) as client, trio.open_nursery() as running:
        archive = Archive(client, store)
        await running.start(archive.run)
        found = await archive.studies()
        running.cancel_scope.cancel()
    assert [dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in found] == [STUDY]
    assert path.stat().st_mtime == old
