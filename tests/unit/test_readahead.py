"""Read-ahead's decisions alone, with a recording engine and store (no server)."""

from __future__ import annotations

from typing import Any

import trio

from dicomfs.readahead import Readahead
from dicomfs.store import Key

STUDY, SERIES = "1.2.3", "1.2.3.4"
UIDS = [f"1.2.3.4.{n}" for n in range(1, 31)]


class Engine:
    """Near (as on loopback): a walk would be streamed if the series fits the cache."""

    near = True

    def __init__(self) -> None:
        self.streams: list[list[str]] = []
        self.wanted: list[str] = []

    def stream(self, study: str, series: str, uids: list[str]) -> None:
        self.streams.append(uids)

    def want(self, key: Key, priority: object) -> None:
        self.wanted.append(key.instance or "")

    def withdraw(self, key: Key) -> bool:
        return False


class Store:
    """A 1 MiB cache in which nothing has arrived yet."""

    def size(self, key: Key) -> int | None:
        return None

    def capacity(self) -> int:
        return 1 << 20


async def listing(study: str, series: str) -> list[str]:
    return UIDS


async def test_no_stream_before_a_file_size_is_known() -> None:
    """Opens are often seen before their files arrive: an unknown size must not pass for a
    series small enough to stream into the cache."""
    engine = Engine()
    readahead = Readahead(engine, Store(), listing, max_window=8)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(readahead.run)
        for uid in UIDS[:3]:
            readahead.opened(Key(STUDY, SERIES, uid, "dcm"))
        await wait_for(lambda: engine.wanted)
        nursery.cancel_scope.cancel()
    assert engine.streams == []
    assert engine.wanted[0] == UIDS[2]  # a walk all the same: the next files, one by one


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)
