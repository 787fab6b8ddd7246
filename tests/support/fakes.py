"""Misbehaving network peers for the reliability and security tests.

* :class:`Proxy`: a reverse proxy on 127.0.0.1 in front of a real server (Orthanc), one
  request per connection, whose ``policy`` decides per request what happens: forward,
  forward but cut the body (FIN or RST), forward and stall mid-body, stall before any
  answer, reset at once, or answer by itself (503, 401, ...).
* :class:`FaultPolicy`: the seeded, deterministic random faults (cuts, resets, bursts of 503
  with and without ``Retry-After``, stalls longer than the client's timeout), with counts.
* :class:`TokenGate`: a bearer-token check that accepts only the current token, rotating
  ``t1``, ``t2``, ... every ``period`` seconds, the current one kept in a file that a token
  command prints.
* :class:`StreamingJsonServer`: a raw server that streams an endless QIDO JSON array, to
  show that a client's size bound stops reading early.

The scripted ``FakeServer`` of the unit tests is in :mod:`tests.support.fakeserver`.

Every thread here is bounded (a fixed pool) and ends by itself: sockets have timeouts and
every sleep waits on the stop event.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Answer",
    "Cut",
    "FaultPolicy",
    "Forward",
    "Proxy",
    "Request",
    "Reset",
    "Stall",
    "StreamingJsonServer",
    "TokenGate",
    "wait_until",
]

MAX_HEAD = 64 * 1024
SERIES_RETRIEVE = re.compile(r"/studies/[0-9.]+/series/[0-9.]+$")  # WADO-RS of a whole series
CHUNK = 256 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "upgrade",
              "transfer-encoding-hint"}


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# =========================================================================== actions


@dataclass(frozen=True)
class Request:
    """One request as the proxy received it."""

    method: str
    target: str
    headers: dict[str, str]  # names lower-cased


@dataclass(frozen=True)
class Forward:
    """Pass the request on and the answer back, whole."""


@dataclass(frozen=True)
class Cut:
    """Pass the answer back but stop after ``fraction`` of the body (or ``limit`` bytes
    when the answer has no Content-Length), then close (``reset``: abort with RST), or
    ``stall`` that long first (the client times out mid-body)."""

    fraction: float
    limit: int
    reset: bool = False
    stall: float = 0.0
    series: bool = False  # for the counts: a cut of a series stream


@dataclass(frozen=True)
class Stall:
    """Say nothing for ``seconds``, then close."""

    seconds: float


@dataclass(frozen=True)
class Reset:
    """Abort the connection (RST) before any answer."""


@dataclass(frozen=True)
class Answer:
    """Answer by itself, without asking upstream."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


Action = Forward | Cut | Stall | Reset | Answer
Policy = Callable[[Request], Action]


# =========================================================================== socket helpers


def _read_head(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes]:
    """(head without the blank line, bytes read past it); (b"", b"") on EOF first."""
    data = buffered
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise ConnectionError("head too large")
        chunk = sock.recv(65536)
        if not chunk:
            if data:
                raise ConnectionError("EOF inside a head")
            return b"", b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    out = []
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        out.append((name.strip(), value.strip()))
    return out


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _accepted(listener: socket.socket, stop: threading.Event) -> Iterator[socket.socket]:
    """Each connection ``listener`` accepts (it has a short timeout, to look at ``stop``
    between tries) until ``stop`` is set or the listener is closed."""
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        yield conn


# =========================================================================== the proxy


class Proxy:
    """A reverse proxy on 127.0.0.1:<free port>; ``url(path)`` names it.

    One request per client connection (answers carry ``Connection: close``), served by a
    pool of at most ``workers`` threads; more connections wait in the accept queue.
    """

    def __init__(self, upstream: str, policy: Policy, *, workers: int = 16,
                 io_timeout: float = 20.0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.policy = policy
        self.io_timeout = io_timeout
        self.stop_event = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fake-proxy")
        self._thread = threading.Thread(target=self._accept_loop, name="fake-proxy-accept",
                                        daemon=True)
        self.errors: list[str] = []  # proxy-side surprises, for the failure report
        self.seen: list[Request] = []  # every request, in arrival order
        self.open_connections = 0
        self.peak_connections = 0  # the most client connections open at once
        self._count_lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop_event.set()
        self._thread.join(5)
        self._listener.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _accept_loop(self) -> None:
        for conn in _accepted(self._listener, self.stop_event):
            try:
                self._pool.submit(self._serve, conn)
            except RuntimeError:  # shut down meanwhile
                conn.close()
                return

    def _serve(self, conn: socket.socket) -> None:
        with self._count_lock:
            self.open_connections += 1
            self.peak_connections = max(self.peak_connections, self.open_connections)
        released = threading.Event()

        def release() -> None:
            """The connection stops counting as open just before the client can see the
            end of its answer: it may open the next one at once, before this thread has
            closed this one (which counted one too many on a busy machine)."""
            with self._count_lock:
                if not released.is_set():
                    released.set()
                    self.open_connections -= 1

        try:
            self._serve_one(conn, release)
        finally:
            release()

    def _serve_one(self, conn: socket.socket, release: Callable[[], None]) -> None:
        conn.settimeout(self.io_timeout)
        reset = False
        try:
            head, rest = _read_head(conn)
            if not head:
                return
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].decode("latin-1").split(" ", 2)
            headers = _parse_headers(lines[1:])
            length = next((int(v) for n, v in headers if n.lower() == "content-length"), 0)
            body = rest
            while len(body) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            request = Request(method, target, {n.lower(): v for n, v in headers})
            self.seen.append(request)
            action = self.policy(request)
            if isinstance(action, Reset):
                reset = True
                return
            if isinstance(action, Stall):
                self.stop_event.wait(action.seconds)
                return
            if isinstance(action, Answer):
                release()
                self._answer(conn, action)
                return
            reset = self._forward(conn, method, target, headers, body, action, release)
        except (OSError, ValueError) as exc:
            if not self.stop_event.is_set():
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if reset:
                _abort(conn)
            else:
                release()
                with contextlib.suppress(OSError):
                    conn.close()

    @staticmethod
    def _answer(conn: socket.socket, action: Answer) -> None:
        lines = [f"HTTP/1.1 {action.status} {action.reason}"]
        lines += [f"{name}: {value}" for name, value in action.headers]
        lines += [f"Content-Length: {len(action.body)}", "Connection: close"]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + action.body)

    def _forward(self, conn: socket.socket, method: str, target: str,
                 headers: list[tuple[str, str]], body: bytes, action: Forward | Cut,
                 release: Callable[[], None]) -> bool:
        """Relay one exchange; returns True when the client connection must be reset."""
        with socket.create_connection(self.upstream, timeout=self.io_timeout) as up:
            kept = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP]
            out = [f"{method} {target} HTTP/1.1"] + [f"{n}: {v}" for n, v in kept]
            out.append("Connection: close")
            up.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
            head, rest = _read_head(up)
            if not head:
                raise ConnectionError("upstream closed without an answer")
            lines = head.split(b"\r\n")
            answer_headers = [(n, v) for n, v in _parse_headers(lines[1:])
                              if n.lower() not in HOP_BY_HOP]
            declared = next((int(v) for n, v in answer_headers
                             if n.lower() == "content-length"), None)
            new_head = [lines[0].decode("latin-1")]
            new_head += [f"{n}: {v}" for n, v in answer_headers]
            new_head.append("Connection: close")
            if declared == 0:
                release()
            conn.sendall(("\r\n".join(new_head) + "\r\n\r\n").encode("latin-1"))
            budget = None
            if isinstance(action, Cut) and declared != 0:
                budget = (int(declared * action.fraction) if declared is not None
                          else action.limit)
            sent = 0
            data = rest
            while True:
                if budget is not None and sent + len(data) >= budget:
                    conn.sendall(data[: budget - sent])
                    assert isinstance(action, Cut)
                    self._note_cut(action, True)
                    if action.stall:
                        self.stop_event.wait(action.stall)
                    return action.reset
                if data:
                    if declared is not None and sent + len(data) >= declared:
                        release()
                    conn.sendall(data)
                    sent += len(data)
                if declared is not None and sent >= declared:
                    break
                data = up.recv(CHUNK)
                if not data:
                    break
            if isinstance(action, Cut):
                self._note_cut(action, False)  # the body ended before the cut point
            return False

    def _note_cut(self, action: Cut, happened: bool) -> None:
        """Hook for policies that count what really happened."""
        note = getattr(self.policy, "note_cut", None)
        if note is not None:
            note(action, happened)


# =========================================================================== fault policy


@dataclass
class FaultPolicy:
    """Seeded random faults, the same ones for the same request sequence.

    Each request's fate is drawn from ``Random(f"{seed}|{method} {target}|{n}")``, ``n``
    counting earlier requests for the same target, so that concurrency elsewhere does not
    change what one request meets. A 503 starts a burst: the next requests for the same
    target get 503 too (1 to 3 in all), with no ``Retry-After``, ``0`` or ``1``.
    """

    seed: int
    stall_seconds: float = 3.0
    enabled: bool = False
    # Series streams (many MB, one request) meet a cut more often: the first of each series
    # and half of the later ones, somewhere in their first ``series_cut_bytes``.
    series_cut_rate: float = 0.5
    series_cut_bytes: int = 4_000_000
    # Probabilities of each fault, in this order; the rest is forwarded untouched.
    rates: tuple[tuple[str, float], ...] = (
        ("cut", 0.08), ("reset-mid-body", 0.05), ("reset-at-once", 0.03),
        ("503-burst", 0.08), ("stall-before-answer", 0.03), ("stall-mid-body", 0.02),
    )
    counts: Counter[str] = field(default_factory=Counter)
    _seen: Counter[str] = field(default_factory=Counter)
    _bursts: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: Request) -> Action:
        name = f"{request.method} {request.target}"
        with self._lock:
            n = self._seen[name]
            self._seen[name] += 1
            self.counts["requests"] += 1
            if not self.enabled:
                self.counts["forwarded-unfaulted"] += 1
                return Forward()
            burst = self._bursts.pop(name, None)
            if burst is not None:
                left, retry_after = burst
                if left > 1:
                    self._bursts[name] = (left - 1, retry_after)
                return self._unavailable(retry_after)
            rng = random.Random(f"{self.seed}|{name}|{n}")
            if SERIES_RETRIEVE.search(request.target) and (
                    n == 0 or rng.random() < self.series_cut_rate):
                return Cut(0.5, rng.randrange(1, self.series_cut_bytes), series=True)
            draw = rng.random()
            kind = "forward"
            for fault, rate in self.rates:
                if draw < rate:
                    kind = fault
                    break
                draw -= rate
            if kind == "forward":
                self.counts["forwarded"] += 1
                return Forward()
            if kind == "503-burst":
                size = rng.randint(1, 3)
                retry_after = rng.choice([None, "0", "1"])
                if size > 1:
                    self._bursts[name] = (size - 1, retry_after)
                self.counts["503-bursts"] += 1
                return self._unavailable(retry_after)
            if kind == "reset-at-once":
                self.counts[kind] += 1
                return Reset()
            if kind == "stall-before-answer":
                self.counts[kind] += 1
                return Stall(self.stall_seconds)
            # Body faults: counted once they really happened (see note_cut).
            fraction = rng.uniform(0.0, 0.95)
            limit = rng.randrange(1, 3_000_000)
            if kind == "cut":
                return Cut(fraction, limit)
            if kind == "reset-mid-body":
                return Cut(fraction, limit, reset=True)
            return Cut(fraction, limit, stall=self.stall_seconds)

    def _unavailable(self, retry_after: str | None) -> Answer:
        label = "none" if retry_after is None else retry_after
        self.counts[f"503 (Retry-After: {label})"] += 1
        headers = (("Retry-After", retry_after),) if retry_after is not None else ()
        return Answer(503, "Service Unavailable", headers, b"injected 503")

    def note_cut(self, action: Cut, happened: bool) -> None:
        kind = ("stall-mid-body" if action.stall else
                "reset-mid-body" if action.reset else
                "cut-series-stream" if action.series else "cut-mid-body")
        with self._lock:
            self.counts[kind if happened else f"{kind} (body ended first)"] += 1

    def summary(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))


# =========================================================================== token gate


class TokenGate:
    """Accept only the current bearer token; everything else gets 401.

    Rotating (``static`` None): tokens ``t1``, ``t2``, ... each current for ``period``
    seconds; the rotation happens when a request arrives after the period, and is put off
    while a token command ran less than ``grace`` seconds ago (it could not have used the
    token yet: no real token lives a few milliseconds). The current token is in
    ``folder/token``; a token command takes ``folder/lock`` and appends the time to
    ``folder/runs`` (see :data:`TOKEN_COMMAND`); rotations take the same lock.
    """

    def __init__(self, folder: Path, *, period: float = 1.5, grace: float = 0.5,
                 static: str | None = None) -> None:
        self.folder = folder
        self.period = period
        self.grace = grace
        self.static = static
        self.index = 1
        self.rotated_at = time.monotonic()
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # by the token presented ("" for none)
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "runs").touch()
        (folder / "lock").touch()
        self._write(self.current)

    @property
    def current(self) -> str:
        return self.static if self.static is not None else f"t{self.index}"

    @property
    def rejections(self) -> int:
        return sum(self.rejected.values())

    def runs(self) -> int:
        """How many times the token command ran."""
        return len((self.folder / "runs").read_text().split())

    def _write(self, token: str) -> None:
        temp = self.folder / "token.new"
        temp.write_text(token + "\n")
        os.replace(temp, self.folder / "token")

    def _maybe_rotate(self) -> None:
        if self.static is not None or time.monotonic() - self.rotated_at < self.period:
            return
        with open(self.folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            runs = (self.folder / "runs").read_text().split()
            if runs and time.time() - float(runs[-1]) < self.grace:
                return
            self.index += 1
            self.rotated_at = time.monotonic()
            self._write(self.current)

    def __call__(self, request: Request) -> Action:
        with self._lock:
            self._maybe_rotate()
            presented = request.headers.get("authorization", "")
            token = presented.removeprefix("Bearer ").strip() if presented.startswith(
                "Bearer ") else ""
            if token == self.current:
                self.accepted[token] += 1
                return Forward()
            self.rejected[token] += 1
        return Answer(401, "Unauthorized", (("WWW-Authenticate",
                                             'Bearer error="invalid_token"'),),
                      b'{"error": "invalid_token"}')


# A token command: prints the gate's current token, records each run (see TokenGate).
TOKEN_COMMAND = """\
import fcntl, os, sys, time
folder = sys.argv[1]
with open(os.path.join(folder, "lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(os.path.join(folder, "runs"), "a") as runs:
        runs.write(f"{time.time()!r}\\n")
    with open(os.path.join(folder, "token")) as f:
        token = f.read().strip()
print(token)
"""


# =========================================================================== streaming JSON


class StreamingJsonServer:
    """Answers every request with an endless (``total`` bytes) QIDO JSON array, no
    Content-Length, and counts the bytes it managed to send before the client hung up."""

    def __init__(self, total: int = 512 * 1024 * 1024) -> None:
        self.total = total
        self.sent = 0
        self.finished = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-json", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/dicom-web"

    def __enter__(self) -> StreamingJsonServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    def _run(self) -> None:
        for conn in _accepted(self._listener, self._stop):
            with conn:
                conn.settimeout(5)
                self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        item = b'{"0020000D": {"vr": "UI", "Value": ["1.2.840.99.1"]}},'
        block = item * (65536 // len(item))
        try:
            _read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
                         b"Connection: close\r\n\r\n[")
            while self.sent < self.total and not self._stop.is_set():
                conn.sendall(block)
                self.sent += len(block)
        except OSError:
            pass
        finally:
            self.finished.set()
