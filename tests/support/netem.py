"""A link-emulating TCP proxy: one-way delay and a bandwidth cap per connection and direction.

The kernel here has no ``sch_netem``, and a link-wide ``tbf``/``htb`` cap cannot give each
connection its own rate, which is what a remote PACS or a cloud store looks like: every
connection gets part of the bandwidth and every request pays a round trip. This proxy
listens on 127.0.0.1 and forwards each connection to one target.

Model, per connection and per direction: read up to 64 KiB, and deliver that chunk at
``max(now, link_free) + len/rate + delay`` where ``link_free`` is when the previous chunk
finished crossing the link (so order is kept and a direction never exceeds ``rate``).
End of stream (FIN) is delayed like data; a reset is passed on as a reset (RST). A new
connection's first client bytes reach the server one round trip later than their own
delay, as the TCP handshake would make them. At most ``window`` bytes are in flight per
direction (the larger of 4 MiB and twice the bandwidth-delay product), so a slow reader
slows the sender as TCP's window would, instead of the proxy buffering a whole answer.
Not modelled: slow start, loss, link-wide contention between connections.

It runs an asyncio loop in a background thread (the caller's thread stays free), and
counts what tests and benchmarks need: bytes each way, response body bytes, connections,
HTTP request lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CHUNK = 64 * 1024
MIN_WINDOW = 4 * 1024 * 1024
MAX_LINE = 8192  # request lines kept up to this length (longer ones are cut)

_EOF = b""
_RESET = None  # the queue item that means "the sender reset its connection"


def parse_target(target: str) -> tuple[str, int, str]:
    """``host``, ``port`` and URL path of ``http://host:port/path`` or ``host:port``."""
    parts = urlsplit(target if "://" in target else f"tcp://{target}")
    if parts.hostname is None or parts.port is None:
        if parts.scheme == "http" and parts.hostname:
            return parts.hostname, 80, parts.path
        raise ValueError(f"target needs a host and a port: {target!r}")
    return parts.hostname, parts.port, parts.path


def parse_rate(text: str) -> float | None:
    """Bytes per second from ``25M``, ``1.5G``, ``500k`` or ``12000`` (decimal units);
    ``none``/``0`` for no cap."""
    text = text.strip().lower().removesuffix("b/s").removesuffix("/s")
    if text in ("", "none", "0", "unlimited"):
        return None
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1], 1.0)
    value = float(text[:-1] if scale != 1.0 else text) * scale
    if value <= 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return value


@dataclass
class Counters:
    """What crossed the proxy since the start or the last :meth:`LinkProxy.reset`."""

    bytes_down: int = 0  # sent by the server (read from it), towards the client
    body_bytes_down: int = 0  # of which response bodies (no status lines, headers, framing)
    bytes_up: int = 0  # sent by the client (read from it), towards the server
    connections: int = 0
    request_lines: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.request_lines)


class _RequestLines:
    """Finds HTTP request lines in one client->server stream.

    Assumes requests without bodies (dicomfs, curl and rclone here only GET, HEAD and
    PROPFIND without a body): the first non-empty line after a blank line starts a request.
    """

    def __init__(self) -> None:
        self._line = bytearray()
        self._at_start = True  # the next non-empty line is a request line

    def feed(self, data: bytes) -> list[str]:
        found = []
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if len(self._line) < MAX_LINE:
                self._line += data[start:end][: MAX_LINE - len(self._line)]
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            if not line:
                self._at_start = True
            elif self._at_start:
                found.append(line.decode("latin-1"))
                self._at_start = False
            start = end + 1
        if len(self._line) < MAX_LINE:
            self._line += data[start:][: MAX_LINE - len(self._line)]
        return found


class _ResponseBodies:
    """Counts the body bytes of the HTTP/1.1 responses in one server->client stream: what
    a client keeps once the status line, the headers and any chunked framing are off.

    Bodies framed by Content-Length, chunked, or running to the end of the connection.
    Assumes answers to GET (like _RequestLines): a 1xx, 204 or 304 has no body.
    """

    def __init__(self) -> None:
        self._line = bytearray()
        self._state = "status"  # status, headers, body, size, data, data-end, trailer
        self._left = -1  # body or chunk bytes still to come; -1: until the end
        self._length: int | None = None
        self._chunked = False
        self._bodiless = False

    def feed(self, data: bytes) -> int:
        body = 0
        view = memoryview(data)
        while view:
            if self._state in ("body", "data"):
                take = len(view) if self._left < 0 else min(self._left, len(view))
                body += take
                view = view[take:]
                if self._left >= 0:
                    self._left -= take
                    if self._left == 0:
                        self._state = "data-end" if self._state == "data" else "status"
                continue
            end = bytes(view[:MAX_LINE]).find(b"\n")
            if end < 0:
                self._line += view
                break
            self._line += view[:end]
            view = view[end + 1:]
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            self._line_done(line)
        return body

    def _line_done(self, line: bytes) -> None:
        if self._state == "status":
            if line:
                code = line.split()[1] if len(line.split()) > 1 else b""
                self._bodiless = code.startswith(b"1") or code in (b"204", b"304")
                self._length, self._chunked, self._state = None, False, "headers"
        elif self._state == "headers":
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self._length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif not line:
                self._start_body()
        elif self._state == "size":
            self._left = int(line.split(b";")[0].strip() or b"0", 16)
            self._state = "data" if self._left else "trailer"
        elif self._state == "data-end":
            self._state = "size"
        elif self._state == "trailer" and not line:
            self._state = "status"

    def _start_body(self) -> None:
        if self._bodiless:
            self._state = "status"
        elif self._chunked:
            self._state = "size"
        elif self._length is not None:
            self._left = self._length
            self._state = "body" if self._length else "status"
        else:
            self._left, self._state = -1, "body"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST (SO_LINGER 0), as the peer that reset us did."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class LinkProxy:
    """``with LinkProxy("http://127.0.0.1:8042", delay=0.020, rate=25e6) as link:``.

    ``delay``: one-way seconds; ``rate``: bytes per second per connection and direction
    (None: no cap). :meth:`url` gives the proxied URL; :attr:`counters` what crossed it.
    """

    def __init__(self, target: str, *, delay: float = 0.0, rate: float | None = None,
                 port: int = 0) -> None:
        if delay < 0 or (rate is not None and rate <= 0):
            raise ValueError("delay must be >= 0 and rate > 0 (or None)")
        self.target_host, self.target_port, self._path = parse_target(target)
        self.delay = delay
        self.rate = rate
        self.window = max(MIN_WINDOW, int(2 * (rate or 0) * delay))
        self._port = port
        self.counters = Counters()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # -- API ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str | None = None) -> str:
        """``http://127.0.0.1:PORT`` + ``path`` (default: the target URL's own path)."""
        return f"http://127.0.0.1:{self.port}{self._path if path is None else path}"

    @property
    def bytes_down(self) -> int:
        return self.counters.bytes_down

    @property
    def bytes_up(self) -> int:
        return self.counters.bytes_up

    @property
    def connections(self) -> int:
        return self.counters.connections

    @property
    def requests(self) -> int:
        return self.counters.requests

    def reset(self) -> Counters:
        """Zero the counters; return what they held."""
        with self._lock:
            old, self.counters = self.counters, Counters()
        return old

    def cpu_seconds(self) -> float:
        """CPU time the proxy's thread has used so far (it does all the proxy's work)."""
        if self._thread is None or self._thread.ident is None:
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))

    def start(self) -> LinkProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._serve, "127.0.0.1", self._port, limit=CHUNK))
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name="netem", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection (with a reset); idempotent."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop thread ---------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            _reset(writer)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        """One accepted connection. Never ends cancelled: asyncio's server callback would
        log a cancelled handler as an error at shutdown."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        with self._lock:
            self.counters.connections += 1
        try:
            await self._connection(client_r, client_w)
        except asyncio.CancelledError:
            _reset(client_w)
        finally:
            client_w.close()
            self._writers.discard(client_w)
            self._tasks.discard(task)

    async def _connection(self, client_r: asyncio.StreamReader,
                          client_w: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        try:
            server_r, server_w = await asyncio.open_connection(
                self.target_host, self.target_port, limit=CHUNK)
        except OSError:
            _reset(client_w)
            return
        self._writers.add(server_w)
        lines = _RequestLines()
        bodies = _ResponseBodies()

        def up(data: bytes) -> None:
            found = lines.feed(data)
            with self._lock:
                self.counters.bytes_up += len(data)
                self.counters.request_lines.extend(found)

        def down(data: bytes) -> None:
            body = bodies.feed(data)
            with self._lock:
                self.counters.bytes_down += len(data)
                self.counters.body_bytes_down += body

        # the handshake: the client's first bytes leave one round trip after accept
        pumps = [loop.create_task(self._direction(client_r, server_w, up,
                                                  accepted + 2 * self.delay)),
                 loop.create_task(self._direction(server_r, client_w, down, accepted))]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            if any(p.cancelled() or p.exception() for p in pumps if p.done()):
                _reset(client_w)
                _reset(server_w)
        finally:
            for pump in pumps:
                pump.cancel()
                self._tasks.discard(pump)
            server_w.close()
            self._writers.discard(server_w)

    async def _direction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         count: Callable[[bytes], None], link_free: float) -> None:
        """Pump one direction: a reader that stamps each chunk with its release time, and
        a writer that delivers it then. A reset on either side resets the other."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        space = asyncio.Semaphore(max(1, math.ceil(self.window / CHUNK)))

        async def receive() -> None:
            nonlocal link_free
            while True:
                await space.acquire()
                try:
                    data: bytes | None = await reader.read(CHUNK)
                except OSError:
                    data = _RESET
                now = loop.time()
                link_free = max(now, link_free) + (len(data) / self.rate
                                                   if data and self.rate else 0.0)
                queue.put_nowait((link_free + self.delay, data))
                if not data:
                    return
                count(data)

        async def deliver() -> None:
            while True:
                release, data = await queue.get()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is _RESET:
                    _reset(writer)
                    raise ConnectionResetError("the sender reset the connection")
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                space.release()

        receiving = asyncio.ensure_future(receive())
        try:
            await deliver()
        finally:
            if not receiving.done():
                receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.netem",
        description="Forward 127.0.0.1:PORT to a target with a one-way delay and a "
        "bandwidth cap per connection and direction.")
    parser.add_argument("--target", required=True, help="HOST:PORT or http://HOST:PORT/path")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (ms)")
    parser.add_argument("--rate", type=parse_rate, default=None,
                        help="bytes/s per connection and direction: 25M, 1.5G, 500k")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: free)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LinkProxy(args.target, delay=args.delay_ms / 1000, rate=args.rate,
                   port=args.port) as link:
        rate = "unlimited" if args.rate is None else f"{args.rate / 1e6:g} MB/s"
        print(f"{link.url()} -> {args.target}: {args.delay_ms:g} ms one way, {rate} per "
              "connection (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        c = link.counters
    print(f"{c.connections} connections, {c.requests} requests, {c.bytes_up} bytes up, "
          f"{c.bytes_down} bytes down", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
