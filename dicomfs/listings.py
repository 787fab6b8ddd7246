"""QIDO-RS listings through the cache: in memory for a TTL, saved on disk for offline use.

What folders show comes from here: the studies a query finds, a study's series, a
series' instances, and single ones found by UID. A listing younger than the TTL is
answered without a request (from memory, or from the copy saved by an earlier
mount); an older one is asked again; when the server cannot answer, a saved copy of
any age stands in, because a stale listing of immutable studies is far more useful
than none. Folders a walker will open next are listed ahead in the background.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable

import cachetools
import trio

from dicomfs import dicomjson
from dicomfs.client import DicomwebClient, Query
from dicomfs.dicomjson import Dataset
from dicomfs.errors import DicomfsError, ServerError, Timeout, Unreachable
from dicomfs.flight import Flights
from dicomfs.store import Key, Store

log = logging.getLogger(__name__)

# Failures that mean "the server cannot answer this now": cached data may stand in.
OFFLINE_ERRORS = (Unreachable, Timeout, ServerError)
LIST_AHEAD_QUEUE = 256  # folders waiting to be listed ahead; more are not listed ahead
LIST_AHEAD_AT_ONCE = 16  # QIDO requests of listing ahead at once (the pool has 16)


class _Large(Exception):
    """The first page of a listing was full: there is more."""


class Arriving:
    """A listing on its way, page by page, shared by everyone who follows it.

    Followers read ``items`` as it grows; when the last one leaves before the end,
    the transfer stops (``ls | head`` must not walk a million-study server to the
    end), and nothing partial is kept.
    """

    def __init__(self, items: list[Dataset] | None = None) -> None:
        self.items: list[Dataset] = items if items is not None else []
        self.done = items is not None
        self.error: DicomfsError | None = None
        self.followers = 0
        self.scope = trio.CancelScope()
        self._changed = trio.Event()

    def add(self, page: list[Dataset]) -> None:
        self.items.extend(page)
        self._wake()

    def finish(self, error: DicomfsError | None = None) -> None:
        self.done, self.error = True, error
        self._wake()

    async def wait(self, *, beyond: int = 0) -> None:
        """Until more than ``beyond`` items have arrived, or the end; the listing's error,
        if it failed."""
        while not self.done and len(self.items) <= beyond:
            await self._changed.wait()
        if self.error is not None and len(self.items) <= beyond:
            raise copy.copy(self.error)

    async def complete(self) -> list[Dataset]:
        await self.wait(beyond=sys.maxsize)
        return self.items

    def follow(self) -> None:
        self.followers += 1

    def leave(self) -> None:
        self.followers -= 1
        if self.followers <= 0 and not self.done:
            self.scope.cancel()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class Listings:
    """The server's listings as the mount sees them. :meth:`run` must run for study
    listings and :meth:`list_ahead` to do anything."""

    def __init__(self, client: DicomwebClient, store: Store, flights: Flights, *,
                 listing_ttl: float = 60.0) -> None:
        self.client = client
        self.store = store
        self.flights = flights
        self.listing_ttl = listing_ttl
        self._listings: cachetools.TTLCache[str, list[Dataset]] = cachetools.TTLCache(
            maxsize=100_000, ttl=listing_ttl)
        self._ahead_send, self._ahead_receive = trio.open_memory_channel[
            tuple[str, str | None]](LIST_AHEAD_QUEUE)
        self._arriving: dict[str, Arriving] = {}
        self._large: set[str] = set()  # study listings known to hold more than a page
        self._nursery: trio.Nursery | None = None

    async def studies(self, query: Query = ()) -> list[Dataset]:
        """Every study ``query`` finds."""
        arriving = await self.follow_studies(query)
        try:
            return await arriving.complete()
        finally:
            arriving.leave()

    async def few_studies(self, query: Query = ()) -> list[Dataset] | None:
        """Every study ``query`` finds if they fit in one QIDO page, else None.

        Views that group the whole scope (/patients, /dates) do so only on servers
        this small, and ask by part (a letter, a month) on larger ones, where listing
        everything would take minutes. One request, which on a small server is the
        listing itself; a server found large stays so for the mount's life.
        """
        items, name = _study_listing(query)
        if name in self._large:
            return None

        async def first_page() -> list[Dataset]:
            page, complete = await self.client.first_studies(items)
            if not complete:
                raise _Large
            return page

        try:
            found = await self._listing(name, first_page)
        except _Large:
            found = None
        if found is None or len(found) >= self.client.config.page_size:
            self._large.add(name)
            return None
        return found

    async def follow_studies(self, query: Query = ()) -> Arriving:
        """The studies ``query`` finds, as they arrive: done at once from memory or a
        young saved copy, else page by page from the server (one transfer however many
        follow it). The caller follows it and must :meth:`Arriving.leave` it."""
        items, name = _study_listing(query)
        arriving = self._arriving.get(name)
        if arriving is None or arriving.scope.cancel_called:
            cached = self._listings.get(name)
            saved = None
            if cached is None:
                saved = self.store.load_listing(name)
                cached = await self._young(name, saved)
            if cached is not None:
                arriving = Arriving(cached)
            else:
                arriving = self._arriving[name] = Arriving()
                self._start(self._arrive, name, arriving, saved,
                            self.client.study_pages(items))
        arriving.follow()
        return arriving

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

    # -- single ones, by UID -----------------------------------------------------------

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
        return dicomjson.pick(found, dicomjson.STUDY_UID, study)

    async def find_series(self, study: str, series: str) -> Dataset | None:
        """One series by UID: from the study's listing when it is at hand (a lookup of the
        study fetches it alongside), else one QIDO query; offline, the saved listing of its
        study or the cache answers."""
        listed = await self._at_hand(f"series/{study}")
        if listed is not None and (known := dicomjson.pick(listed, dicomjson.SERIES_UID,
                                                           series)):
            return known
        try:
            found = await self._listing(
                f"series/{study}/{series}",
                lambda: self.client.search_series(study, {"SeriesInstanceUID": series}))
        except OFFLINE_ERRORS:
            if self.store.holds(Key(study, series)):
                return {dicomjson.SERIES_UID: {"vr": "UI", "Value": [series]}}
            found = await self.series(study)
        return dicomjson.pick(found, dicomjson.SERIES_UID, series)

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
                if self.store.size(Key(study, series, instance, "dcm")) is not None:
                    return {dicomjson.SOP_UID: {"vr": "UI", "Value": [instance]}}
                listed = await self.instances(study, series)
        return dicomjson.pick(listed, dicomjson.SOP_UID, instance)

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

    # -- listing ahead -------------------------------------------------------------------

    def list_ahead(self, study: str, series: str | None = None) -> None:
        """Fetch the listings below a folder a walker is about to open, in the background:
        a study's series and each series' instances, or one series' instances.

        ``ls -R``, ``find``, ``du`` and file managers then wait a round trip per level
        of the tree, not per folder. Bounded: a full queue drops the request (the
        walker then lists that folder itself), and LIST_AHEAD_AT_ONCE run at once.
        """
        with contextlib.suppress(trio.WouldBlock):
            self._ahead_send.send_nowait((study, series))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run listing ahead and the study listings on their way, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._list_ahead()

    def _start(self, work: Callable[..., Awaitable[None]], *args: object) -> None:
        if self._nursery is None:
            raise RuntimeError("Listings.run is not running")
        self._nursery.start_soon(work, *args)

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

    # -- memory, saved copies, the server --------------------------------------------------

    async def _listing(self, name: str,
                       fetch: Callable[[], Awaitable[list[Dataset]]]) -> list[Dataset]:
        """A listing from memory, from a young saved copy, or from the server; when the
        server cannot be reached, from a saved copy of any age."""
        cached = self._listings.get(name)
        if cached is not None:
            return cached
        saved = self.store.load_listing(name)
        young = await self._young(name, saved)
        if young is not None:
            return young
        try:
            return await self.flights.once(("listing", name),
                                           lambda: self._fetch_listing(name, fetch))
        except OFFLINE_ERRORS as exc:
            if saved is None:
                raise
            log.warning("serving a saved listing (%s)", exc)
            return await self._remember(name, saved[0])

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
        result = await self.flights.guarded(fetch)
        self._listings[name] = result
        await trio.to_thread.run_sync(
            lambda: self.store.save_listing(name, json.dumps(result).encode()))
        return result

    async def _arrive(self, name: str, arriving: Arriving, saved: tuple[bytes, float] | None,
                      pages: AsyncGenerator[list[Dataset], None]) -> None:
        """Bring a study listing in page by page; complete, it is kept like any other.
        Offline before its first page, a saved copy of any age stands in."""
        error: DicomfsError | None = None
        fetched = True  # False: the saved copy stands in, and keeps its age
        with arriving.scope:
            try:
                while True:
                    try:
                        page = await self.flights.guarded(lambda: anext(pages))
                    except StopAsyncIteration:
                        break
                    arriving.add(page)
            except OFFLINE_ERRORS as exc:
                if saved is None or arriving.items:
                    error = exc
                else:
                    log.warning("serving a saved listing (%s)", exc)
                    arriving.items = await self._remember(name, saved[0])
                    fetched = False
            except DicomfsError as exc:
                error = exc
            finally:
                with trio.CancelScope(shield=True):
                    await pages.aclose()
                if self._arriving.get(name) is arriving:
                    del self._arriving[name]
        if arriving.scope.cancelled_caught:
            error = error or DicomfsError("stopped: nobody follows the listing any more")
        elif error is None and fetched:
            self._listings[name] = arriving.items
            await trio.to_thread.run_sync(
                lambda: self.store.save_listing(name, json.dumps(arriving.items).encode()))
        arriving.finish(error)


def _study_listing(query: Query) -> tuple[list[tuple[str, str]], str]:
    """A study search's parameters in a stable order, and the name it is kept under."""
    items = sorted(dict(query).items()) if query else []
    return items, f"studies?{items}"
