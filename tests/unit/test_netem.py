"""The link-emulating proxy (tests.support.netem): bytes, order, half-close and resets pass
through; delay and rate are lower bounds on time (never upper bounds); counters are exact.

Targets are small raw TCP servers in threads; tests/e2e/test_netem.py adds a real Orthanc
for the HTTP case.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.harness import REPO_ROOT

if TYPE_CHECKING:
    from tests.support.harness import LinkFactory

Handler = Callable[[socket.socket], None]


class Target:
    """A TCP server on 127.0.0.1 running ``handler`` on each connection in its own thread."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: queue.Queue[BaseException] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                self.handler(conn)
            except BaseException as exc:  # reported by the test that expects or fails on it
                self.errors.put(exc)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(30)


@pytest.fixture
def targets() -> Iterator[Callable[[Handler], Target]]:
    started: list[Target] = []

    def start(handler: Handler) -> Target:
        started.append(Target(handler))
        return started[-1]

    yield start
    for target in started:
        target.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer's FIN."""
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def echo(conn: socket.socket) -> None:
    """Read until the client's FIN, send it all back, then FIN (half-close both ways)."""
    data = read_all(conn)
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    read_all(conn)


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def exchange(port: int, data: bytes, pieces: int = 7) -> bytes:
    """Send ``data`` in uneven pieces, half-close, and return what came back."""
    with connect(port) as sock:
        cuts = sorted(random.Random(len(data)).sample(range(1, len(data)), pieces - 1))
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            sock.sendall(data[start:end])
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


@pytest.mark.parametrize(("delay", "rate"), [(0.0, None), (0.01, 50e6)])
def test_bytes_order_and_half_close_pass_through(
    targets: Callable[[Handler], Target], link_factory: LinkFactory, delay: float,
    rate: float | None,
) -> None:
    """The echo server answers only after the client's FIN, and the client reads until the
    server's FIN: both half-closes must cross, every byte in order."""
    target = targets(echo)
    link = link_factory(target.address, delay=delay, rate=rate)
    data = random.Random(1).randbytes(3_000_017)
    assert exchange(link.port, data) == data
    assert target.errors.empty()
    assert (link.connections, link.bytes_up, link.bytes_down) == (1, len(data), len(data))


def test_first_byte_not_before_the_delay(
    targets: Callable[[Handler], Target], link_factory: LinkFactory,
) -> None:
    """A greeting pushed by the server at accept arrives one delay later at the earliest; an
    answer to the client's first bytes also pays the handshake's round trip (4 delays)."""
    greeter = targets(lambda conn: conn.sendall(b"hello"))
    delay = 0.15
    link = link_factory(greeter.address, delay=delay)
    started = time.monotonic()
    with connect(link.port) as sock:
        assert sock.recv(1) == b"h"
        assert time.monotonic() - started >= delay
    echo_link = link_factory(targets(echo).address, delay=delay)
    started = time.monotonic()
    assert exchange(echo_link.port, b"ping", pieces=1) == b"ping"
    assert time.monotonic() - started >= 4 * delay


def test_rate_is_a_cap_per_connection(
    targets: Callable[[Handler], Target], link_factory: LinkFactory,
) -> None:
    """N bytes through a link of ``rate`` take at least N/rate, on each of several
    connections at once, in both directions."""
    size, rate = 1_500_000, 10e6
    target = targets(echo)
    link = link_factory(target.address, rate=rate)
    data = os.urandom(size)
    started = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: exchange(link.port, data), range(3)))
    assert all(r == data for r in results)
    # up then down, each at most ``rate``: at least 2 N / rate for every connection
    assert time.monotonic() - started >= 2 * size / rate


def test_counters_are_exact_and_reset(
    targets: Callable[[Handler], Target], link_factory: LinkFactory,
) -> None:
    """Request lines are found across chunk boundaries (pipelined, cut byte by byte)."""
    link = link_factory(targets(echo).address, delay=0.002)
    requests = (b"GET /a HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
                b"GET /studies?limit=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
    with connect(link.port) as sock:
        for i in range(len(requests)):
            sock.sendall(requests[i:i + 1])
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == requests
    assert link.counters.request_lines == ["GET /a HTTP/1.1",
                                           "GET /studies?limit=1000 HTTP/1.1"]
    assert (link.requests, link.connections) == (2, 1)
    assert link.bytes_up == link.bytes_down == len(requests)
    old = link.reset()
    assert (old.requests, old.bytes_up) == (2, len(requests))
    assert (link.requests, link.connections, link.bytes_up, link.bytes_down) == (0, 0, 0, 0)
    assert exchange(link.port, b"GET /b HTTP/1.0\r\n\r\n") == b"GET /b HTTP/1.0\r\n\r\n"
    assert link.counters.request_lines == ["GET /b HTTP/1.0"]
    assert link.connections == 1


def test_resets_pass_through_both_ways(
    targets: Callable[[Handler], Target], link_factory: LinkFactory,
) -> None:
    """A server's RST reaches the client as a reset (not a clean end), and a client's RST
    reaches the server as one."""

    def send_then_reset(conn: socket.socket) -> None:
        conn.sendall(b"x" * 100_000)
        rst_close(conn)

    link = link_factory(targets(send_then_reset).address, delay=0.01)
    with connect(link.port) as sock, pytest.raises(ConnectionResetError):
        read_all(sock)

    seen: queue.Queue[str] = queue.Queue()

    def wait_for_client(conn: socket.socket) -> None:
        try:
            data = read_all(conn)
        except ConnectionResetError:
            seen.put("reset")
        else:
            seen.put(f"clean end after {len(data)} bytes")

    link = link_factory(targets(wait_for_client).address, delay=0.01)
    sock = connect(link.port)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    rst_close(sock)
    assert seen.get(timeout=30) == "reset"


def test_many_concurrent_connections(
    targets: Callable[[Handler], Target], link_factory: LinkFactory,
) -> None:
    target = targets(echo)
    link = link_factory(target.address, delay=0.02, rate=20e6)
    payloads = [random.Random(i).randbytes(200_000 + i) for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda d: exchange(link.port, d), payloads))
    assert [hashlib.sha256(r).digest() for r in results] == [
        hashlib.sha256(p).digest() for p in payloads]
    total = sum(map(len, payloads))
    assert (link.connections, link.bytes_up, link.bytes_down) == (40, total, total)
    assert target.errors.empty()


def test_command_line(targets: Callable[[Handler], Target], tmp_path: Path) -> None:
    """``python -m tests.support.netem`` prints its URL, forwards, and sums up on SIGTERM."""
    target = targets(echo)
    root = REPO_ROOT
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.netem", "--target", target.address,
         "--delay-ms", "5", "--rate", "20M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = first.split()[0]
        port = int(url.rsplit(":", 1)[1])
        assert exchange(port, b"GET / HTTP/1.1\r\n\r\n", pieces=2) == b"GET / HTTP/1.1\r\n\r\n"
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "1 connections, 1 requests, 18 bytes up, 18 bytes down" in err
