"""Series prefetch: when a program walks a series, fetch the rest of it in bulk.

Tools that read a series (dcm2niix, SimpleITK, ``cp -r``) open its files one
after another. One request per file pays a round trip each; one WADO-RS series
request streams them all at the speed of the wire. But a person opening one
image must not pull a 1 GB series, so bulk fetching starts only after several
uncached files of the same series were opened within a short time.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict, deque

import trio

from dicomfs import dicomjson
from dicomfs.archive import Archive
from dicomfs.errors import DicomfsError, NotFound
from dicomfs.progress import Progress
from dicomfs.store import Key

log = logging.getLogger(__name__)

TRIGGER_MISSES = 2  # uncached opens in one series that make it a walk
WINDOW_SECONDS = 10.0  # how close together those opens must be


class Prefetcher:
    """Watches uncached opens; :meth:`run` carries out the bulk fetches they call for."""

    def __init__(self, archive: Archive, *, trigger: int = TRIGGER_MISSES,
                 window: float = WINDOW_SECONDS) -> None:
        self.archive = archive
        self.trigger = trigger
        self.window = window
        self._misses: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._running: set[tuple[str, str]] = set()
        self._too_large: set[tuple[str, str]] = set()
        self._send, self._receive = trio.open_memory_channel[tuple[str, str]](math.inf)

    async def run(self) -> None:
        """Serve prefetch requests until cancelled; FUSE handlers only enqueue them."""
        async with trio.open_nursery() as nursery:
            async for study, series in self._receive:
                nursery.start_soon(self._fetch, study, series)

    def note_miss(self, study: str, series: str) -> None:
        """An instance of this series is about to be fetched because it was not cached."""
        series_key = (study, series)
        if series_key in self._running or series_key in self._too_large:
            return
        now = time.monotonic()
        misses = self._misses[series_key]
        misses.append(now)
        while misses and now - misses[0] > self.window:
            misses.popleft()
        if len(misses) >= self.trigger:
            del self._misses[series_key]
            self._running.add(series_key)
            self._send.send_nowait(series_key)

    async def _fetch(self, study: str, series: str) -> None:
        started = time.monotonic()
        sizes: list[int] = []
        try:
            if await self._too_big(study, series):
                self._too_large.add((study, series))
            else:
                await self.archive.fill_series(study, series, on_stored=sizes.append)
                log.info("series %s: prefetched %d instances (%d bytes) in %.2f s", series,
                         len(sizes), sum(sizes), time.monotonic() - started)
        except DicomfsError as exc:
            log.warning("series %s: prefetch failed: %s", series, exc)
        except Exception:  # a background task must never take the mount down
            log.exception("series %s: prefetch failed unexpectedly", series)
        finally:
            self._running.discard((study, series))

    async def _too_big(self, study: str, series: str) -> bool:
        """Whether the series, judged by its instances cached so far, would take more than
        half the cache: prefetching it would evict what it brings before it is read."""
        uids = await self.archive.instance_uids(study, series)
        known = [size for uid in uids
                 if (size := self.archive.store.size(Key(study, series, uid, "dcm")))]
        if not known or sum(known) / len(known) * len(uids) <= self.archive.store.max_bytes / 2:
            return False
        log.info("series %s: too large for the cache to prefetch; reading it file by file",
                 series)
        return True


async def prefetch(archive: Archive, study: str, series: str | None = None, *,
                   metadata: bool = True) -> int:
    """Fill the cache with a study (or one series) ahead of time; returns failures.

    Resumable: what is cached already is skipped, so a second run after an
    interruption fetches only the rest. Metadata comes along, for offline use,
    when the server offers it (``metadata``).
    """
    if await archive.find_study(study) is None:
        raise NotFound(f"no study {study} on the server")
    if series is None:
        found = await archive.series(study)
        all_series = [uid for ds in found if (uid := dicomjson.uid(ds, dicomjson.SERIES_UID))]
    elif await archive.find_series(study, series) is None:
        raise NotFound(f"no series {series} in study {study}")
    else:
        all_series = [series]
    for one in all_series:  # saved, so that a mount can look them up offline
        await archive.find_series(study, one)
    total = cached = 0
    for one in all_series:
        uids = await archive.instance_uids(study, one)
        total += len(uids)
        cached += sum(archive.is_cached(study, one, uid) for uid in uids)
    progress = Progress(total, done=cached)
    failed: list[str] = []
    for one in all_series:
        failed += await archive.fill_series(study, one, on_stored=progress.add)
        if metadata:
            (await archive.metadata(study, one)).close()
    if metadata:
        (await archive.metadata(study)).close()
    progress.finish()
    return len(failed)
