"""Observability without a server: request kinds, the metrics address and log format in
fstab form, and how the counting proxy takes bodies out of however they are framed."""

from __future__ import annotations

import pytest

from dicomfs.metrics import KINDS, parse_address, request_kind
from dicomfs.options import fuse_helper_argv
from tests.support.netem import _ResponseBodies


@pytest.mark.parametrize(("path", "kind"), [
    ("/dicom-web/studies", "qido"),
    ("/studies", "qido"),
    ("/dicom-web/series", "qido"),
    ("/dicom-web/instances", "qido"),
    ("/dicom-web/studies/1.2.3/series", "qido"),
    ("/dicom-web/studies/1.2.3/instances", "qido"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances", "qido"),
    ("/dicom-web/studies/1.2.3/metadata", "metadata"),
    ("/dicom-web/studies/1.2.3/series/4.5/metadata", "metadata"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/metadata", "metadata"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7", "instance"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/", "instance"),
    ("/dicom-web/studies/1.2.3/series/4.5", "series"),
    ("/dicom-web/studies/1.2.3", "study"),
    ("/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb/studies/1.2/series/3",
     "series"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/rendered", "rendered"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1/rendered", "rendered"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/frames/1", "other"),
    ("/dicom-web/studies/1.2.3/series/4.5/instances/6.7/thumbnail", "other"),
    ("/system", "other"),
    ("/dicom-web/studies/not-a-uid", "other"),
    ("", "other"),
])
def test_request_kind(path: str, kind: str) -> None:
    assert request_kind(path) == kind
    assert kind in KINDS


def test_metrics_address_and_log_format_in_fstab_form() -> None:
    assert parse_address("127.0.0.1:9400") == ("127.0.0.1", 9400)
    assert parse_address("[::1]:9400") == ("::1", 9400)
    for bad in ("9400", ":9400", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)
    argv = fuse_helper_argv(["http://pacs/dicom-web", "/mnt/pacs", "-o",
                             "allow_other,metrics_address=127.0.0.1:9400,log_format=json"])
    assert argv == ["mount", "http://pacs/dicom-web", "/mnt/pacs", "--metrics-address",
                    "127.0.0.1:9400", "--log-format", "json", "-o", "allow_other"]


def test_response_bodies_counts_bodies_however_framed() -> None:
    """The proxy's body count, fed a byte at a time: a sized body, a 204, a chunked body
    with an extension and a trailer, then a body that runs to the end of the connection."""
    stream = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
              b"HTTP/1.1 204 No Content\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: t\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end")
    bodies = _ResponseBodies()
    assert sum(bodies.feed(stream[i:i + 1]) for i in range(len(stream))) == 5 + 3 + 16 + 10
    assert _ResponseBodies().feed(stream) == 5 + 3 + 16 + 10
