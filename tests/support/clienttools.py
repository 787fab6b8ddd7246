"""Helpers for tests that drive :class:`~dicomfs.client.DicomwebClient` directly: the Accept
headers it sends, image signatures, and the parts and UIDs of what it returns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dicomfs import dicomjson
from dicomfs.multipart import Event, PartData, PartEnd, PartStart

MULTIPART_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
SINGLE_ACCEPT = "application/dicom; transfer-syntax=*"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


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


def uids(datasets: list[dict[str, Any]], tag: str) -> list[str]:
    found = [dicomjson.uid(ds, tag) for ds in datasets]
    assert None not in found
    return [u for u in found if u is not None]
