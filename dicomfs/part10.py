"""Checks of DICOM Part 10 files before they are cached: which instance, and whole.

A download is kept only when its bytes are a Part 10 file whose dataset names the
instance asked for and that ends where its last element ends: a server that cuts
a file short but frames the answer consistently must not get it served.

Nearly every file is little endian (implicit or explicit VR, encapsulated or not),
and for those a walk over element headers, jumping over values, answers both
questions in microseconds without a DICOM library. Big endian and deflated files,
and anything surprising, go to pydicom.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from pydicom.filereader import read_partial

from dicomfs.errors import IntegrityError

SOP_INSTANCE_UID = 0x00080018
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
IMPLICIT_VR_LITTLE_ENDIAN = b"1.2.840.10008.1.2"
# Every other transfer syntax encodes the dataset as explicit VR little endian, but these.
NOT_LITTLE_ENDIAN = {b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.1.99"}  # big endian, deflate
# Explicit VRs whose length field is 4 bytes (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
            b"UT", b"UV"}
MAX_DEPTH = 32  # nested sequences deeper than this are not a real file


class _Reader:
    """Bytes of a file at an offset: from the head in memory when it holds them."""

    def __init__(self, head: bytes, fd: int | None, size: int) -> None:
        self.head, self.fd, self.size = head, fd, size

    def get(self, offset: int, length: int) -> bytes:
        if offset + length <= len(self.head):
            return self.head[offset:offset + length]
        if self.fd is None or offset + length > self.size:
            raise EOFError
        return os.pread(self.fd, length, offset)


def _element(data: _Reader, offset: int, explicit: bool) -> tuple[int, int, int]:
    """(tag, value offset, value length) of the little-endian element at ``offset``."""
    header = data.get(offset, 8)
    group, element = struct.unpack_from("<HH", header)
    tag = (group << 16) | element
    if not explicit or group == 0xFFFE:  # item and delimiter tags have no VR
        return tag, offset + 8, struct.unpack_from("<I", header, 4)[0]
    if header[4:6] in LONG_VRS:
        return tag, offset + 12, struct.unpack_from("<I", data.get(offset + 8, 4))[0]
    return tag, offset + 8, struct.unpack_from("<H", header, 6)[0]


def _dataset_start(data: _Reader) -> tuple[int, bytes]:
    """Offset of the dataset and the transfer syntax, after the preamble and file meta."""
    if data.get(128, 4) != b"DICM":
        raise IntegrityError("not DICOM Part 10: no DICM prefix")
    offset, syntax = 132, b""
    while offset < data.size:
        tag, start, length = _element(data, offset, explicit=True)
        if tag >> 16 != 0x0002:
            break
        if tag == 0x00020010:
            syntax = data.get(start, length).rstrip(b"\0 ")
        offset = start + length
    return offset, syntax


def _walk(data: _Reader, offset: int, explicit: bool, end_tag: int | None, depth: int) -> int:
    """Walk elements from ``offset`` to ``end_tag`` (or to the end of the file); return
    where the walk ended. EOFError when an element runs past the end: a cut file."""
    if depth > MAX_DEPTH:
        raise IntegrityError("not DICOM: sequences nested too deep")
    while offset < data.size:
        tag, start, length = _element(data, offset, explicit)
        if tag == end_tag:
            return start
        if length != UNDEFINED_LENGTH:
            offset = start + length
            if offset > data.size:
                raise EOFError
        elif tag == ITEM:  # an item of undefined length: a nested dataset
            offset = _walk(data, start, explicit, ITEM_END, depth + 1)
        else:  # a sequence, or encapsulated pixel data: items up to the delimiter
            offset = _walk(data, start, explicit, SEQUENCE_END, depth + 1)
    if end_tag is not None:
        raise EOFError
    return offset


def check_whole(head: bytes, fd: int | None, size: int) -> str | None:
    """The dataset's SOP Instance UID, once the file is shown complete; None when this
    file needs pydicom (big endian, deflate). IntegrityError for a cut or broken file.

    ``head`` is the start of the file, ``fd`` (may be None when ``head`` is the whole
    file) reads the rest.
    """
    data = _Reader(head, fd, size)
    try:
        offset, syntax = _dataset_start(data)
        if not syntax or syntax in NOT_LITTLE_ENDIAN:
            return None
        explicit = syntax != IMPLICIT_VR_LITTLE_ENDIAN
        found = ""
        while offset < size:  # the top level, watching for the SOP Instance UID
            tag, start, length = _element(data, offset, explicit)
            if tag == SOP_INSTANCE_UID and length != UNDEFINED_LENGTH:
                found = data.get(start, length).rstrip(b"\0 ").decode("ascii", "replace")
            if tag > SOP_INSTANCE_UID or length == UNDEFINED_LENGTH:
                break
            offset = start + length
        if _walk(data, offset, explicit, None, 0) != size:
            raise EOFError
    except (EOFError, struct.error):
        raise IntegrityError("not DICOM Part 10: it ends inside an element (cut short)"
                             ) from None
    return found


def parsed_sop_uid(source: BinaryIO) -> str:
    """The dataset's SOP Instance UID, by pydicom, reading no further than that element."""
    try:
        ds = read_partial(source, stop_when=lambda tag, vr, length: tag > SOP_INSTANCE_UID)
        return str(ds.get("SOPInstanceUID", ""))
    except Exception as exc:  # pydicom raises many kinds on broken input
        raise IntegrityError(f"not DICOM Part 10: {type(exc).__name__}: {exc}") from None
