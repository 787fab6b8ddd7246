"""The DICOMweb client's retries against a scripted fake server and a closed port: 503 and
429 with ``Retry-After``, giving up, client errors never retried, JSON bodies cut short
fetched again, and a refused connection failing fast.
"""

from __future__ import annotations

import json

import pytest
import trio

import dicomfs.transport
from dicomfs import dicomjson
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import (
    BadRequest,
    DicomwebError,
    NotFound,
    ServerError,
    Truncated,
    Unauthorized,
    Unreachable,
)
from tests.support import demo_uid
from tests.support.clienttools import collect_parts, uids
from tests.support.fakeserver import DICOM_JSON, STUDY, FakeServer, Reply, json_reply, study_item
from tests.support.orthanc import free_port


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
    choose = dicomfs.transport.backoff

    def recorded(attempt: int, exc: DicomwebError) -> float:
        delays.append(choose(attempt, exc))
        return delays[-1]

    monkeypatch.setattr(dicomfs.transport, "backoff", recorded)
    return delays


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
