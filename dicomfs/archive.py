"""The read-through cache: answer from the store when possible, from the server when needed.

This is where "nothing immutable is fetched twice" is kept: listings live in
memory for a TTL and on disk for offline use, metadata and rendered images go
to the store once checked, and instances come through the fetch engine
(:mod:`dicomfs.fetch`), which verifies them before they are stored; opens of
instances also tell read-ahead (:mod:`dicomfs.readahead`) where programs walk.
Concurrent requests for the same listing or entry share one download. Nothing
unverified ever reaches the store, so nothing unverified is ever served.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cachetools
import trio

from dicomfs import dicomjson, metrics
from dicomfs.client import DicomwebClient, Query
from dicomfs.dicomjson import Dataset
from dicomfs.errors import (
    DicomfsError,
    IntegrityError,
    ServerError,
    Timeout,
    Unreachable,
)
from dicomfs.fetch import FetchEngine, Priority, ServerHealth
from dicomfs.readahead import Readahead
from dicomfs.store import Blob, Key, OpenFile, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failures that mean "the server cannot answer this now": cached data may stand in.
OFFLINE_ERRORS = (Unreachable, Timeout, ServerError)
LIST_AHEAD_QUEUE = 256  # folders waiting to be listed ahead; more are not listed ahead
LIST_AHEAD_AT_ONCE = 16  # QIDO requests of listing ahead at once (the pool has 16)
IMAGE_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg"}


def _ignore(size: int) -> None:
    """The default progress callback."""


@dataclass(eq=False)
class _Flight:
    """One download in progress; everyone who wants the same entry waits on it."""

    done: trio.Event = field(default_factory=trio.Event)
    error: DicomfsError | None = None
    finished: bool = False
    result: Any = None


def count_instances(raw: bytes) -> int:
    """How many distinct instances a metadata answer describes."""
    datasets = dicomjson.load_array(raw, what="metadata")
    return len({dicomjson.uid(ds, dicomjson.SOP_UID) for ds in datasets} - {None})


class Archive:
    """The server as seen through the cache. All methods are trio-async; :meth:`run`
    (the fetch engine and read-ahead) must be running for instances to arrive."""

    def __init__(self, client: DicomwebClient, store: Store, *, listing_ttl: float = 60.0,
                 retries: int = 3, deadline: float = 120.0, readahead: bool = True) -> None:
        self.client = client
        self.store = store
        self.listing_ttl = listing_ttl
        self.deadline = deadline
        self.health = ServerHealth()
        self.engine = FetchEngine(client, store, max_connections=client.config.max_connections,
                                  retries=retries, deadline=deadline, health=self.health)
        self.readahead = Readahead(self.engine, store, self.instance_uids,
                                   max_window=2 * client.config.max_connections) \
            if readahead else None
        self._listings: cachetools.TTLCache[str, list[Dataset]] = cachetools.TTLCache(
            maxsize=100_000, ttl=listing_ttl)
        self._flights: dict[object, _Flight] = {}
        self._metadata_counts: dict[Key, int] = {}
        self._ahead_send, self._ahead_receive = trio.open_memory_channel[
            tuple[str, str | None]](LIST_AHEAD_QUEUE)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run the fetch engine and read-ahead until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.engine.run)
            if self.readahead is not None:
                await nursery.start(self.readahead.run)
            nursery.start_soon(self._list_ahead)
            task_status.started()

    def list_ahead(self, study: str, series: str | None = None) -> None:
        """Fetch the listings below a folder a walker is about to open, in the background:
        a study's series and each series' instances, or one series' instances.

        ``ls -R``, ``find``, ``du`` and file managers then wait a round trip per level
        of the tree, not per folder. Bounded: a full queue drops the request (the
        walker then lists that folder itself), and LIST_AHEAD_AT_ONCE run at once.
        """
        with contextlib.suppress(trio.WouldBlock):
            self._ahead_send.send_nowait((study, series))

    async def _list_ahead(self) -> None:
        limiter = trio.CapacityLimiter(LIST_AHEAD_AT_ONCE)

        async def one(study: str, series: str | None) -> None:
            async with limiter:
                try:
                    if series is not None:
                        await self.instances(study, series)
                        return
                    for found in await self.series(study):
                        uid = dicomjson.uid(found, dicomjson.SERIES_UID)
                        if uid is not None:
                            nursery.start_soon(one, study, uid)
                except DicomfsError as exc:  # the walker's own listing will say it
                    log.debug("listing ahead of %s: %s", series or study, exc)

        async with trio.open_nursery() as nursery:
            async for study, series in self._ahead_receive:
                nursery.start_soon(one, study, series)

    # -- listings (QIDO-RS) ---------------------------------------------------------

    async def studies(self, query: Query = ()) -> list[Dataset]:
        items = sorted(dict(query).items()) if query else []
        return await self._listing(f"studies?{items}",
                                   lambda: self.client.search_studies(items))

    async def series(self, study: str) -> list[Dataset]:
        return await self._listing(f"series/{study}",
                                   lambda: self.client.search_series(study))

    async def instances(self, study: str, series: str) -> list[Dataset]:
        return await self._listing(f"instances/{study}/{series}",
                                   lambda: self.client.search_instances(study, series))

    async def instance_uids(self, study: str, series: str) -> list[str]:
        """The SOP Instance UIDs of a series, in the order its folder lists them."""
        listing = dicomjson.in_instance_order(await self.instances(study, series))
        return [uid for ds in listing if (uid := dicomjson.uid(ds, dicomjson.SOP_UID))]

    async def find_study(self, study: str) -> Dataset | None:
        """One study by UID, also one that a server's result cap hides from the full list.

        Offline, the saved full listing answers instead, or failing that the cache
        itself: a study with cached entries exists.
        """
        try:
            found = await self._listing(
                f"study/{study}",
                lambda: self.client.search_studies({"StudyInstanceUID": study}))
        except OFFLINE_ERRORS:
            if self.store.holds(Key(study)):
                return {dicomjson.STUDY_UID: {"vr": "UI", "Value": [study]}}
            found = await self.studies()
        return _pick(found, dicomjson.STUDY_UID, study)

    async def find_series(self, study: str, series: str) -> Dataset | None:
        """One series by UID: from the study's listing when it is at hand (a lookup of the
        study fetches it alongside), else one QIDO query; offline, the saved listing of its
        study or the cache answers."""
        listed = await self._at_hand(f"series/{study}")
        if listed is not None and (found := _pick(listed, dicomjson.SERIES_UID, series)):
            return found
        try:
            found = await self._listing(
                f"series/{study}/{series}",
                lambda: self.client.search_series(study, {"SeriesInstanceUID": series}))
        except OFFLINE_ERRORS:
            if self.store.holds(Key(study, series)):
                return {dicomjson.SERIES_UID: {"vr": "UI", "Value": [series]}}
            found = await self.series(study)
        return _pick(found, dicomjson.SERIES_UID, series)

    async def find_instance(self, study: str, series: str, instance: str) -> Dataset | None:
        """One instance by UID: from the series listing when it is at hand, else one
        QIDO query. Opening a file by its path must not cost listing a 2000-image series.
        """
        listed = await self._at_hand(f"instances/{study}/{series}")
        if listed is None:
            try:
                listed = await self._listing(
                    f"instance/{study}/{series}/{instance}",
                    lambda: self.client.search_instances(study, series,
                                                         {"SOPInstanceUID": instance}))
            except OFFLINE_ERRORS:
                if self.is_cached(study, series, instance):
                    return {dicomjson.SOP_UID: {"vr": "UI", "Value": [instance]}}
                listed = await self.instances(study, series)
        return _pick(listed, dicomjson.SOP_UID, instance)

    async def _listing(self, name: str,
                       fetch: Callable[[], Awaitable[list[Dataset]]]) -> list[Dataset]:
        """A listing from memory, from a young saved copy, or from the server.

        When the server cannot be reached, an older saved copy of any age stands in:
        a stale listing of immutable studies is far more useful than none.
        """
        cached = self._listings.get(name)
        if cached is not None:
            return cached
        saved = self.store.load_listing(name)
        young = await self._young(name, saved)
        if young is not None:
            return young
        try:
            return await self._single_flight(("listing", name),
                                             lambda: self._fetch_listing(name, fetch))
        except OFFLINE_ERRORS as exc:
            if saved is None:
                raise
            log.warning("serving a saved listing (%s)", exc)
            return await self._remember(name, saved[0])

    def forget_listings(self, study: str, series: str, instance: str) -> None:
        """Drop every listing an instance just stored makes stale, in memory and saved:
        the study listings (and searches), its study's series, its series' instances,
        and the lookups by UID that may have found nothing before."""
        names = {name for name in self._listings if name.startswith("studies?")}
        names |= {"studies?[]", f"study/{study}", f"series/{study}",
                  f"series/{study}/{series}", f"instances/{study}/{series}",
                  f"instance/{study}/{series}/{instance}"}
        for name in names:
            self._listings.pop(name, None)
            self.store.drop_listing(name)

    async def _at_hand(self, name: str) -> list[Dataset] | None:
        """A listing from memory or from a saved copy younger than the TTL; no request."""
        cached = self._listings.get(name)
        return cached if cached is not None else \
            await self._young(name, self.store.load_listing(name))

    async def _young(self, name: str, saved: tuple[bytes, float] | None
                     ) -> list[Dataset] | None:
        """A saved listing if it is younger than the TTL, now kept in memory too."""
        if saved is None or saved[1] >= self.listing_ttl:
            return None
        return await self._remember(name, saved[0])

    async def _remember(self, name: str, raw: bytes) -> list[Dataset]:
        """A saved listing, parsed in a worker thread (it may list thousands)."""
        result = await trio.to_thread.run_sync(
            lambda: dicomjson.load_array(raw, what="saved listing"))
        self._listings[name] = result
        return result

    async def _fetch_listing(self, name: str,
                             fetch: Callable[[], Awaitable[list[Dataset]]]) -> list[Dataset]:
        result = await self._guarded(fetch)
        self._listings[name] = result
        await trio.to_thread.run_sync(
            lambda: self.store.save_listing(name, json.dumps(result).encode()))
        return result

    # -- metadata (WADO-RS) ---------------------------------------------------------

    async def metadata(self, study: str, series: str | None = None) -> Blob:
        """Study or series metadata as the server sent it, fetched again when stale.

        A study still receiving instances changes its metadata: when QIDO's instance
        count (from a listing no older than the TTL) differs from what the cached copy
        describes, it is refetched.
        """
        key = Key(study, series)
        blob = self.store.open(key)
        expected = await self._instance_count(study, series) if blob is not None else None
        if blob is not None and expected is not None and \
                await self._cached_count(key, blob) != expected:
            log.info("metadata of %s is stale (instance count changed); fetching again",
                     series or study)
            blob.close()
            blob = None
        metrics.cache_open("metadata", blob is not None)
        if blob is not None:
            return blob
        try:
            await self._single_flight(key, lambda: self._fetch_metadata(key))
        except OFFLINE_ERRORS as exc:
            stale = self.store.open(key)
            if stale is None:
                raise
            log.warning("metadata of %s: serving the cached copy (%s)", series or study, exc)
            return stale
        return await self._open_filled(key)

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

    async def _cached_count(self, key: Key, blob: Blob) -> int:
        if key not in self._metadata_counts:
            raw = await trio.to_thread.run_sync(_read_all, blob)
            self._metadata_counts[key] = await trio.to_thread.run_sync(count_instances, raw)
        return self._metadata_counts[key]

    async def _fetch_metadata(self, key: Key) -> None:
        if key.series is None:
            raw = await self._guarded(lambda: self.client.study_metadata(key.study))
        else:
            raw = await self._guarded(
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
        blob = self.store.open(key)
        metrics.cache_open("instance", blob is not None)
        if blob is not None:
            return blob
        arriving = await self.engine.open(key)
        return arriving if arriving is not None else await self._open_filled(key)

    async def rendered(self, study: str, series: str, instance: str, fmt: str) -> Blob:
        """A rendered PNG or JPEG of the instance, cached like any other entry."""
        key = Key(study, series, instance, fmt)
        blob = self.store.open(key)
        metrics.cache_open("rendered", blob is not None)
        if blob is not None:
            return blob
        await self._single_flight(key, lambda: self._fetch_rendered(key))
        return await self._open_filled(key)

    async def _fetch_rendered(self, key: Key) -> None:
        data = await self._guarded(lambda: self.client.rendered(
            key.study, key.series or "", key.instance or "", media_type=MEDIA_TYPES[key.kind]))
        if not data.startswith(IMAGE_MAGIC[key.kind]):
            raise IntegrityError(f"rendered {key.kind} of {key.instance} is not a {key.kind}")
        await trio.to_thread.run_sync(self.store.put_bytes, key, data)

    async def fill(self, study: str, series: str, *,
                   on_stored: Callable[[int], None] = _ignore) -> list[str]:
        """Bring every instance of a series into the store; returns the UIDs that failed.

        What is cached already is skipped, so an interrupted fill resumes where it
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

    async def _open_filled(self, key: Key) -> Blob:
        blob = self.store.open(key)
        if blob is None:  # evicted between fill and open, e.g. by another mount
            await self._single_flight(key, lambda: self._refill(key))
            blob = self.store.open(key)
        if blob is None:
            raise DicomfsError(f"{key.relpath()} vanished from the cache right after filling")
        return blob

    async def _refill(self, key: Key) -> None:
        if key.kind == "dcm":
            await self.engine.fetch(key)
        elif key.kind == "metadata":
            await self._fetch_metadata(key)
        else:
            await self._fetch_rendered(key)

    async def _single_flight(self, key: object, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` once for everyone who asks for ``key`` while it runs.

        Waiters get the result, or a fresh copy of the owner's error; when the owner
        was cancelled (its reader gave up), the next waiter does the work itself.
        """
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise copy.copy(flight.error)
            if flight.finished:
                return flight.result  # type: ignore[no-any-return]
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await work()
            flight.finished = True
            return flight.result  # type: ignore[no-any-return]
        except DicomfsError as exc:
            flight.error = exc
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    async def _guarded(self, work: Callable[[], Awaitable[T]]) -> T:
        """Bound one fetch by the deadline and keep track of whether the server answers."""
        try:
            with trio.fail_after(self.deadline):
                result = await work()
        except trio.TooSlowError:
            exc = Timeout(f"no complete answer within {self.deadline:g} s")
            self.health.failed(exc)
            raise exc from None
        except (Unreachable, Timeout) as exc:
            self.health.failed(exc)
            raise
        self.health.answered()
        return result


def _pick(datasets: list[Dataset], tag: str, uid: str) -> Dataset | None:
    return next((ds for ds in datasets if dicomjson.uid(ds, tag) == uid), None)


def _read_all(blob: Blob) -> bytes:
    return os.pread(blob.fd, blob.size, 0)
