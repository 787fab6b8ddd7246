"""The DICOMweb client against the session Orthanc holding the sample archive: every
instance in every transfer syntax comes back byte for byte, series retrieve, metadata,
paging, searches, rendered images, typed errors and authentication.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import pydicom
import pytest
import trio

from dicomfs import dicomjson
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import BadRequest, NotFound, Unauthorized
from tests.support import LocalOrthanc, SampleArchive, demo_uid
from tests.support.clienttools import (
    JPEG_MAGIC,
    MULTIPART_ACCEPT,
    PNG_MAGIC,
    SINGLE_ACCEPT,
    collect_parts,
    parts_of,
    uids,
)

if TYPE_CHECKING:
    from tests.support.harness import OrthancFactory


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


def sop_uid_of(data: bytes) -> str:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                         specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)


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
    # Pages of 3, 12, 48 while full; the short one at a grown size is confirmed as the
    # end by one more request, at the total.
    offsets = [int(r.url.params["offset"]) for r in sent]
    assert offsets == [0, 3, 15, len(archive.studies)] and 15 < len(archive.studies) < 63
    assert [r.url.params["limit"] for r in sent][:3] == ["3", "12", "48"]
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
    # Pages of 7, 28, 112, then 448 brings the last 253; one more, empty, confirms the end.
    assert offsets == [0, 7, 35, 147, 400]
    assert len(requests) == len(offsets)
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
