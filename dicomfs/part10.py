"""Checks of downloaded DICOM objects before they are cached: which instance, and whole.

A download is kept only when its bytes are a DICOM object whose dataset names a valid
SOP Instance UID and that ends where its last element ends: a server that cuts a file
short but frames the answer consistently must not get it served.

Servers store objects as they received them, so every encoding a sender may use is
accepted: Part 10 files (with the 128-byte preamble, or with the file meta and no
preamble), and raw datasets with no file meta at all (implicit or explicit VR little
endian, or explicit VR big endian, told apart as pydicom does). The walk reads element
headers and jumps over values, so little-endian files cost microseconds whatever their
size; a deflated dataset is inflated in bounded chunks and walked as it streams.

What "whole" can mean: every element, sequence, item and pixel-data fragment must end
inside the file, every undefined length must reach its delimiter, the last top-level
element must end exactly at the end of the file (or of the deflate stream, which must
end the file, and whose end marker catches every cut). One cut no walk can see: exactly
between two top-level elements after the SOP Instance UID, which leaves a valid shorter
object (objects without the pixel data their header announces exist, and servers store
and serve them, so "an image must carry pixel data" would refuse whole objects).
"""

from __future__ import annotations

import os
import struct
import zlib

from dicomfs.errors import IntegrityError
from dicomfs.uids import is_uid

SOP_INSTANCE_UID = 0x00080018
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_DEPTH = 32  # nested sequences deeper than this are not a real file
MAX_UID_LENGTH = 256  # a UID value longer than this is garbage (valid ones are at most 64)

EXPLICIT_VR_BIG_ENDIAN = b"1.2.840.10008.1.2.2"
#: Transfer syntaxes whose whole dataset is deflated (plain, JPIP, JPIP HTJ2K).
DEFLATED = frozenset({b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.4.95",
                      b"1.2.840.10008.1.2.4.205"})
#: The VRs of PS3.5 6.2; an explicit-VR raw dataset starts with one (pydicom's test).
KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL"
    b" UN UR US UT UV".split())
#: Explicit VRs whose length field is 4 bytes (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
NOT_WHOLE = "not a whole DICOM object"  # every refusal says so first
CHUNK = 256 * 1024  # inflate output per step: bounds memory whatever the compression ratio


class _Garbage(Exception):
    """The bytes are not a DICOM dataset (as opposed to a cut one: EOFError)."""


class _Encoding:
    """How a dataset's elements are written: byte order and whether VRs are explicit."""

    def __init__(self, little: bool, explicit: bool) -> None:
        self.explicit = explicit
        order = "<" if little else ">"
        self.header = struct.Struct(order + "HHI").unpack  # tag, 4-byte length
        self.short_length = struct.Struct(order + "H").unpack_from
        self.long_length = struct.Struct(order + "I").unpack


IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = (_Encoding(True, False), _Encoding(True, True),
                                         _Encoding(False, True))


class _File:
    """The file read forward from ``pos``: from ``head`` in memory while it holds the
    bytes, then from ``fd``. Skips only move the position (values are never read)."""

    def __init__(self, head: bytes, fd: int | None, size: int) -> None:
        self.head, self.fd, self.size, self.pos = head, fd, size, 0

    def read(self, n: int) -> bytes:
        start, end = self.pos, self.pos + n
        if end > self.size:
            raise EOFError
        if end <= len(self.head):
            data = self.head[start:end]
        elif self.fd is None:
            raise EOFError
        else:
            data = os.pread(self.fd, n, start)
            if len(data) != n:
                raise EOFError
        self.pos = end
        return data

    def peek(self, n: int) -> bytes:
        data = self.read(n)
        self.pos -= n
        return data

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > self.size:
            raise EOFError

    def at_end(self) -> bool:
        return self.pos >= self.size


class _Inflated:
    """The inflated dataset of a deflated file, read forward in bounded steps."""

    def __init__(self, file: _File) -> None:
        self.file = file
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.pending = b""  # compressed input not yet inflated
        self.buffer, self.offset = b"", 0  # inflated bytes not yet consumed
        self.crc, self.total = 0, 0  # of every inflated byte, for a gzip-style trailer

    def _fill(self) -> bool:
        """Inflate one more step into the buffer; False once the stream has ended."""
        while not self.inflater.eof:
            if not self.pending:
                if self.file.at_end():
                    raise EOFError  # the deflate stream is cut
                self.pending = self.file.read(min(CHUNK, self.file.size - self.file.pos))
            try:
                out = self.inflater.decompress(self.pending, CHUNK)
            except zlib.error:
                raise _Garbage("not a deflate stream") from None
            self.pending = self.inflater.unconsumed_tail
            if out:
                self.crc, self.total = zlib.crc32(out, self.crc), self.total + len(out)
                self.buffer, self.offset = self.buffer[self.offset:] + out, 0
                return True
        return False

    def read(self, n: int) -> bytes:
        while len(self.buffer) - self.offset < n:
            if not self._fill():
                raise EOFError
        data = self.buffer[self.offset:self.offset + n]
        self.offset += n
        return data

    def skip(self, n: int) -> None:
        while n > len(self.buffer) - self.offset:
            n -= len(self.buffer) - self.offset
            self.buffer, self.offset = b"", 0
            if not self._fill():
                raise EOFError
        self.offset += n

    def at_end(self) -> bool:
        """True when the dataset has ended; then the deflate stream must end the file,
        but for a pad byte or the CRC-32 and size that gzip-made writers leave (pydicom's
        ``image_dfl.dcm`` has them), which must then match what was inflated."""
        if self.offset < len(self.buffer) or self._fill():
            return False
        left = self.file.size - self.file.pos
        if len(self.inflater.unused_data) + left > 9:
            raise _Garbage("bytes after the end of the deflate stream")
        tail = self.inflater.unused_data + self.file.read(left)
        trailer = struct.pack("<II", self.crc, self.total & 0xFFFFFFFF)
        if tail not in (b"", b"\0", trailer, trailer + b"\0"):
            raise _Garbage("bytes after the end of the deflate stream")
        return True


_Source = _File | _Inflated


def _header(src: _Source, enc: _Encoding) -> tuple[int, bytes, int]:
    """(tag, VR or b"", value length) of the next element."""
    head = src.read(8)
    group, element, length = enc.header(head)
    vr = b""
    if enc.explicit and group != 0xFFFE:  # item and delimiter tags have no VR
        vr = head[4:6]
        if not (vr.isalpha() and vr.isupper()):
            raise _Garbage(f"bad VR {vr!r}")
        if vr in LONG_VRS:
            (length,) = enc.long_length(src.read(4))
        else:
            (length,) = enc.short_length(head, 6)
    return group << 16 | element, vr, length


def _dataset(src: _Source, enc: _Encoding, depth: int, top: list[bytes] | None) -> None:
    """Walk one dataset: the top level to the end of ``src`` (appending the value of its
    SOP Instance UID to ``top``), or an item of undefined length to its delimiter."""
    while top is None or not src.at_end():
        tag, vr, length = _header(src, enc)
        if tag >> 16 == 0xFFFE:
            if tag == ITEM_END and top is None:
                return
            raise _Garbage(f"item tag {tag:08X} outside a sequence")
        if length == UNDEFINED_LENGTH:
            # A sequence, encapsulated pixel data, or a UN sequence (implicit VR inside).
            _items(src, IMPLICIT_LE if vr == b"UN" else enc, depth + 1)
        elif tag == SOP_INSTANCE_UID and top is not None:
            if length > MAX_UID_LENGTH:
                raise _Garbage("a UID too long")
            top.append(src.read(length).rstrip(b"\0 "))
        else:
            src.skip(length)


def _items(src: _Source, enc: _Encoding, depth: int) -> None:
    """Walk the items of a sequence (or pixel-data fragments) up to its delimiter."""
    if depth > MAX_DEPTH:
        raise _Garbage("sequences nested too deep")
    while True:
        tag, _, length = _header(src, enc)
        if tag == SEQUENCE_END:
            return
        if tag != ITEM:
            raise _Garbage(f"element {tag:08X} where an item belongs")
        if length == UNDEFINED_LENGTH:
            _dataset(src, enc, depth, None)
        else:
            src.skip(length)


def _raw_encoding(file: _File) -> _Encoding:
    """The encoding of a dataset with no transfer syntax, guessed as pydicom does: a VR
    after the first tag means explicit VR, and then a first group that reads >= 1024 in
    little endian means big endian."""
    head = file.peek(6)
    if head[4:6] not in KNOWN_VRS:
        return IMPLICIT_LE
    return EXPLICIT_BE if struct.unpack_from("<H", head)[0] >= 1024 else EXPLICIT_LE


def _open_dataset(file: _File) -> tuple[_Source, _Encoding]:
    """Skip the preamble and file meta, if any; the dataset and its encoding."""
    if file.size >= 132 and file.peek(132)[128:] == b"DICM":
        file.skip(132)
    elif file.peek(4) == b"DICM":  # a prefix without its preamble
        file.skip(4)
    syntax = None
    while not file.at_end() and file.peek(2) == b"\x02\x00":  # file meta, group 0002
        meta_encoding = _raw_encoding(file)  # explicit VR LE, unless written wrongly
        tag, _, length = _header(file, meta_encoding)
        if length == UNDEFINED_LENGTH or (tag == 0x00020010 and length > MAX_UID_LENGTH):
            raise _Garbage("a broken file meta")
        if tag == 0x00020010:
            syntax = file.read(length).rstrip(b"\0 ")
        else:
            file.skip(length)
    if syntax is None:
        return file, _raw_encoding(file)
    if syntax in DEFLATED:
        return _Inflated(file), EXPLICIT_LE
    if syntax == EXPLICIT_VR_BIG_ENDIAN:
        return file, EXPLICIT_BE
    # Little endian as declared, implicit or explicit VR as the dataset is written: some
    # servers (tiny-pacs) declare explicit VR over a dataset stored implicit, and pydicom
    # reads it all the same, so the object is whole and must be served.
    return file, EXPLICIT_LE if file.peek(6)[4:6] in KNOWN_VRS else IMPLICIT_LE


def whole_instance_uid(head: bytes, fd: int | None, size: int) -> str:
    """The SOP Instance UID of the DICOM object in a file of ``size`` bytes, once the
    file is shown whole; IntegrityError for a cut, broken or non-DICOM file, or a UID
    that is not valid.

    ``head`` is the start of the file (any length, the whole file when ``fd`` is None),
    ``fd`` reads the rest with ``os.pread`` (the position is not used, so the caller may
    share it). Pure and blocking: big deflated files take milliseconds, call it from a
    worker thread.
    """
    file = _File(head, fd, size)
    top: list[bytes] = []
    try:
        src, enc = _open_dataset(file)
        _dataset(src, enc, 0, top)
    except (EOFError, struct.error):
        raise IntegrityError(f"{NOT_WHOLE}: it ends inside an element (cut short?)") from None
    except _Garbage as exc:
        raise IntegrityError(f"{NOT_WHOLE}: {exc}") from None
    uid = top[-1].decode("ascii", "replace") if top else ""
    if not is_uid(uid):
        raise IntegrityError(f"{NOT_WHOLE}: SOP Instance UID {uid[:64]!r}")
    return uid
