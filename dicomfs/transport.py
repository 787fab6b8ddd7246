"""The HTTP layer under the DICOMweb client: httpx below, our typed errors and part events above.

Whatever httpx raises or a server answers with, callers see one of the errors of
:mod:`dicomfs.errors`; every request, whoever sends it, is retried by the one
policy here (:func:`retryable`, :func:`backoff`); an answer that carries instances
is read as the events of :mod:`dicomfs.multipart`, whether it came multipart or
single-part. It knows HTTP and how DICOMweb uses it, not which requests exist:
those are :mod:`dicomfs.client`'s.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import trio
from httpcore._async.http11 import AsyncHTTP11Connection

from dicomfs.errors import (
    BadRequest,
    CertificateError,
    Conflict,
    DicomwebError,
    NotFound,
    ProtocolError,
    ServerError,
    Timeout,
    TooLarge,
    Truncated,
    Unauthorized,
    Unreachable,
)
from dicomfs.multipart import Event, PartData, PartEnd, PartStart, iter_events, parse_content_type

log = logging.getLogger(__name__)
T = TypeVar("T")

# The media type DICOMweb carries instances in, both ways (WADO-RS answers, STOW-RS bodies).
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
MAX_ERROR_TEXT = 500  # of a refusal's body, quoted in the error

# httpcore receives at most 64 KiB per socket read, a constant it offers no option for.
# A series answer is hundreds of MB: 1 MiB reads cut the per-read overhead by a
# factor of about 3 and bring a series retrieve to curl's speed (docs/performance.md).
if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", 0) < 1024 * 1024:
    AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024
# Characters a QIDO query value keeps as they are: wildcards and list separators (legal in
# a URL query, RFC 3986) and the PN separator ^ (which servers take as it is). Orthanc 1.10
# does not decode escapes in QIDO values: "Doe%5EJane%2A", what a form encoder sends,
# matches nothing there, "Doe^Jane*" does.
QUERY_SAFE = "*?,^:@/"


def status_error(status: int, message: str, url: str,
                 retry_after: str | None = None) -> DicomwebError:
    """Map an HTTP status to the error type callers act on."""
    kind: type[DicomwebError]
    if status in (404, 410):
        kind = NotFound
    elif status in (401, 403):
        kind = Unauthorized
    elif status >= 500 or status in (408, 429):
        kind = ServerError
    elif status == 409:
        kind = Conflict
    elif status == 413:
        kind = TooLarge
    else:
        kind = BadRequest
    return kind(f"HTTP {status}: {message}" if message else f"HTTP {status}", status=status,
                url=url, retry_after=retry_after)


@contextmanager
def translated(url: str) -> Any:
    """Turn httpx's exceptions into ours, so no caller needs to know httpx."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise Timeout(f"timed out: {type(exc).__name__}", url=url) from exc
    except httpx.ConnectError as exc:
        rejected = _certificate_failure(exc)
        if rejected is not None:
            raise CertificateError(f"the server's TLS certificate is not trusted: {rejected}",
                                   url=url) from exc
        raise Unreachable(f"cannot connect: {exc}", url=url) from exc
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise Truncated(f"connection broke mid-answer: {exc}", url=url) from exc
    except httpx.DecodingError as exc:
        raise ProtocolError(f"undecodable answer: {exc}", url=url) from exc
    except httpx.TransportError as exc:
        raise Unreachable(f"transport error: {exc}", url=url) from exc


def _certificate_failure(exc: BaseException) -> str | None:
    """Why certificate verification failed, when that is what broke the connection."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause.verify_message or str(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def query_string(params: Iterable[tuple[str, str]]) -> str:
    """A QIDO query string that escapes only what a URL query cannot hold (see QUERY_SAFE)."""
    return "&".join(f"{quote(key, safe=QUERY_SAFE)}={quote(value, safe=QUERY_SAFE)}"
                    for key, value in params)


def retryable(exc: DicomwebError) -> bool:
    """Whether asking again may succeed: the server was busy, slow, gone or cut us off."""
    return isinstance(exc, ServerError | Timeout | Unreachable | Truncated)


def backoff(attempt: int, exc: DicomwebError) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential with full jitter; a
    server's Retry-After wins if sane. The one retry policy of every request."""
    if exc.retry_after and exc.retry_after.isdigit():
        return min(float(exc.retry_after), 30.0)
    return random.uniform(0, min(0.25 * 2**attempt, 8.0))


async def retrying(once: Callable[[], Awaitable[T]], retries: int) -> T:
    """``once()``, run again after failures worth retrying, at most ``retries`` times."""
    attempt = 0
    while True:
        try:
            return await once()
        except DicomwebError as exc:
            if not retryable(exc) or attempt >= retries:
                raise
            delay = backoff(attempt, exc)
            attempt += 1
            log.warning("retrying in %.1fs (%d/%d) after: %s", delay, attempt, retries, exc)
            await trio.sleep(delay)


async def events(response: httpx.Response, url: str) -> AsyncIterator[Event]:
    """An answer that carries instances, as multipart events whatever its form."""
    content_type = response.headers.get("Content-Type", "")
    media, params = parse_content_type(content_type)
    with translated(url):
        if media == "multipart/related":
            boundary = params.get("boundary")
            if not boundary:
                raise ProtocolError("multipart answer without a boundary", url=url)
            async for event in iter_events(response.aiter_bytes(), boundary):
                yield event
        elif media == "application/dicom":
            async for event in _single_part(response, content_type, url):
                yield event
        else:
            raise ProtocolError(f"unexpected content type {content_type[:100]!r}", url=url)


async def _single_part(response: httpx.Response, content_type: str,
                       url: str) -> AsyncIterator[Event]:
    """A single-part ``application/dicom`` answer, presented as one multipart part."""
    headers = {"content-type": content_type}
    # A compressed answer's Content-Length counts compressed bytes; httpx checks it.
    encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
    declared = None if encoded else response.headers.get("Content-Length")
    if declared is not None:
        headers["content-length"] = declared
    yield PartStart(headers)
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        yield PartData(chunk)
    if declared is not None and declared.isdigit() and size != int(declared):
        raise Truncated(f"got {size} of {declared} bytes", url=url)
    yield PartEnd()
