"""The benchmark's data beyond the sample archive, and the (untimed) check of what a read
showed against the originals."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.benchmarks.common import Measure, say
from tests.support.sample import SampleArchive, SampleFile

PARALLEL_SERIES = 8
PARALLEL_SLICES = 48
PARALLEL_NAMESPACE = uuid.UUID("0f4c2a8e-3b7d-5e1f-9a6c-8d2e4b1f7a30")


@dataclass(frozen=True)
class FileRef:
    """A file a mount must show: its size, SHA-256 and the original on local disk."""

    size: int
    sha256: str
    origin: Path


@dataclass(frozen=True)
class SeriesRef:
    """One series (or study) to read: its UIDs and its files by name (``<SOP UID>.dcm``)."""

    study: str
    series: str
    files: dict[str, FileRef]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def middle(self) -> str:
        """The name of the middle file in archive order (the time-to-first-byte file)."""
        return sorted(self.files, key=lambda n: self.files[n].origin)[len(self.files) // 2]


def series_ref(archive: SampleArchive, entries: Sequence[SampleFile], study: str,
               series: str) -> SeriesRef:
    """A :class:`SeriesRef` from archive entries."""
    return SeriesRef(study, series, {f"{f.sop_uid}.dcm": FileRef(f.size, f.sha256,
                                                                 archive.path(f))
                                     for f in entries})


def build_parallel_series(dest: Path) -> list[SeriesRef]:
    """Eight series of 48 512x512 int16 slices (~25 MB each) for the parallel-read row.

    Deterministic (UIDs from uuid5, seeded pixels); reused when ``dest`` already holds them.
    """
    manifest = dest / "manifest.json"

    def refs_of(data: dict[str, Any]) -> list[SeriesRef]:
        return [SeriesRef(s["study"], s["series"], {
            name: FileRef(size, digest, dest / s["series"] / name)
            for name, (size, digest) in s["files"].items()}) for s in data["series"]]

    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        refs = refs_of(data)
        if data.get("slices") == PARALLEL_SLICES and len(refs) == PARALLEL_SERIES and all(
            f.origin.stat().st_size == f.size for r in refs for f in r.files.values()
        ):
            return refs
    import numpy as np

    from tests.support.sample import part10_dataset

    def uid(name: str) -> str:
        return f"2.25.{uuid.uuid5(PARALLEL_NAMESPACE, name).int}"

    shutil.rmtree(dest, ignore_errors=True)
    study = uid("study")
    series_list: list[dict[str, Any]] = []
    for s in range(PARALLEL_SERIES):
        series = uid(f"series/{s}")
        folder = dest / series
        folder.mkdir(parents=True)
        rng = np.random.default_rng(1000 + s)
        files: dict[str, tuple[int, str]] = {}
        for i in range(PARALLEL_SLICES):
            sop = uid(f"instance/{s}/{i}")
            ds = part10_dataset("1.2.840.10008.5.1.4.1.1.2", sop)
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.PatientID = "DFS-BENCH"
            ds.PatientName = "Bench^Parallel"
            ds.StudyDate = "20240301"
            ds.StudyDescription = "BENCH PARALLEL"
            ds.Modality = "CT"
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = f"Parallel {s + 1}"
            ds.InstanceNumber = i + 1
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = 512
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = rng.integers(-1000, 2000, (512, 512), dtype=np.int16).tobytes()
            path = folder / f"{sop}.dcm"
            ds.save_as(path, enforce_file_format=True)
            data_bytes = path.read_bytes()
            files[path.name] = (len(data_bytes), hashlib.sha256(data_bytes).hexdigest())
        series_list.append({"study": study, "series": series, "files": files})
    content = {"slices": PARALLEL_SLICES, "series": series_list}
    manifest.write_text(json.dumps(content), encoding="utf-8")
    return refs_of(content)


def verify_into(measures: Sequence[Measure], folder: Path, ref: SeriesRef,
                read: Collection[str] | None = None) -> None:
    """:func:`check_folder`, a problem recorded against the run of ``measures`` just timed
    (which is kept)."""
    problem = check_folder(folder, ref, read)
    if problem is None:
        return
    for m in measures:
        m.wrong.append(f"run {len(m.values)}: {problem}")
    say(f"WRONG RESULT ({', '.join(m.label for m in measures)}): {problem}")


def first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (the shorter length if none)."""
    step = 4096
    for start in range(0, min(len(a), len(b)), step):
        if a[start:start + step] != b[start:start + step]:
            return next(i for i in range(start, start + step) if a[i:i + 1] != b[i:i + 1])
    return min(len(a), len(b))


def check_folder(folder: Path, ref: SeriesRef, read: Collection[str] | None = None
                 ) -> str | None:
    """None when ``folder`` shows exactly the series' files with their bytes, else what not.

    Untimed, after the timed read: every file (or every name in ``read``) is read again and
    hashed.
    """
    try:
        found = {p.name: p.stat().st_size for p in folder.glob("*.dcm")}
    except OSError as exc:
        return f"listing {folder}: {exc}"
    problems = []
    missing = set(ref.files) - set(found)
    if missing:
        problems.append(f"{len(missing)} of {len(ref.files)} files missing")
    if extra := set(found) - set(ref.files):
        problems.append(f"{len(extra)} unexpected files")
    checked = set(found) & set(ref.files) & set(ref.files if read is None else read)
    # (a file not read yet may show an estimated size: only read files must be exact)
    wrong_size = [n for n in checked if found[n] != ref.files[n].size]
    if wrong_size:
        problems.append(f"{len(wrong_size)} files with the wrong size")
    wrong: list[tuple[str, int]] = []
    for name in sorted(checked):
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            problems.append(f"reading {name}: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() != ref.files[name].sha256:
            wrong.append((name, first_difference(data, ref.files[name].origin.read_bytes())))
    if wrong:
        offsets = sorted({offset for _, offset in wrong})
        problems.append(f"{len(wrong)} of {len(ref.files)} files with wrong bytes (e.g. "
                        f"{ref.files[wrong[0][0]].origin.name}), first difference at offset "
                        f"{', '.join(map(str, offsets[:4]))}")
    return "; ".join(problems) or None

