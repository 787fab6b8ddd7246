"""The DICOMweb client: QIDO-RS searches, WADO-RS metadata, retrieve and rendered.

It speaks HTTP and DICOMweb and nothing else: no FUSE, no disk. Every answer
that carries instances is streamed through the multipart parser as events, so
a series is never held in memory. Failures surface as the typed errors of
:mod:`dicomfs.errors`, whatever httpx raised underneath.
"""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import trio
from httpcore._async.http11 import AsyncHTTP11Connection

from dicomfs import __version__, dicomjson, metrics
from dicomfs.dicomjson import Dataset
from dicomfs.errors import (
    BadRequest,
    CertificateError,
    Conflict,
    DicomwebError,
    NotFound,
    ProtocolError,
    ServerError,
    Timeout,
    TooLarge,
    Truncated,
    Unauthorized,
    Unreachable,
)
from dicomfs.multipart import Event, PartData, PartEnd, PartStart, iter_events, parse_content_type
from dicomfs.uids import check_uid

log = logging.getLogger(__name__)
T = TypeVar("T")

MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
USER_AGENT = f"dicomfs/{__version__}"
MAX_JSON_BYTES = 512 * 1024 * 1024
MAX_ERROR_TEXT = 500
MAX_STOW_ANSWER = 16 * 1024 * 1024
STOW_CHUNK = 1024 * 1024
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
# STOW-RS failure reasons (PS3.18 and PS3.4 status codes) a person can act on.
FAILURE_REASONS = {
    0x0110: "processing failure", 0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported", 0x0124: "not authorized",
    0xA700: "out of resources", 0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
}

# QIDO return keys worth asking for: they name, date and size the files we show.
INSTANCE_FIELDS = (
    dicomjson.INSTANCE_NUMBER, dicomjson.CREATION_DATE, dicomjson.CREATION_TIME,
    dicomjson.NUMBER_OF_FRAMES, dicomjson.ROWS, dicomjson.COLUMNS,
    dicomjson.BITS_ALLOCATED, dicomjson.SAMPLES_PER_PIXEL,
)
SERIES_FIELDS = (dicomjson.SERIES_DATE, dicomjson.SERIES_TIME)
# The readable trees name study folders by patient, date and description (dicomfs.names);
# StudyDescription is no QIDO default, the others are asked for in case a server omits them.
STUDY_FIELDS = (
    dicomjson.STUDY_DATE, dicomjson.STUDY_TIME, dicomjson.STUDY_DESCRIPTION,
    dicomjson.PATIENT_NAME, dicomjson.PATIENT_ID, dicomjson.STUDY_INSTANCES,
)

Query = Mapping[str, str] | Iterable[tuple[str, str]]

# httpcore receives at most 64 KiB per socket read, a constant it offers no option for.
# A series answer is hundreds of MB: 1 MiB reads cut the per-read overhead by a
# factor of about 3 and bring a series retrieve to curl's speed (docs/performance.md).
if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", 0) < 1024 * 1024:
    AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024
# Characters a QIDO query value keeps as they are: wildcards and list separators (legal in
# a URL query, RFC 3986) and the PN separator ^ (which servers take as it is). Orthanc 1.10
# does not decode escapes in QIDO values: "Doe%5EJane%2A", what a form encoder sends,
# matches nothing there, "Doe^Jane*" does.
QUERY_SAFE = "*?,^:@/"


@dataclass(frozen=True)
class ClientConfig:
    """How to reach and talk to one DICOMweb server."""

    base_url: str
    qido_url: str | None = None
    wado_url: str | None = None
    timeout: float = 30.0
    connect_timeout: float = 10.0
    max_connections: int = 16
    page_size: int = 1000
    page_concurrency: int = 1  # QIDO pages asked at once in a long listing (opt-in)
    retries: int = 3
    single_part: bool = False
    transfer_syntax: str = "*"
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: httpx.Auth | None = None
    # httpx 0.28 sends no client certificate given as cert= next to a CA path (and calls
    # verify=<path> deprecated): one SSLContext carries the CA bundle and the client chain.
    verify: bool | ssl.SSLContext = True


def _status_error(status: int, message: str, url: str,
                  retry_after: str | None = None) -> DicomwebError:
    """Map an HTTP status to the error type callers act on."""
    kind: type[DicomwebError]
    if status in (404, 410):
        kind = NotFound
    elif status in (401, 403):
        kind = Unauthorized
    elif status >= 500 or status in (408, 429):
        kind = ServerError
    elif status == 409:
        kind = Conflict
    elif status == 413:
        kind = TooLarge
    else:
        kind = BadRequest
    return kind(f"HTTP {status}: {message}" if message else f"HTTP {status}", status=status,
                url=url, retry_after=retry_after)


@contextmanager
def _translated(url: str) -> Any:
    """Turn httpx's exceptions into ours, so no caller needs to know httpx."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise Timeout(f"timed out: {type(exc).__name__}", url=url) from exc
    except httpx.ConnectError as exc:
        rejected = _certificate_failure(exc)
        if rejected is not None:
            raise CertificateError(f"the server's TLS certificate is not trusted: {rejected}",
                                   url=url) from exc
        raise Unreachable(f"cannot connect: {exc}", url=url) from exc
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise Truncated(f"connection broke mid-answer: {exc}", url=url) from exc
    except httpx.DecodingError as exc:
        raise ProtocolError(f"undecodable answer: {exc}", url=url) from exc
    except httpx.TransportError as exc:
        raise Unreachable(f"transport error: {exc}", url=url) from exc


def _certificate_failure(exc: BaseException) -> str | None:
    """Why certificate verification failed, when that is what broke the connection."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause.verify_message or str(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def query_string(params: Iterable[tuple[str, str]]) -> str:
    """A QIDO query string that escapes only what a URL query cannot hold (see QUERY_SAFE)."""
    return "&".join(f"{quote(key, safe=QUERY_SAFE)}={quote(value, safe=QUERY_SAFE)}"
                    for key, value in params)


def retryable(exc: DicomwebError) -> bool:
    """Whether asking again may succeed: the server was busy, slow, gone or cut us off."""
    return isinstance(exc, ServerError | Timeout | Unreachable | Truncated)


def backoff(attempt: int, exc: DicomwebError) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential with full jitter; a
    server's Retry-After wins if sane. The one retry policy of every request."""
    if exc.retry_after and exc.retry_after.isdigit():
        return min(float(exc.retry_after), 30.0)
    return random.uniform(0, min(0.25 * 2**attempt, 8.0))


class DicomwebClient:
    """An async DICOMweb client over one pooled httpx connection set.

    Use as ``async with DicomwebClient(config) as client:``. Safe to share
    between tasks: httpx pools and bounds the connections.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        base = self._base = config.base_url.rstrip("/")
        self._qido = (config.qido_url or base).rstrip("/")
        self._wado = (config.wado_url or base).rstrip("/")
        limits = httpx.Limits(max_connections=config.max_connections,
                              max_keepalive_connections=config.max_connections)
        timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
        self._http = httpx.AsyncClient(
            headers={"User-Agent": USER_AGENT, **config.headers}, auth=config.auth,
            timeout=timeout, limits=limits, verify=config.verify,
            follow_redirects=True, event_hooks=metrics.http_event_hooks(),
        )

    async def __aenter__(self) -> DicomwebClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plumbing -----------------------------------------------------------------

    async def _send(self, url: str, *, accept: str, params: list[tuple[str, str]] | None = None,
                    encoding: str | None = None, retry: bool = True) -> httpx.Response:
        """Send a GET and return the open response once its status is good.

        Retries cover the request up to its status line; a body that breaks later
        is the caller's to fetch again, since only it knows what it has consumed.
        With ``retry`` off the caller runs the retries (the fetch engine, which
        also adapts its connection count to what it sees).
        """
        return await self._retrying(
            lambda: self._send_once(url, accept=accept, params=params, encoding=encoding),
            retry=retry)

    async def _retrying(self, once: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """``once()``, run again after failures worth retrying, at most ``retries`` times."""
        attempt = 0
        while True:
            try:
                return await once()
            except DicomwebError as exc:
                if not retry or not retryable(exc) or attempt >= self.config.retries:
                    raise
                delay = backoff(attempt, exc)
                attempt += 1
                log.warning("retrying in %.1fs (%d/%d) after: %s", delay, attempt,
                            self.config.retries, exc)
                await trio.sleep(delay)

    async def _send_once(self, url: str, *, accept: str, params: list[tuple[str, str]] | None,
                         encoding: str | None) -> httpx.Response:
        headers = {"Accept": accept}
        if encoding:
            headers["Accept-Encoding"] = encoding
        with _translated(url):
            request = self._http.build_request("GET", url, params=params, headers=headers)
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError:
                metrics.request_failed(url)
                raise
        if response.status_code < 400:
            return response
        body = b""
        try:
            with _translated(url):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_ERROR_TEXT:
                        break
        finally:
            await response.aclose()
        message = body[:MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        raise _status_error(response.status_code, message, url,
                            response.headers.get("Retry-After"))

    async def _get_bytes(self, url: str, *, accept: str,
                         params: list[tuple[str, str]] | None = None,
                         limit: int | None = None) -> tuple[bytes, httpx.Headers]:
        """A whole (bounded) body; a broken body is retried like a failed request."""
        limit = MAX_JSON_BYTES if limit is None else limit
        attempt = 0
        while True:
            response = await self._send(url, accept=accept, params=params)
            try:
                chunks: list[bytes] = []
                size = 0
                with _translated(url):
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise ProtocolError(f"answer larger than {limit} bytes", url=url)
                        chunks.append(chunk)
                return b"".join(chunks), response.headers
            except (Truncated, Timeout):  # cut or stalled mid-body
                if attempt >= self.config.retries:
                    raise
                attempt += 1
                log.warning("answer cut short or stalled, fetching again (%d/%d)", attempt,
                            self.config.retries)
            finally:
                await response.aclose()

    # -- QIDO-RS --------------------------------------------------------------------

    async def search_studies(self, query: Query = (), *,
                             fields: Iterable[str] = STUDY_FIELDS) -> list[Dataset]:
        """All studies matching ``query``, every page."""
        return await self._search("/studies", dicomjson.STUDY_UID, query, fields)

    async def search_series(self, study: str, query: Query = (), *,
                            fields: Iterable[str] = SERIES_FIELDS) -> list[Dataset]:
        """All series of a study matching ``query``."""
        return await self._search(f"/studies/{check_uid(study)}/series",
                                  dicomjson.SERIES_UID, query, fields)

    async def search_instances(self, study: str, series: str, query: Query = (), *,
                               fields: Iterable[str] = INSTANCE_FIELDS) -> list[Dataset]:
        """All instances of a series matching ``query``."""
        path = f"/studies/{check_uid(study)}/series/{check_uid(series)}/instances"
        return await self._search(path, dicomjson.SOP_UID, query, fields)

    def study_pages(self, query: Query = (), *,
                    fields: Iterable[str] = STUDY_FIELDS
                    ) -> AsyncGenerator[list[Dataset], None]:
        """The studies matching ``query``, a page at a time as the server answers: for
        folders that show the first studies while the rest are on their way."""
        return self._search_pages("/studies", dicomjson.STUDY_UID, query, fields)

    async def first_studies(self, query: Query = (), *, fields: Iterable[str] = STUDY_FIELDS
                            ) -> tuple[list[Dataset], bool]:
        """The first page of a study search, and whether it is all there is (a short
        page without a warning): one request tells a small server from a large one."""
        limit = self.config.page_size
        page, warning = await self._page("/studies", _search_params(query, fields), limit, 0)
        return _new("/studies", page, dicomjson.STUDY_UID, set()), \
            len(page) < limit and not warning

    async def _search(self, path: str, key: str, query: Query,
                      fields: Iterable[str]) -> list[Dataset]:
        return [ds async for page in self._search_pages(path, key, query, fields)
                for ds in page]

    async def _search_pages(self, path: str, key: str, query: Query,
                            fields: Iterable[str]) -> AsyncGenerator[list[Dataset], None]:
        """Page through a search until a short or empty page; yield what each page adds
        (de-duplicated by UID).

        Servers cap pages silently or with a ``Warning`` header, so a page is
        short only when it is shorter than what the server has shown it returns;
        a page with nothing new ends the walk whatever the server claims.

        With ``page_concurrency`` above 1, once a full page shows the listing is
        long, that many pages are asked at once at the offsets that follow (no
        server tells the total, so the last ones may come back empty). A capped
        page puts the walk back to one page at a time from where it was cut.
        """
        base = _search_params(query, fields)
        limit = self.config.page_size
        seen: set[str] = set()
        offset = 0
        batch = 1
        while True:
            pages = await self._pages(path, base, limit,
                                      [offset + n * limit for n in range(batch)])
            batch = max(self.config.page_concurrency, 1)
            for page, warning in pages:
                new = _new(path, page, key, seen)
                if not new:
                    return
                yield new
                offset += len(page)
                if len(page) < limit:
                    if not warning:
                        return
                    limit, batch = len(page), 1  # capped: ask for what it gives, in order
                    break

    async def _pages(self, path: str, base: list[tuple[str, str]], limit: int,
                     offsets: list[int]) -> list[tuple[list[Dataset], str | None]]:
        """QIDO pages at ``offsets`` (at once when several), in order, with any Warning."""
        if len(offsets) == 1:
            return [await self._page(path, base, limit, offsets[0])]
        pages: list[tuple[list[Dataset], str | None]] = [([], None)] * len(offsets)
        errors: list[DicomwebError] = []

        async def fetch(index: int, offset: int) -> None:
            try:
                pages[index] = await self._page(path, base, limit, offset)
            except DicomwebError as exc:  # raised as itself below, not in an exception group
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for index, offset in enumerate(offsets):
                nursery.start_soon(fetch, index, offset)
        if errors:
            raise errors[0]
        return pages

    async def _page(self, path: str, base: list[tuple[str, str]], limit: int,
                    offset: int) -> tuple[list[Dataset], str | None]:
        params = [*base, ("limit", str(limit)), ("offset", str(offset))]
        body, headers = await self._get_bytes(f"{self._qido}{path}?{query_string(params)}",
                                              accept="application/dicom+json")
        warning = headers.get("Warning")
        if warning:
            log.warning("QIDO %s: server warns %r", path, warning[:200])
        return dicomjson.load_array(body, what=f"QIDO {path}"), warning

    # -- WADO-RS ----------------------------------------------------------------------

    async def study_metadata(self, study: str) -> bytes:
        """WADO-RS metadata of a study: the raw JSON bytes as the server sent them."""
        return await self._metadata(f"/studies/{check_uid(study)}/metadata")

    async def series_metadata(self, study: str, series: str) -> bytes:
        """WADO-RS metadata of a series: the raw JSON bytes as the server sent them."""
        return await self._metadata(
            f"/studies/{check_uid(study)}/series/{check_uid(series)}/metadata")

    async def instance_metadata(self, study: str, series: str, instance: str) -> bytes:
        """WADO-RS metadata of one instance (what :mod:`dicomfs.capabilities` probes with)."""
        return await self._metadata(f"/studies/{check_uid(study)}/series/{check_uid(series)}"
                                    f"/instances/{check_uid(instance)}/metadata")

    async def _metadata(self, path: str) -> bytes:
        body, _ = await self._get_bytes(self._wado + path, accept="application/dicom+json")
        return body

    async def _send_retrieve(self, url: str, *, single_part: bool,
                             retry: bool) -> httpx.Response:
        # DICOM bytes are the payload, not text: compression costs CPU on both
        # ends and hides the part lengths, so ask for them as they are.
        return await self._send(url, accept=self._retrieve_accept(single_part),
                                encoding="identity", retry=retry)

    def _retrieve_accept(self, single_part: bool) -> str:
        syntax = f"transfer-syntax={self.config.transfer_syntax}"
        if single_part:
            return f"application/dicom; {syntax}"
        return f"{MULTIPART_DICOM}; {syntax}"

    @asynccontextmanager
    async def retrieve(self, study: str, series: str | None = None,
                       instance: str | None = None, *,
                       retry: bool = True) -> AsyncIterator[AsyncIterator[Event]]:
        """Stream a study, series or instance as multipart events.

        ``async with client.retrieve(s, se, i) as events: async for event in events``.
        Parts arrive as PartStart, PartData..., PartEnd; a stream that ends early
        raises Truncated, so a part that got its PartEnd is complete.
        """
        path = f"/studies/{check_uid(study)}"
        if series is not None:
            path += f"/series/{check_uid(series)}"
            if instance is not None:
                path += f"/instances/{check_uid(instance)}"
        url = self._wado + path
        single = self.config.single_part and instance is not None
        try:
            response = await self._send_retrieve(url, single_part=single, retry=retry)
        except BadRequest as exc:
            # Some servers speak only one of the two forms for single instances.
            if instance is None or exc.status not in (400, 406, 415):
                raise
            response = await self._send_retrieve(url, single_part=not single, retry=retry)
        try:
            yield self._events(response, url)
        finally:
            await response.aclose()

    async def _events(self, response: httpx.Response, url: str) -> AsyncIterator[Event]:
        content_type = response.headers.get("Content-Type", "")
        media, params = parse_content_type(content_type)
        with _translated(url):
            if media == "multipart/related":
                boundary = params.get("boundary")
                if not boundary:
                    raise ProtocolError("multipart answer without a boundary", url=url)
                async for event in iter_events(response.aiter_bytes(), boundary):
                    yield event
            elif media == "application/dicom":
                async for event in _single_part(response, content_type, url):
                    yield event
            else:
                raise ProtocolError(f"unexpected content type {content_type[:100]!r}", url=url)

    async def rendered(self, study: str, series: str, instance: str, *,
                       media_type: str = "image/png", frame: int | None = None) -> bytes:
        """A rendered PNG or JPEG of an instance, or of one frame (numbered from 1)."""
        path = (f"/studies/{check_uid(study)}/series/{check_uid(series)}"
                f"/instances/{check_uid(instance)}")
        if frame is not None:
            path += f"/frames/{int(frame)}"
        body, headers = await self._get_bytes(self._wado + path + "/rendered",
                                              accept=media_type)
        got, _ = parse_content_type(headers.get("Content-Type", media_type))
        if got != media_type:
            raise ProtocolError(f"asked for {media_type}, got {got}", url=self._wado + path)
        return body

    async def sample_instance(self) -> tuple[str, str, str] | None:
        """(study, series, instance) UIDs of some instance, from three one-entry QIDO pages;
        None when the server holds nothing."""
        path = ""
        found: list[str] = []
        for level, key in (("/studies", dicomjson.STUDY_UID), ("/series", dicomjson.SERIES_UID),
                           ("/instances", dicomjson.SOP_UID)):
            path += level
            page, _ = await self._page(path, [], 1, 0)
            uid = next((uid for ds in page if (uid := dicomjson.uid(ds, key))), None)
            if uid is None:
                return None
            found.append(uid)
            path += f"/{uid}"
        return found[0], found[1], found[2]

    # -- STOW-RS ----------------------------------------------------------------------

    async def store_instances(self, paths: Sequence[Path]) -> StowResult:
        """Store DICOM files on the server (``POST {base}/studies``), in one request.

        The body is streamed from the files, never held in memory, with an exact
        Content-Length (some servers refuse chunked uploads); it can be sent again,
        so retries (5xx, a broken connection) and a token refreshed on 401 work.
        A refusal raises the typed error of its status (Conflict for 409, TooLarge
        for 413) with the server's reasons in its message; an answer of 200 or 202
        tells what was stored and what failed, per instance.
        """
        url = f"{self._base}/studies"
        body = _MultipartFiles(paths)
        headers = {"Content-Type": f"{MULTIPART_DICOM}; boundary={body.boundary}",
                   "Content-Length": str(body.length), "Accept": "application/dicom+json"}
        return await self._retrying(lambda: self._stow_once(url, body, headers))

    async def _stow_once(self, url: str, body: _MultipartFiles,
                         headers: dict[str, str]) -> StowResult:
        with _translated(url):
            request = self._http.build_request("POST", url, content=body, headers=headers)
            response = await self._http.send(request, stream=True)
            try:
                raw = b""
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) > MAX_STOW_ANSWER:
                        raise ProtocolError("STOW-RS answer too large", url=url)
            finally:
                await response.aclose()
        answer = _stow_answer(raw)
        if response.status_code >= 400:
            text = "; ".join(f"{uid}: {why}" for uid, why in answer.failed.items()) if \
                answer.failed else ("" if answer.parsed else
                                    raw[:MAX_ERROR_TEXT].decode("utf-8", "replace").strip())
            raise _status_error(response.status_code, text, url,
                                response.headers.get("Retry-After"))
        return answer

    async def probe(self) -> None:
        """One cheap QIDO request, to fail fast on a wrong URL or wrong credentials."""
        await self._get_bytes(self._qido + "/studies", accept="application/dicom+json",
                              params=[("limit", "1")])


class _MultipartFiles:
    """A ``multipart/related`` body of DICOM files, read from disk as it is sent.

    An async iterable but no generator, so httpx can send it again (retries,
    authentication); its length is known before the first byte.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.boundary = f"dicomfs-{os.urandom(12).hex()}"
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"--{self.boundary}--\r\n".encode()
        self._sizes = [os.stat(path).st_size for path in self.paths]
        self.length = sum(len(self._head) + size + 2 for size in self._sizes) + len(self._tail)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for path, size in zip(self.paths, self._sizes, strict=True):
            yield self._head
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while offset < size:
                    chunk = await trio.to_thread.run_sync(
                        os.pread, fd, min(STOW_CHUNK, size - offset), offset)
                    if not chunk:  # shorter than announced: never send a cut file
                        raise ProtocolError(f"{path.name} shrank while being sent")
                    offset += len(chunk)
                    yield chunk
            finally:
                os.close(fd)
            yield b"\r\n"
        yield self._tail


@dataclass(frozen=True)
class StowResult:
    """What a STOW-RS answer says: instances stored, and instances refused with why."""

    stored: frozenset[str]
    failed: dict[str, str]
    parsed: bool = True  # False when the answer was no DICOM JSON (e.g. empty)


def _stow_answer(raw: bytes) -> StowResult:
    """The Referenced and Failed SOP Sequences of a STOW-RS answer, leniently: an
    empty or non-JSON body says nothing, which the status then says alone."""
    try:
        parsed = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, list):  # some servers wrap the one answer in an array
        parsed = next((item for item in parsed if isinstance(item, dict)), None)
    if not isinstance(parsed, dict):
        return StowResult(frozenset(), {}, parsed=False)
    stored = {uid for item in _items(parsed, REFERENCED_SOP_SEQUENCE)
              if (uid := dicomjson.uid(item, REFERENCED_SOP_INSTANCE))}
    failed = {}
    for item in _items(parsed, FAILED_SOP_SEQUENCE):
        code = dicomjson.integer(item, FAILURE_REASON)
        why = "no reason given" if code is None else \
            f"{FAILURE_REASONS.get(code, 'refused')} (0x{code:04X})"
        failed[dicomjson.uid(item, REFERENCED_SOP_INSTANCE) or "?"] = why
    return StowResult(frozenset(stored), failed)


def _items(ds: Dataset, tag: str) -> list[Dataset]:
    element = ds.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values if isinstance(item, dict)] if isinstance(values, list) \
        else []


async def _single_part(response: httpx.Response, content_type: str,
                       url: str) -> AsyncIterator[Event]:
    """A single-part ``application/dicom`` answer, presented as one multipart part."""
    headers = {"content-type": content_type}
    # A compressed answer's Content-Length counts compressed bytes; httpx checks it.
    encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
    declared = None if encoded else response.headers.get("Content-Length")
    if declared is not None:
        headers["content-length"] = declared
    yield PartStart(headers)
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        yield PartData(chunk)
    if declared is not None and declared.isdigit() and size != int(declared):
        raise Truncated(f"got {size} of {declared} bytes", url=url)
    yield PartEnd()


def _search_params(query: Query, fields: Iterable[str]) -> list[tuple[str, str]]:
    items = query.items() if isinstance(query, Mapping) else query
    # One parameter per field: some servers (Orthanc) ignore a comma list.
    return [*((str(k), str(v)) for k, v in items), *(("includefield", f) for f in fields)]


def _new(path: str, page: list[Dataset], key: str, seen: set[str]) -> list[Dataset]:
    """The entries of a QIDO page not seen before (by their UID in ``key``), noted as seen."""
    new: list[Dataset] = []
    for dataset in page:
        uid = dicomjson.uid(dataset, key)
        if uid is None:
            log.warning("QIDO %s: skipped an entry without a valid UID", path)
        elif uid not in seen:
            seen.add(uid)
            new.append(dataset)
    return new
