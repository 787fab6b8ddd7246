"""The error types every layer raises.

One small hierarchy so the FUSE adapter can map any failure to an errno without
knowing which layer raised it, and so callers can tell "the server said no"
from "the server is gone" from "the bytes are wrong".
"""

from __future__ import annotations


class DicomfsError(Exception):
    """Base of every error dicomfs raises on purpose."""


class DicomwebError(DicomfsError):
    """A DICOMweb request failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None,
                 retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.url = url
        self.retry_after = retry_after


class NotFound(DicomwebError):
    """404 or 410: the study, series or instance does not exist on the server."""


class Unauthorized(DicomwebError):
    """401 or 403: credentials are missing, wrong or expired."""


class BadRequest(DicomwebError):
    """400, 406, 415 and other 4xx: the server refused the request as asked."""


class Conflict(BadRequest):
    """409: the server refused to store an instance, e.g. one it already holds."""


class TooLarge(BadRequest):
    """413, or an upload over ``--upload-max-size``: too large to store."""


class ServerError(DicomwebError):
    """5xx, 408 or 429: the server failed; worth retrying."""


class Timeout(DicomwebError):
    """No answer, or no bytes, within the configured time."""


class Unreachable(DicomwebError):
    """The connection could not be made: the server is down or the network is."""


class CertificateError(DicomwebError):
    """The server's TLS certificate failed verification: asking again cannot help."""


class ProtocolError(DicomwebError):
    """The answer is not what DICOMweb promises: bad JSON, bad multipart, bad framing."""


class Truncated(ProtocolError):
    """The answer ended early: a part without its closing delimiter or short of its length."""


class IntegrityError(ProtocolError):
    """The bytes arrived whole but are not the DICOM instance that was asked for."""


class CacheError(DicomfsError):
    """The cache folder failed us (removed under a live mount, full, unwritable): EIO, not
    "no such file", because the file exists on the server all the same."""


class InvalidUpload(DicomfsError):
    """A file copied into /upload is not a whole DICOM object: refused before sending."""
