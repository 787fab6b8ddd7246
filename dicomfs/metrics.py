"""What a mount does, in figures: the metric definitions and their Prometheus endpoint.

Counting is always on and cheap (a counter increment per request, per body chunk and per
FUSE call): the client counts its requests and the body bytes of their answers as they
stream, the archive its cache hits and misses, the store its evictions, the FUSE adapter
its operations and errors. The fetch engine and the store are read only when scraped.
Two readers use the figures: Prometheus at ``--metrics-address`` (served here) and
``dicomfs status`` (:mod:`dicomfs.status`), which needs no address.

The endpoint runs on the trio thread that serves FUSE, not in prometheus_client's own
server thread: the engine's state is then read without locks, at the cost of the
rendering (well under a millisecond) once per scrape. No label carries a UID, a name or a
URL, only kinds, statuses, operations and errnos: the figures hold no patient data.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import httpx
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

disable_created_metrics()  # the *_created series double the output and tell nothing here
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
# From a QIDO page on loopback (milliseconds) to a series of thousands of slices (minutes).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0)
KINDS = ("qido", "metadata", "instance", "series", "study", "rendered", "other")
CACHED_KINDS = ("instance", "metadata", "rendered")

REQUESTS = Counter("dicomfs_requests", "HTTP requests to the DICOMweb server, by kind and "
                   "HTTP status (error: no answer came)", ["kind", "status"], registry=REGISTRY)
RESPONSE_BYTES = Counter("dicomfs_response_bytes", "Body bytes received from the server, "
                         "counted as they arrive", ["kind"], registry=REGISTRY)
DURATION = Histogram("dicomfs_request_duration_seconds", "Time from sending a request to "
                     "the end of its answer", ["kind"], buckets=DURATION_BUCKETS,
                     registry=REGISTRY)
CACHE_HITS = Counter("dicomfs_cache_hits", "Opens of an instance, metadata or rendered file "
                     "served from the cache folder", ["kind"], registry=REGISTRY)
CACHE_MISSES = Counter("dicomfs_cache_misses", "Opens of an instance, metadata or rendered "
                       "file that had to be fetched", ["kind"], registry=REGISTRY)
CACHE_EVICTIONS = Counter("dicomfs_cache_evictions", "Cache entries removed to stay within "
                          "the cache size or the disk reserve", registry=REGISTRY)
FUSE_OPERATIONS = Counter("dicomfs_fuse_operations", "FUSE requests from the kernel",
                          ["op"], registry=REGISTRY)
FUSE_ERRORS = Counter("dicomfs_fuse_errors", "FUSE requests answered with an error",
                      ["op", "errno"], registry=REGISTRY)

for _kind in KINDS:  # every series exists from the start: rate() needs a first sample
    RESPONSE_BYTES.labels(_kind)
    DURATION.labels(_kind)
for _kind in CACHED_KINDS:
    CACHE_HITS.labels(_kind)
    CACHE_MISSES.labels(_kind)

# The tail of a DICOMweb URL path, after whatever prefix the server puts before /studies.
_UID = r"[0-9][0-9.]*"
_KIND_PATTERNS = (
    ("rendered", re.compile(r"/rendered$")),
    ("metadata", re.compile(r"/metadata$")),
    ("qido", re.compile(r"(^|/)(studies|series|instances)$")),
    ("instance", re.compile(rf"/studies/{_UID}/series/{_UID}/instances/{_UID}$")),
    ("series", re.compile(rf"/studies/{_UID}/series/{_UID}$")),
    ("study", re.compile(rf"/studies/{_UID}$")),
)


def request_kind(path: str) -> str:
    """What a DICOMweb request asks for, from its URL path: one of KINDS."""
    path = path.rstrip("/")
    return next((kind for kind, pattern in _KIND_PATTERNS if pattern.search(path)), "other")


# -- the HTTP client ------------------------------------------------------------------------

_STARTED = "dicomfs.started"


def http_event_hooks() -> dict[str, list]:  # type: ignore[type-arg]
    """httpx event hooks that count every request and answer, redirects and auth retries
    included (each is a request the server sees)."""
    return {"request": [_sending], "response": [_answered]}


async def _sending(request: httpx.Request) -> None:
    request.extensions[_STARTED] = time.perf_counter()


async def _answered(response: httpx.Response) -> None:
    request = response.request
    kind = request_kind(request.url.path)
    REQUESTS.labels(kind, str(response.status_code)).inc()
    response.stream = _CountedStream(response.stream, kind,  # type: ignore[arg-type]
                                     request.extensions.get(_STARTED, time.perf_counter()))


def request_failed(url: str) -> None:
    """A request that got no answer (connection refused, timed out, cut before the head)."""
    REQUESTS.labels(request_kind(httpx.URL(url).path), "error").inc()


class _CountedStream(httpx.AsyncByteStream):
    """An answer's body that counts its bytes as they arrive and, once closed, the
    request's duration."""

    def __init__(self, inner: httpx.AsyncByteStream, kind: str, started: float) -> None:
        self._inner = inner
        self._bytes = RESPONSE_BYTES.labels(kind)
        self._kind = kind
        self._started: float | None = started

    async def __aiter__(self) -> AsyncIterator[bytes]:
        count = self._bytes.inc
        async for chunk in self._inner:
            count(len(chunk))
            yield chunk

    async def aclose(self) -> None:
        if self._started is not None:
            DURATION.labels(self._kind).observe(time.perf_counter() - self._started)
            self._started = None
        await self._inner.aclose()


# -- the other layers -------------------------------------------------------------------------


def cache_open(kind: str, hit: bool) -> None:
    """An open of an instance, metadata or rendered file: from the cache or fetched."""
    (CACHE_HITS if hit else CACHE_MISSES).labels(kind).inc()


def fuse_error(op: str, number: int) -> None:
    FUSE_ERRORS.labels(op, errno.errorcode.get(number, str(number))).inc()


class Engine(Protocol):
    """What the gauges read of :class:`dicomfs.fetch.FetchEngine`."""

    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def limit(self) -> int: ...


class Cache(Protocol):
    """What the gauges read of :class:`dicomfs.store.Store`."""

    max_bytes: int

    @property
    def used(self) -> int: ...


class _Gauges(Collector):
    """Gauges read at scrape time from the mount's engine and store."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.cache: Cache | None = None

    def collect(self) -> Iterable[Metric]:
        for name, doc, read in (
            ("dicomfs_transfers_in_flight", "Instance transfers running (a series stream "
             "counts once)", lambda: self.engine and self.engine.in_flight),
            ("dicomfs_transfers_queued", "Instance transfers waiting for a connection",
             lambda: self.engine and self.engine.queued),
            ("dicomfs_transfers_limit", "Transfers allowed at once now (halved when the "
             "server is strained)", lambda: self.engine and self.engine.limit),
            ("dicomfs_cache_bytes", "Bytes in the cache folder's entries",
             lambda: self.cache and self.cache.used),
            ("dicomfs_cache_limit_bytes", "The cache size bound (--cache-size)",
             lambda: self.cache and self.cache.max_bytes),
        ):
            value = read()
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)


GAUGES = _Gauges()
REGISTRY.register(GAUGES)


def watch(engine: Engine, cache: Cache) -> None:
    """Report this engine's and this cache's gauges (one mount per process)."""
    GAUGES.engine, GAUGES.cache = engine, cache


def total(counter: Counter) -> float:
    """A counter's sum over all its labels."""
    return sum(sample.value for metric in counter.collect() for sample in metric.samples
               if sample.name.endswith("_total"))


# -- the endpoint -----------------------------------------------------------------------------

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r} (e.g. 127.0.0.1:9400)")
    return host, int(port)


async def open_listeners(address: tuple[str, int]) -> list[trio.SocketListener]:
    """Bind the endpoint now, so that a taken port fails the mount before it starts."""
    host, port = address
    return await trio.open_tcp_listeners(port, host=host)


def bound_address(listeners: list[trio.SocketListener]) -> str:
    """``http://host:port/metrics`` as bound (port 0 picks a free one)."""
    host, port = listeners[0].socket.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


async def serve(listeners: list[trio.SocketListener]) -> None:
    """Answer ``GET /metrics`` with the Prometheus text format until cancelled."""
    await trio.serve_listeners(_answer, listeners)


async def _answer(stream: trio.SocketStream) -> None:
    try:
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        words = head.split(b"\r\n", 1)[0].split()
        method, path = (words[0], words[1].split(b"?")[0]) if len(words) >= 2 else (b"", b"")
        if method in (b"GET", b"HEAD") and path == b"/metrics":
            status, media, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), \
                generate_latest(REGISTRY)
        else:
            status, media, body = b"404 Not Found", b"text/plain", b"see /metrics\n"
        await stream.send_all(
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + media + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
            + (body if method != b"HEAD" else b""))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics request: %s", exc)
    except Exception:  # monitoring must never end the mount
        log.exception("metrics request failed")
    finally:
        await stream.aclose()
