"""Tiny DICOM files (8x8 pixels) with chosen identities, names and numbers.

Why: tests of naming need awkward data the sample archive does not hold (two
studies of one patient on one day with one description, duplicate or missing
instance numbers, very long or control-character descriptions), and the
listing benchmark needs ten thousand studies that upload in seconds. Each file
is a few hundred bytes, built in memory, and deterministic for the same
arguments.
"""

from __future__ import annotations

import io

import pydicom

from tests.support.sample import demo_uid, part10_dataset

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SIZE = 8


def tiny_instance(*, study_uid: str, series_uid: str, sop_uid: str, patient_name: str = "",
                  patient_id: str = "", study_date: str = "", study_description: str = "",
                  series_number: int | None = None, modality: str = "OT",
                  series_description: str = "", instance_number: int | None = None) -> bytes:
    """A Part 10 secondary capture of 8x8 8-bit pixels; ``None`` numbers are left out."""
    ds = part10_dataset(SECONDARY_CAPTURE, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: any name can be written
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyDate = study_date
    ds.StudyTime = "120000" if study_date else ""
    ds.StudyDescription = study_description
    ds.Modality = modality
    ds.SeriesDescription = series_description
    if series_number is not None:
        ds.SeriesNumber = series_number
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIZE
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes((i * 4) % 256 for i in range(SIZE * SIZE))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_dicom(study: str, series: str, sop: str) -> bytes:
    """A small, valid Part 10 secondary-capture instance."""
    ds = part10_dataset("1.2.840.10008.5.1.4.1.1.7", sop)
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Hostile^Server"
    ds.PatientID = "HOSTILE-1"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256))
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def upload_instance(name: str, series: int = 1, number: int = 1) -> tuple[str, str, str, bytes]:
    """(study, series, SOP Instance UID, Part 10 bytes) of a new tiny instance."""
    study = demo_uid(f"upload/{name}")
    series_uid = demo_uid(f"upload/{name}/{series}")
    sop = demo_uid(f"upload/{name}/{series}/{number}")
    return study, series_uid, sop, tiny_instance(study_uid=study, series_uid=series_uid,
                                                 sop_uid=sop, instance_number=number)
