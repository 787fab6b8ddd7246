"""Read-ahead: when a program walks a series, fetch the files it will open next.

Tools that read a series (dcm2niix, SimpleITK, ``cp -r``, ``cat *.dcm``) open
its files one after another, in the order they listed them: the folder's own
order (``readdir``: by instance number) or sorted by name (a shell glob, ``ls``).
Two opens in a row that follow one of those orders make a walk; from then on
the fetch engine is asked for the next files in that order, in parallel
requests. When the server is near (on this machine or LAN, see
``FetchEngine.near``) and the series fits in half the cache, one series stream
brings it instead: as fast there, and half the CPU on both ends. The window grows
while the walk goes on (4, 8, ... up to ``max_window`` files, enough to keep
every connection busy) and never holds more than a share of what the cache can
keep now, so on a nearly full disk it shrinks towards fetching only what is
read. A file read-ahead asked for is never asked for again in the same walk:
if the cache dropped it before it was read, the reader's own open fetches it.
A person opening one image pulls nothing more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import cachetools
import trio

from dicomfs.errors import DicomfsError
from dicomfs.fetch import FetchEngine, Priority
from dicomfs.store import Key, Store

log = logging.getLogger(__name__)

MiB = 1024 * 1024
INITIAL_WINDOW = 4
CACHE_SHARE = 8  # read-ahead holds at most this fraction (1/8) of what the cache can keep
MAX_AHEAD_BYTES = 512 * MiB
WALKS = 64  # series followed at once

Listing = Callable[[str, str], Awaitable[list[str]]]


@dataclass
class _Walk:
    """A series being read: its two candidate orders and where the reader is."""

    orders: tuple[list[str], list[str]]  # listed (readdir), named (sorted by file name)
    positions: tuple[dict[str, int], dict[str, int]]
    last: str | None = None
    order: int | None = None  # which of the orders the walk follows
    window: int = 0
    ahead: set[str] = field(default_factory=set)  # asked for and not yet passed
    asked: set[str] = field(default_factory=set)  # ever asked for by this walk
    size: int = 0  # of a file of this series, once one is cached
    streamed: bool = False

    @classmethod
    def of(cls, listed: list[str]) -> _Walk:
        named = sorted(listed, key=lambda uid: uid + ".dcm")
        return cls((listed, named), ({u: i for i, u in enumerate(listed)},
                                     {u: i for i, u in enumerate(named)}))

    def follows(self, instance: str) -> int | None:
        """The order in which ``instance`` comes shortly after the previous open, if any.

        In the order the walk follows, a few steps are allowed, not just one: files
        the kernel still holds are opened without asking us, so the walk may seem to
        skip them. Switching to the other order takes the very next file: with
        random UIDs, a few steps in the other order happen by chance.
        """
        if self.last is None:
            return None
        for order in sorted((0, 1), key=lambda candidate: candidate != self.order):
            positions = self.positions[order]
            step = positions[instance] - positions[self.last]
            if step == 1 or (order == self.order and 1 <= step <= self.window + 1):
                return order
        return None


class Readahead:
    """Watches opens of instances (:meth:`opened`); :meth:`run` keeps walks fed."""

    def __init__(self, engine: FetchEngine, store: Store, listing: Listing, *,
                 max_window: int) -> None:
        self.engine = engine
        self.store = store
        self.listing = listing
        self.max_window = max(1, max_window)
        self._walks: cachetools.LRUCache[tuple[str, str], _Walk] = cachetools.LRUCache(WALKS)
        self._first_opens: cachetools.LRUCache[tuple[str, str], str] = \
            cachetools.LRUCache(WALKS)
        self._send, self._receive = trio.open_memory_channel[Key](math.inf)

    def opened(self, key: Key) -> None:
        """A program opens this instance (cached or not); never blocks."""
        self._send.send_nowait(key)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        async for key in self._receive:
            try:
                await self._step(key)
            except DicomfsError as exc:  # no listing: no read-ahead, the reads go on
                log.debug("read-ahead of series %s: %s", key.series, exc)

    async def _step(self, key: Key) -> None:
        study, series, instance = key.study, key.series or "", key.instance or ""
        walk = self._walks.get((study, series))
        if walk is None:
            # One open is no walk: a person opening one image, or a path opened by name,
            # must not cost the listing of a series of thousands. The second one is.
            first = self._first_opens.pop((study, series), None)
            if first is None:
                self._first_opens[study, series] = instance
                return
            walk = self._walks[study, series] = _Walk.of(await self.listing(study, series))
            walk.last = first if first in walk.positions[0] else None
            walk.size = self.store.size(Key(study, series, first, "dcm")) or 0  # read by now
        if instance not in walk.positions[0]:
            return
        walk.size = self.store.size(key) or walk.size
        order = walk.order = walk.follows(instance)
        walk.last = instance
        if order is None:  # a jump: whatever was ahead is not wanted now
            log.debug("series %s: jump to %s", series, instance)
            self._withdraw(study, series, walk.ahead, walk)
            walk.ahead, walk.window = set(), 0
            return
        # Only once a file's size is known: an open is often seen before its file has
        # arrived, and an unknown size must not pass for a series that fits the cache.
        if not walk.streamed and self.engine.near and walk.size and \
                walk.size * len(walk.orders[0]) <= self.store.capacity() // 2:
            walk.streamed = True  # near: one stream, half the CPU of parallel requests
            self.engine.stream(study, series, walk.orders[order])
        walk.window = min(max(INITIAL_WINDOW, walk.window * 2), self._room(walk.size))
        log.debug("series %s: walk at %s, %d ahead", series, instance, walk.window)
        start = walk.positions[order][instance] + 1
        upcoming = walk.orders[order][start:start + walk.window]
        self._withdraw(study, series, walk.ahead - set(upcoming), walk)
        walk.ahead = set(upcoming)
        for uid in upcoming:
            if uid not in walk.asked:
                walk.asked.add(uid)
                self.engine.want(Key(study, series, uid, "dcm"), Priority.READAHEAD)

    def _withdraw(self, study: str, series: str, uids: set[str], walk: _Walk) -> None:
        """Drop queued read-ahead the reader no longer heads for; those never started
        may be asked for again later."""
        for uid in uids:
            if self.engine.withdraw(Key(study, series, uid, "dcm")):
                walk.asked.discard(uid)

    def _room(self, size: int) -> int:
        """Files the window may hold: a share of what the cache can keep now, in files
        of ``size`` bytes (the series' files, once one is known)."""
        if not size:  # nothing known of the files yet: stay small
            return INITIAL_WINDOW
        budget = min(self.store.capacity() // CACHE_SHARE, MAX_AHEAD_BYTES)
        files = budget // size
        return max(1, min(self.max_window, files))
