"""The integrity check of downloaded objects (dicomfs.part10.whole_instance_uid).

Objects of every encoding a server may hold are written here element by element with
pydicom, so the offset of every top-level element boundary is known without asking the
code under test. Each object is accepted whole with its UID, and cut at every offset:
refused everywhere but exactly between two top-level elements after the SOP Instance
UID (a valid shorter object, which no walk can tell from a cut; a deflated object is
refused there too, by the end of its deflate stream).
"""

from __future__ import annotations

import os
import struct
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicomfs.errors import IntegrityError
from dicomfs.part10 import whole_instance_uid
from tests.support import SampleArchive
from tests.support.sample import demo_uid, part10_dataset

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SOP_UID = demo_uid("test_part10/instance")
UID_TAGS = (b"\x08\x00\x18\x00", b"\x00\x08\x00\x18")  # (0008,0018), little and big endian
GARBAGE = settings(max_examples=300, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])


def check(data: bytes) -> str:
    """The check on bytes in memory, as on a file whose head holds everything."""
    return whole_instance_uid(data, None, len(data))


def _item(undefined: bool, **values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    item.is_undefined_length_sequence_item = undefined
    return item


def _dataset(*, encapsulated: bool) -> Dataset:
    """An instance with sequences of defined and undefined length nested in items of
    both kinds, long-VR values and pixel data (native, or fragments)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASS
    ds.SOPInstanceUID = SOP_UID
    ds.Modality = "OT"
    inner = _item(False, CodeValue="T-D0050", CodingSchemeDesignator="SRT")
    ds.ReferencedImageSequence = Sequence([
        _item(True, ReferencedSOPClassUID=SOP_CLASS, ReferencedSOPInstanceUID="1.2.3",
              PurposeOfReferenceCodeSequence=Sequence([inner])),
        _item(False, ReferencedSOPClassUID=SOP_CLASS, ReferencedSOPInstanceUID="1.2.4"),
    ])
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence = Sequence([_item(True, CodeValue="T-D3000")])
    ds.ProcedureCodeSequence = Sequence([])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    ds.PatientName = "Cut^Anywhere"
    ds.PatientID = "PART10"
    ds.PatientComments = "a long-VR text value " * 3
    ds.StudyInstanceUID = demo_uid("test_part10/study")
    ds.SeriesInstanceUID = demo_uid("test_part10/series")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if encapsulated:
        ds.NumberOfFrames = 2
        ds.PixelData = encapsulate([b"\xff\xd8frame one\xff\xd9", b"\xff\xd8two\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = bytes(range(16))
        ds["PixelData"].VR = "OB"
    return ds


def _elements(ds: Dataset, little: bool, implicit: bool) -> list[bytes]:
    """Each top-level element of ``ds``, encoded on its own."""
    out = []
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = little, implicit
        write_data_element(fp, elem, ["iso8859"])
        out.append(fp.getvalue())
    return out


def _un_sequence() -> list[bytes]:
    """A private creator and a sequence sent as UN of undefined length, whose content is
    implicit VR little endian (PS3.5 6.2.2): after the pixel data, in group 7FE1."""
    ds = Dataset()
    ds.add_new(0x7FE10010, "LO", "DICOMFS")
    ds.add_new(0x7FE11001, "SQ", Sequence([_item(True, CodeValue="1"), _item(False)]))
    ds[0x7FE11001].is_undefined_length = True
    sequence = _elements(ds, little=True, implicit=True)[1]
    assert sequence[4:8] == b"\xff\xff\xff\xff"
    return [_elements(ds, little=True, implicit=False)[0],
            sequence[:4] + b"UN\0\0" + sequence[4:]]


@dataclass
class Sample:
    name: str
    prefix: bytes  # preamble, prefix and file meta, or nothing
    elements: list[bytes]  # the dataset's top-level elements
    deflated: bool = False

    @property
    def data(self) -> bytes:
        dataset = b"".join(self.elements)
        if self.deflated:
            packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            dataset = packer.compress(dataset) + packer.flush()
        return self.prefix + dataset

    def whole_cuts(self) -> set[int]:
        """The cut offsets that leave a valid object: top-level element boundaries after
        the SOP Instance UID (none when deflated)."""
        if self.deflated:
            return set()
        offsets, offset = set(), len(self.prefix)
        uid_seen = False
        for element in self.elements:
            uid_seen = uid_seen or element[:4] in UID_TAGS
            offset += len(element)
            if uid_seen:
                offsets.add(offset)
        return offsets


def _meta(syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, part10_dataset(SOP_CLASS, SOP_UID, syntax).file_meta)
    return fp.getvalue()


def _part10(syntax: str) -> bytes:
    return b"\0" * 128 + b"DICM" + _meta(syntax)


def _samples() -> list[Sample]:
    native, encapsulated = _dataset(encapsulated=False), _dataset(encapsulated=True)
    explicit_le = _elements(native, little=True, implicit=False)
    return [
        Sample("part10-explicit-le", _part10(ExplicitVRLittleEndian),
               explicit_le + _un_sequence()),
        Sample("part10-implicit-le", _part10(ImplicitVRLittleEndian),
               _elements(native, little=True, implicit=True)),
        Sample("part10-encapsulated", _part10(JPEGBaseline8Bit),
               _elements(encapsulated, little=True, implicit=False)),
        Sample("part10-big-endian", _part10(ExplicitVRBigEndian),
               _elements(native, little=False, implicit=False)),
        Sample("part10-deflated", _part10(DeflatedExplicitVRLittleEndian),
               explicit_le + _un_sequence(), deflated=True),
        Sample("meta-without-preamble", _meta(ExplicitVRLittleEndian), explicit_le),
        Sample("dicm-without-preamble", b"DICM" + _meta(ExplicitVRLittleEndian), explicit_le),
        Sample("raw-implicit-le", b"", _elements(native, little=True, implicit=True)),
        Sample("raw-explicit-le", b"", explicit_le),
        Sample("raw-encapsulated", b"", _elements(encapsulated, little=True, implicit=False)),
        Sample("raw-big-endian", b"", _elements(native, little=False, implicit=False)),
    ]


SAMPLES = _samples()


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_whole_objects_are_accepted_with_their_uid(sample: Sample, tmp_path: Path) -> None:
    data = sample.data
    assert check(data) == SOP_UID
    path = tmp_path / "instance.dcm"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:  # the head in memory may end anywhere: the rest comes from the file
        for head in (0, 1, 131, 132, len(data) // 2, len(data) - 1):
            assert whole_instance_uid(data[:head], fd, len(data)) == SOP_UID
    finally:
        os.close(fd)


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_every_cut_is_refused_but_between_top_level_elements(sample: Sample) -> None:
    data = sample.data
    whole = sample.whole_cuts()
    if not sample.deflated:  # the samples do have such boundaries, and pixel data last
        assert len(whole) > 3 and max(whole) == len(data)
    accepted = []
    for cut in range(len(data)):
        try:
            check(data[:cut])
        except IntegrityError:
            continue
        accepted.append(cut)
    assert set(accepted) == whole - {len(data)}


def test_a_deflated_object_may_end_with_a_pad_byte_or_a_gzip_trailer() -> None:
    sample = next(s for s in SAMPLES if s.deflated)
    data = sample.data
    dataset = b"".join(sample.elements)
    trailer = struct.pack("<II", zlib.crc32(dataset), len(dataset))
    for tail in (b"\0", trailer, trailer + b"\0"):
        assert check(data + tail) == SOP_UID
    wrong = struct.pack("<II", zlib.crc32(dataset) ^ 1, len(dataset))
    for tail in (b"\0\0", b"\x01", wrong, trailer + b"\0\0", b"x" * 4096):
        with pytest.raises(IntegrityError):
            check(data + tail)


def test_a_deflate_bomb_is_walked_in_bounded_memory() -> None:
    """32 MiB of pixel data deflate to 32 KiB; walking them must not hold them."""
    ds = _dataset(encapsulated=False)
    ds.Rows = ds.Columns = 4096
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = bytes(32 << 20)
    sample = Sample("bomb", _part10(DeflatedExplicitVRLittleEndian),
                    _elements(ds, little=True, implicit=False), deflated=True)
    data = sample.data
    del ds, sample
    tracemalloc.start()
    try:
        assert check(data) == SOP_UID
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def _replace(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with the first ``old`` replaced."""
    assert old in data
    return data.replace(old, new, 1)


def test_broken_objects_are_refused() -> None:
    explicit = next(s for s in SAMPLES if s.name == "part10-explicit-le").data
    raw = next(s for s in SAMPLES if s.name == "raw-implicit-le").data
    deflated = next(s for s in SAMPLES if s.deflated)
    uid_at = explicit.index(b"\x08\x00\x18\x00UI") + 8  # the dataset's, not the file meta's
    broken = {
        "invalid UID": explicit[:uid_at] + b"1..2" + explicit[uid_at + 4:],
        "no SOP Instance UID": _replace(explicit, b"\x08\x00\x18\x00UI", b"\x08\x00\x19\x00UI"),
        "bad VR": _replace(explicit, b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00p?"),
        "item at the top level": explicit + b"\xfe\xff\x00\xe0\0\0\0\0",
        "delimiter at the top level": raw + b"\xfe\xff\x0d\xe0\0\0\0\0",
        "element inside a sequence": _replace(
            explicit, b"\xfe\xff\xdd\xe0", b"\x08\x00\x05\x00"),
        "not deflated": deflated.prefix + b"".join(deflated.elements),
        "empty": b"",
        "preamble only": b"\0" * 128 + b"DICM",
        "PNG": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "JSON": b'[{"00080018": {"vr": "UI", "Value": ["1.2.3"]}}]',
        "HTML": b"<html><body>502 Bad Gateway</body></html>\n",
    }
    for what, data in broken.items():
        with pytest.raises(IntegrityError):
            check(data)
            pytest.fail(what)


def test_nesting_is_bounded() -> None:
    """Sequences nested deeper than any real file are refused, not a RecursionError."""
    level = b"\x08\x00\x15\x11SQ\0\0\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    data = _part10(ExplicitVRLittleEndian) + b"\x08\x00\x18\x00UI\x06\x001.2.3\0" + level * 5000
    with pytest.raises(IntegrityError):
        check(data)


@GARBAGE
@given(noise=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\0" * 128 + b"DICM"]))
def test_garbage_is_refused(noise: bytes, prefix: bytes) -> None:
    with pytest.raises(IntegrityError):
        check(prefix + noise)


def test_every_archive_file_is_accepted_whole_and_refused_cut(archive: SampleArchive) -> None:
    """The sample archive, every encoding it holds, read as the cache reads a download;
    cut 1 and 7 bytes short (inside the last element, at least 8 bytes long), refused."""
    for entry in archive.files:
        fd = os.open(archive.path(entry), os.O_RDONLY)
        try:
            head = os.pread(fd, 64 * 1024, 0)
            assert whole_instance_uid(head, fd, entry.size) == entry.sop_uid, entry.path
            for cut in (entry.size - 1, entry.size - 7):
                with pytest.raises(IntegrityError):
                    whole_instance_uid(head[:cut], fd, cut)
                    pytest.fail(f"{entry.path} cut at {cut}")
        finally:
            os.close(fd)
