"""STOW-RS, one request of it: the body streamed from DICOM files, and what the answer says.

:meth:`dicomfs.client.DicomwebClient.store_instances` is the way in: it names the
URL and retries :func:`post` under the one retry policy of :mod:`dicomfs.transport`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from dicomfs import dicomjson
from dicomfs.dicomjson import Dataset
from dicomfs.errors import ProtocolError
from dicomfs.transport import MAX_ERROR_TEXT, MULTIPART_DICOM, status_error, translated

MAX_ANSWER = 16 * 1024 * 1024
CHUNK = 1024 * 1024
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
# STOW-RS failure reasons (PS3.18 and PS3.4 status codes) a person can act on.
FAILURE_REASONS = {
    0x0110: "processing failure", 0x0111: "duplicate SOP instance",
    0x0122: "SOP class not supported", 0x0124: "not authorized",
    0xA700: "out of resources", 0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
}


class MultipartFiles:
    """A ``multipart/related`` body of DICOM files, read from disk as it is sent.

    An async iterable but no generator, so httpx can send it again (retries,
    authentication); its length is known before the first byte.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.boundary = f"dicomfs-{os.urandom(12).hex()}"
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"--{self.boundary}--\r\n".encode()
        self._sizes = [os.stat(path).st_size for path in self.paths]
        self.length = sum(len(self._head) + size + 2 for size in self._sizes) + len(self._tail)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        for path, size in zip(self.paths, self._sizes, strict=True):
            yield self._head
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while offset < size:
                    chunk = await trio.to_thread.run_sync(
                        os.pread, fd, min(CHUNK, size - offset), offset)
                    if not chunk:  # shorter than announced: never send a cut file
                        raise ProtocolError(f"{path.name} shrank while being sent")
                    offset += len(chunk)
                    yield chunk
            finally:
                os.close(fd)
            yield b"\r\n"
        yield self._tail


@dataclass(frozen=True)
class StowResult:
    """What a STOW-RS answer says: instances stored, and instances refused with why."""

    stored: frozenset[str]
    failed: dict[str, str]
    parsed: bool = True  # False when the answer was no DICOM JSON (e.g. empty)


async def post(http: httpx.AsyncClient, url: str, body: MultipartFiles) -> StowResult:
    """Send ``body`` once; a refusal raises the typed error of its status, with the
    server's reasons per instance in its message when it gave them."""
    # An exact Content-Length: some servers refuse chunked uploads.
    headers = {"Content-Type": f"{MULTIPART_DICOM}; boundary={body.boundary}",
               "Content-Length": str(body.length), "Accept": "application/dicom+json"}
    with translated(url):
        request = http.build_request("POST", url, content=body, headers=headers)
        response = await http.send(request, stream=True)
        try:
            raw = b""
            async for chunk in response.aiter_bytes():
                raw += chunk
                if len(raw) > MAX_ANSWER:
                    raise ProtocolError("STOW-RS answer too large", url=url)
        finally:
            await response.aclose()
    answer = _answer(raw)
    if response.status_code >= 400:
        text = "; ".join(f"{uid}: {why}" for uid, why in answer.failed.items()) if \
            answer.failed else ("" if answer.parsed else
                                raw[:MAX_ERROR_TEXT].decode("utf-8", "replace").strip())
        raise status_error(response.status_code, text, url, response.headers.get("Retry-After"))
    return answer


def _answer(raw: bytes) -> StowResult:
    """The Referenced and Failed SOP Sequences of a STOW-RS answer, leniently: an
    empty or non-JSON body says nothing, which the status then says alone."""
    try:
        parsed = json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, list):  # some servers wrap the one answer in an array
        parsed = next((item for item in parsed if isinstance(item, dict)), None)
    if not isinstance(parsed, dict):
        return StowResult(frozenset(), {}, parsed=False)
    stored = {uid for item in _items(parsed, REFERENCED_SOP_SEQUENCE)
              if (uid := dicomjson.uid(item, REFERENCED_SOP_INSTANCE))}
    failed = {}
    for item in _items(parsed, FAILED_SOP_SEQUENCE):
        code = dicomjson.integer(item, FAILURE_REASON)
        why = "no reason given" if code is None else \
            f"{FAILURE_REASONS.get(code, 'refused')} (0x{code:04X})"
        failed[dicomjson.uid(item, REFERENCED_SOP_INSTANCE) or "?"] = why
    return StowResult(frozenset(stored), failed)


def _items(ds: Dataset, tag: str) -> list[Dataset]:
    """The items of sequence ``tag``, leaving out whatever is no item."""
    element = ds.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values if isinstance(item, dict)] if isinstance(values, list) \
        else []
