"""One instance on its way into the cache, and the file a program reads while it arrives.

The fetch engine (:mod:`dicomfs.fetch`) decides when a transfer runs and feeds it
the part's bytes; here is what a transfer holds meanwhile (its temporary file,
how much of it is written, its outcome) and how a reader waits on it: a read
never returns bytes before they are written, nor the end of a file before the
whole of it has passed its checks.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from dicomfs.errors import DicomfsError, ProtocolError
from dicomfs.store import CachedFile, Key, Writer

if TYPE_CHECKING:  # the engine runs transfers; a transfer only names it
    from dicomfs.fetch import FetchEngine, Priority


@dataclass(eq=False)
class Transfer:
    """One instance on its way into the cache, readable while it arrives.

    Once the part's headers give its length (``size``), what is written so far can
    be read (``fd``, ``written``); a retry starts the file again from its start.
    """

    key: Key
    priority: Priority
    done: trio.Event = field(default_factory=trio.Event)
    error: DicomfsError | None = None
    started: bool = False
    waiters: int = 0
    undelivered: bool = False  # a series stream claimed it and ended without it
    size: int | None = None  # the part's declared length, once its headers are in
    written: int = 0
    fd: int = -1  # reads the temporary file being written
    readers: int = 0  # streaming readers (ArrivingFile) still open
    pinned: CachedFile | None = None  # the cache entry, kept from eviction for those readers
    progress: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def begin(self, writer: Writer, size: int | None) -> None:
        """A new attempt's part starts: its bytes become readable as they are written."""
        if self.size is not None and size is not None and size != self.size:
            raise ProtocolError(f"the instance was {self.size} bytes, now {size}")
        self.end()
        if size is not None:
            self.size = size
            self.fd = os.open(writer.path, os.O_RDONLY)
        self._moved()

    def advance(self, count: int) -> None:
        self.written += count
        self._moved()

    def end(self) -> None:
        """This attempt is over; what it wrote is no longer readable through it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.written = 0

    def _moved(self) -> None:
        self.progress.set()
        self.progress = trio.Event()

    def failure(self) -> DicomfsError:
        """A fresh copy of the error for one waiter: exceptions carry tracebacks and
        contexts, and one object raised in many tasks tangles them."""
        return copy.copy(self.error or DicomfsError("transfer ended without a result"))


class ArrivingFile:
    """An instance open while it arrives: a read waits for the bytes it asks for, and
    fails (EIO) at the first byte a broken transfer did not bring. Nothing here is
    cached until the whole file has passed its checks (see
    :class:`~dicomfs.fetch.FetchEngine`)."""

    def __init__(self, engine: FetchEngine, transfer: Transfer) -> None:
        self.engine = engine
        self.transfer = transfer
        self.size = transfer.size or 0
        self._closed = False

    @property
    def fd(self) -> int:
        """The file written so far (-1 between attempts)."""
        return self.transfer.fd

    async def read(self, offset: int, size: int) -> bytes:
        """The bytes asked for once they are in; the last ones (and the end of the file)
        only once the whole file has passed its checks, so that a reader never gets all
        of an object the checks refuse: it gets EIO instead."""
        transfer = self.transfer
        end = min(offset + size, self.size)
        while True:
            if transfer.error is not None:
                raise transfer.failure()
            ready = transfer.done.is_set() if end >= self.size else transfer.written >= end
            if transfer.fd >= 0 and ready:
                return os.pread(transfer.fd, end - offset, offset) if end > offset else b""
            await transfer.progress.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.abandoned(self.transfer)
