"""The DICOMweb client: QIDO-RS searches, WADO-RS metadata, retrieve and rendered.

It speaks HTTP and DICOMweb and nothing else: no FUSE, no disk. Every answer
that carries instances is streamed through the multipart parser as events, so
a series is never held in memory. Failures surface as the typed errors of
:mod:`dicomfs.errors`, whatever httpx raised underneath. The HTTP plumbing all
requests share (errors, retries, reading parts) is :mod:`dicomfs.transport`;
the STOW-RS body and answer are :mod:`dicomfs.stow`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from dicomfs import __version__, dicomjson, metrics, stow
from dicomfs.dicomjson import Dataset
from dicomfs.errors import BadRequest, DicomwebError, ProtocolError, Timeout, Truncated
from dicomfs.multipart import Event, parse_content_type
from dicomfs.stow import MultipartFiles, StowResult
from dicomfs.transport import (
    MAX_ERROR_TEXT,
    MULTIPART_DICOM,
    events,
    query_string,
    retrying,
    status_error,
    translated,
)
from dicomfs.uids import check_uid

log = logging.getLogger(__name__)

USER_AGENT = f"dicomfs/{__version__}"
MAX_JSON_BYTES = 512 * 1024 * 1024
GROWTH = 4  # a full QIDO page: the next one is this much larger ...
MAX_PAGE = 16_000  # ... up to this many entries (about 13 MB of study JSON)
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
        return await retrying(
            lambda: self._send_once(url, accept=accept, params=params, encoding=encoding),
            self.config.retries if retry else 0)

    async def _send_once(self, url: str, *, accept: str, params: list[tuple[str, str]] | None,
                         encoding: str | None) -> httpx.Response:
        headers = {"Accept": accept}
        if encoding:
            headers["Accept-Encoding"] = encoding
        with translated(url):
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
            with translated(url):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= MAX_ERROR_TEXT:
                        break
        finally:
            await response.aclose()
        message = body[:MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        raise status_error(response.status_code, message, url,
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
                with translated(url):
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

        Pages grow (GROWTH times, up to MAX_PAGE) while the server fills them: the
        first page comes as soon as a ``page_size`` one can, and a long listing takes
        a few requests, not one per ``page_size`` (Orthanc pays a search over the whole
        index per page). A grown page that comes back short may be a silent cap rather
        than the end: the next page, asked at that size, tells (one more request).

        With ``page_concurrency`` above 1, pages keep their size and, once a full page
        shows the listing is long, that many are asked at once at the offsets that
        follow (no server tells the total, so the last ones may come back empty). A
        capped page puts the walk back to one page at a time from where it was cut.
        """
        base = _search_params(query, fields)
        limit = filled = self.config.page_size  # filled: the largest page known whole
        grow = self.config.page_concurrency <= 1
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
                if len(page) >= limit:
                    filled = max(filled, limit)
                    if grow:
                        limit = min(limit * GROWTH, max(MAX_PAGE, limit))
                    continue
                if warning:
                    limit, batch, grow = len(page), 1, False  # capped: what it gives, in order
                    break
                if limit <= filled:
                    return
                limit, grow = len(page), False  # the end, or a silent cap: the next page says
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
            yield events(response, url)
        finally:
            await response.aclose()

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
        body = MultipartFiles(paths)
        return await retrying(lambda: stow.post(self._http, url, body), self.config.retries)

    async def probe(self) -> None:
        """One cheap QIDO request, to fail fast on a wrong URL or wrong credentials."""
        await self._get_bytes(self._qido + "/studies", accept="application/dicom+json",
                              params=[("limit", "1")])


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
