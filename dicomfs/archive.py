"""The read-through cache: answer from the store when possible, from the server when needed.

This is where "nothing immutable is fetched twice" is kept: listings live in
memory for a TTL and on disk for offline use, metadata and instances go to the
store once verified, and concurrent requests for the same entry share one
download. Nothing unverified ever reaches the store, so nothing unverified is
ever served.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import cachetools
import trio

from dicomfs import dicomjson, part10
from dicomfs.client import DicomwebClient, Query
from dicomfs.dicomjson import Dataset
from dicomfs.errors import (
    DicomfsError,
    IntegrityError,
    ProtocolError,
    ServerError,
    Timeout,
    Truncated,
    Unreachable,
)
from dicomfs.multipart import PartData, PartStart
from dicomfs.store import Blob, Key, Store, Writer

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failures that mean "the server cannot answer this now": cached data may stand in.
OFFLINE_ERRORS = (Unreachable, Timeout, ServerError)
IMAGE_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg"}


def _ignore(size: int) -> None:
    """The default progress callback."""


class _Flight:
    """One download in progress; everyone who wants the same entry waits on it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


async def sop_instance_uid(writer: Writer) -> str:
    """The SOP Instance UID of a written part, once it is shown a whole DICOM object.

    The dataset's UID is the instance's identity (servers index by it, and a file
    meta that says otherwise exists in the wild). The walk runs in a worker thread:
    inflating a big deflated file takes milliseconds.
    """
    def check() -> str:
        fd = os.open(writer.path, os.O_RDONLY)
        try:
            return part10.whole_instance_uid(writer.head, fd, writer.size)
        finally:
            os.close(fd)

    return await trio.to_thread.run_sync(check)


async def verify_instance(writer: Writer, key: Key) -> None:
    """Raise IntegrityError unless the written part is the whole instance ``key`` names."""
    found = await sop_instance_uid(writer)
    if found != key.instance:
        raise IntegrityError(f"asked for instance {key.instance}, got {found!r}")


def count_instances(raw: bytes) -> int:
    """How many distinct instances a metadata answer describes."""
    datasets = dicomjson.load_array(raw, what="metadata")
    return len({dicomjson.uid(ds, dicomjson.SOP_UID) for ds in datasets} - {None})


class Archive:
    """The server as seen through the cache. All methods are trio-async."""

    def __init__(self, client: DicomwebClient, store: Store, *, listing_ttl: float = 60.0,
                 retries: int = 3, deadline: float = 120.0) -> None:
        self.client = client
        self.store = store
        self.listing_ttl = listing_ttl
        self.retries = retries
        self.deadline = deadline
        self._listings: cachetools.TTLCache[str, list[Dataset]] = cachetools.TTLCache(
            maxsize=100_000, ttl=listing_ttl)
        self._flights: dict[object, _Flight] = {}
        self._metadata_counts: dict[Key, int] = {}
        self._offline_since: float | None = None

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
        """The SOP Instance UIDs of a series, from its listing."""
        listing = await self.instances(study, series)
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
        """One series by UID; offline, the saved listing of its study or the cache answers."""
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
        listed = self._at_hand(f"instances/{study}/{series}")
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
        young = self._young(name, saved)
        if young is not None:
            return young
        flight_key = ("listing", name)
        try:
            await self._single_flight(flight_key, lambda: self._fetch_listing(name, fetch))
        except OFFLINE_ERRORS as exc:
            if saved is None:
                raise
            log.warning("serving a saved listing (%s)", exc)
            result = dicomjson.load_array(saved[0], what="saved listing")
            self._listings[name] = result
            return result
        return self._listings.get(name) or []

    def _at_hand(self, name: str) -> list[Dataset] | None:
        """A listing from memory or from a saved copy younger than the TTL; no request."""
        cached = self._listings.get(name)
        return cached if cached is not None else self._young(name,
                                                             self.store.load_listing(name))

    def _young(self, name: str, saved: tuple[bytes, float] | None) -> list[Dataset] | None:
        """A saved listing if it is younger than the TTL, now kept in memory too."""
        if saved is None or saved[1] >= self.listing_ttl:
            return None
        result = dicomjson.load_array(saved[0], what="saved listing")
        self._listings[name] = result
        return result

    async def _fetch_listing(self, name: str,
                             fetch: Callable[[], Awaitable[list[Dataset]]]) -> None:
        result = await self._guarded(fetch)
        self._listings[name] = result
        self.store.save_listing(name, json.dumps(result).encode())

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
        self.store.put_bytes(key, raw)

    # -- instances and rendered images ----------------------------------------------

    async def instance(self, study: str, series: str, instance: str) -> Blob:
        """The instance's stored bytes, from the cache or downloaded and verified first."""
        key = Key(study, series, instance, "dcm")
        blob = self.store.open(key)
        if blob is not None:
            return blob
        await self._single_flight(key, lambda: self._guarded(lambda: self._download(key)))
        return await self._open_filled(key)

    async def rendered(self, study: str, series: str, instance: str, fmt: str) -> Blob:
        """A rendered PNG or JPEG of the instance, cached like any other entry."""
        key = Key(study, series, instance, fmt)
        blob = self.store.open(key)
        if blob is not None:
            return blob
        await self._single_flight(key, lambda: self._fetch_rendered(key))
        return await self._open_filled(key)

    async def _fetch_rendered(self, key: Key) -> None:
        data = await self._guarded(lambda: self.client.rendered(
            key.study, key.series or "", key.instance or "", media_type=MEDIA_TYPES[key.kind]))
        if not data.startswith(IMAGE_MAGIC[key.kind]):
            raise IntegrityError(f"rendered {key.kind} of {key.instance} is not a {key.kind}")
        self.store.put_bytes(key, data)

    async def _download(self, key: Key) -> None:
        """Fetch one instance into the store; a transfer cut short is fetched again."""
        for attempt in range(self.retries + 1):
            writer = self.store.writer()
            try:
                async with self.client.retrieve(key.study, key.series,
                                                key.instance) as events:
                    parts = 0
                    async for event in events:
                        if isinstance(event, PartStart):
                            parts += 1
                            if parts > 1:
                                raise ProtocolError("an instance answer with several parts")
                        elif isinstance(event, PartData):
                            self._write_bounded(writer, event.data)
                if parts == 0:
                    raise ProtocolError("an instance answer with no part")
                await verify_instance(writer, key)
                self.store.commit(writer, key)
                return
            except (Truncated, Timeout) as exc:  # cut or stalled mid-body
                writer.abort()
                if attempt >= self.retries:
                    raise
                log.warning("instance %s: %s; fetching again", key.instance, exc)
            except BaseException:
                writer.abort()
                raise

    async def fill_series(self, study: str, series: str, *,
                          on_stored: Callable[[int], None] = _ignore) -> list[str]:
        """Bring every instance of a series into the store; returns the UIDs that failed.

        Mostly uncached: one series request, at the speed of the wire. Mostly
        cached, as when an interrupted prefetch resumes: only what is missing,
        one request each, a few at a time. ``on_stored`` gets each new entry's size.
        """
        wanted = await self.instance_uids(study, series)
        missing = [uid for uid in wanted if not self.is_cached(study, series, uid)]
        if len(missing) * 2 > len(wanted):
            delivered = await self.fetch_series(study, series, missing, on_stored=on_stored)
            # Not "what is not cached now": a small cache may already have evicted
            # what the stream delivered, and fetching that again would loop.
            missing = [uid for uid in missing if uid not in delivered]
        failed: list[str] = []
        limiter = trio.CapacityLimiter(self.client.config.max_connections)

        async def fetch_one(instance: str) -> None:
            async with limiter:
                try:
                    blob = await self.instance(study, series, instance)
                except DicomfsError as exc:
                    log.warning("instance %s: %s", instance, exc)
                    failed.append(instance)
                    return
                blob.close()
                on_stored(blob.size)

        async with trio.open_nursery() as nursery:
            for instance in missing:
                nursery.start_soon(fetch_one, instance)
        return failed

    def is_cached(self, study: str, series: str, instance: str) -> bool:
        return self.store.size(Key(study, series, instance, "dcm")) is not None

    async def fetch_series(self, study: str, series: str, wanted: Iterable[str], *,
                           on_stored: Callable[[int], None] = _ignore) -> set[str]:
        """Stream a series into the store in one request, keeping the ``wanted`` instances.

        The wanted instances that are neither cached nor already on their way are
        claimed first, so that opening one of them waits for this stream instead
        of asking the server a second time. Whatever the stream does not deliver
        is released, and its waiters fetch it on their own. Returns the UIDs stored.
        """
        claimed: dict[str, _Flight] = {}
        for instance in wanted:
            key = Key(study, series, instance, "dcm")
            if self.store.size(key) is None and key not in self._flights:
                claimed[instance] = self._flights[key] = _Flight()
        wanted_here = set(claimed)
        try:
            if claimed:
                await self._stream_series(study, series, claimed, on_stored)
        finally:
            for instance, flight in claimed.items():
                self._land(Key(study, series, instance, "dcm"), flight)
        return wanted_here - set(claimed)

    async def _stream_series(self, study: str, series: str, claimed: dict[str, _Flight],
                             on_stored: Callable[[int], None]) -> None:
        """Write each part to a temporary file and keep it if it is a claimed instance."""
        writer = None
        try:
            async with self.client.retrieve(study, series) as events:
                async for event in events:
                    if isinstance(event, PartStart):
                        writer = self.store.writer()
                    elif isinstance(event, PartData) and writer is not None:
                        self._write_bounded(writer, event.data)
                    elif writer is not None:
                        await self._keep_part(writer, study, series, claimed, on_stored)
                        writer = None
        except DicomfsError as exc:
            log.warning("series %s: bulk fetch stopped (%s); the rest comes one by one",
                        series, exc)
        finally:
            if writer is not None:
                writer.abort()

    async def _keep_part(self, writer: Writer, study: str, series: str,
                         claimed: dict[str, _Flight], on_stored: Callable[[int], None]
                         ) -> None:
        """Commit one part of a series stream if it is a claimed instance of that series.

        Claimed UIDs come from the series' QIDO listing, and SOP Instance UIDs are
        unique, so a part whose UID was claimed is that instance of this series.
        """
        try:
            found = await sop_instance_uid(writer)
            flight = claimed.pop(found, None)
            if flight is None:
                writer.abort()
                return
            key = Key(study, series, found, "dcm")
            self.store.commit(writer, key)
            self._land(key, flight)
            on_stored(writer.size)
        except (IntegrityError, OSError) as exc:
            writer.abort()
            log.warning("series %s: skipped a part (%s)", series, exc)

    def _land(self, key: object, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    def _write_bounded(self, writer: Writer, data: bytes) -> None:
        """Write part data, refusing a part larger than the whole cache may hold.

        Without a bound, a broken or hostile server streaming without end would
        fill the disk before any check at commit time could object.
        """
        if writer.size + len(data) > self.store.max_bytes:
            raise ProtocolError(f"an instance larger than the cache size "
                                f"({self.store.max_bytes} bytes); raise --cache-size")
        writer.write(data)

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
            await self._guarded(lambda: self._download(key))
        elif key.kind == "metadata":
            await self._fetch_metadata(key)
        else:
            await self._fetch_rendered(key)

    async def _single_flight(self, key: object, work: Callable[[], Awaitable[object]]) -> None:
        """Run ``work`` once for everyone who asks for ``key`` while it runs."""
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return
        flight = self._flights[key] = _Flight()
        try:
            await work()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            self._land(key, flight)

    async def _guarded(self, work: Callable[[], Awaitable[T]]) -> T:
        """Bound one fetch by the deadline and keep track of whether the server answers."""
        try:
            with trio.fail_after(self.deadline):
                result = await work()
        except trio.TooSlowError:
            exc = Timeout(f"no complete answer within {self.deadline:g} s")
            self._note_offline(exc)
            raise exc from None
        except (Unreachable, Timeout) as exc:
            self._note_offline(exc)
            raise
        if self._offline_since is not None:
            log.warning("server reachable again after %.0f s",
                        time.monotonic() - self._offline_since)
            self._offline_since = None
        return result

    def _note_offline(self, exc: BaseException) -> None:
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            log.error("server unreachable (%s); serving what is cached", exc)


def _pick(datasets: list[Dataset], tag: str, uid: str) -> Dataset | None:
    return next((ds for ds in datasets if dicomjson.uid(ds, tag) == uid), None)


def _read_all(blob: Blob) -> bytes:
    return os.pread(blob.fd, blob.size, 0)
