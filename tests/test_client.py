"""The DICOMweb client, against the real Orthanc and against scripted fake servers.

Part A talks to the session Orthanc holding the sample archive: every instance in every
transfer syntax comes back byte for byte, series retrieve, metadata, paging, searches,
rendered images, typed errors and authentication.

Part B drives the fault paths with a tiny HTTP server on 127.0.0.1 run in a thread, which
writes raw bytes so that bodies can be cut, lengths can lie and connections can be reset:
empty answers, capped and offset-ignoring pagers, malformed JSON, retries and Retry-After,
truncated multipart and single-part answers, the Accept fallback and the JSON size bound.
"""

from __future__ import annotations

import gzip
import hashlib
import http
import io
import json
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pydicom
import pytest
import trio

import dicomfs.client
from dicomfs import __version__, dicomjson
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import (
    BadRequest,
    DicomwebError,
    NotFound,
    ProtocolError,
    ServerError,
    Truncated,
    Unauthorized,
    Unreachable,
)
from dicomfs.multipart import Event, PartData, PartEnd, PartStart
from tests.support import LocalOrthanc, SampleArchive, demo_uid
from tests.support.orthanc import free_port

if TYPE_CHECKING:
    from conftest import OrthancFactory

MULTIPART_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SINGLE_ACCEPT = "application/dicom; transfer-syntax=*"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

# Every transfer syntax the sample archive holds (see tests/support/sample.py).
ARCHIVE_SYNTAXES = {
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.70",  # JPEG lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE
}


# =========================================================================== helpers


async def parts_of(events: AsyncIterator[Event]) -> AsyncIterator[tuple[dict[str, str], bytes]]:
    """(headers, body) of each complete part, checking the event grammar on the way."""
    headers: dict[str, str] | None = None
    chunks: list[bytes] = []
    async for event in events:
        if isinstance(event, PartStart):
            assert headers is None, "PartStart inside a part"
            headers, chunks = event.headers, []
        elif isinstance(event, PartData):
            assert headers is not None, "PartData outside a part"
            chunks.append(event.data)
        else:
            assert isinstance(event, PartEnd), event
            assert headers is not None, "PartEnd outside a part"
            yield headers, b"".join(chunks)
            headers = None
    assert headers is None, "stream ended inside a part without raising"


async def collect_parts(events: AsyncIterator[Event]) -> list[tuple[dict[str, str], bytes]]:
    return [part async for part in parts_of(events)]


async def collect_events(events: AsyncIterator[Event], into: list[Event]) -> None:
    """Append every event to ``into`` (so the caller still has them after an exception)."""
    async for event in events:
        into.append(event)


def sop_uid_of(data: bytes) -> str:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                         specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)


def uids(datasets: list[dict[str, Any]], tag: str) -> list[str]:
    found = [dicomjson.uid(ds, tag) for ds in datasets]
    assert None not in found
    return [u for u in found if u is not None]


_ORTHANC_SHA: dict[tuple[str, str], str] = {}


async def orthanc_file(orthanc: LocalOrthanc, sop: str) -> bytes:
    """Orthanc's stored file, fetched in a thread; its digest is remembered."""
    data = await trio.to_thread.run_sync(orthanc.instance_file, sop)
    _ORTHANC_SHA[orthanc.url, sop] = hashlib.sha256(data).hexdigest()
    return data


async def orthanc_sha(orthanc: LocalOrthanc, sop: str) -> str:
    if (orthanc.url, sop) not in _ORTHANC_SHA:
        await orthanc_file(orthanc, sop)
    return _ORTHANC_SHA[orthanc.url, sop]


def orthanc_client(orthanc: LocalOrthanc, **options: Any) -> DicomwebClient:
    orthanc.client  # noqa: B018 -- create the shared REST client before threads use it
    return DicomwebClient(ClientConfig(base_url=orthanc.dicomweb_url, **options))


def record_requests(client: DicomwebClient) -> list[httpx.Request]:
    """Every request the client sends from now on (an httpx event hook on its pool)."""
    sent: list[httpx.Request] = []

    async def hook(request: httpx.Request) -> None:
        sent.append(request)

    client._http.event_hooks = {"request": [hook], "response": []}
    return sent


# =========================================================================== A: real Orthanc


async def test_every_instance_byte_identical(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    """Each archive instance, retrieved alone, is exactly the file Orthanc stored."""
    limiter = trio.CapacityLimiter(4)
    covered: Counter[str] = Counter()
    wrong: list[str] = []

    async with orthanc_client(orthanc) as client:

        async def check(f: Any) -> None:
            async with limiter:
                async with client.retrieve(f.study_uid, f.series_uid, f.sop_uid) as events:
                    parts = await collect_parts(events)
                expected = await orthanc_file(orthanc, f.sop_uid)
            if len(parts) != 1 or parts[0][1] != expected:
                wrong.append(f"{f.label} ({f.transfer_syntax}): {len(parts)} parts, "
                             f"sizes {[len(p[1]) for p in parts]} vs {len(expected)}")
                return
            assert parts[0][0]["content-type"].startswith("application/dicom")
            covered[f.transfer_syntax] += 1

        async with trio.open_nursery() as nursery:
            for f in archive.files:
                nursery.start_soon(check, f)

    assert wrong == []
    assert sum(covered.values()) == len(archive.files)
    assert set(covered) == {f.transfer_syntax for f in archive.files}
    assert set(covered) >= ARCHIVE_SYNTAXES


@pytest.mark.parametrize("label", ["ct", "mr"])
async def test_series_retrieve_every_instance_once(
    orthanc: LocalOrthanc, archive: SampleArchive, label: str
) -> None:
    study, series = archive.study_uid(label), archive.series_uid(label)
    expected = {f.sop_uid for f in archive.series_files(series)}
    assert len(expected) == (400 if label == "ct" else 30)
    seen: Counter[str] = Counter()
    wrong: list[str] = []
    async with orthanc_client(orthanc) as client, client.retrieve(study, series) as events:
        async for _headers, body in parts_of(events):
            sop = sop_uid_of(body)
            seen[sop] += 1
            if hashlib.sha256(body).hexdigest() != await orthanc_sha(orthanc, sop):
                wrong.append(sop)
    assert set(seen) == expected
    assert max(seen.values()) == 1
    assert wrong == []


async def test_single_part_config_falls_back_on_orthanc(
    orthanc: LocalOrthanc, archive: SampleArchive
) -> None:
    """Orthanc 1.7 answers 400 to single-part Accept: the client asks again as multipart."""
    f = archive.with_label("pydicom/MR_small_bigendian.dcm")[0]
    async with orthanc_client(orthanc, single_part=True) as client:
        sent = record_requests(client)
        mark = orthanc.mark()
        async with client.retrieve(f.study_uid, f.series_uid, f.sop_uid) as events:
            parts = await collect_parts(events)
        requests = orthanc.requests_since(mark)
    assert [p[1] for p in parts] == [await orthanc_file(orthanc, f.sop_uid)]
    assert [r.headers["Accept"] for r in sent] == [SINGLE_ACCEPT, MULTIPART_ACCEPT]
    path = f"GET /dicom-web/studies/{f.study_uid}/series/{f.series_uid}/instances/{f.sop_uid}"
    assert requests == [path, path]


async def test_study_and_series_metadata_list_every_instance(
    orthanc: LocalOrthanc, archive: SampleArchive
) -> None:
    async with orthanc_client(orthanc) as client:
        for study in archive.studies:
            items = dicomjson.load_array(await client.study_metadata(study), what="study")
            assert sorted(uids(items, dicomjson.SOP_UID)) == sorted(
                f.sop_uid for f in archive.study_files(study)
            ), study
            assert set(uids(items, dicomjson.STUDY_UID)) == {study}
        for series, count in archive.series.items():
            study = archive.series_files(series)[0].study_uid
            raw = await client.series_metadata(study, series)
            items = dicomjson.load_array(raw, what="series")
            assert sorted(uids(items, dicomjson.SOP_UID)) == sorted(
                f.sop_uid for f in archive.series_files(series)
            ), series
            assert len(items) == count
            assert set(uids(items, dicomjson.SERIES_UID)) == {series}
    ct = archive.series_uid("ct")
    assert archive.series[ct] == 400


async def test_paging_studies(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    async with orthanc_client(orthanc) as client:
        default = uids(await client.search_studies(), dicomjson.STUDY_UID)
    async with orthanc_client(orthanc, page_size=3) as client:
        sent = record_requests(client)
        mark = orthanc.mark()
        paged = uids(await client.search_studies(), dicomjson.STUDY_UID)
        requests = orthanc.requests_since(mark)
    assert len(paged) == len(set(paged)) == len(archive.studies) > 30
    assert set(paged) == set(default) == set(archive.studies)
    assert len(default) == len(set(default))
    # Full pages of 3, then a short page (or an empty one) that ends the walk.
    offsets = [int(r.url.params["offset"]) for r in sent]
    assert offsets == list(range(0, len(archive.studies) + 1, 3))
    assert {r.url.params["limit"] for r in sent} == {"3"}
    assert requests == ["GET /dicom-web/studies"] * len(offsets)


async def test_paging_instances(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    study, series = archive.study_uid("ct"), archive.series_uid("ct")
    async with orthanc_client(orthanc, page_size=7) as client:
        sent = record_requests(client)
        mark = orthanc.mark()
        found = uids(await client.search_instances(study, series), dicomjson.SOP_UID)
        requests = orthanc.requests_since(mark)
    assert len(found) == len(set(found)) == 400
    assert set(found) == {f.sop_uid for f in archive.series_files(series)}
    offsets = [int(r.url.params["offset"]) for r in sent]
    assert offsets == list(range(0, 400, 7))  # 57 pages of 7, a short 58th page of 1
    assert len(requests) == len(offsets) == 58
    assert set(requests) == {f"GET /dicom-web/studies/{study}/series/{series}/instances"}


async def test_search_series_and_instances(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    async with orthanc_client(orthanc) as client:
        for study in archive.studies:
            found = uids(await client.search_series(study), dicomjson.SERIES_UID)
            assert sorted(found) == sorted({f.series_uid for f in archive.study_files(study)})
        follow = archive.study_uid("followup-ct")
        assert len(await client.search_series(follow)) == 2

        mr_study, mr_series = archive.study_uid("mr"), archive.series_uid("mr")
        instances = await client.search_instances(mr_study, mr_series)
        assert sorted(uids(instances, dicomjson.SOP_UID)) == sorted(
            f.sop_uid for f in archive.series_files(mr_series)
        )
        numbers = [dicomjson.integer(i, dicomjson.INSTANCE_NUMBER) for i in instances]
        assert sorted(n for n in numbers if n is not None) == list(range(1, 31))
        assert {dicomjson.integer(i, dicomjson.ROWS) for i in instances} == {256}
        assert {dicomjson.integer(i, dicomjson.COLUMNS) for i in instances} == {256}
        assert {dicomjson.integer(i, dicomjson.BITS_ALLOCATED) for i in instances} == {16}

        emri = archive.with_label("pydicom/emri_small.dcm")[0]
        (one,) = await client.search_instances(emri.study_uid, emri.series_uid)
        assert dicomjson.integer(one, dicomjson.NUMBER_OF_FRAMES) == 10

        # A match key narrows the search.
        f = archive.with_label("mr")[4]
        (hit,) = await client.search_instances(mr_study, mr_series,
                                               {"SOPInstanceUID": f.sop_uid})
        assert dicomjson.integer(hit, dicomjson.INSTANCE_NUMBER) == 5


async def test_includefield_beyond_server_defaults(
    orthanc: LocalOrthanc, archive: SampleArchive
) -> None:
    """Fields the client asks for that Orthanc does not return by default must come back.

    SeriesDate/SeriesTime (series level) and SamplesPerPixel (instance level) are not in
    Orthanc's default QIDO return keys: they come back only if ``includefield`` is honoured.
    """
    async with orthanc_client(orthanc) as client:
        sent = record_requests(client)
        follow = archive.study_uid("followup-ct")
        series = await client.search_series(follow)
        mr_study, mr_series = archive.study_uid("mr"), archive.series_uid("mr")
        instances = await client.search_instances(mr_study, mr_series)
    asked = [r.url.params.get_list("includefield") for r in sent]
    assert {dicomjson.text(s, dicomjson.SERIES_DATE) for s in series} == {"20240610"}, asked
    times = {dicomjson.text(s, dicomjson.SERIES_TIME) for s in series}
    assert {(t or "")[:2] for t in times} == {"10", "11"}  # 10:00:xx and 11:00:00
    assert {dicomjson.integer(i, dicomjson.SAMPLES_PER_PIXEL) for i in instances} == {1}


async def test_rendered(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    ct = archive.with_label("ct")[200]
    emri = archive.with_label("pydicom/emri_small.dcm")[0]
    color = archive.with_label("pydicom/color3d_jpeg_baseline.dcm")[0]
    async with orthanc_client(orthanc) as client:
        png = await client.rendered(ct.study_uid, ct.series_uid, ct.sop_uid)
        assert png.startswith(PNG_MAGIC)
        jpeg = await client.rendered(ct.study_uid, ct.series_uid, ct.sop_uid,
                                     media_type="image/jpeg")
        assert jpeg.startswith(JPEG_MAGIC)
        frame = await client.rendered(emri.study_uid, emri.series_uid, emri.sop_uid, frame=1)
        assert frame.startswith(PNG_MAGIC)
        frame = await client.rendered(color.study_uid, color.series_uid, color.sop_uid,
                                      frame=1, media_type="image/jpeg")
        assert frame.startswith(JPEG_MAGIC)
        for label in ("pydicom/rtdose.dcm", "pydicom/JPEG2000.dcm"):
            f = archive.with_label(label)[0]
            mark = orthanc.mark()
            with pytest.raises(BadRequest) as caught:
                await client.rendered(f.study_uid, f.series_uid, f.sop_uid)
            assert caught.value.status == 400
            assert "Parameter out of range" in str(caught.value)  # Orthanc's own message
            assert len(orthanc.requests_since(mark)) == 1  # a 400 is not retried


async def test_not_found(orthanc: LocalOrthanc, archive: SampleArchive) -> None:
    missing = demo_uid("study/that-does-not-exist")
    ct_study, ct_series = archive.study_uid("ct"), archive.series_uid("ct")
    async with orthanc_client(orthanc) as client:
        with pytest.raises(NotFound) as caught:
            await client.study_metadata(missing)
        assert caught.value.status == 404
        with pytest.raises(NotFound):
            await client.series_metadata(ct_study, missing)
        with pytest.raises(NotFound):
            async with client.retrieve(missing) as events:
                await collect_parts(events)
        mark = orthanc.mark()
        with pytest.raises(NotFound):
            async with client.retrieve(ct_study, ct_series, missing) as events:
                await collect_parts(events)
        assert len(orthanc.requests_since(mark)) == 1  # no retry, no Accept fallback
        assert await client.search_series(missing) == []


async def test_unreachable_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection is retried ``retries`` times, with short backoffs, then fails."""
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    delays = record_backoffs(monkeypatch)
    for retries in (0, 2):
        delays.clear()
        async with DicomwebClient(ClientConfig(base_url=url, retries=retries,
                                               connect_timeout=2.0)) as client:
            with pytest.raises(Unreachable):
                await client.search_studies()
            with pytest.raises(Unreachable):
                async with client.retrieve(demo_uid("study/x")) as events:
                    await collect_parts(events)
        assert len(delays) == 2 * retries
        assert all(delay <= 0.25 * 2 ** (retries - 1) for delay in delays), delays


def record_backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the client waits before each retry, as they are chosen."""
    delays: list[float] = []
    choose = dicomfs.client.backoff

    def recorded(attempt: int, exc: DicomwebError) -> float:
        delays.append(choose(attempt, exc))
        return delays[-1]

    monkeypatch.setattr(dicomfs.client, "backoff", recorded)
    return delays


async def test_authentication(orthanc_factory: OrthancFactory) -> None:
    server = orthanc_factory(users={"alice": "secret"})
    async with DicomwebClient(ClientConfig(base_url=server.dicomweb_url)) as client:
        with pytest.raises(Unauthorized) as caught:
            await client.search_studies()
        assert caught.value.status == 401
        with pytest.raises(Unauthorized):
            await client.probe()
    wrong = ClientConfig(base_url=server.dicomweb_url, auth=httpx.BasicAuth("alice", "nope"))
    async with DicomwebClient(wrong) as client:
        with pytest.raises(Unauthorized):
            await client.search_studies()
    good = ClientConfig(base_url=server.dicomweb_url, auth=httpx.BasicAuth("alice", "secret"))
    async with DicomwebClient(good) as client:
        await client.probe()
        assert await client.search_studies() == []


# =========================================================================== B: fake server


@dataclass
class Seen:
    """One request the fake server received."""

    method: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""  # of a request with a Content-Length (a STOW-RS POST)

    def param(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[0] if values else None


@dataclass
class Reply:
    """What the fake server writes back, byte for byte."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    length: int | str | None = "auto"  # Content-Length: "auto", a number (may lie), None
    cut: int | None = None  # send only this many body bytes
    reset: bool = False  # then abort the connection (RST) instead of closing it


App = Callable[[Seen], Reply]


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(65537)
        if not line.strip():
            return
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            raw = self.rfile.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        url = urllib.parse.urlsplit(target)
        body = self.rfile.read(int(headers.get("content-length", "0")))
        seen = Seen(method, url.path, urllib.parse.parse_qs(url.query, keep_blank_values=True),
                    headers, body)
        with self.server.lock:
            self.server.seen.append(seen)
        reply = self.server.app(seen)
        try:
            reason = http.HTTPStatus(reply.status).phrase
        except ValueError:
            reason = "Whatever"
        lines = [f"HTTP/1.1 {reply.status} {reason}"]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        if reply.length == "auto":
            lines.append(f"Content-Length: {len(reply.body)}")
        elif reply.length is not None:
            lines.append(f"Content-Length: {reply.length}")
        lines.append("Connection: close")
        body = reply.body if reply.cut is None else reply.body[: reply.cut]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.wfile.flush()
        if reply.reset:
            time.sleep(0.05)  # let the client start reading the body before the RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64  # the default 5 drops SYNs of parallel clients (1 s retransmit)

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.app: App = lambda seen: Reply(500, body=b"no app")


@dataclass
class FakeServer:
    """A scripted DICOMweb server: set ``app``, read ``seen``."""

    server: _Server = field(default_factory=_Server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    @property
    def seen(self) -> list[Seen]:
        with self.server.lock:
            return list(self.server.seen)

    @property
    def app(self) -> App:
        return self.server.app

    @app.setter
    def app(self, app: App) -> None:
        self.server.app = app

    def replies(self, *replies: Reply) -> None:
        """Answer the n-th request with the n-th reply (the last one repeats)."""
        script = list(replies)

        def app(seen: Seen) -> Reply:
            return script.pop(0) if len(script) > 1 else script[0]

        self.app = app

    def client(self, **options: Any) -> DicomwebClient:
        options.setdefault("retries", 0)
        return DicomwebClient(ClientConfig(base_url=self.url, **options))


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    thread.join(5)


DICOM_JSON = [("Content-Type", "application/dicom+json")]
BOUNDARY = "dicomfs-test-boundary-42"
MULTIPART_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
STUDY, SERIES, INSTANCE = "1.2.3", "1.2.3.4", "1.2.3.4.5"
PAYLOAD_A = bytes(range(256)) * 80  # 20480 bytes, holds CR, LF and dashes
PAYLOAD_B = b"DICM" + bytes(reversed(range(256))) * 50


def study_item(uid: str) -> dict[str, Any]:
    return {"0020000D": {"vr": "UI", "Value": [uid]}}


def json_reply(items: Any, **kwargs: Any) -> Reply:
    return Reply(200, [*DICOM_JSON, *kwargs.pop("headers", [])],
                 json.dumps(items).encode(), **kwargs)


def multipart_body(parts: Sequence[bytes], *, lengths: bool = True) -> bytes:
    out = b""
    for part in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode()
        if lengths:
            out += f"Content-Length: {len(part)}\r\n".encode()
        out += b"\r\n" + part + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def qido_pager(items: list[dict[str, Any]], *, cap: int | None = None,
               warn: str | None = None, warn_always: bool = False,
               ignore_offset: bool = False, ignore_limit: bool = False) -> App:
    """A QIDO server over ``items`` with one of the paging habits real servers have."""

    def app(seen: Seen) -> Reply:
        limit = int(seen.param("limit") or len(items))
        offset = 0 if ignore_offset else int(seen.param("offset") or 0)
        size = len(items) if ignore_limit else limit
        capped = cap is not None and size > cap
        if cap is not None:
            size = min(size, cap)
        headers = [("Warning", warn)] if warn and (capped or warn_always) else []
        return json_reply(items[offset: offset + size], headers=headers)

    return app


WARNING_299 = ('299 example.org "The number of results exceeded the maximum supported by '
               'the server. Additional results can be requested."')


def offsets_of(seen: list[Seen]) -> list[tuple[int, int]]:
    return [(int(s.param("offset") or -1), int(s.param("limit") or -1)) for s in seen]


async def test_user_agent_names_dicomfs(fake: FakeServer) -> None:
    fake.replies(json_reply([]))
    async with fake.client(headers={"X-Extra": "yes"}) as client:
        await client.search_studies()
    (seen,) = fake.seen
    agent = seen.headers["user-agent"]
    assert agent == f"dicomfs/{__version__}"
    assert "dicomfs" in agent and __version__ in agent
    assert seen.headers["x-extra"] == "yes"
    assert seen.headers["accept"] == "application/dicom+json"
    assert seen.path == "/dicom-web/studies"
    assert seen.param("limit") == "1000" and seen.param("offset") == "0"


@pytest.mark.parametrize(
    "reply",
    [Reply(204, length=None), Reply(200, DICOM_JSON, b"[]"), Reply(200, DICOM_JSON, b""),
     Reply(200, DICOM_JSON, b" \r\n")],
    ids=["204", "200-empty-array", "200-empty-body", "200-whitespace"],
)
async def test_empty_answers(fake: FakeServer, reply: Reply) -> None:
    fake.replies(reply)
    async with fake.client() as client:
        assert await client.search_studies() == []
        assert await client.search_series(STUDY) == []
        assert await client.search_instances(STUDY, SERIES) == []
    assert len(fake.seen) == 3  # an empty page ends each walk at once


async def test_silent_cap_loses_results(fake: FakeServer) -> None:
    """Current behaviour, documented: a server that silently returns fewer results than
    ``limit`` (no Warning) looks exactly like a last page, so only its first page is kept.

    With ``page_size`` at or below the server's cap, everything is found.
    """
    items = [study_item(f"1.2.{i}") for i in range(7)]
    fake.app = qido_pager(items, cap=2)
    async with fake.client(page_size=5) as client:
        found = await client.search_studies()
    assert uids(found, dicomjson.STUDY_UID) == ["1.2.0", "1.2.1"]
    assert offsets_of(fake.seen) == [(0, 5)]
    before = len(fake.seen)
    async with fake.client(page_size=2) as client:
        found = await client.search_studies()
    assert uids(found, dicomjson.STUDY_UID) == [f"1.2.{i}" for i in range(7)]
    assert offsets_of(fake.seen[before:]) == [(0, 2), (2, 2), (4, 2), (6, 2)]


@pytest.mark.parametrize("warn_always", [False, True], ids=["warn-when-capped", "warn-always"])
async def test_warning_cap_returns_everything_once(fake: FakeServer, warn_always: bool) -> None:
    items = [study_item(f"1.2.{i}") for i in range(7)]
    fake.app = qido_pager(items, cap=2, warn=WARNING_299, warn_always=warn_always)
    async with fake.client(page_size=5) as client:
        found = await client.search_studies()
    assert uids(found, dicomjson.STUDY_UID) == [f"1.2.{i}" for i in range(7)]
    offsets = [offset for offset, _ in offsets_of(fake.seen)]
    assert offsets[:4] == [0, 2, 4, 6]
    assert len(offsets) <= 5  # at most one more, empty, page to confirm the end


@pytest.mark.parametrize("ignore_limit", [False, True], ids=["pages", "everything"])
async def test_ignored_offset_ends(fake: FakeServer, ignore_limit: bool) -> None:
    """A server that ignores ``offset`` answers the same page forever: the walk must end."""
    items = [study_item(f"1.2.{i}") for i in range(10)]
    fake.app = qido_pager(items, ignore_offset=True, ignore_limit=ignore_limit)
    async with fake.client(page_size=3) as client:
        with trio.fail_after(10):
            found = await client.search_studies()
    got = uids(found, dicomjson.STUDY_UID)
    assert len(got) == len(set(got))
    assert got == [f"1.2.{i}" for i in range(10 if ignore_limit else 3)]
    assert len(fake.seen) == 2  # the second page brought nothing new


@pytest.mark.parametrize(
    "body",
    [b'{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}', b'"studies"', b"42", b"null",
     b"[{]", b"<html>oops</html>", b"\xff\xfe\x00"],
    ids=["object", "string", "number", "null", "broken", "html", "binary"],
)
async def test_json_not_an_array(fake: FakeServer, body: bytes) -> None:
    fake.replies(Reply(200, DICOM_JSON, body))
    async with fake.client() as client:
        with pytest.raises(ProtocolError):
            await client.search_studies()
        with pytest.raises(ProtocolError):
            await client.search_instances(STUDY, SERIES)


async def test_entries_without_valid_uid_skipped(fake: FakeServer) -> None:
    page = [
        study_item("1.2.840.1"),
        {},
        {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "No^Uid"}]}},
        {"0020000D": {"vr": "UI", "Value": ["1.2.abc"]}},
        {"0020000D": {"vr": "UI", "Value": ["../../etc"]}},
        {"0020000D": {"vr": "UI", "Value": ["1." + "2" * 70]}},
        {"0020000D": {"vr": "UI", "Value": []}},
        {"0020000D": {"vr": "UI"}},
        {"0020000D": "1.2.3"},
        42,
        "1.2.3",
        None,
        study_item("1.2.840.2"),
        study_item("1.2.840.1"),  # a duplicate
    ]
    fake.replies(json_reply(page))
    async with fake.client() as client:
        found = await client.search_studies()
    assert uids(found, dicomjson.STUDY_UID) == ["1.2.840.1", "1.2.840.2"]


async def test_retry_503_then_success(fake: FakeServer) -> None:
    busy = Reply(503, [("Retry-After", "0")], b"busy")
    fake.replies(busy, busy, json_reply([study_item("1.2.3")]))
    async with fake.client(retries=3) as client:
        with trio.fail_after(5):
            found = await client.search_studies()
    assert uids(found, dicomjson.STUDY_UID) == ["1.2.3"]
    assert len(fake.seen) == 3


async def test_retry_after_is_honoured(fake: FakeServer, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    delays = record_backoffs(monkeypatch)
    fake.replies(Reply(503, [("Retry-After", "1")], b"busy"),
                 Reply(429, [("Retry-After", "2")], b"slow down"),
                 Reply(200, DICOM_JSON, b"[]"))
    async with fake.client(retries=3) as client:
        assert await client.search_studies() == []
    assert len(fake.seen) == 3
    assert delays == [1.0, 2.0]


async def test_retries_give_up(fake: FakeServer) -> None:
    fake.replies(Reply(503, [("Retry-After", "0")], b"still busy"))
    async with fake.client(retries=2) as client:
        with pytest.raises(ServerError) as caught:
            await client.study_metadata(STUDY)
    assert caught.value.status == 503
    assert "still busy" in str(caught.value)
    assert len(fake.seen) == 3


@pytest.mark.parametrize(
    ("status", "kind"),
    [(404, NotFound), (410, NotFound), (400, BadRequest), (401, Unauthorized),
     (403, Unauthorized)],
)
async def test_client_errors_not_retried(fake: FakeServer, status: int, kind: type) -> None:
    fake.replies(Reply(status, [("Content-Type", "text/plain")], b"no such thing"),
                 json_reply([]))
    async with fake.client(retries=3) as client:
        with pytest.raises(kind) as caught:
            await client.search_studies()
    assert caught.value.status == status
    assert "no such thing" in str(caught.value)
    assert len(fake.seen) == 1


@pytest.mark.parametrize("reset", [False, True], ids=["cut", "reset"])
async def test_broken_json_body_is_fetched_again(fake: FakeServer, reset: bool) -> None:
    body = json.dumps([study_item(f"1.2.{i}") for i in range(50)]).encode()
    fake.replies(Reply(200, DICOM_JSON, body, cut=100, reset=reset),
                 Reply(200, DICOM_JSON, body))
    async with fake.client(retries=1) as client:
        found = await client.search_studies()
    assert len(found) == 50
    assert len(fake.seen) == 2


async def test_broken_json_body_without_retries(fake: FakeServer) -> None:
    body = json.dumps([study_item(f"1.2.{i}") for i in range(50)]).encode()
    fake.replies(Reply(200, DICOM_JSON, body, cut=100))
    async with fake.client(retries=0) as client:
        with pytest.raises(Truncated):
            await client.study_metadata(STUDY)


@pytest.mark.parametrize(
    ("lengths", "declared", "reset"),
    [(True, False, False), (False, False, False), (True, True, False), (False, False, True)],
    ids=["part-lengths-eof", "no-part-lengths-eof", "http-length-lies", "reset"],
)
async def test_multipart_cut_mid_part(fake: FakeServer, lengths: bool, declared: bool,
                                      reset: bool) -> None:
    body = multipart_body([PAYLOAD_A, PAYLOAD_B], lengths=lengths)
    cut = body.index(PAYLOAD_B) + len(PAYLOAD_B) // 2
    fake.replies(Reply(200, [("Content-Type", MULTIPART_TYPE)], body,
                       length=len(body) if declared else None, cut=cut, reset=reset))
    events: list[Event] = []
    async with fake.client(retries=3) as client, client.retrieve(STUDY, SERIES) as stream:
        with pytest.raises(Truncated):
            await collect_events(stream, events)
    assert len(fake.seen) == 1  # a broken stream is the caller's to fetch again
    ends = [i for i, e in enumerate(events) if isinstance(e, PartEnd)]
    starts = [i for i, e in enumerate(events) if isinstance(e, PartStart)]
    assert len(ends) == 1 and len(starts) == 2  # the first part whole, the second never ends
    first = b"".join(e.data for e in events[: ends[0]] if isinstance(e, PartData))
    assert first == PAYLOAD_A


async def test_multipart_complete(fake: FakeServer) -> None:
    for lengths in (True, False):
        fake.replies(Reply(200, [("Content-Type", MULTIPART_TYPE)],
                           multipart_body([PAYLOAD_A, PAYLOAD_B], lengths=lengths), length=None))
        async with fake.client() as client, client.retrieve(STUDY, SERIES) as events:
            parts = await collect_parts(events)
        assert [p[1] for p in parts] == [PAYLOAD_A, PAYLOAD_B]
        assert all(p[0]["content-type"] == "application/dicom" for p in parts)
    assert {s.headers["accept"] for s in fake.seen} == {MULTIPART_ACCEPT}
    assert fake.seen[0].path == f"/dicom-web/studies/{STUDY}/series/{SERIES}"


@pytest.mark.parametrize("reset", [False, True], ids=["short", "reset"])
async def test_single_part_shorter_than_length(fake: FakeServer, reset: bool) -> None:
    fake.replies(Reply(200, [("Content-Type", "application/dicom")], PAYLOAD_A,
                       cut=len(PAYLOAD_A) - 1000, reset=reset))
    events: list[Event] = []
    async with (
        fake.client(single_part=True) as client,
        client.retrieve(STUDY, SERIES, INSTANCE) as stream,
    ):
        with pytest.raises(Truncated):
            await collect_events(stream, events)
    assert isinstance(events[0], PartStart)
    assert not any(isinstance(e, PartEnd) for e in events)


async def test_single_part_answer(fake: FakeServer) -> None:
    fake.replies(Reply(200, [("Content-Type", "application/dicom; transfer-syntax=1.2.840"
                              ".10008.1.2.1")], PAYLOAD_A))
    events: list[Event] = []
    async with (
        fake.client(single_part=True) as client,
        client.retrieve(STUDY, SERIES, INSTANCE) as stream,
    ):
        await collect_events(stream, events)
    assert isinstance(events[0], PartStart)
    assert isinstance(events[-1], PartEnd)
    assert all(isinstance(e, PartData) for e in events[1:-1]) and len(events) >= 3
    assert b"".join(e.data for e in events[1:-1] if isinstance(e, PartData)) == PAYLOAD_A
    assert events[0].headers["content-type"].startswith("application/dicom")
    assert events[0].headers["content-length"] == str(len(PAYLOAD_A))
    (seen,) = fake.seen
    assert seen.headers["accept"] == SINGLE_ACCEPT
    assert seen.path == f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}"


async def test_single_part_without_length(fake: FakeServer) -> None:
    fake.replies(Reply(200, [("Content-Type", "application/dicom")], PAYLOAD_B, length=None))
    async with (  # multipart asked, single part answered (Google style)
        fake.client() as client,
        client.retrieve(STUDY, SERIES, INSTANCE) as events,
    ):
        parts = await collect_parts(events)
    assert [p[1] for p in parts] == [PAYLOAD_B]


async def test_single_part_gzip_encoded(fake: FakeServer) -> None:
    """We ask for identity, but a server that compresses anyway is decoded, and its
    Content-Length (of the encoded bytes) is not mistaken for the part length."""
    packed = gzip.compress(PAYLOAD_A)
    fake.replies(Reply(200, [("Content-Type", "application/dicom"),
                             ("Content-Encoding", "gzip")], packed))
    async with (
        fake.client(single_part=True) as client,
        client.retrieve(STUDY, SERIES, INSTANCE) as events,
    ):
        parts = await collect_parts(events)
    assert fake.seen[0].headers["accept-encoding"] == "identity"
    assert [p[1] for p in parts] == [PAYLOAD_A]


@pytest.mark.parametrize("status", [406, 400, 415])
async def test_instance_accept_fallback(fake: FakeServer, status: int) -> None:
    def app(seen: Seen) -> Reply:
        if seen.headers["accept"].startswith("multipart/"):
            return Reply(status, [("Content-Type", "text/plain")], b"only single part here")
        return Reply(200, [("Content-Type", "application/dicom")], PAYLOAD_A)

    fake.app = app
    async with fake.client() as client, client.retrieve(STUDY, SERIES, INSTANCE) as events:
        parts = await collect_parts(events)
    assert [p[1] for p in parts] == [PAYLOAD_A]
    assert [s.headers["accept"] for s in fake.seen] == [MULTIPART_ACCEPT, SINGLE_ACCEPT]


async def test_single_part_config_falls_back_to_multipart(fake: FakeServer) -> None:
    def app(seen: Seen) -> Reply:
        if seen.headers["accept"].startswith("multipart/"):
            return Reply(200, [("Content-Type", MULTIPART_TYPE)], multipart_body([PAYLOAD_B]))
        return Reply(400, body=b"single part not supported")

    fake.app = app
    async with (
        fake.client(single_part=True) as client,
        client.retrieve(STUDY, SERIES, INSTANCE) as events,
    ):
        parts = await collect_parts(events)
    assert [p[1] for p in parts] == [PAYLOAD_B]
    assert [s.headers["accept"] for s in fake.seen] == [SINGLE_ACCEPT, MULTIPART_ACCEPT]


async def test_no_fallback_for_series_or_when_both_refused(fake: FakeServer) -> None:
    fake.replies(Reply(406, body=b"not acceptable"))
    async with fake.client() as client:
        with pytest.raises(BadRequest) as caught:
            async with client.retrieve(STUDY, SERIES) as events:
                await collect_parts(events)
        assert caught.value.status == 406
        assert len(fake.seen) == 1
        with pytest.raises(BadRequest):
            async with client.retrieve(STUDY, SERIES, INSTANCE) as events:
                await collect_parts(events)
    assert [s.headers["accept"] for s in fake.seen[1:]] == [MULTIPART_ACCEPT, SINGLE_ACCEPT]


@pytest.mark.parametrize(
    "content_type",
    ["text/html; charset=utf-8", "application/dicom+json", "multipart/related",
     'multipart/related; type="application/dicom"', "", "image/png"],
    ids=["html", "json", "multipart-no-type", "multipart-no-boundary", "none", "png"],
)
async def test_unexpected_content_type(fake: FakeServer, content_type: str) -> None:
    headers = [("Content-Type", content_type)] if content_type else []
    fake.replies(Reply(200, headers, b"<html>hello</html>"))
    async with fake.client() as client:
        with pytest.raises(ProtocolError) as caught:
            async with client.retrieve(STUDY, SERIES, INSTANCE) as events:
                await collect_parts(events)
    assert not isinstance(caught.value, Truncated)


async def test_json_larger_than_bound(fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicomfs.client, "MAX_JSON_BYTES", 1000)
    body = json.dumps([study_item(f"1.2.{i}") for i in range(200)]).encode()
    assert len(body) > 5000
    fake.replies(Reply(200, DICOM_JSON, body, length=None))
    async with fake.client() as client:
        with pytest.raises(ProtocolError) as caught:
            await client.search_studies()
        assert "larger than" in str(caught.value)
        with pytest.raises(ProtocolError):
            await client.study_metadata(STUDY)


async def test_rendered_wrong_media_type(fake: FakeServer) -> None:
    fake.replies(Reply(200, [("Content-Type", "image/jpeg")], JPEG_MAGIC + b"rest"))
    async with fake.client() as client:
        assert await client.rendered(STUDY, SERIES, INSTANCE, media_type="image/jpeg") \
            == JPEG_MAGIC + b"rest"
        with pytest.raises(ProtocolError):
            await client.rendered(STUDY, SERIES, INSTANCE)
    assert [s.headers["accept"] for s in fake.seen] == ["image/jpeg", "image/png"]
    assert fake.seen[0].path.endswith(f"/instances/{INSTANCE}/rendered")


async def test_rendered_frame_path(fake: FakeServer) -> None:
    fake.replies(Reply(200, [("Content-Type", "image/png")], PNG_MAGIC))
    async with fake.client() as client:
        assert await client.rendered(STUDY, SERIES, INSTANCE, frame=3) == PNG_MAGIC
    assert fake.seen[0].path == (f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances/"
                                 f"{INSTANCE}/frames/3/rendered")


async def test_invalid_uids_refused_before_any_request(fake: FakeServer) -> None:
    fake.replies(json_reply([]))
    async with fake.client() as client:
        for bad in ("../etc", "1.2.x", "", "1..2"):
            with pytest.raises(ValueError):
                await client.search_series(bad)
            with pytest.raises(ValueError):
                await client.study_metadata(bad)
    assert fake.seen == []
