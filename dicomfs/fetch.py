"""The fetch engine: every instance transfer, over a bounded, adaptive set of connections.

Why parallel requests, one instance each: across a hospital network or the internet
each request pays a round trip and each connection gets only a share of the link,
so one series stream runs at one connection's rate however fast the link is.
Measured through our link emulator (20 ms one way, 25 MB/s per connection, the
400-slice CT series, docs/performance.md): one series stream takes about as long
as a single ``curl``, while instance requests on 16 connections take a fraction of
it; on loopback the two cost about the same wall time. Instance requests also let
a walk fetch exactly what the reader will open next, in its order, and let a
transfer that fails be retried alone.

How (mountpoint-s3's prefetcher and gcsfuse's parallel downloads are the models):

* Every transfer is a :class:`~dicomfs.transfer.Transfer` in one priority queue: a
  file a program is blocked on (``READER``) starts before read-ahead (``READAHEAD``)
  and before ``dicomfs prefetch`` (``BACKGROUND``). One transfer per entry:
  whoever asks for an entry on its way waits for that transfer (and raises its
  priority).
* At most ``limit`` transfers run at once, never more than ``max_connections``.
  The limit adapts (AIMD): halved when the server says it is overloaded (429,
  503) or transfers fail or stall, and no new transfer starts before its
  ``Retry-After``; raised by one per ``limit`` successes. Read-ahead leaves one
  connection free for readers.
* Each transfer runs in its own task, bounded by the deadline, with the client's
  one retry policy (:func:`dicomfs.transport.backoff`) and at most ``retries`` retries
  in all, so one slow or failed transfer never stalls the others.
* Nothing unverified enters the cache: a part is written to a temporary file and
  committed only when :mod:`dicomfs.part10` shows it is the whole instance asked
  for. The check and the commit (renames, eviction) run in worker threads, off
  the trio thread that serves every FUSE request.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterable

import trio

from dicomfs import part10
from dicomfs.client import DicomwebClient
from dicomfs.errors import (
    DicomfsError,
    DicomwebError,
    IntegrityError,
    ProtocolError,
    ServerError,
    Timeout,
    Unreachable,
)
from dicomfs.flight import ServerHealth
from dicomfs.multipart import PartData, PartEnd, PartStart
from dicomfs.store import Key, Store, Writer
from dicomfs.transfer import ArrivingFile, Transfer
from dicomfs.transport import backoff, retryable

log = logging.getLogger(__name__)

OVERLOADED = (429, 503)  # statuses that mean "fewer connections, please"
# A first byte sooner than this: the server is on this machine or LAN. Measured: 1.6-3 ms
# for an instance from Orthanc on loopback (more on a busy machine), 12 ms and more
# across the nearest emulated link (5 ms one way).
NEAR_SECONDS = 0.006
RTT_SAMPLES = 32


class Priority(enum.IntEnum):
    """Who waits for a transfer; lower goes first."""

    READER = 0  # a program is blocked in open()
    READAHEAD = 1  # a walking reader will open it soon
    BACKGROUND = 2  # dicomfs prefetch


class FetchEngine:
    """Runs instance transfers for a mount (or ``dicomfs prefetch``): start :meth:`run`
    in a nursery, then :meth:`fetch` waits for an entry and :meth:`want` asks ahead."""

    def __init__(self, client: DicomwebClient, store: Store, *, max_connections: int = 16,
                 retries: int = 3, deadline: float = 120.0,
                 health: ServerHealth | None = None) -> None:
        self.client = client
        self.store = store
        self.max_connections = max(1, max_connections)
        self.retries = max(0, retries)
        self.deadline = deadline
        self.health = health or ServerHealth()
        self._limit = float(self.max_connections)
        self._paused_until = 0.0
        self._queue: list[tuple[int, int, Transfer]] = []
        self._order = itertools.count()
        self._transfers: dict[Key, Transfer] = {}
        self._active = 0
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._first_bytes: deque[float] = deque(maxlen=RTT_SAMPLES)

    # -- what callers see ---------------------------------------------------------------

    @property
    def limit(self) -> int:
        """Transfers allowed at once now (adapts between 1 and max_connections)."""
        return max(1, int(self._limit))

    @property
    def in_flight(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return sum(not t.started for t in self._transfers.values())

    @property
    def near(self) -> bool:
        """Whether the server answers as if on this machine or LAN (judged by the
        quickest first byte of recent instance requests): there one series stream
        is as fast as parallel requests and costs both ends half the CPU."""
        return bool(self._first_bytes) and min(self._first_bytes) < NEAR_SECONDS

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run transfers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                self._pump()
                pause = self._paused_until - time.monotonic()
                if self._queue and pause > 0:  # after a Retry-After: try again then
                    await trio.sleep(pause)
                    self._wake.set()

    async def fetch(self, key: Key, priority: Priority = Priority.READER) -> None:
        """Bring ``key`` into the cache, or join the transfer already bringing it."""
        await self._join(key, priority, streaming=False)

    async def open(self, key: Key) -> ArrivingFile | None:
        """For a program opening ``key``: a file readable while it arrives, as soon as
        the server has said how long it is; None once it is in the cache instead (it
        arrived whole first, or the server gave no length)."""
        transfer = await self._join(key, Priority.READER, streaming=True)
        return ArrivingFile(self, transfer) if not transfer.done.is_set() else None

    async def _join(self, key: Key, priority: Priority, *, streaming: bool) -> Transfer:
        """Wait for ``key`` to arrive, or (``streaming``) to start arriving with a length."""
        while True:
            transfer = self._enqueue(key, priority)
            transfer.waiters += 1
            try:
                while not transfer.done.is_set() and not (streaming and transfer.fd >= 0):
                    await transfer.progress.wait()
            finally:
                transfer.waiters -= 1
            if not transfer.undelivered:
                break
        if transfer.error is not None:
            raise transfer.failure()
        if streaming and not transfer.done.is_set():
            transfer.readers += 1
        return transfer

    def abandoned(self, transfer: Transfer) -> None:
        """A streaming reader closed: with no other reader, nobody waiting and nothing
        else asking for it (read-ahead, prefetch), the rest is not worth the bytes."""
        transfer.readers -= 1
        if transfer.readers or transfer.waiters:
            return
        if transfer.done.is_set():
            transfer.end()
            if transfer.pinned is not None:
                transfer.pinned.close()
                transfer.pinned = None
        elif transfer.priority is Priority.READER and transfer.written < (transfer.size or 0):
            transfer.scope.cancel()  # (all bytes in: let it be checked and cached)

    def stream(self, study: str, series: str, instances: Iterable[str]) -> int:
        """Fetch a series in one streamed request, keeping the ``instances`` that are
        neither cached nor on their way (claimed now: opening one waits for the
        stream). What the stream does not deliver is fetched alone when asked for.
        Returns how many were claimed; the stream takes one connection.
        """
        claimed: dict[str, Transfer] = {}
        for instance in instances:
            key = Key(study, series, instance, "dcm")
            if self.store.size(key) is None and key not in self._transfers:
                transfer = self._transfers[key] = Transfer(key, Priority.READAHEAD)
                transfer.started = True
                claimed[instance] = transfer
        if claimed and self._nursery is not None:
            self._active += 1
            self._nursery.start_soon(self._stream, study, series, claimed)
        return len(claimed)

    def want(self, key: Key, priority: Priority = Priority.READAHEAD) -> None:
        """Fetch ``key`` when a connection is free, unless cached or on its way."""
        if self.store.size(key) is None:
            self._enqueue(key, priority)

    def withdraw(self, key: Key) -> bool:
        """Forget a queued read-ahead nobody waits for (the reader went elsewhere);
        False when it is running, awaited or not known."""
        transfer = self._transfers.get(key)
        if transfer is None or transfer.started or transfer.waiters:
            return False
        del self._transfers[key]
        transfer.error = DicomfsError("withdrawn")
        transfer.done.set()
        return True

    # -- scheduling -----------------------------------------------------------------------

    def _enqueue(self, key: Key, priority: Priority) -> Transfer:
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._transfers[key] = Transfer(key, priority)
        elif transfer.started or transfer.priority <= priority:
            return transfer
        transfer.priority = priority  # new or raised: queued (again) at this priority
        heapq.heappush(self._queue, (priority, next(self._order), transfer))
        self._wake.set()
        return transfer

    def _pump(self) -> None:
        """Start queued transfers, most urgent first, while connections are free."""
        if self._nursery is None or time.monotonic() < self._paused_until:
            return
        while self._queue:
            priority, _, transfer = self._queue[0]
            stale = (transfer.started or transfer.priority != priority
                     or self._transfers.get(transfer.key) is not transfer)
            if stale:
                heapq.heappop(self._queue)
                continue
            # Read-ahead leaves a connection free for a program blocked in open().
            room = self.limit - (1 if priority > Priority.READER and self.limit > 1 else 0)
            if self._active >= room:
                return
            heapq.heappop(self._queue)
            transfer.started = True
            self._active += 1
            self._nursery.start_soon(self._run, transfer)

    async def _run(self, transfer: Transfer) -> None:
        try:
            with transfer.scope, trio.fail_after(self.deadline):
                await self._attempts(transfer)
            if transfer.scope.cancelled_caught:
                transfer.error = DicomfsError("stopped: its last reader closed it")
        except trio.TooSlowError:
            transfer.error = Timeout(f"no complete answer within {self.deadline:g} s")
            self.health.failed(transfer.error)
        except DicomfsError as exc:
            transfer.error = exc
        except Exception as exc:  # a bug must fail one file, never the mount
            log.exception("instance %s: transfer failed unexpectedly", transfer.key.instance)
            transfer.error = DicomfsError(f"unexpected error: {exc}")
        finally:
            self._active -= 1
            self._land(transfer)

    def _land(self, transfer: Transfer) -> None:
        if self._transfers.get(transfer.key) is transfer:
            del self._transfers[transfer.key]
        if transfer.error is not None or not transfer.readers:
            transfer.end()  # else the last streaming reader closes it, and its pin
        else:  # a file being read is never evicted from under its reader
            transfer.pinned = self.store.open(transfer.key)
        transfer.done.set()
        transfer.progress.set()
        self._wake.set()

    async def _stream(self, study: str, series: str, claimed: dict[str, Transfer]) -> None:
        """Write each part to a temporary file and keep it if it is a claimed instance.

        Claimed UIDs come from the series' QIDO listing, and SOP Instance UIDs are
        unique, so a part whose UID was claimed is that instance of this series.
        """
        writer = None
        try:
            with trio.fail_after(self.deadline):
                async with self.client.retrieve(study, series, retry=False) as events:
                    async for event in events:
                        if isinstance(event, PartStart):
                            writer = self.store.writer()
                        elif isinstance(event, PartData) and writer is not None:
                            write_bounded(self.store, writer, event.data)
                        elif isinstance(event, PartEnd) and writer is not None:
                            await self._keep(writer, claimed)
                            writer = None
        except (DicomfsError, trio.TooSlowError) as exc:
            log.warning("series %s: stream stopped (%s); the rest comes one by one",
                        series, exc or "deadline")
        finally:
            if writer is not None:
                writer.abort()
            self._active -= 1
            self._wake.set()  # a connection is free (even when every part was delivered)
            for transfer in claimed.values():
                transfer.undelivered = True
                self._land(transfer)

    async def _keep(self, writer: Writer, claimed: dict[str, Transfer]) -> None:
        try:
            found = await trio.to_thread.run_sync(instance_uid, writer)
            transfer = claimed.pop(found, None)
            if transfer is None:
                writer.abort()
                return
            await trio.to_thread.run_sync(self.store.commit, writer, transfer.key)
            self._land(transfer)
        except DicomfsError as exc:
            writer.abort()
            log.warning("series stream: skipped a part (%s)", exc)

    async def _attempts(self, transfer: Transfer) -> None:
        """Fetch an instance with at most ``retries`` retries in all, adapting the limit."""
        key = transfer.key
        for attempt in itertools.count():
            try:
                await self._download(transfer)
            except DicomwebError as exc:
                if isinstance(exc, Unreachable | Timeout):
                    self.health.failed(exc)
                if not retryable(exc):
                    raise
                self._back_off(exc)
                if attempt >= self.retries:
                    raise
                delay = backoff(attempt, exc)
                log.warning("instance %s: %s; again in %.1f s (%d/%d)", key.instance, exc,
                            delay, attempt + 1, self.retries)
                await trio.sleep(delay)
            else:
                self.health.answered()
                self._limit = min(self.max_connections, self._limit + 1 / self._limit)
                return

    def _back_off(self, exc: DicomwebError) -> None:
        """Fewer connections after a sign of overload; none new before Retry-After."""
        self._limit = max(1.0, self._limit / 2)
        if isinstance(exc, ServerError) and exc.status in OVERLOADED and exc.retry_after \
                and exc.retry_after.isdigit():
            pause = min(float(exc.retry_after), 30.0)
            self._paused_until = max(self._paused_until, time.monotonic() + pause)
        log.info("server strained (%s): at most %d transfers at once", exc, self.limit)

    async def _download(self, transfer: Transfer) -> None:
        """One request for one instance, readable as it arrives, into the cache once
        verified."""
        key = transfer.key
        writer = self.store.writer()
        try:
            asked = time.monotonic()
            async with self.client.retrieve(key.study, key.series, key.instance,
                                            retry=False) as events:
                self._first_bytes.append(time.monotonic() - asked)
                parts = 0
                async for event in events:
                    if isinstance(event, PartStart):
                        parts += 1
                        if parts > 1:
                            raise ProtocolError("an instance answer with several parts")
                        transfer.begin(writer, self._declared(event.headers))
                    elif isinstance(event, PartData):
                        write_bounded(self.store, writer, event.data)
                        transfer.advance(len(event.data))
            if parts == 0:
                raise ProtocolError("an instance answer with no part")
            await trio.to_thread.run_sync(self._verify_and_commit, writer, key)
        except BaseException:
            writer.abort()
            transfer.end()
            raise

    def _verify_and_commit(self, writer: Writer, key: Key) -> None:
        """In a worker thread (one hop per file): keep the part if it is the whole
        instance ``key`` names, else IntegrityError."""
        found = instance_uid(writer)
        if found != key.instance:
            raise IntegrityError(f"asked for instance {key.instance}, got {found!r}")
        self.store.commit(writer, key)

    def _declared(self, headers: dict[str, str]) -> int | None:
        """The part's length, when it says one; refused when the cache could not hold it."""
        value = headers.get("content-length", "")
        if not value.isdigit():
            return None
        if int(value) > self.store.max_bytes:
            raise ProtocolError(f"an instance of {value} bytes, larger than the cache "
                                f"({self.store.max_bytes} bytes); raise --cache-size")
        return int(value)


def write_bounded(store: Store, writer: Writer, data: bytes) -> None:
    """Write part data, refusing a part larger than the whole cache may hold.

    Without a bound, a broken or hostile server streaming without end would fill
    the disk before any check at commit time could object.
    """
    if writer.size + len(data) > store.max_bytes:
        raise ProtocolError(f"an instance larger than the cache size "
                            f"({store.max_bytes} bytes); raise --cache-size")
    writer.write(data)


def instance_uid(writer: Writer) -> str:
    """The SOP Instance UID of a written part, once it is shown a whole DICOM object.

    The dataset's UID is the instance's identity (servers index by it, and a file
    meta that says otherwise exists in the wild). Blocking (inflating a big deflated
    file takes milliseconds): call it from a worker thread.
    """
    fd = os.open(writer.path, os.O_RDONLY)
    try:
        return part10.whole_instance_uid(writer.head, fd, writer.size)
    finally:
        os.close(fd)
