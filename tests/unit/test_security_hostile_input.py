"""Hostile input without a mount: endless JSON and error bodies are read only up to a
bound, and Hypothesis fuzzing of the DICOM JSON helpers, the Part 10 check and the QIDO
client shows they raise only their declared errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dicomfs.client
from dicomfs import dicomjson, part10
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import DicomfsError, IntegrityError, ProtocolError, ServerError
from dicomfs.uids import is_uid
from tests.support.fakes import StreamingJsonServer
from tests.support.tiny import make_dicom

ROOT = "1.2.826.0.1.3680043.10.4242"


async def test_endless_json_answer_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_JSON_BYTES (512 MiB) is the bound; lowered to 1 MiB here, a server streaming a
    512 MiB array is cut off early: the client stops reading and says why."""
    monkeypatch.setattr(dicomfs.client, "MAX_JSON_BYTES", 1024 * 1024)
    with StreamingJsonServer(total=512 * 1024 * 1024) as server:
        async with DicomwebClient(ClientConfig(base_url=server.url, retries=0)) as client:
            with pytest.raises(ProtocolError, match="larger than"):
                await client.search_studies()
        assert await trio.to_thread.run_sync(server.finished.wait, 10)
    assert server.sent < 64 * 1024 * 1024, server.sent


async def test_endless_error_body_is_bounded() -> None:
    """An error answer's text is read only as far as the message needs."""

    class Endless500(StreamingJsonServer):
        def _serve(self, conn: Any) -> None:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n")
                while self.sent < self.total and not self._stop.is_set():
                    conn.sendall(b"x" * 65536)
                    self.sent += 65536
            except OSError:
                pass
            finally:
                self.finished.set()

    with Endless500(total=512 * 1024 * 1024) as server:
        async with DicomwebClient(ClientConfig(base_url=server.url, retries=0)) as client:
            with pytest.raises(ServerError) as caught:
                await client.search_studies()
        assert await trio.to_thread.run_sync(server.finished.wait, 10)
    assert len(str(caught.value)) < 1000
    assert server.sent < 64 * 1024 * 1024, server.sent


TAGS = [dicomjson.STUDY_UID, dicomjson.SERIES_UID, dicomjson.SOP_UID, dicomjson.ROWS,
        dicomjson.INSTANCE_NUMBER, dicomjson.SERIES_DATE, dicomjson.SERIES_TIME,
        dicomjson.PATIENT_NAME, dicomjson.NUMBER_OF_FRAMES]


json_leaves = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
               | st.floats(allow_nan=True, allow_infinity=True)
               | st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -0.0,
                                  2**64, -(2**63), 4300 * 9, 0.5])
               | st.sampled_from(["1.2.3", "20240131", "235960", "99999999", "1" * 70, "../x",
                                  "0000", "-5", "1e3", " 12 ",
                                  "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668"]))


json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


elements = st.fixed_dictionaries(
    {}, optional={"vr": st.text(max_size=3), "Value": json_values | st.lists(json_values,
                                                                             max_size=3),
                  "Alphabetic": json_values}) | json_values


datasets = st.dictionaries(st.sampled_from(TAGS) | st.text(max_size=9), elements, max_size=6)


answers = (st.lists(datasets | json_values, max_size=6) | json_values).map(
    lambda value: json.dumps(value, allow_nan=True).encode())


raw_bodies = st.binary(max_size=300) | answers | answers.map(lambda b: b[: len(b) // 2])


FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw_bodies)
def test_fuzz_load_array_raises_only_declared_errors(body: bytes) -> None:
    try:
        result = dicomjson.load_array(body, what="fuzz")
    except DicomfsError:
        return
    assert isinstance(result, list) and all(isinstance(ds, dict) for ds in result)


@FUZZ
@given(st.lists(datasets, min_size=1, max_size=4).map(
    lambda value: json.dumps(value, allow_nan=True).encode()))
def test_fuzz_value_readers_never_raise(body: bytes) -> None:
    """Whatever JSON a server sends, reading a value from it gives a value or None."""
    for ds in dicomjson.load_array(body, what="fuzz"):
        for tag in [*TAGS, *ds]:
            found = dicomjson.text(ds, tag)
            assert found is None or isinstance(found, str)
            number = dicomjson.integer(ds, tag)
            assert number is None or isinstance(number, int)
            uid = dicomjson.uid(ds, tag)
            assert uid is None or is_uid(uid)
        for date_tag, time_tag in ((dicomjson.SERIES_DATE, dicomjson.SERIES_TIME),
                                   (dicomjson.STUDY_DATE, dicomjson.STUDY_TIME)):
            stamp = dicomjson.timestamp(ds, date_tag, time_tag)
            assert stamp is None or isinstance(stamp, float)


SAMPLE = make_dicom(f"{ROOT}.7", f"{ROOT}.7.1", f"{ROOT}.7.1.1")


@FUZZ
@given(position=st.integers(0, len(SAMPLE)), patch=st.binary(max_size=16),
       keep=st.integers(0, len(SAMPLE) + 16))
def test_fuzz_part10_check_raises_only_integrity_errors(position: int, patch: bytes,
                                                        keep: int) -> None:
    """The check that a part is the instance asked for, on corrupted and cut files: it
    finds a valid UID, or says it is not a DICOM instance, and nothing else."""
    data = (SAMPLE[:position] + patch + SAMPLE[position + len(patch):])[:keep]
    try:
        found = part10.whole_instance_uid(data, None, len(data))
    except IntegrityError:
        return
    assert is_uid(found)


async def _client_over(handler: Any) -> DicomwebClient:
    """A real client whose HTTP goes to ``handler`` instead of the network."""
    client = DicomwebClient(ClientConfig(base_url="http://dicomweb.invalid/dw", retries=0))
    await client._http.aclose()
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return client


@FUZZ
@given(body=raw_bodies, status=st.sampled_from([200, 200, 200, 204, 400, 401, 404, 429, 500]),
       warning=st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                   max_size=30),
       content_type=st.sampled_from(["application/dicom+json", "text/html", ""]))
def test_fuzz_qido_search_raises_only_declared_errors(body: bytes, status: int,
                                                      warning: str | None,
                                                      content_type: str) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {"Content-Type": content_type} if content_type else {}
        if warning is not None:
            headers["Warning"] = warning
        return httpx.Response(status, headers=headers, content=body)

    async def search() -> None:
        async with await _client_over(handler) as client:
            for call, key in ((client.search_studies, dicomjson.STUDY_UID),
                              (lambda: client.search_series("1.2.3"), dicomjson.SERIES_UID),
                              (lambda: client.search_instances("1.2", "1.2.3"),
                               dicomjson.SOP_UID)):
                try:
                    found = await call()
                except DicomfsError:
                    continue
                uids = [dicomjson.uid(ds, key) for ds in found]
                assert all(is_uid(uid) for uid in uids)
                assert len(set(uids)) == len(uids)

    trio.run(search)
    assert len(requests) <= 3 * 2  # a page that brings nothing new ends the walk
