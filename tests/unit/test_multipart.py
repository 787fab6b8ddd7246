"""Tests for dicomfs.multipart: the streaming multipart/related parser."""

from __future__ import annotations

import contextlib
import itertools
import string
from collections.abc import AsyncIterator, Iterable, Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dicomfs.errors import ProtocolError, Truncated
from dicomfs.multipart import (
    Event,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    iter_events,
    parse_content_type,
)

# RFC 2046 bchars: a boundary is 1..70 of these and does not end with a space.
BCHARS = string.digits + string.ascii_letters + "'()+_,-./:=? "
BOUNDARY = "8f3b1a2c-dicomfs-test"
DICOM = "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"

Part = tuple[dict[str, str], bytes]

# ---------------------------------------------------------------------------
# helpers


def build(
    parts: Sequence[tuple[dict[str, str], bytes]],
    boundary: str = BOUNDARY,
    *,
    content_length: bool = False,
    preamble: bytes = b"",
    epilogue: bytes = b"",
    padding: bytes = b"",
) -> bytes:
    """Serialise parts the way a DICOMweb server would."""
    b = boundary.encode()
    out = [preamble + b"\r\n--" + b if preamble else b"--" + b]
    for headers, body in parts:
        lines = [f"{name}: {value}".encode() for name, value in headers.items()]
        if content_length:
            lines.append(b"Content-Length: %d" % len(body))
        out += [padding, b"\r\n", *(line + b"\r\n" for line in lines), b"\r\n", body]
        out.append(b"\r\n--" + b)
    out.append(b"--" + padding + b"\r\n" + epilogue)
    return b"".join(out)


def expected(parts: Iterable[Part], *, content_length: bool) -> list[Part]:
    """What parsing build(parts) must return: normalised headers, exact bodies."""
    result = []
    for headers, body in parts:
        want = {name.lower(): value.strip() for name, value in headers.items()}
        if content_length:
            want["content-length"] = str(len(body))
        result.append((want, body))
    return result


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut data at the given offsets (any order, duplicates allowed)."""
    points = [0, *sorted(c for c in cuts if 0 <= c <= len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def assemble(events: Iterable[Event]) -> tuple[list[Part], bool]:
    """Rebuild parts from events, checking their grammar; also say if the last ended."""
    parts: list[tuple[dict[str, str], bytearray]] = []
    open_part = False
    for event in events:
        if isinstance(event, PartStart):
            assert not open_part, "PartStart inside a part"
            parts.append((event.headers, bytearray()))
            open_part = True
        elif isinstance(event, PartData):
            assert open_part, "PartData outside a part"
            assert type(event.data) is bytes and event.data, "PartData must be non-empty bytes"
            parts[-1][1].extend(event.data)
        else:
            assert isinstance(event, PartEnd)
            assert open_part, "PartEnd outside a part"
            open_part = False
    return [(h, bytes(b)) for h, b in parts], not open_part


def feed_all(chunks: Iterable[bytes], boundary: str | bytes = BOUNDARY) -> list[Event]:
    parser = MultipartParser(boundary)
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    parser.close()
    assert parser.done
    return events


def parse(chunks: Iterable[bytes], boundary: str | bytes = BOUNDARY) -> list[Part]:
    parts, ended = assemble(feed_all(chunks, boundary))
    assert ended
    return parts


def scan_safe(payload: bytes, boundary: str) -> bool:
    """Whether ``payload`` contains no delimiter once a real delimiter follows it."""
    delim = b"\r\n--" + boundary.encode()
    stream = payload + delim + b"\r\n"
    i = stream.find(delim)
    while 0 <= i < len(payload):
        follower = stream[i + len(delim) : i + len(delim) + 2]
        if follower[:1] in (b" ", b"\t", b"\r", b"\n") or follower == b"--":
            return False
        i = stream.find(delim, i + 1)
    return True


# ---------------------------------------------------------------------------
# strategies

boundaries = st.text(alphabet=BCHARS, min_size=1, max_size=70).filter(lambda s: not s.endswith(" "))
header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True)
header_values = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)
header_dicts = st.dictionaries(header_names, header_values, max_size=4).filter(
    lambda d: (
        len({k.lower() for k in d}) == len(d) and "content-length" not in {k.lower() for k in d}
    )
)


@st.composite
def payloads(draw: st.DrawFn, boundary: str, *, content_length: bool) -> bytes:
    """Binary bodies, often holding boundary-like bytes that are not delimiters."""
    b = boundary.encode()
    tricky = [
        b"--" + b,  # boundary without the CRLF in front
        b"\n--" + b + b"\r\n",  # bare LF in front: not a delimiter
        b"\r\n--" + b + b"x",  # a longer string that starts with the boundary
        b"\r\n--" + b + b"-x",
        b"\r\n--" + b + b"-",  # then a real delimiter right after the single dash
        b"\r\n",
        b"\r",
        b"--",
        b,
    ]
    tricky += [b"\r\n--" + b[:k] for k in range(len(b))]  # delimiter prefixes
    if content_length:  # counted bodies may hold real delimiters
        tricky += [b"\r\n--" + b + b"\r\n", b"\r\n--" + b + b"--", b"\r\n--" + b]
    pieces = draw(st.lists(st.binary(max_size=40) | st.sampled_from(tricky), max_size=6))
    payload = b"".join(pieces)
    if not content_length:
        assume(scan_safe(payload, boundary))
    return payload


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bool, list[Part], bytes, int]:
    """A valid answer: (boundary, content_length, parts, message, end of close delimiter)."""
    boundary = draw(boundaries)
    content_length = draw(st.booleans())
    n = draw(st.integers(0, 4))
    parts = [
        (draw(header_dicts), draw(payloads(boundary, content_length=content_length)))
        for _ in range(n)
    ]
    preamble = draw(st.sampled_from([b"", b"This is a multi-part message.", b"\r\n"]))
    assume(scan_safe(b"\r\n" + preamble, boundary))
    epilogue = draw(st.binary(max_size=20))
    padding = draw(st.sampled_from([b"", b" ", b"\t \t"]))
    message = build(
        parts,
        boundary,
        content_length=content_length,
        preamble=preamble,
        epilogue=epilogue,
        padding=padding,
    )
    close_end = len(message) - len(epilogue) - len(padding) - 2  # just after "--b--"
    return boundary, content_length, parts, message, close_end


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# realistic answers


def test_orthanc_like_answer_with_content_length() -> None:
    bodies = [b"DICM" * 100, b"\x00\r\n--" + BOUNDARY.encode() + b"\r\n\x01", b"x"]
    message = (
        b"".join(
            b"--%s\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n%s\r\n"
            % (BOUNDARY.encode(), len(body), body)
            for body in bodies
        )
        + b"--%s--\r\n" % BOUNDARY.encode()
    )
    parts = parse([message])
    assert [body for _, body in parts] == bodies
    assert parts[1][0] == {
        "content-type": "application/dicom",
        "content-length": str(len(bodies[1])),
    }


def test_dcm4chee_like_answer_without_content_length() -> None:
    parts = [({"Content-Type": DICOM}, bytes(range(256)) * 40) for _ in range(3)]
    message = b"\r\n" + build(parts)  # dcm4chee opens with CRLF before the first delimiter
    assert parse([message]) == expected(parts, content_length=False)


def test_single_part() -> None:
    parts = [({"Content-Type": "application/dicom"}, b"hello")]
    assert parse([build(parts)]) == expected(parts, content_length=False)


@pytest.mark.parametrize("content_length", [False, True])
def test_empty_parts(content_length: bool) -> None:
    parts = [({"Content-Type": DICOM}, b""), ({}, b"x"), ({"A": "b"}, b"")]
    message = build(parts, content_length=content_length)
    assert parse([message]) == expected(parts, content_length=content_length)


def test_part_without_headers() -> None:
    message = b"--b\r\n\r\nbody\r\n--b\r\n\r\n\r\n--b--"
    assert parse([message], "b") == [({}, b"body"), ({}, b"")]


def test_preamble_and_epilogue_are_ignored() -> None:
    parts = [({"Content-Type": DICOM}, b"data")]
    preamble = b"This is the preamble. --" + BOUNDARY.encode() + b" is mentioned here\r\n"
    epilogue = b"\r\n--" + BOUNDARY.encode() + b"\r\nnot a part\r\n"
    message = build(parts, preamble=preamble, epilogue=epilogue)
    assert parse([message]) == expected(parts, content_length=False)


def test_transport_padding_after_delimiters() -> None:
    parts = [({"A": "1"}, b"one"), ({"B": "2"}, b"two")]
    for padding in (b" ", b"\t", b" \t  \t"):
        message = build(parts, padding=padding)
        assert parse([message]) == expected(parts, content_length=False)


def test_boundary_like_bytes_in_the_body() -> None:
    b = BOUNDARY.encode()
    body = b"".join(
        [
            b"--" + b + b"\r\n",  # no CRLF before: body
            b"\r\n--" + b[:-1],  # a prefix of the delimiter
            b"\r\n--" + b + b"x",  # the boundary followed by another character
            b"\r\n--" + b + b"-y",  # a single dash is not a close delimiter
            b"\n--" + b + b"\r\n",  # bare LF before: body
            b"\r\r\n-\r\n--",
        ]
    )
    parts = [({"Content-Type": DICOM}, body), ({}, body)]
    assert parse([build(parts)]) == expected(parts, content_length=False)


def test_boundary_that_prefixes_a_longer_boundary() -> None:
    # A boundary "ab" must not end a body at "--abc", nor at "--ab-c".
    message = b"--ab\r\n\r\nx\r\n--abc\r\n--ab-c\r\ny\r\n--ab--"
    assert parse([message], "ab") == [({}, b"x\r\n--abc\r\n--ab-c\r\ny")]
    message = b"--ab\r\n\r\nx\r\n--ab-\r\n--ab\r\n\r\n\r\n--ab--"
    assert parse([message], "ab") == [({}, b"x\r\n--ab-"), ({}, b"")]


def test_content_length_body_is_not_scanned() -> None:
    b = BOUNDARY.encode()
    body = b"\r\n--" + b + b"\r\nContent-Type: fake\r\n\r\n\r\n--" + b + b"--\r\n"
    parts = [({}, body), ({"X": "y"}, body)]
    assert parse([build(parts, content_length=True)]) == expected(parts, content_length=True)


def test_bare_lf_headers_are_accepted() -> None:
    message = b"--b\r\nContent-Type: a/b\nX-Other:  v \n\nbody\r\n--b--"
    assert parse([message], "b") == [({"content-type": "a/b", "x-other": "v"}, b"body")]


def test_header_details() -> None:
    message = (
        b"--b\r\nContent-TYPE:application/dicom\r\nX-Folded: one\r\n  two\r\n"
        b"X-Dup: a\r\nx-dup: b\r\nContent-Location: /studies/caf\xc3\xa9\r\n\r\n\r\n--b--"
    )
    [(headers, body)] = parse([message], "b")
    assert body == b""
    assert headers == {
        "content-type": "application/dicom",
        "x-folded": "one two",
        "x-dup": "a, b",
        "content-location": "/studies/café",
    }


def test_zero_parts_is_a_complete_answer() -> None:
    # Documented: "--b--" alone is a complete, empty body.
    assert feed_all([b"--b--\r\n"], "b") == []


def test_bytes_boundary_and_memoryview_input() -> None:
    message = build([({}, b"abc")], "q")
    view = memoryview(bytearray(message))
    assert parse([view[:7], view[7:]], b"q") == [({}, b"abc")]


# ---------------------------------------------------------------------------
# chunking


def small_messages() -> list[tuple[bytes, list[Part]]]:
    parts = [({"Content-Type": DICOM}, b"ab\r\n--bq--b\r\n-"), ({}, b""), ({"X": "1"}, b"\r\n--bx")]
    return [
        (
            build(parts, "b", preamble=b"pre", epilogue=b"epi", padding=b" "),
            expected(parts, content_length=False),
        ),
        (build(parts, "b", content_length=True), expected(parts, content_length=True)),
    ]


@pytest.mark.parametrize(("message", "want"), small_messages())
def test_every_split_point(message: bytes, want: list[Part]) -> None:
    for i in range(len(message) + 1):
        assert parse(split(message, [i]), "b") == want, i


@pytest.mark.parametrize(("message", "want"), small_messages())
def test_every_pair_of_split_points(message: bytes, want: list[Part]) -> None:
    for i in range(len(message) + 1):
        for j in range(i, len(message) + 1):
            assert parse(split(message, [i, j]), "b") == want, (i, j)


@pytest.mark.parametrize(("message", "want"), small_messages())
def test_byte_by_byte(message: bytes, want: list[Part]) -> None:
    assert parse([message[i : i + 1] for i in range(len(message))], "b") == want


@pytest.mark.parametrize("content_length", [False, True])
def test_memory_stays_bounded_and_data_flows_early(content_length: bool) -> None:
    """Body bytes leave as they arrive, less at most a delimiter's worth held back."""
    body = (bytes(range(256)) * 4096)[:1_000_003] + b"\r\n--" + BOUNDARY.encode()[:5]
    message = build([({"Content-Type": DICOM}, body)], content_length=content_length)
    parser = MultipartParser(BOUNDARY)
    fed = 0
    got = 0
    header_end = message.index(b"\r\n\r\n") + 4
    for chunk in split(message, range(0, len(message), 4096)):
        fed += len(chunk)
        for event in parser.feed(chunk):
            if isinstance(event, PartData):
                got += len(event.data)
        body_fed = min(max(0, fed - header_end), len(body))
        assert body_fed - got <= len(BOUNDARY) + 4
        assert len(parser._buf) <= 4096 + len(BOUNDARY) + 4  # internal, but it is the point
    parser.close()
    assert got == len(body)


# ---------------------------------------------------------------------------
# truncation


@pytest.mark.parametrize(("message", "want"), small_messages())
def test_every_strict_prefix_is_truncated(message: bytes, want: list[Part]) -> None:
    close_end = message.index(b"\r\n--b--") + len(b"\r\n--b--")
    for cut in range(close_end):
        parser = MultipartParser("b")
        parser.feed(message[:cut])
        with pytest.raises(Truncated):
            parser.close()
    for cut in range(close_end, len(message) + 1):
        parser = MultipartParser("b")
        parser.feed(message[:cut])
        parser.close()


def test_truncated_messages_say_where() -> None:
    message = build([({}, b"x" * 10), ({}, b"y" * 1234)], "b")
    cut = message.index(b"y" * 1234) + 1234
    parser = MultipartParser("b")
    parser.feed(message[:cut])
    with pytest.raises(Truncated, match="part 2 after 1234 body bytes"):
        parser.close()
    counted = build([({}, b"y" * 100)], "b", content_length=True)
    parser = MultipartParser("b")
    parser.feed(counted[: counted.index(b"y") + 40])
    with pytest.raises(Truncated, match="part 1 after 40 of 100 body bytes"):
        parser.close()


@pytest.mark.parametrize(
    "stream",
    [b"", b"just a preamble, no delimiter", b"--", b"--b", b"--b-", b"\r\n--b", b"--b\r\nA: 1"],
)
def test_streams_that_never_start_or_finish_are_truncated(stream: bytes) -> None:
    parser = MultipartParser("b")
    parser.feed(stream)
    with pytest.raises(Truncated):
        parser.close()


# ---------------------------------------------------------------------------
# malformed input


@pytest.mark.parametrize(
    "length", ["abc", "-1", "", "1e3", "0x10", "+5", "5 5", "²", "1" * 40, "5, 6"]
)
def test_invalid_content_length(length: str) -> None:
    message = b"--b\r\nContent-Length: %s\r\n\r\nhello\r\n--b--" % length.encode()
    parser = MultipartParser("b")
    with pytest.raises(ProtocolError, match="Content-Length"):
        parser.feed(message)


def test_repeated_identical_content_length_is_tolerated() -> None:
    message = b"--b\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello\r\n--b--"
    assert parse([message], "b") == [({"content-length": "5, 5"}, b"hello")]


@pytest.mark.parametrize("delta", [-5, -1, 1, 2, 3, 4, 5, 6, 50])
@pytest.mark.parametrize("which", [0, 1])
def test_content_length_lies(delta: int, which: int) -> None:
    bodies = [b"first body", b"second body"]
    message = (
        b"".join(
            b"--b\r\nContent-Length: %d\r\n\r\n%s\r\n"
            % (len(body) + (delta if i == which else 0), body)
            for i, body in enumerate(bodies)
        )
        + b"--b--\r\n"
    )
    parser = MultipartParser("b")
    with pytest.raises(ProtocolError):  # from feed() or from close()
        parser.feed(message)
        parser.close()


@pytest.mark.parametrize(
    "message",
    [
        b"--b\r\nno colon here\r\n\r\n\r\n--b--",
        b"--b\r\n: no name\r\n\r\n\r\n--b--",
        b"--b\r\n folded first\r\n\r\n\r\n--b--",
        b"--b \tx\r\n\r\n\r\n--b--",  # text after the padding
        b"--b\r\n\r\n\r\n--b \r--b--",
        b"--b\r\n\r\nx\r\n--b\t\txyz",
        b"--b\r\nContent-Length: 1\r\n\r\nx\r\n--b-x",  # counted: must be a delimiter
        b"--b\r\nContent-Length: 1\r\n\r\nx\r\n--bb\r\n",
        b"--b" + b" " * 2000,  # endless padding
    ],
)
def test_malformed_answers(message: bytes) -> None:
    parser = MultipartParser("b")
    with pytest.raises(ProtocolError) as info:
        parser.feed(message)
    assert not isinstance(info.value, Truncated)


def test_header_block_limit() -> None:
    line = b"X-Long: " + b"v" * 100 + b"\r\n"
    fits = b"--b\r\n" + line * 9 + b"\r\nbody\r\n--b--"
    assert parse([fits], "b")[0][1] == b"body"
    parser = MultipartParser("b", max_header_size=9 * len(line))
    assert parser.feed(fits)
    parser = MultipartParser("b", max_header_size=8 * len(line))
    with pytest.raises(ProtocolError, match="larger than"):
        parser.feed(fits)
    parser = MultipartParser("b", max_header_size=100)
    with pytest.raises(ProtocolError, match="larger than"):
        for i in range(0, 1000, 7):  # no terminator yet: refused once over the limit
            parser.feed((b"--b\r\n" + line * 9)[i : i + 7])


@pytest.mark.parametrize("boundary", ["", "a\r\nb", "caf\u00e9", b"x\ny"])
def test_invalid_boundaries(boundary: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        MultipartParser(boundary)


def test_lifecycle() -> None:
    parser = MultipartParser("b")
    assert not parser.done
    assert parser.feed(b"--b\r\n\r\nx\r\n--b--") == [PartStart({}), PartData(b"x"), PartEnd()]
    assert parser.done
    assert parser.feed(b"\r\n--b\r\n\r\nmore epilogue") == []
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_parser_refuses_input_after_an_error() -> None:
    parser = MultipartParser("b")
    with pytest.raises(ProtocolError):
        parser.feed(b"--b\r\nbad header\r\n\r\n")
    with pytest.raises(ProtocolError, match="already failed"):
        parser.feed(b"more")
    with pytest.raises(ProtocolError, match="already failed"):
        parser.close()


# ---------------------------------------------------------------------------
# Content-Type


@pytest.mark.parametrize(
    ("value", "media_type", "params"),
    [
        (
            'multipart/related; type="application/dicom; foo=bar"; boundary="a;b"',
            "multipart/related",
            {"type": "application/dicom; foo=bar", "boundary": "a;b"},
        ),
        (
            "Multipart/Related;Type=application/dicom;BOUNDARY=abc123",
            "multipart/related",
            {"type": "application/dicom", "boundary": "abc123"},
        ),
        (
            'multipart/related ; boundary = "x,y=z" ; q="say \\"hi\\" \\\\"',
            "multipart/related",
            {"boundary": "x,y=z", "q": 'say "hi" \\'},
        ),
        ("application/dicom", "application/dicom", {}),
        ("application/json;", "application/json", {}),
        ("text/plain; charset=utf-8; ; novalue; x=", "text/plain", {"charset": "utf-8", "x": ""}),
        ("a/b; boundary=first; boundary=second", "a/b", {"boundary": "first"}),
    ],
)
def test_parse_content_type(value: str, media_type: str, params: dict[str, str]) -> None:
    assert parse_content_type(value) == (media_type, params)


@pytest.mark.parametrize(
    "value", ["", "   ", "multipart", "/related", "multipart/", "a/b c", 'a/b; x="open', ";a/b"]
)
def test_parse_content_type_garbage(value: str) -> None:
    with pytest.raises(ProtocolError):
        parse_content_type(value)


def test_content_type_boundary_feeds_the_parser() -> None:
    _, params = parse_content_type(
        'multipart/related; type="application/dicom"; boundary="weird:(b o)=?"'
    )
    message = build([({}, b"ok")], params["boundary"])
    assert parse([message], params["boundary"]) == [({}, b"ok")]


# ---------------------------------------------------------------------------
# properties


@FAST
@given(messages(), st.data())
def test_round_trip(case: tuple[str, bool, list[Part], bytes, int], data: st.DataObject) -> None:
    boundary, content_length, parts, message, _ = case
    cuts = data.draw(st.lists(st.integers(0, len(message)), max_size=12))
    assert parse(split(message, cuts), boundary) == expected(parts, content_length=content_length)


@FAST
@given(messages(), st.data())
def test_strict_prefixes_are_truncated(
    case: tuple[str, bool, list[Part], bytes, int], data: st.DataObject
) -> None:
    boundary, content_length, parts, message, close_end = case
    full = expected(parts, content_length=content_length)
    cut = data.draw(
        st.integers(0, close_end - 1) | st.sampled_from(range(max(0, close_end - 80), close_end))
    )
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=6))
    parser = MultipartParser(boundary)
    events: list[Event] = []
    for chunk in split(message[:cut], cuts):
        events += parser.feed(chunk)  # a prefix of a valid answer is never malformed
    with pytest.raises(Truncated):
        parser.close()
    assert not parser.done
    # What came out so far agrees with the full answer.
    got, ended = assemble(events)
    assert len(got) <= len(full)
    for i, (headers, body) in enumerate(got):
        assert headers == full[i][0]
        if i < len(got) - 1 or ended:
            assert body == full[i][1]
        else:
            assert full[i][1].startswith(body)


@FAST
@given(boundaries, st.data())
def test_content_length_lies_are_caught(boundary: str, data: st.DataObject) -> None:
    delim = b"\r\n--" + boundary.encode()
    parts = data.draw(
        st.lists(
            st.tuples(header_dicts, payloads(boundary, content_length=False)),
            min_size=1,
            max_size=4,
        )
    )
    which = data.draw(st.integers(0, len(parts) - 1))
    real = len(parts[which][1])
    lie = data.draw(st.integers(0, real + 200).filter(lambda n: n != real))
    message = bytearray(b"--" + boundary.encode())
    body_start = 0
    for i, (headers, body) in enumerate(parts):
        message += b"\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        message += b"Content-Length: %d\r\n\r\n" % (lie if i == which else len(body))
        if i == which:
            body_start = len(message)
        message += body + delim
    message += b"--\r\n"
    # A lie that ends the body exactly at a real delimiter is another valid reading of the
    # same bytes (one part swallowing the next), so only those are beyond detection.
    assume(message[body_start + lie : body_start + lie + len(delim)] != delim)
    parser = MultipartParser(boundary)
    cuts = data.draw(st.lists(st.integers(0, len(message)), max_size=8))
    with pytest.raises(ProtocolError):  # from feed() or from close()
        for chunk in split(bytes(message), cuts):
            parser.feed(chunk)
        parser.close()


fuzz_tokens = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b"--",
        b"--b",
        b"\r\n--b",
        b"b",
        b" ",
        b"\t",
        b"-",
        b":",
        b"Content-Length: ",
        b"Content-Length: 3\r\n",
        b"1",
        b"\r\n\r\n",
        b"X: y\r\n",
    ]
)


def fuzz_parse(stream: bytes, cuts: list[int], boundary: str = "b") -> None:
    parser = MultipartParser(boundary, max_header_size=64)
    events: list[Event] = []
    try:
        for chunk in split(stream, cuts):
            events += parser.feed(chunk)
        parser.close()
    except ProtocolError:
        pass
    assemble(events)  # whatever came out before the error is well formed


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.binary(max_size=8) | fuzz_tokens, max_size=40).map(b"".join),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_fuzz_raises_only_protocol_errors(stream: bytes, cuts: list[int]) -> None:
    fuzz_parse(stream, cuts)


@FAST
@given(messages(), st.data())
def test_fuzz_mutated_answers(
    case: tuple[str, bool, list[Part], bytes, int], data: st.DataObject
) -> None:
    boundary, _, _, message, _ = case
    mutated = bytearray(message)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(mutated)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=4) | fuzz_tokens)
        elif at < len(mutated):
            if action == "flip":
                mutated[at] ^= data.draw(st.integers(1, 255))
            else:
                del mutated[at : at + data.draw(st.integers(1, 8))]
    fuzz_parse(bytes(mutated), data.draw(st.lists(st.integers(0, len(mutated)))), boundary)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_content_type(value: str) -> None:
    try:
        media_type, params = parse_content_type(value)
    except ProtocolError:
        return
    assert "/" in media_type
    assert media_type == media_type.lower()
    assert all(name == name.lower() for name in params)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20) | st.binary(max_size=20))
def test_fuzz_boundary(boundary: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):
        MultipartParser(boundary)


# ---------------------------------------------------------------------------
# trio


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_iter_events_with_trio() -> None:
    parts = [({"Content-Type": DICOM}, bytes(range(256)) * 50) for _ in range(5)]
    message = build(parts, content_length=True, epilogue=b"trailing junk")
    events = [event async for event in iter_events(_chunks(message, 1000), BOUNDARY)]
    got, ended = assemble(events)
    assert ended
    assert got == expected(parts, content_length=True)


async def test_iter_events_raises_truncated() -> None:
    message = build([({}, b"x" * 5000)])
    with pytest.raises(Truncated):
        async for _ in iter_events(_chunks(message[:-20], 512), BOUNDARY):
            pass
