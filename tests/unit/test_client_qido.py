"""The DICOMweb client's QIDO-RS searches against a scripted fake server
(:class:`~tests.support.fakeserver.FakeServer`): the request it sends, empty answers, capped
and offset-ignoring pagers, JSON that is not an array, entries without a valid UID, the JSON
size bound and UIDs refused before any request.
"""

from __future__ import annotations

import json

import pytest
import trio

import dicomfs.client
from dicomfs import __version__, dicomjson
from dicomfs.errors import ProtocolError
from tests.support.clienttools import uids
from tests.support.fakeserver import (
    DICOM_JSON,
    SERIES,
    STUDY,
    WARNING_299,
    FakeServer,
    Reply,
    Seen,
    json_reply,
    qido_pager,
    study_item,
)


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
    # The full first page grows the next (8), which the cap cuts short: from there on,
    # pages of what the server gives.
    assert offsets_of(fake.seen[before:]) == [(0, 2), (2, 8), (4, 2), (6, 2)]


async def test_pages_grow_while_the_server_fills_them(fake: FakeServer) -> None:
    """A long listing takes a few requests: each full page makes the next one larger; the
    short page at a grown size is confirmed as the end by one more, empty, page."""
    items = [study_item(f"1.2.{i}") for i in range(50)]
    fake.app = qido_pager(items)
    async with fake.client(page_size=2) as client:
        found = await client.search_studies()
    assert uids(found, dicomjson.STUDY_UID) == [f"1.2.{i}" for i in range(50)]
    assert offsets_of(fake.seen) == [(0, 2), (2, 8), (10, 32), (42, 128), (50, 8)]


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
    # The grown second page (12) brings the first 10 again, 7 of them new; the next
    # page brings nothing new and ends the walk.
    assert got == [f"1.2.{i}" for i in range(10)]
    assert len(fake.seen) == (2 if ignore_limit else 3)


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


async def test_invalid_uids_refused_before_any_request(fake: FakeServer) -> None:
    fake.replies(json_reply([]))
    async with fake.client() as client:
        for bad in ("../etc", "1.2.x", "", "1..2"):
            with pytest.raises(ValueError):
                await client.search_series(bad)
            with pytest.raises(ValueError):
                await client.study_metadata(bad)
    assert fake.seen == []
