"""The DICOMweb client's WADO-RS retrieve against a scripted fake server, which writes raw
bytes so that bodies can be cut, lengths can lie and connections can be reset: truncated
multipart and single-part answers, gzip, the Accept fallback, unexpected content types and
rendered images.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import pytest

from dicomfs.errors import BadRequest, ProtocolError, Truncated
from dicomfs.multipart import Event, PartData, PartEnd, PartStart
from tests.support.clienttools import (
    JPEG_MAGIC,
    MULTIPART_ACCEPT,
    PNG_MAGIC,
    SINGLE_ACCEPT,
    collect_parts,
)
from tests.support.fakeserver import (
    INSTANCE,
    MULTIPART_TYPE,
    PAYLOAD_A,
    PAYLOAD_B,
    SERIES,
    STUDY,
    FakeServer,
    Reply,
    Seen,
    multipart_body,
)


async def collect_events(events: AsyncIterator[Event], into: list[Event]) -> None:
    """Append every event to ``into`` (so the caller still has them after an exception)."""
    async for event in events:
        into.append(event)


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
