"""The read-through cache: answer from the store when possible, from the server when needed.

This is where "nothing immutable is fetched twice" is kept: listings come through
:class:`~dicomfs.listings.Listings` (memory, saved copies), metadata and rendered
images go to the store once checked, and instances come through the fetch engine
(:mod:`dicomfs.fetch`), which verifies them before they are stored; opens of
instances also tell read-ahead (:mod:`dicomfs.readahead`) where programs walk.
Concurrent requests for the same entry share one download (:mod:`dicomfs.flight`).
Nothing unverified ever reaches the store, so nothing unverified is ever served.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import trio

from dicomfs import dicomjson, metrics
from dicomfs.client import DicomwebClient, StowResult
from dicomfs.errors import DicomfsError, IntegrityError
from dicomfs.fetch import FetchEngine, Priority
from dicomfs.flight import Flights, ServerHealth
from dicomfs.listings import OFFLINE_ERRORS, Listings
from dicomfs.readahead import Readahead
from dicomfs.store import CachedFile, Key, OpenFile, Store, Writer

log = logging.getLogger(__name__)

IMAGE_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg"}


def _ignore(size: int) -> None:
    """The default progress callback."""


def count_instances(raw: bytes) -> int:
    """How many distinct instances a metadata answer describes."""
    datasets = dicomjson.load_array(raw, what="metadata")
    return len({dicomjson.uid(ds, dicomjson.SOP_UID) for ds in datasets} - {None})


class Archive(Listings):
    """The server as seen through the cache: its listings (:class:`Listings`) and its
    files. All methods are trio-async; :meth:`run` (the fetch engine, read-ahead and
    listing ahead) must be running for instances to arrive."""

    def __init__(self, client: DicomwebClient, store: Store, *, listing_ttl: float = 60.0,
                 retries: int = 3, deadline: float = 120.0, readahead: bool = True) -> None:
        health = ServerHealth()
        super().__init__(client, store, Flights(deadline=deadline, health=health),
                         listing_ttl=listing_ttl)
        self.engine = FetchEngine(client, store, max_connections=client.config.max_connections,
                                  retries=retries, deadline=deadline, health=health)
        self.readahead = Readahead(self.engine, store, self.instance_uids,
                                   max_window=2 * client.config.max_connections) \
            if readahead else None
        self._metadata_counts: dict[Key, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the fetch engine, read-ahead and listing ahead until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.engine.run)
            if self.readahead is not None:
                await nursery.start(self.readahead.run)
            await nursery.start(super().run)
            task_status.started()

    # -- metadata (WADO-RS) ---------------------------------------------------------

    async def metadata(self, study: str, series: str | None = None) -> CachedFile:
        """Study or series metadata as the server sent it, fetched again when stale.

        A study still receiving instances changes its metadata: when QIDO's instance
        count (from a listing no older than the TTL) differs from what the cached copy
        describes, it is refetched.
        """
        key = Key(study, series)
        opened = self.store.open(key)
        expected = await self._instance_count(study, series) if opened is not None else None
        if opened is not None and expected is not None and \
                await self._cached_count(key, opened) != expected:
            log.info("metadata of %s is stale (instance count changed); fetching again",
                     series or study)
            opened.close()
            opened = None
        metrics.cache_open("metadata", opened is not None)
        if opened is not None:
            return opened
        try:
            await self.flights.once(key, lambda: self._fetch_metadata(key))
        except OFFLINE_ERRORS as exc:
            stale = self.store.open(key)
            if stale is None:
                raise
            log.warning("metadata of %s: serving the cached copy (%s)", series or study, exc)
            return stale
        return await self._open_stored(key)

    async def _instance_count(self, study: str, series: str | None) -> int | None:
        """What QIDO says the study or series holds; None when it cannot say."""
        try:
            if series is None:
                found, tag = await self.find_study(study), dicomjson.STUDY_INSTANCES
            else:
                found, tag = await self.find_series(study, series), dicomjson.SERIES_INSTANCES
        except DicomfsError:
            return None
        return dicomjson.integer(found, tag) if found else None

    async def _cached_count(self, key: Key, opened: CachedFile) -> int:
        if key not in self._metadata_counts:
            raw = await trio.to_thread.run_sync(_read_all, opened)
            self._metadata_counts[key] = await trio.to_thread.run_sync(count_instances, raw)
        return self._metadata_counts[key]

    async def _fetch_metadata(self, key: Key) -> None:
        if key.series is None:
            raw = await self.flights.guarded(lambda: self.client.study_metadata(key.study))
        else:
            raw = await self.flights.guarded(
                lambda: self.client.series_metadata(key.study, key.series or ""))
        self._metadata_counts[key] = await trio.to_thread.run_sync(count_instances, raw)
        await trio.to_thread.run_sync(self.store.put_bytes, key, raw)

    # -- instances and rendered images ----------------------------------------------

    async def instance(self, study: str, series: str, instance: str) -> OpenFile:
        """The instance's bytes: from the cache, or readable while they arrive once the
        server has said how many there are (else once fetched and verified whole).

        Every open, cached or not, tells read-ahead first, so that the files a
        walking program opens next are on their way while this one arrives.
        """
        key = Key(study, series, instance, "dcm")
        if self.readahead is not None:
            self.readahead.opened(key)
        opened = self.store.open(key)
        metrics.cache_open("instance", opened is not None)
        if opened is not None:
            return opened
        arriving = await self.engine.open(key)
        return arriving if arriving is not None else await self._open_stored(key)

    async def rendered(self, study: str, series: str, instance: str, fmt: str) -> CachedFile:
        """A rendered PNG or JPEG of the instance, cached like any other entry."""
        key = Key(study, series, instance, fmt)
        opened = self.store.open(key)
        metrics.cache_open("rendered", opened is not None)
        if opened is not None:
            return opened
        await self.flights.once(key, lambda: self._fetch_rendered(key))
        return await self._open_stored(key)

    async def _fetch_rendered(self, key: Key) -> None:
        data = await self.flights.guarded(lambda: self.client.rendered(
            key.study, key.series or "", key.instance or "", media_type=MEDIA_TYPES[key.kind]))
        if not data.startswith(IMAGE_MAGIC[key.kind]):
            raise IntegrityError(f"rendered {key.kind} of {key.instance} is not a {key.kind}")
        await trio.to_thread.run_sync(self.store.put_bytes, key, data)

    async def prefetch_series(self, study: str, series: str, *,
                   on_stored: Callable[[int], None] = _ignore) -> list[str]:
        """Bring every instance of a series into the store; returns the UIDs that failed.

        What is cached already is skipped, so an interrupted prefetch resumes where it
        stopped. Mostly missing and the server near (judged from the first one
        fetched), the rest comes in one series stream; else in parallel requests.
        ``on_stored`` gets each new entry's size.
        """
        failed: list[str] = []
        wanted = await self.instance_uids(study, series)
        missing = [uid for uid in wanted if not self.is_cached(study, series, uid)]

        async def fetch_one(instance: str) -> None:
            key = Key(study, series, instance, "dcm")
            try:
                await self.engine.fetch(key, Priority.BACKGROUND)
            except DicomfsError as exc:
                log.warning("instance %s: %s", instance, exc)
                failed.append(instance)
                return
            on_stored(self.store.size(key) or 0)

        if len(missing) * 2 > len(wanted):
            await fetch_one(missing.pop(0))
            if self.engine.near:
                self.engine.stream(study, series, missing)
        async with trio.open_nursery() as nursery:
            for instance in missing:
                nursery.start_soon(fetch_one, instance)
        return failed

    def expect(self, study: str, series: str, instance: str) -> None:
        """A program looks this instance up by its path, so it will most likely open it
        next: its transfer starts now, while the lookup's own query runs."""
        self.engine.want(Key(study, series, instance, "dcm"), Priority.READER)

    def is_cached(self, study: str, series: str, instance: str) -> bool:
        return self.cached_size(Key(study, series, instance, "dcm")) is not None

    def cached_size(self, key: Key) -> int | None:
        """The size of a cached entry, without touching the disk; None if not cached."""
        return self.store.size(key)

    # -- plumbing ---------------------------------------------------------------------

    async def _open_stored(self, key: Key) -> CachedFile:
        opened = self.store.open(key)
        if opened is None:  # evicted between storing and opening, e.g. by another mount
            await self.flights.once(key, lambda: self._fetch_again(key))
            opened = self.store.open(key)
        if opened is None:
            raise DicomfsError(f"{key.relpath()} vanished from the cache right after it was stored")
        return opened

    async def _fetch_again(self, key: Key) -> None:
        if key.kind == "dcm":
            await self.engine.fetch(key)
        elif key.kind == "metadata":
            await self._fetch_metadata(key)
        else:
            await self._fetch_rendered(key)

    # -- /upload --------------------------------------------------------------------

    def writer(self) -> Writer:
        """A private temporary file in the cache folder, for an upload being written."""
        return self.store.writer()

    async def upload(self, path: Path) -> StowResult:
        """Send one Part 10 file to the server (STOW-RS)."""
        return await self.client.store_instances([path])

    def space(self) -> os.statvfs_result:
        """The disk the cache (and uploads being written) lives on."""
        return os.statvfs(self.store.folder)


def _read_all(opened: CachedFile) -> bytes:
    return os.pread(opened.fd, opened.size, 0)
