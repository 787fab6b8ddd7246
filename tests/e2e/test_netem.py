"""The link-emulating proxy (tests.support.netem) in front of a real Orthanc, which ends a
series retrieve by closing the connection."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from tests.support import SampleArchive

if TYPE_CHECKING:
    from tests.support.harness import LinkFactory, OrthancFactory
from tests.support.clienttools import MULTIPART_ACCEPT as ACCEPT


def test_orthanc_answers_through_a_link(
    archive: SampleArchive, orthanc_factory: OrthancFactory, link_factory: LinkFactory,
) -> None:
    """Orthanc ends a series retrieve by closing the connection (no length, no chunks): the
    answer is whole only if the close crosses the link. Instance retrieves keep it alive."""
    files = archive.series_files(archive.series_uid("ct"))[:4]
    server = orthanc_factory()
    server.upload([archive.path(f) for f in files])
    link = link_factory(server.url, delay=0.005, rate=50e6)
    series = f"/studies/{files[0].study_uid}/series/{files[0].series_uid}"
    headers = {"Accept": ACCEPT, "Accept-Encoding": "identity"}
    with httpx.Client(base_url=link.url("/dicom-web"), timeout=60) as client:
        answer = client.get(series, headers=headers)
        assert answer.status_code == 200
        assert answer.headers["connection"] == "close"
        assert all(archive.read(f) in answer.content for f in files)
        for f in files:
            answer = client.get(f"{series}/instances/{f.sop_uid}", headers=headers)
            assert answer.status_code == 200
            assert archive.read(f) in answer.content
    assert link.counters.request_lines == [f"GET /dicom-web{series} HTTP/1.1"] + [
        f"GET /dicom-web{series}/instances/{f.sop_uid} HTTP/1.1" for f in files]
    assert link.connections == 2
    assert link.bytes_down > 2 * sum(f.size for f in files)
