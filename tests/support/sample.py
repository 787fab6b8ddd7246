"""The sample archive: one deterministic set of DICOM files for tests, the demo and benchmarks.

Why one generator: every test, the demo and the benchmarks must see the same studies, so a
failure in one can be replayed in the others, and byte-identity checks can compare what the
mount serves against a file on disk.

Why deterministic: UIDs come from ``2.25.<uuid5>`` of a fixed name, dates are fixed and pixel
data come from a seeded generator, so a rebuild gives byte-identical files and tests may name
UIDs. The build is skipped when ``dest`` already holds a complete archive of the same recipe.

Contents (see :data:`SERIES` and :data:`PYDICOM_PICKS`):

* generated series: a 512x512 CT of ``ct_slices`` slices (~200 MB at 400) with real geometry,
  a follow-up study with two series for the same patient, a 30-slice MR for another patient,
  a patient whose name duplicates another's, one with an empty name, one with a non-ASCII
  name containing ``/`` (a path separator, which a filesystem must not take literally);
* pydicom's and pydicom-data's sample files in many transfer syntaxes (implicit and explicit
  little endian, explicit big endian, deflated, JPEG baseline/extended/lossless, JPEG-LS
  lossless and near-lossless, JPEG 2000 lossless and lossy, RLE), multi-frame images, SR,
  waveform, RT objects, and the non-ASCII samples of ``pydicom/data/charset_files``;
* raw datasets, with no preamble and no file meta, as legacy systems send them and servers
  store them: implicit VR little endian, explicit VR little endian and big endian;
* a deflated object with nested sequences (see :data:`DEFLATED_PICKS`);
* real multi-study patients: the images under pydicom's DICOMDIR tests.

Sample files are copied byte for byte unless they must change to be storable: variants of one
image that share a SOPInstanceUID get a new one, and files lacking study/series UIDs get them.
Files without a Part 10 header stay without one. Rewrites go through pydicom only for files
that pydicom round-trips exactly, and the pixel data are checked to be unchanged.

Left out (reasons): other encodings of an image already included (same SOPInstanceUID:
``SC_rgb_*`` bit-depth/frame variants, ``*_expb*``, ``emri_small_*``, ``liver_*``,
``rtdose_*``...); unique samples that bring no new transfer syntax or structure
(``OBXXXX1A*``, ``RG3_*``, ``US1_*``, ``SC_rgb_dcmtk_*``, ``examples_*``, the 50-image
``TINY_ALPHA`` series...); files Orthanc rejects: truncated (``MR_truncated``,
``rtplan_truncated``, ``emri_small_jpeg_2k_lossless_too_short``), without any UID
(DICOMDIRs, ``chrSQEncoding*``, ``*priv_SQ``, ``no_meta*``, ``UN_sequence``,
``empty_charset_LEI``, ``meta_missing_tsyntax``, ``JPEGLSNearLossless_*``,
``SC_rgb_jls_lossy_sample``) or unparsable (``SC_rgb_jpeg``); ``bad_sequence.dcm`` (its
"UIDs" are hex strings); ``chrJapMultiExplicitIR6`` (see :data:`CHARSET_SKIPPED`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

#: Bump when the recipe changes in a way the fingerprint cannot see (e.g. pixel synthesis).
ARCHIVE_VERSION = 2
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dicomfs-demo-archive"

#: Namespace of every UID this module makes; never change it, tests may hard-code UIDs.
NAMESPACE = uuid.UUID("6c0b8a3e-4f0e-5b3a-9d1e-0d1c0f5a2e77")
IMPLEMENTATION_VERSION_NAME = "DICOMFS_DEMO_1"

PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def demo_uid(name: str) -> str:
    """A stable UID for ``name``: ``2.25.<int of uuid5(NAMESPACE, name)>`` (at most 44 chars)."""
    return f"2.25.{uuid.uuid5(NAMESPACE, name).int}"


IMPLEMENTATION_CLASS_UID = demo_uid("implementation")


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    """The Part 10 header of one instance, naming this module as its implementation."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def part10_dataset(sop_class: str, sop_uid: str,
                   transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """A dataset of ``sop_uid`` (its SOP class and instance UIDs) whose ``file_meta``
    makes it a Part 10 file."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid, transfer_syntax)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


# --------------------------------------------------------------------------- manifest model


@dataclass(frozen=True)
class SampleFile:
    """One file of the archive, with the identifiers tests look things up by."""

    path: str  # relative to the archive root, POSIX separators
    label: str  # generated series key ("ct", "mr", ...) or "pydicom/<name>", "charset/<name>"
    origin: str  # "generated" | "copied" | "uid-rewritten" | "uids-added" | "deflated"
    patient_id: str
    patient_name: str  # decoded with the file's SpecificCharacterSet; "" when empty or absent
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    number_of_frames: int
    size: int
    sha256: str


@dataclass(frozen=True)
class SampleArchive:
    """The manifest of a built archive: every file and the counts tests compare against."""

    root: Path
    version: int
    fingerprint: str
    ct_slices: int
    files: tuple[SampleFile, ...]

    def path(self, item: SampleFile | str) -> Path:
        """Absolute path of a file, given its entry or its SOPInstanceUID."""
        entry = self.by_sop[item] if isinstance(item, str) else item
        return self.root / entry.path

    def read(self, item: SampleFile | str) -> bytes:
        """The file's bytes (what a byte-identity test compares a served file against)."""
        return self.path(item).read_bytes()

    @cached_property
    def by_sop(self) -> dict[str, SampleFile]:
        return {f.sop_uid: f for f in self.files}

    @cached_property
    def studies(self) -> dict[str, int]:
        """StudyInstanceUID -> number of instances."""
        return dict(Counter(f.study_uid for f in self.files))

    @cached_property
    def series(self) -> dict[str, int]:
        """SeriesInstanceUID -> number of instances."""
        return dict(Counter(f.series_uid for f in self.files))

    @cached_property
    def series_per_study(self) -> dict[str, int]:
        """StudyInstanceUID -> number of series."""
        return dict(
            Counter(study for study, _ in {(f.study_uid, f.series_uid) for f in self.files})
        )

    @cached_property
    def patients(self) -> dict[str, str]:
        """PatientID -> PatientName (the name of its first file)."""
        out: dict[str, str] = {}
        for f in self.files:
            out.setdefault(f.patient_id, f.patient_name)
        return out

    @cached_property
    def studies_per_patient(self) -> dict[str, int]:
        """PatientID -> number of studies."""
        return dict(Counter(p for p, _ in {(f.patient_id, f.study_uid) for f in self.files}))

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def with_label(self, label: str) -> list[SampleFile]:
        """Files of one generated series ("ct") or one sample file ("pydicom/CT_small.dcm")."""
        found = [f for f in self.files if f.label == label]
        if not found:
            raise KeyError(f"no file labelled {label!r} in the archive")
        return found

    def series_uid(self, label: str) -> str:
        """SeriesInstanceUID of a generated series, e.g. ``archive.series_uid("ct")``."""
        return self.with_label(label)[0].series_uid

    def study_uid(self, label: str) -> str:
        """StudyInstanceUID of the study holding a labelled series or file."""
        return self.with_label(label)[0].study_uid

    def series_files(self, series_uid: str) -> list[SampleFile]:
        return [f for f in self.files if f.series_uid == series_uid]

    def study_files(self, study_uid: str) -> list[SampleFile]:
        return [f for f in self.files if f.study_uid == study_uid]

    @classmethod
    def load(cls, root: Path) -> SampleArchive:
        """Read the manifest of an archive built earlier (no completeness check)."""
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        return cls(
            root=root,
            version=data["version"],
            fingerprint=data["fingerprint"],
            ct_slices=data["params"]["ct_slices"],
            files=tuple(SampleFile(**f) for f in data["files"]),
        )


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class _Patient:
    id: str
    name: str
    birth_date: str
    sex: str
    charset: str = "ISO_IR 100"


@dataclass(frozen=True)
class _Series:
    key: str  # label, folder name and UID seed
    patient: _Patient
    study_key: str
    study_date: str
    study_description: str
    accession: str
    series_number: int
    series_description: str
    modality: str  # "CT" | "MR"
    size: int  # rows == columns
    count: int  # 0: the CT, whose count is the ct_slices parameter
    pixel_spacing: float
    thickness: float
    localizer: bool = False


JANE = _Patient("DFS-0001", "Doe^Jane", "19700101", "F")
JOHN = _Patient("DFS-0002", "Smith^John", "19650415", "M")
OTHER_JANE = _Patient("DFS-0003", "Doe^Jane", "19881212", "F")  # same name, other patient
NAMELESS = _Patient("DFS-0004", "", "", "O")
SLASHED = _Patient("DFS-0005", "Müller/Schmidt^Zoë", "19991231", "F", "ISO_IR 192")

SERIES: tuple[_Series, ...] = (
    _Series("ct", JANE, "ct-chest", "20240115", "CT CHEST", "DFSACC001", 1,
            "Axial 1.25mm", "CT", 512, 0, 500 / 512, 1.25),
    _Series("followup-ct", JANE, "ct-followup", "20240610", "CT CHEST FOLLOW-UP", "DFSACC002", 1,
            "Axial 5mm", "CT", 256, 40, 400 / 256, 5.0),
    _Series("followup-scout", JANE, "ct-followup", "20240610", "CT CHEST FOLLOW-UP", "DFSACC002",
            2, "Scout", "CT", 512, 1, 500 / 512, 1.0, localizer=True),
    _Series("mr", JOHN, "mr-brain", "20240220", "MR BRAIN", "DFSACC003", 3,
            "T1 axial", "MR", 256, 30, 240 / 256, 4.0),
    _Series("dup-name", OTHER_JANE, "ct-sinus", "20230905", "CT SINUS", "DFSACC004", 1,
            "Axial 3mm", "CT", 128, 5, 1.5, 3.0),
    _Series("no-name", NAMELESS, "mr-knee", "20220301", "MR KNEE", "DFSACC005", 1,
            "PD sagittal", "MR", 64, 3, 2.0, 4.0),
    _Series("slash-name", SLASHED, "ct-hand", "20210707", "CT HAND", "DFSACC006", 1,
            "Axial", "CT", 64, 2, 1.0, 2.0),
)  # fmt: skip

#: Sample files (names, or globs relative to pydicom's test_files), in order: the first file
#: with a given SOPInstanceUID keeps it, later variants of the same image get a new one.
#: Comments give what each file brings.
PYDICOM_PICKS: tuple[str, ...] = (
    "CT_small.dcm",  # explicit VR LE, CT
    "MR_small.dcm",  # explicit VR LE; the base of the MR_small variants below
    "MR_small_implicit.dcm",  # implicit VR LE
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "ExplVR_BigEnd.dcm",  # explicit VR big endian, US
    "ExplVR_LitEndNoMeta.dcm",  # raw dataset (no preamble, no file meta), explicit VR LE
    "ExplVR_BigEndNoMeta.dcm",  # raw dataset, explicit VR big endian
    "rtstruct.dcm",  # RT structure set, raw dataset, implicit VR
    "OT-PAL-8-face.dcm",  # palette colour, raw dataset, implicit VR (pydicom-data)
    "image_dfl.dcm",  # deflated explicit VR LE
    "JPEG-lossy.dcm",  # JPEG extended (process 2+4)
    "JPEG2000.dcm",  # JPEG 2000 (lossy allowed)
    "693_J2KI.dcm",  # JPEG 2000 lossy CT
    "JPEG-LL.dcm",  # JPEG lossless SV1 (pydicom-data)
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1, 8 bit (pydicom-data)
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, RGB
    "SC_rgb_small_odd.dcm",  # odd rows/columns, explicit VR LE
    "SC_rgb_small_odd_jpeg.dcm",  # odd rows/columns, JPEG baseline
    "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless; has no study/series UIDs: added
    "SC_rgb_rle.dcm",  # RLE, RGB
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, RGB (same image as SC_rgb_rle)
    "rtdose.dcm",  # RT dose, 15 frames, implicit VR
    "rtplan.dcm",  # RT plan, no pixel data
    "test-SR.dcm",  # structured report
    "waveform_ecg.dcm",  # ECG waveform
    "liver.dcm",  # segmentation, multi-frame (pydicom-data)
    "eCT_Supplemental.dcm",  # enhanced CT, multi-frame (pydicom-data)
    "emri_small.dcm",  # MR, 10 frames (pydicom-data)
    "gdcm-US-ALOKA-16.dcm",  # US, implicit VR (pydicom-data)
    "MR2_UNCR.dcm",  # 1024x1024 MR, explicit VR LE (pydicom-data)
    "MR2_J2KR.dcm",  # the same, JPEG 2000 lossless
    "MR2_J2KI.dcm",  # the same, JPEG 2000 lossy
    "RG1_UNCR.dcm",  # 7 MB CR (pydicom-data)
    "RG1_J2KI.dcm",  # the same, JPEG 2000 lossy
    "color3d_jpeg_baseline.dcm",  # 120-frame US, JPEG baseline YBR (pydicom-data)
    # Real multi-study patients (the images under pydicom's DICOMDIR tests): one with a CR
    # study of three series and a CT study, one with a CT study and three MR studies.
    "dicomdirtests/[79]*/*/*",
)

#: Charset samples left out: the chrSQEncoding files hold no UIDs at all (Orthanc refuses
#: them); chrJapMultiExplicitIR6 is chrJapMulti with another charset declaration, shares its
#: SOPInstanceUID, and pydicom does not round-trip its ISO 2022 text, so it cannot be rewritten.
CHARSET_SKIPPED: tuple[str, ...] = (
    "chrSQEncoding.dcm",
    "chrSQEncoding1.dcm",
    "chrJapMultiExplicitIR6.dcm",
)


#: Sample files stored again deflated (new SOPInstanceUID): the only deflated sample of pydicom,
#: ``image_dfl.dcm``, has no sequences (and ends with a gzip trailer), these have nested ones.
DEFLATED_PICKS: tuple[str, ...] = ("rtplan.dcm",)


def _fingerprint(ct_slices: int) -> str:
    """Hash of everything that decides the archive's bytes, so an edited recipe rebuilds."""
    recipe = {
        "version": ARCHIVE_VERSION,
        "ct_slices": ct_slices,
        "series": [asdict(s) for s in SERIES],
        "pydicom": PYDICOM_PICKS,
        "deflated": DEFLATED_PICKS,
        "charset_skipped": CHARSET_SKIPPED,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- public entry


def build_archive(dest: Path, *, ct_slices: int = 400) -> SampleArchive:
    """Write the sample archive into ``dest`` (or reuse it) and return its manifest.

    Idempotent and safe to call from concurrent processes: a lock serialises builders, a
    complete archive of the same recipe is returned at once (after checking every file's
    size), anything else in ``dest`` is replaced. The new archive is written next to ``dest``
    and renamed into place, so ``dest`` never holds a half-built archive.
    """
    if ct_slices < 1:
        raise ValueError("ct_slices must be at least 1")
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(ct_slices)
    with _locked(dest.parent / f".{dest.name}.lock"):
        existing = _load_if_complete(dest, fingerprint)
        if existing is not None:
            return existing
        if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST_NAME).exists():
            raise FileExistsError(f"{dest} exists and is not a sample archive; not replacing it")
        staging = dest.with_name(dest.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        files = [*_write_generated(staging, ct_slices), *_write_samples(staging)]
        _check_identities(files)
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": ARCHIVE_VERSION,
            "fingerprint": fingerprint,
            "params": {"ct_slices": ct_slices},
            "complete": True,
            "files": [asdict(f) for f in files],
        }
        (staging / MANIFEST_NAME).write_text(
            json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        return SampleArchive.load(dest)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_if_complete(dest: Path, fingerprint: str) -> SampleArchive | None:
    """The archive in ``dest`` when it is complete and built from the same recipe, else None."""
    try:
        data = json.loads((dest / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        data.get("format") != MANIFEST_FORMAT
        or data.get("version") != ARCHIVE_VERSION
        or data.get("fingerprint") != fingerprint
        or data.get("complete") is not True
    ):
        return None
    archive = SampleArchive.load(dest)
    for f in archive.files:
        try:
            if (dest / f.path).stat().st_size != f.size:
                return None
        except OSError:
            return None
    return archive


def _check_identities(files: list[SampleFile]) -> None:
    """Fail the build unless Orthanc (and any DICOMweb server) will see one object per UID.

    Orthanc keys patients by PatientID, studies by (PatientID, StudyUID), series and instances
    by the whole chain: a UID reused under another parent would show up twice over DICOMweb.
    """
    sops = Counter(f.sop_uid for f in files)
    if dup := [u for u, n in sops.items() if n > 1]:
        raise AssertionError(f"duplicate SOPInstanceUIDs in the archive: {dup}")
    for child, parent in (("series_uid", "study_uid"), ("study_uid", "patient_id")):
        seen: dict[str, str] = {}
        for f in files:
            key, value = getattr(f, child), getattr(f, parent)
            if seen.setdefault(key, value) != value:
                raise AssertionError(f"{child} {key} under two {parent}s: {seen[key]}, {value}")


def _entry(root: Path, rel: str, label: str, origin: str, data: bytes) -> SampleFile:
    """Write ``data`` to ``root/rel`` and describe it from its own header."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    return SampleFile(
        path=rel,
        label=label,
        origin=origin,
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        transfer_syntax=_transfer_syntax(ds),
        number_of_frames=int(ds.get("NumberOfFrames", 1) or 1),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


#: The big multi-frame instance: 600 frames of 512x512 16-bit (~315 MB), the size of a
#: breast tomosynthesis or enhanced CT object. Bump BIG_VERSION when its recipe changes.
BIG_FRAMES = 600
BIG_VERSION = 1
BIG_NAME = "big.dcm"
BIG_FORMAT = "dicomfs-demo-big-instance"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def build_big_instance(dest: Path, *, frames: int = BIG_FRAMES) -> SampleFile:
    """Write one multi-frame CT of ``frames`` 512x512 frames into ``dest`` (or reuse it).

    Why apart from the archive: at 315 MB it is too big for the archive every test builds;
    the latency benchmark needs it to show that the first bytes of a big object do not wait
    for the whole object. Deterministic like the archive (``demo_uid`` UIDs, frames from the
    CT phantom and its seeded noise, for Jane Doe in a study of its own) and cached the same
    way: reused when ``dest`` holds a file of the same recipe and size, else written next to
    ``dest`` and renamed into place under a lock.
    """
    if frames < 1:
        raise ValueError("frames must be at least 1")
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    recipe = {"format": BIG_FORMAT, "version": BIG_VERSION, "frames": frames}
    with _locked(dest.parent / f".{dest.name}.lock"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads((dest / MANIFEST_NAME).read_text(encoding="utf-8"))
            entry = SampleFile(**data["file"])
            if data["recipe"] == recipe and (dest / entry.path).stat().st_size == entry.size:
                return entry
        staging = dest.with_name(dest.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        entry = _entry(staging, BIG_NAME, "big", "generated", _encode(_big_dataset(frames)))
        manifest = {"recipe": recipe, "file": asdict(entry)}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n",
                                             encoding="utf-8")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
        return entry


def _big_dataset(frames: int) -> Dataset:
    """The big instance: the CT series' slices (phantom and noise) as frames of one object."""
    spec = next(s for s in SERIES if s.key == "ct")
    sop_uid = demo_uid("instance/big/0")
    noise = _noise(spec)
    ds = part10_dataset(ENHANCED_CT_IMAGE_STORAGE, sop_uid)
    ds.SpecificCharacterSet = spec.patient.charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240801"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "100000"
    ds.AccessionNumber = "DFSACC007"
    ds.Modality = "CT"
    ds.Manufacturer = "dicomfs demo"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT BIG MULTI-FRAME"
    ds.SeriesDescription = f"Multi-frame {frames} frames"
    ds.PatientName = spec.patient.name
    ds.PatientID = spec.patient.id
    ds.PatientBirthDate = spec.patient.birth_date
    ds.PatientSex = spec.patient.sex
    ds.StudyInstanceUID = demo_uid("study/big")
    ds.SeriesInstanceUID = demo_uid("series/big")
    ds.StudyID = "007"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = spec.size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    pixels = bytearray()
    for i in range(frames):
        image = _phantom("CT", spec.size, i / max(frames - 1, 1))
        shifted = np.roll(noise, ((i * 37) % spec.size, (i * 91) % spec.size), axis=(0, 1))
        pixels += (image + 1024 + shifted).astype("<i2").tobytes()
    ds.PixelData = bytes(pixels)
    return ds


# --------------------------------------------------------------------------- generated series


def _write_generated(root: Path, ct_slices: int) -> list[SampleFile]:
    out: list[SampleFile] = []
    for spec in SERIES:
        count = spec.count or ct_slices
        noise = _noise(spec)
        for i in range(count):
            data = _encode(_instance(spec, i, count, noise))
            rel = f"generated/{spec.key}/{i + 1:04d}.dcm"
            out.append(_entry(root, rel, spec.key, "generated", data))
    return out


def _noise(spec: _Series) -> np.ndarray:
    """A fixed noise field per series; slices take shifted copies (cheap, still varied)."""
    seed = uuid.uuid5(NAMESPACE, f"noise/{spec.key}").int & 0xFFFFFFFF
    rng = np.random.default_rng(seed)
    sigma = 12.0 if spec.modality == "CT" else 20.0
    return np.rint(rng.normal(0.0, sigma, (spec.size, spec.size))).astype(np.int16)


def _phantom(modality: str, size: int, z: float) -> np.ndarray:
    """A crude body section at relative height ``z`` in [0, 1]: CT in HU, MR in signal units."""
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0

    bulge = float(np.sin(np.pi * (0.15 + 0.7 * z)))
    if modality == "CT":
        img = np.full((size, size), -1000, dtype=np.int16)
        img[ellipse(0, 0, 0.85, 0.62)] = 40
        for cx in (-0.4, 0.4):
            img[ellipse(cx, -0.05, 0.26, 0.38 * bulge + 0.05)] = -850
        img[ellipse(-0.08, 0.05, 0.2, 0.17) & (abs(z - 0.6) < 0.2)] = 50
        img[ellipse(0, 0.45, 0.09, 0.09)] = 700
        lesion = 0.1**2 - (z - 0.55) ** 2 * 4
        if lesion > 0:
            img[ellipse(0.38, 0.0, lesion**0.5, lesion**0.5)] = 60
        return img
    img = np.zeros((size, size), dtype=np.int16)
    img[ellipse(0, 0, 0.78, 0.9 * bulge + 0.05)] = 300
    img[ellipse(0, 0, 0.7, 0.82 * bulge)] = 900
    img[ellipse(0, 0, 0.12, 0.3 * bulge) & (abs(z - 0.5) < 0.25)] = 150
    return img


def _instance(spec: _Series, i: int, count: int, noise: np.ndarray) -> Dataset:
    """One slice of a generated series, with the geometry volume readers need."""
    study_uid = demo_uid(f"study/{spec.study_key}")
    sop_class = CT_IMAGE_STORAGE if spec.modality == "CT" else MR_IMAGE_STORAGE
    sop_uid = demo_uid(f"instance/{spec.key}/{i}")
    z = -0.5 * (count - 1) * spec.thickness + i * spec.thickness
    half = spec.size * spec.pixel_spacing / 2.0
    hours = 9 + spec.series_number

    ds = part10_dataset(sop_class, sop_uid)
    ds.SpecificCharacterSet = spec.patient.charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if spec.localizer else "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date
    ds.StudyTime = "090000"
    ds.SeriesTime = ds.ContentTime = f"{hours:02d}{i // 60 % 60:02d}{i % 60:02d}"
    ds.AccessionNumber = spec.accession
    ds.Modality = spec.modality
    ds.Manufacturer = "dicomfs demo"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient.name
    ds.PatientID = spec.patient.id
    ds.PatientBirthDate = spec.patient.birth_date
    ds.PatientSex = spec.patient.sex
    ds.SliceThickness = f"{spec.thickness:g}"
    if spec.modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.MagneticFieldStrength = "1.5"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = demo_uid(f"series/{spec.key}")
    ds.StudyID = spec.accession[-3:]
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = i + 1
    ds.ImagePositionPatient = [f"{-half:.4f}", f"{-half:.4f}", f"{z:.4f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = demo_uid(f"frame/{spec.study_key}")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.4f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = spec.size
    ds.PixelSpacing = [f"{spec.pixel_spacing:.6f}", f"{spec.pixel_spacing:.6f}"]
    ds.BitsAllocated = 16
    rel = i / max(count - 1, 1)
    image = _phantom(spec.modality, spec.size, 0.5 if spec.localizer else rel)
    shifted = np.roll(noise, ((i * 37) % spec.size, (i * 91) % spec.size), axis=(0, 1))
    if spec.modality == "CT":
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        pixels = (image + 1024 + shifted).astype("<i2")
    else:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = "600", "1200"
        pixels = np.clip(image + shifted, 0, 4095).astype("<u2")
    ds.PixelData = pixels.tobytes()
    return ds


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- sample files


def sample_source(label: str) -> Path:
    """The pydicom file a sample's label names, e.g. ``"pydicom/CT_small.dcm"``, or
    ``"deflated/rtplan.dcm"`` (the file it was made from)."""
    kind, name = label.split("/", 1)
    if kind == "charset":
        return Path(get_charset_files(name)[0])
    if "/" in name:
        return PYDICOM_TEST_FILES / name
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        raise FileNotFoundError(
            f"pydicom sample {name!r} not found; is the pydicom-data package installed?"
        )
    return Path(found)


def _sample_labels() -> list[str]:
    """Labels of every sample file to include, in archive order."""
    labels: list[str] = []
    for pick in PYDICOM_PICKS:
        if "*" in pick:
            matches = sorted(PYDICOM_TEST_FILES.glob(pick))
            if not matches:
                raise FileNotFoundError(f"no pydicom sample matches {pick!r}")
            labels += [f"pydicom/{m.relative_to(PYDICOM_TEST_FILES).as_posix()}" for m in matches]
        else:
            labels.append(f"pydicom/{pick}")
    labels += [f"deflated/{pick}" for pick in DEFLATED_PICKS]
    for found in sorted(get_charset_files("*.dcm"), key=lambda p: Path(p).name):
        name = Path(found).name
        if name not in CHARSET_SKIPPED:
            labels.append(f"charset/{name}")
    return labels


def _write_samples(root: Path) -> list[SampleFile]:
    out: list[SampleFile] = []
    seen: set[str] = set()
    for label in _sample_labels():
        raw = sample_source(label).read_bytes()
        if label.startswith("deflated/"):
            data, origin = _deflated(label, raw), "deflated"
        else:
            data, origin = _storable(label, raw, seen)
        rel = label if Path(label).suffix == ".dcm" else label + ".dcm"
        entry = _entry(root, rel, label, origin, data)
        seen.add(entry.sop_uid)
        out.append(entry)
    return out


def _storable(label: str, raw: bytes, seen_sops: set[str]) -> tuple[bytes, str]:
    """The bytes to store for a sample file and how they differ from the original."""
    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if k not in ds]
    clash = str(ds.SOPInstanceUID) in seen_sops
    if not missing and not clash:
        return raw, "copied"

    buf = io.BytesIO()
    ds.save_as(buf)
    if buf.getvalue() != raw:
        raise AssertionError(f"{label}: pydicom does not round-trip it, refusing to rewrite")
    if clash:
        ds.SOPInstanceUID = demo_uid(f"sample/{label}")
        if ds.file_meta:  # a raw dataset stays without file meta
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        origin = "uid-rewritten"
    else:
        origin = "uids-added"
    for keyword in missing:
        setattr(ds, keyword, demo_uid(f"sample/{label}/{keyword}"))
    if missing and "PatientID" not in ds:  # a new study: not under an anonymous patient
        ds.PatientID = "DFS-SAMPLES"
        ds.PatientName = "Samples^Pydicom"
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    _check_same_pixels(label, raw, data)
    return data, origin


def _check_same_pixels(label: str, before: bytes, after: bytes) -> None:
    old = pydicom.dcmread(io.BytesIO(before), force=True).get("PixelData")
    new = pydicom.dcmread(io.BytesIO(after), force=True).get("PixelData")
    if old != new:
        raise AssertionError(f"{label}: pixel data changed while rewriting UIDs")


def _deflated(label: str, raw: bytes) -> bytes:
    """A sample stored again in Deflated Explicit VR Little Endian, as a new instance, with
    every sequence and item of undefined length (the delimiters are in the deflate stream)."""
    ds = pydicom.dcmread(io.BytesIO(raw))

    def undefined(_: Dataset, elem: DataElement) -> None:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True

    ds.walk(undefined)
    ds.SOPInstanceUID = demo_uid(f"sample/{label}")
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian)
    return _encode(ds)


def _transfer_syntax(ds: Dataset) -> str:
    """The transfer syntax of a file: from its file meta, else from how pydicom read it."""
    if "TransferSyntaxUID" in ds.file_meta:
        return str(ds.file_meta.TransferSyntaxUID)
    implicit, little = ds.original_encoding
    return {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }[(bool(implicit), bool(little))]
