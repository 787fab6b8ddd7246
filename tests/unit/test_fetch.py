"""The fetch engine and read-ahead, against a scripted server (no FUSE, seconds).

What is asserted is behaviour the server can see: how many requests ran at once,
which came first, what was asked again and when, and that every stored byte is right.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from dicomfs.archive import Archive
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import ServerError
from dicomfs.fetch import FetchEngine, Priority
from dicomfs.store import Key, Store
from tests.support.fakeserver import Reply, one_series_app, serving
from tests.support.tiny import tiny_instance

STUDY, SERIES = "1.2.826.0.1.1", "1.2.826.0.1.1.1"
BOUNDARY = "b0undary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def sop(n: int) -> str:
    return f"1.2.826.0.1.1.1.{n}"


def instance(n: int) -> bytes:
    return tiny_instance(study_uid=STUDY, series_uid=SERIES, sop_uid=sop(n), instance_number=n)


def multipart(*bodies: bytes) -> bytes:
    out = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
                   f"Content-Length: {len(b)}\r\n\r\n".encode() + b + b"\r\n" for b in bodies)
    return out + f"--{BOUNDARY}--\r\n".encode()


@dataclass
class Recorder:
    """Instance retrieves as the server saw them: order, times, and how many at once."""

    delay: float = 0.05  # each answer takes this long: transfers overlap
    lock: threading.Lock = field(default_factory=threading.Lock)
    order: list[str] = field(default_factory=list)
    times: list[tuple[str, float]] = field(default_factory=list)
    running: int = 0
    most: int = 0
    answer: Callable[[str, int], Reply | None] = lambda uid, attempt: None

    def __call__(self, path: str) -> Reply | None:
        uid = path.rsplit("/", 1)[1]
        with self.lock:
            attempt = self.order.count(uid)
            self.order.append(uid)
            self.times.append((uid, time.monotonic()))
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            scripted = self.answer(uid, attempt)
            if scripted is not None:
                return scripted
            return Reply(200, [("Content-Type", MULTIPART)],
                         multipart(instance(int(uid.rsplit(".", 1)[1]))))
        finally:
            with self.lock:
                self.running -= 1


@asynccontextmanager
async def engine_for(recorder: Recorder, tmp_path: Path, count: int, *,
                     connections: int = 4, retries: int = 2
                     ) -> AsyncIterator[tuple[FetchEngine, Store]]:
    """A running engine against a scripted one-series server of ``count`` instances."""
    with serving() as server:
        server.app = one_series_app(STUDY, SERIES, [sop(n) for n in range(count)],
                                    lambda path: recorder(path) if "/instances/" in path
                                    else None)
        store = Store(tmp_path / "cache")
        config = ClientConfig(base_url=server.url, max_connections=connections, retries=0)
        async with DicomwebClient(config) as client, trio.open_nursery() as nursery:
            engine = FetchEngine(client, store, max_connections=connections, retries=retries)
            await nursery.start(engine.run)
            yield engine, store
            nursery.cancel_scope.cancel()


def key(n: int) -> Key:
    return Key(STUDY, SERIES, sop(n), "dcm")


def stored(store: Store, n: int) -> bytes:
    blob = store.open(key(n))
    assert blob is not None, n
    try:
        return Path(f"/proc/self/fd/{blob.fd}").read_bytes()
    finally:
        blob.close()


async def test_parallel_within_the_connection_limit_and_every_byte_right(
        tmp_path: Path) -> None:
    recorder = Recorder()
    async with engine_for(recorder, tmp_path, 24, connections=4) as (engine, store), \
            trio.open_nursery() as nursery:
        for n in range(24):
            nursery.start_soon(engine.fetch, key(n))
    assert recorder.most == 4  # parallel, never above the limit
    assert sorted(recorder.order) == sorted(sop(n) for n in range(24))  # each asked once
    for n in range(24):
        assert stored(store, n) == instance(n)


async def test_a_blocked_reader_goes_before_read_ahead(tmp_path: Path) -> None:
    recorder = Recorder()
    async with engine_for(recorder, tmp_path, 30, connections=3) as (engine, _store):
        for n in range(29):
            engine.want(key(n), Priority.READAHEAD)
        await wait_for(lambda: engine.in_flight >= 2)
        await engine.fetch(key(29))  # a program blocked in open()
    # Read-ahead keeps one connection free for readers: the reader's file was among the
    # first requests, not behind the 29 read-ahead files.
    assert sop(29) in recorder.order[:3], recorder.order[:5]


async def test_overload_halves_the_connections_and_waits_out_retry_after(
        tmp_path: Path) -> None:
    refused: list[float] = []

    def answer(uid: str, attempt: int) -> Reply | None:
        if uid == sop(0) and attempt == 0:
            refused.append(time.monotonic())
            return Reply(503, [("Retry-After", "1")], b"busy")
        return None

    recorder = Recorder(delay=0.05, answer=answer)
    async with engine_for(recorder, tmp_path, 16, connections=8) as (engine, store):
        async with trio.open_nursery() as nursery:
            for n in range(16):
                nursery.start_soon(engine.fetch, key(n))
        assert engine.limit < 8  # halved by the 503, not all regained since
        for n in range(16):
            assert stored(store, n) == instance(n)
    after = [at for uid, at in recorder.times if at > refused[0]]
    # Nothing new before Retry-After: only requests already on their way when the 503
    # came may reach the server just after it.
    early = [at for at in after if at < refused[0] + 1.0]
    assert len(early) < 8 and all(at < refused[0] + 0.5 for at in early), early
    assert any(at >= refused[0] + 1.0 for at in after)


async def test_one_failing_transfer_never_stalls_the_others(tmp_path: Path) -> None:
    def answer(uid: str, attempt: int) -> Reply | None:
        return Reply(500, body=b"broken") if uid == sop(3) else None

    recorder = Recorder(delay=0.01, answer=answer)
    failures: list[BaseException] = []

    async def fetch(n: int) -> None:
        try:
            await engine.fetch(key(n))
        except ServerError as exc:
            failures.append(exc)

    async with engine_for(recorder, tmp_path, 10, connections=2, retries=2) as (engine, store):
        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(fetch, n)
        for n in set(range(10)) - {3}:
            assert stored(store, n) == instance(n)
        assert store.open(key(3)) is None
    assert len(failures) == 1
    assert recorder.order.count(sop(3)) == 3  # --retries 2: three attempts in all, no more


async def test_waiters_share_one_transfer_and_get_their_own_error(tmp_path: Path) -> None:
    recorder = Recorder(answer=lambda uid, attempt: Reply(404, body=b"gone"))
    errors: list[BaseException] = []

    async def fetch() -> None:
        try:
            await engine.fetch(key(0))
        except Exception as exc:
            errors.append(exc)

    async with engine_for(recorder, tmp_path, 1) as (engine, _store), \
            trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(fetch)
    assert recorder.order == [sop(0)]  # one request for five waiters
    assert len(errors) == 5 and len({id(e) for e in errors}) == 5  # each its own copy


async def test_read_ahead_follows_a_walk_in_name_order(tmp_path: Path) -> None:
    """Two opens in name order (a shell glob) make a walk: the next files are fetched
    in that order, before they are opened; a lone open fetches nothing more."""
    recorder = Recorder(delay=0.005)
    count = 40
    by_name = sorted(range(count), key=lambda n: sop(n) + ".dcm")
    with serving() as server:
        server.app = one_series_app(STUDY, SERIES, [sop(n) for n in range(count)],
                                    lambda path: recorder(path) if "/instances/" in path
                                    else None)
        store = Store(tmp_path / "cache")
        config = ClientConfig(base_url=server.url, max_connections=4, retries=0)
        async with DicomwebClient(config) as client, trio.open_nursery() as nursery:
            archive = Archive(client, store)
            await nursery.start(archive.run)
            (await archive.instance(STUDY, SERIES, sop(by_name[20]))).close()  # a lone look
            await wait_for(lambda: archive.engine.in_flight == 0)
            assert recorder.order == [sop(by_name[20])]
            for n in by_name[:2]:
                (await archive.instance(STUDY, SERIES, sop(n))).close()
            await wait_for(lambda: len(recorder.order) >= 7)
            nursery.cancel_scope.cancel()
    fetched = recorder.order[1:]
    # The two opens, then the first window: the next four names. Requests run in
    # parallel, so the server may see the second open among the window's.
    assert fetched[0] == sop(by_name[0])
    assert set(fetched[1:6]) == {sop(n) for n in by_name[1:6]}, fetched


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


@pytest.fixture(autouse=True)
def _no_near_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scripted server is on loopback, which the engine would call near and stream
    from; these tests are about parallel requests."""
    monkeypatch.setattr(FetchEngine, "near", property(lambda self: False))


async def test_a_stream_that_delivers_everything_frees_its_connection(tmp_path: Path) -> None:
    """One connection: a series stream delivers every part it claimed; the fetch queued
    behind it must start once it ends (nothing else wakes the engine then)."""
    recorder = Recorder(delay=0.0)
    with serving() as server:
        def retrieve(path: str) -> Reply | None:
            if path.endswith(SERIES):
                return Reply(200, [("Content-Type", MULTIPART)],
                             multipart(*(instance(n) for n in range(3))))
            return recorder(path) if "/instances/" in path else None

        server.app = one_series_app(STUDY, SERIES, [sop(n) for n in range(4)], retrieve)
        store = Store(tmp_path / "cache")
        config = ClientConfig(base_url=server.url, max_connections=1, retries=0)
        async with DicomwebClient(config) as client, trio.open_nursery() as nursery:
            engine = FetchEngine(client, store, max_connections=1)
            await nursery.start(engine.run)
            assert engine.stream(STUDY, SERIES, [sop(n) for n in range(3)]) == 3
            with trio.fail_after(10):
                await engine.fetch(key(3))  # queued while the stream has the connection
            nursery.cancel_scope.cancel()
    for n in range(4):
        assert stored(store, n) == instance(n)
    assert recorder.order == [sop(3)]  # the streamed ones were not asked again
