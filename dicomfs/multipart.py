"""Sans-IO streaming parser for the multipart/related answers of DICOMweb WADO-RS.

A WADO-RS answer for a whole series is one multipart/related body that can run to
gigabytes, so the parser never holds a part: it hands out body bytes as soon as they
cannot belong to a delimiter, and its buffer grows with header size, never with body
size. It does no I/O, so the HTTP layer, the tests and the benchmark drive it alike.

Two ways to find the end of a part, because servers differ:

* With a ``Content-Length`` part header (Orthanc sends one) the body is read by count,
  never scanned, so it may contain any bytes at all; the delimiter must then follow at
  once, and if it does not the length lied and the answer is rejected.
* Without one (dcm4chee) the body is scanned for CRLF "--" boundary, and that string only
  ends the part when followed by "--", padding or a line end (RFC 2046), so a body that
  merely contains a longer string starting with the boundary survives.

An answer that stops before its close delimiter raises :class:`Truncated` from
:meth:`MultipartParser.close`, whatever the point it stopped at.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from dicomfs.errors import ProtocolError, Truncated

__all__ = [
    "Event",
    "MultipartParser",
    "PartData",
    "PartEnd",
    "PartStart",
    "iter_events",
    "parse_content_type",
]


@dataclass(frozen=True, slots=True)
class PartStart:
    """A body part begins; header names are lower-cased, values stripped."""

    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class PartData:
    """A piece of the current part's body, in order; pieces follow chunking, not meaning."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    """The current part is complete: its whole body has been handed out."""


Event = PartStart | PartData | PartEnd


# ---------------------------------------------------------------------------
# Content-Type

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE = re.compile(rf"\s*({_TOKEN})\s*/\s*({_TOKEN})\s*")
# One ";name=value" parameter. Anything that is not understood up to the next ';' is
# skipped rather than refused: servers send odd spacing, and only the boundary matters.
_PARAM = re.compile(
    r"""
    ;\s*
    (?P<name>[^=;\s"]+)?\s*
    (?:=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<token>[^;]*)))?
    [^;]*
    """,
    re.VERBOSE | re.DOTALL,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type into its media type (lower-cased) and parameters.

    Parameter names are lower-cased and quoted values unquoted, so the ``type`` and
    ``boundary`` of a DICOMweb answer can carry ';', ',' or '=' inside quotes. The first
    of repeated parameters wins. Raises ProtocolError when there is no media type, when
    text follows it without a ';', or when a quoted value never closes.
    """
    match = _MEDIA_TYPE.match(value)
    if match is None:
        raise ProtocolError(f"Content-Type has no media type: {value!r}")
    media_type = f"{match[1]}/{match[2]}".lower()
    params: dict[str, str] = {}
    pos = match.end()
    while pos < len(value):
        param = _PARAM.match(value, pos)
        if param is None:
            raise ProtocolError(f"Content-Type has text after its media type: {value!r}")
        pos = param.end()
        name, quoted, token = param["name"], param["quoted"], param["token"]
        if name is None or (quoted is None and token is None):
            continue  # empty or valueless parameter: ignore, as browsers do
        if quoted is not None:
            text = _QUOTED_PAIR.sub(r"\1", quoted)
        else:
            text = token.strip()
            if text.startswith('"'):
                raise ProtocolError(f"Content-Type has an unterminated quoted value: {value!r}")
        params.setdefault(name.lower(), text)
    return media_type, params


# ---------------------------------------------------------------------------
# Parser

# States. Plain ints: the hot loop compares them on every feed.
_PREAMBLE = 0  # scanning for the first delimiter, discarding what comes before
_DELIM_LINE = 1  # just after a delimiter: expecting "--", or padding then a line end
_HEADERS = 2  # accumulating a part's header block
_BODY_SCAN = 3  # body without Content-Length: scanning for the delimiter
_BODY_COUNT = 4  # body with Content-Length: counting bytes
_AFTER_COUNT = 5  # counted body complete: the delimiter must come next, verbatim
_DONE = 6  # close delimiter seen: everything else is epilogue

_DASH = ord("-")
_CR = ord("\r")
_DELIM_FOLLOWERS = b" \t\r\n"  # after CRLF--boundary these make it a delimiter (and "--")
_PADDING = b" \t"
_MAX_PADDING = 1024  # transport padding allowed after a delimiter, to keep memory bounded
_MAX_LENGTH_DIGITS = 18  # longer Content-Length values are nonsense (and slow for int())


class MultipartParser:
    """Incremental multipart/related parser: bytes in via feed(), events out.

    The parser holds at most one unfinished header block, or one input chunk plus fewer
    bytes than a delimiter; body bytes leave in PartData as soon as they are known to be
    body. Any malformation raises ProtocolError from feed(); an answer that stops early
    raises Truncated from close(). After an error the parser refuses further input.
    """

    __slots__ = (
        "_body_bytes",
        "_buf",
        "_closed",
        "_delim",
        "_error",
        "_fed",
        "_length",
        "_max_header_size",
        "_part",
        "_remaining",
        "_search_from",
        "_state",
    )

    def __init__(self, boundary: str | bytes, *, max_header_size: int = 64 * 1024) -> None:
        """Prepare for a body whose boundary is ``boundary`` (from the Content-Type)."""
        if isinstance(boundary, str):
            try:
                raw = boundary.encode("ascii")
            except UnicodeEncodeError as exc:
                raise ProtocolError(f"multipart boundary is not ASCII: {boundary!r}") from exc
        else:
            raw = bytes(boundary)
        # No CR or LF in the boundary is what lets the scanner skip past a rejected
        # match in one step; RFC 2046 allows neither anyway.
        if not raw or b"\r" in raw or b"\n" in raw:
            raise ProtocolError(f"invalid multipart boundary: {boundary!r}")
        if max_header_size < 1:
            raise ValueError("max_header_size must be positive")
        self._delim = b"\r\n--" + raw
        # A virtual CRLF in front lets a delimiter at the very start of the stream be
        # found by the same search as every later one.
        self._buf = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self._search_from = 0  # where the next search in _buf starts: never rescan
        self._max_header_size = max_header_size
        self._closed = False
        self._error: ProtocolError | None = None
        self._fed = 0  # bytes fed so far, for messages
        self._part = 0  # number of the current part, from 1
        self._body_bytes = 0  # body bytes of the current part handed out so far
        self._length: int | None = None  # Content-Length of the current part
        self._remaining = 0  # body bytes still to count when _length is set

    @property
    def done(self) -> bool:
        """Whether the close delimiter has been seen; later input is epilogue."""
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Take the next chunk of the body and return the events it completes."""
        if self._closed:
            raise RuntimeError("MultipartParser.feed() called after close()")
        if self._error is not None:
            raise ProtocolError(f"multipart parser already failed: {self._error}")
        if self._state == _DONE or not data:
            return []
        before = len(self._buf)
        self._buf += data
        self._fed += len(self._buf) - before
        events: list[Event] = []
        try:
            self._run(events)
        except ProtocolError as exc:
            self._error = exc
            raise
        return events

    def close(self) -> None:
        """Declare the end of the stream; raise Truncated unless the body was complete."""
        self._closed = True
        if self._error is not None:
            raise ProtocolError(f"multipart parser already failed: {self._error}")
        state = self._state
        if state == _DONE:
            return
        where = f"at byte {self._fed}"
        part = self._part
        if state == _PREAMBLE:
            message = f"multipart answer ended before its first boundary delimiter ({where})"
        elif state == _DELIM_LINE:
            message = (
                f"multipart answer ended inside a boundary delimiter line after "
                f"{part} complete part(s) ({where})"
            )
        elif state == _HEADERS:
            message = f"multipart answer ended inside the headers of part {part} ({where})"
        elif state == _BODY_SCAN:
            received = self._body_bytes + len(self._buf)
            message = (
                f"multipart answer ended inside part {part} after {received} body bytes, "
                f"without its closing delimiter ({where})"
            )
        elif state == _BODY_COUNT:
            message = (
                f"multipart answer ended inside part {part} after {self._body_bytes} of "
                f"{self._length} body bytes (Content-Length) ({where})"
            )
        else:
            message = (
                f"multipart answer ended after the {self._length} body bytes of part {part}, "
                f"before the boundary delimiter that must follow them ({where})"
            )
        raise Truncated(message)

    # -- state machine ------------------------------------------------------

    def _run(self, events: list[Event]) -> None:
        """Advance through states until one needs more input."""
        while True:
            state = self._state
            if state == _BODY_COUNT:
                progressed = self._body_count(events)
            elif state == _BODY_SCAN:
                progressed = self._scan(events, emit=True)
            elif state == _HEADERS:
                progressed = self._headers(events)
            elif state == _DELIM_LINE:
                progressed = self._delim_line()
            elif state == _AFTER_COUNT:
                progressed = self._after_count(events)
            elif state == _PREAMBLE:
                progressed = self._scan(events, emit=False)
            else:  # _DONE
                self._buf.clear()
                return
            if not progressed:
                return

    def _take(self, count: int) -> bytes:
        """Remove and return the first ``count`` bytes of the buffer, copying once."""
        buf = self._buf
        if count == len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            with memoryview(buf) as view:
                data = view[:count].tobytes()
            del buf[:count]  # O(1): CPython bytearrays drop a prefix by moving their start
        return data

    def _scan(self, events: list[Event], *, emit: bool) -> bool:
        """Hand out (or, in the preamble, drop) bytes up to the next delimiter."""
        buf = self._buf
        delim = self._delim
        dlen = len(delim)
        start = self._search_from
        while True:
            i = buf.find(delim, start)
            if i < 0:
                break
            j = i + dlen  # first byte after CRLF--boundary decides what it is
            if j >= len(buf) or (buf[j] == _DASH and j + 1 >= len(buf)):
                self._release(events, i, emit)  # undecided: wait, holding only the match
                return False
            follower = buf[j]
            if follower == _DASH:
                if buf[j + 1] != _DASH:
                    start = j  # "--boundary-x": body. No CR inside the match, so skip it.
                    continue
            elif follower not in _DELIM_FOLLOWERS:
                start = j  # "--boundaryX": a longer string in the body, not a delimiter
                continue
            self._release(events, i, emit)
            del buf[:dlen]
            if emit:
                events.append(PartEnd())
            self._state = _DELIM_LINE
            return True
        # No delimiter: everything goes except a tail that could begin one. Only the last
        # CR can start it, as the delimiter has no other CR.
        n = len(buf)
        keep = n
        cr = buf.rfind(b"\r", max(start, n - dlen + 1))
        if cr >= 0 and delim.startswith(buf[cr:]):
            keep = cr
        self._release(events, keep, emit)
        return False

    def _release(self, events: list[Event], count: int, emit: bool) -> None:
        """Emit the first ``count`` buffered bytes as body, or drop them as preamble."""
        self._search_from = 0
        if count <= 0:
            return
        if emit:
            self._body_bytes += count
            events.append(PartData(self._take(count)))
        else:
            del self._buf[:count]

    def _delim_line(self) -> bool:
        """Finish a delimiter line: "--" closes the body, else padding then CRLF."""
        buf = self._buf
        if not buf:
            return False
        if buf[0] == _DASH:
            if len(buf) < 2:
                return False
            if buf[1] == _DASH:
                self._state = _DONE
                buf.clear()
                return False
            raise ProtocolError(self._bad_delimiter_line())
        end = buf.find(b"\n")
        if end < 0:
            line = buf[:-1] if buf[-1] == _CR else buf
            if line.strip(_PADDING):
                raise ProtocolError(self._bad_delimiter_line())
            if len(buf) > _MAX_PADDING:
                raise ProtocolError(f"boundary delimiter line too long after part {self._part}")
            return False
        line = buf[:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip(_PADDING):
            raise ProtocolError(self._bad_delimiter_line())
        del buf[: end + 1]
        self._part += 1
        self._body_bytes = 0
        self._length = None
        self._search_from = 0
        self._state = _HEADERS
        return True

    def _bad_delimiter_line(self) -> str:
        """Say why a delimiter line is bad, blaming Content-Length when there was one."""
        if self._length is not None:
            return (
                f"part {self._part} declared Content-Length {self._length} but its body is "
                "followed by something other than a boundary delimiter"
            )
        return f"malformed boundary delimiter line after part {self._part}"

    def _headers(self, events: list[Event]) -> bool:
        """Collect a header block up to its blank line; accept bare LF line ends too."""
        buf = self._buf
        limit = self._max_header_size
        if buf.startswith(b"\r\n"):
            end, skip = 0, 2
        elif buf.startswith(b"\n"):
            end, skip = 0, 1
        elif buf == b"\r":
            return False
        else:
            # Bounded searches: the buffer may already hold a whole chunk of body.
            start = self._search_from
            bound = limit + 3
            end = buf.find(b"\n\r\n", start, bound)
            lf_end = buf.find(b"\n\n", start, end + 2 if end >= 0 else bound)
            if lf_end >= 0:
                end, skip = lf_end, lf_end + 2
            elif end >= 0:
                skip = end + 3
            else:
                if len(buf) > limit + 2:
                    raise ProtocolError(
                        f"headers of part {self._part} are larger than {limit} bytes"
                    )
                self._search_from = max(0, len(buf) - 2)
                return False
            if end > limit:
                raise ProtocolError(f"headers of part {self._part} are larger than {limit} bytes")
        headers = _parse_headers(bytes(buf[:end]), self._part)
        del buf[:skip]
        self._search_from = 0
        events.append(PartStart(headers))
        value = headers.get("content-length")
        if value is None:
            self._state = _BODY_SCAN
        else:
            self._length = self._remaining = _parse_length(value, self._part)
            self._state = _BODY_COUNT if self._remaining else _AFTER_COUNT
        return True

    def _body_count(self, events: list[Event]) -> bool:
        """Hand out body bytes by count; no scanning, so the body may hold anything."""
        available = len(self._buf)
        if not available:
            return False
        count = min(available, self._remaining)
        self._remaining -= count
        self._body_bytes += count
        events.append(PartData(self._take(count)))
        if self._remaining:
            return False
        self._state = _AFTER_COUNT
        return True

    def _after_count(self, events: list[Event]) -> bool:
        """Demand the delimiter right after a counted body; otherwise the length lied."""
        buf = self._buf
        delim = self._delim
        have = min(len(buf), len(delim))
        if buf[:have] != delim[:have]:
            raise ProtocolError(
                f"part {self._part} declared Content-Length {self._length} but its body is "
                "not followed by the boundary delimiter"
            )
        if have < len(delim):
            return False
        del buf[: len(delim)]
        events.append(PartEnd())
        self._state = _DELIM_LINE
        return True


def _decode(raw: bytes) -> str:
    """Decode header text: UTF-8 when it is, else Latin-1, which never fails."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _parse_headers(block: bytes, part: int) -> dict[str, str]:
    """Parse "Name: value" lines; repeated names are joined with ", " as in HTTP."""
    headers: dict[str, str] = {}
    if not block:
        return headers
    last: str | None = None
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: continues the last value
            if last is None:
                raise ProtocolError(f"part {part} headers start with a continuation line")
            headers[last] = f"{headers[last]} {_decode(line).strip()}".strip()
            continue
        name, colon, value = line.partition(b":")
        key = _decode(name).strip().lower()
        if not colon or not key:
            raise ProtocolError(f"part {part} has a malformed header line: {line[:80]!r}")
        text = _decode(value).strip()
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
        last = key
    return headers


def _parse_length(value: str, part: int) -> int:
    """Read a Content-Length; identical repeats are tolerated, as in HTTP."""
    values = {item.strip() for item in value.split(",")}
    text = values.pop()
    if values or not (text.isascii() and text.isdigit()) or len(text) > _MAX_LENGTH_DIGITS:
        raise ProtocolError(f"part {part} has an invalid Content-Length: {value[:80]!r}")
    return int(text)


async def iter_events(chunks: AsyncIterable[bytes], boundary: str | bytes) -> AsyncIterator[Event]:
    """Feed every chunk, yield events as they come, call close() at the end.

    The whole source is consumed even after the close delimiter, so the HTTP response
    is drained and its connection can be reused.
    """
    parser = MultipartParser(boundary)
    async for chunk in chunks:
        for event in parser.feed(chunk):
            yield event
    parser.close()
