"""The sample archive every other test trusts (tests/support/sample.py): pinned UIDs, its
contents, a deterministic and idempotent build, and the big instance."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pydicom

from tests.support import SampleArchive, build_archive, demo_uid
from tests.support.sample import build_big_instance, sample_source

CT_SLICES = 400  # what the session archive fixture builds (tests/conftest.py)


# Syntaxes the archive promises to cover (see tests/support/sample.py).
REQUIRED_SYNTAXES = {
    "1.2.840.10008.1.2": "implicit VR little endian",
    "1.2.840.10008.1.2.1": "explicit VR little endian",
    "1.2.840.10008.1.2.2": "explicit VR big endian",
    "1.2.840.10008.1.2.1.99": "deflated",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended",
    "1.2.840.10008.1.2.4.70": "JPEG lossless",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE",
}


def _has_preamble(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def test_uids_are_pinned() -> None:
    """Tests and saved benchmarks may name UIDs: the scheme must never drift."""
    assert demo_uid("series/ct") == "2.25.235833505532505015594041756329344443617"


def test_archive_contents(archive: SampleArchive) -> None:
    ct = archive.with_label("ct")
    assert len(ct) == CT_SLICES
    assert all(f.size > 512 * 512 * 2 for f in ct)
    assert archive.series_uid("ct") == demo_uid("series/ct")
    assert len(archive.with_label("mr")) == 30
    assert len(archive.by_sop) == len(archive.files), "SOPInstanceUIDs must be unique"

    assert len(archive.patients) >= 4
    names = Counter(archive.patients.values())
    assert names["Doe^Jane"] >= 2, "two patients share a name"
    assert "" in names, "one patient has an empty name"
    assert max(archive.studies_per_patient.values()) >= 2
    assert max(archive.series_per_study.values()) >= 2
    assert sum(archive.series.values()) == sum(archive.studies.values()) == len(archive.files)

    syntaxes = {f.transfer_syntax for f in archive.files}
    assert set(REQUIRED_SYNTAXES) <= syntaxes, set(REQUIRED_SYNTAXES) - syntaxes
    assert max(f.number_of_frames for f in archive.files) >= 100
    raw = {f.transfer_syntax for f in archive.files if not _has_preamble(archive.path(f))}
    assert raw == {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}, (
        "raw datasets (no preamble, no file meta) in every encoding they may have")
    assert any(f.origin == "deflated" for f in archive.files)
    russian = archive.with_label("charset/chrRuss.dcm")[0].patient_name
    assert russian and not russian.isascii()


def test_archive_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    first = build_archive(tmp_path / "a", ct_slices=3)
    second = build_archive(tmp_path / "b", ct_slices=3)
    assert first.files == second.files  # same paths, UIDs and sha256: byte-identical files

    stamp = {f.path: (first.root / f.path).stat().st_mtime_ns for f in first.files}
    again = build_archive(tmp_path / "a", ct_slices=3)
    assert again.files == first.files
    assert stamp == {f.path: (first.root / f.path).stat().st_mtime_ns for f in first.files}

    other = build_archive(tmp_path / "a", ct_slices=4)  # other parameters: rebuilt in place
    assert len(other.with_label("ct")) == 4


def test_big_instance_is_deterministic_and_reused(tmp_path: Path) -> None:
    first = build_big_instance(tmp_path / "a", frames=3)
    assert first == build_big_instance(tmp_path / "b", frames=3)  # same UIDs and sha256
    data = (tmp_path / "a" / first.path).read_bytes()
    ds = pydicom.dcmread(tmp_path / "a" / first.path)
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns, ds.BitsAllocated) == (3, 512, 512, 16)
    assert len(ds.PixelData) == 3 * 512 * 512 * 2 and len(data) == first.size
    assert first.number_of_frames == 3 and first.sop_uid == demo_uid("instance/big/0")

    stamp = (tmp_path / "a" / first.path).stat().st_mtime_ns
    assert build_big_instance(tmp_path / "a", frames=3) == first  # reused, not rewritten
    assert (tmp_path / "a" / first.path).stat().st_mtime_ns == stamp
    assert build_big_instance(tmp_path / "a", frames=4).number_of_frames == 4  # rebuilt


def test_copied_samples_are_byte_identical(archive: SampleArchive) -> None:
    copied = [f for f in archive.files if f.origin == "copied" and "/" in f.label]
    assert len(copied) > 30
    for f in copied:
        assert sample_source(f.label).read_bytes() == archive.read(f), f.label
