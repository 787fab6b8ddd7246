"""Requests that share: one download per thing however many ask for it, a deadline
on each, and one idea of whether the server answers.

A file manager opening a folder, a thumbnailer and a shell may all ask for the same
listing or metadata at once; one request serves them all. Instances have their own
queue (:mod:`dicomfs.fetch`), which reports to the same :class:`ServerHealth`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from dicomfs.errors import DicomfsError, Timeout, Unreachable

log = logging.getLogger(__name__)
T = TypeVar("T")


class ServerHealth:
    """Whether the server answers, shared by everything that asks it: an error log
    when it goes away, a warning when it is back, and cached data standing in."""

    def __init__(self) -> None:
        self.offline_since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self.offline_since is None:
            self.offline_since = time.monotonic()
            log.error("server unreachable (%s); serving what is cached", exc)

    def answered(self) -> None:
        if self.offline_since is not None:
            log.warning("server reachable again after %.0f s",
                        time.monotonic() - self.offline_since)
            self.offline_since = None


@dataclass(eq=False)
class _Flight:
    """One download in progress; everyone who wants the same thing waits on it."""

    done: trio.Event = field(default_factory=trio.Event)
    error: DicomfsError | None = None
    finished: bool = False
    result: Any = None


class Flights:
    """Downloads in progress, by what they fetch."""

    def __init__(self, *, deadline: float, health: ServerHealth) -> None:
        self.deadline = deadline
        self.health = health
        self._flights: dict[object, _Flight] = {}

    async def once(self, key: object, work: Callable[[], Awaitable[T]]) -> T:
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

    async def guarded(self, work: Callable[[], Awaitable[T]]) -> T:
        """Bound one request by the deadline and keep track of whether the server answers."""
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
