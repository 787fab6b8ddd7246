"""Large generated archives (issue 18): tens of thousands of one-instance studies.

Why: views that list the whole server look fine on the sample archive (a dozen studies) and
never open on a PACS. This module makes archives big enough to show it, quickly, and always
the same for a given size, so request counts and listings can be asserted in tests and
benchmarks.

What an archive of ``n`` studies holds (:func:`scale_studies`, deterministic for ``n``):

* one study, one series, one 8x8 instance per study (:func:`tiny_instance`, secondary
  captures labelled CT/MR/CR/US/DX, under 1 KB each);
* study dates over ten years (2015-2024): weekdays busy, weekends quiet, about one weekday in
  ten closed, the whole of :data:`EMPTY_MONTH` empty, so there are days with several studies,
  days with none, and an empty month; :data:`BUSY_DAY` always has studies;
* about ``0.6 n`` patients with ``FAMILY^Given`` names from every letter of the alphabet
  (upper and mixed case, a few non-ASCII family names), skewed so that some have many
  studies; IDs ``P000001``..., unique per patient;
* UIDs ``2.25.<uuid5>`` of ``scale/<n>/...`` names (:func:`demo_uid`), so archives of
  different sizes never share a UID.

Build and load: :func:`build_zip` writes every instance into one ZIP (cached under a folder,
keyed by ``n`` and :data:`SCALE_VERSION`); :func:`load_zip` POSTs that ZIP to Orthanc's REST
``/instances`` (Orthanc 1.10.1 here unpacks it: 20,000 studies in about 30 s).
:func:`scale_orthanc` does both for a private :class:`LocalOrthanc` whose storage folder is
kept and reused, and :func:`copied_scale_orthanc` gives tests a throwaway copy of it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.support.orthanc import LocalOrthanc, OrthancError
from tests.support.sample import _locked, demo_uid
from tests.support.tiny import tiny_instance

#: Bump when the recipe changes: cached ZIPs and Orthanc storage folders are keyed by it.
SCALE_VERSION = 2
TEST_STUDIES = 3000  # the tests' archive: paged listings (page size 1000), sparse days
SEED = 18
FIRST_DAY = dt.date(2015, 1, 1)
LAST_DAY = dt.date(2024, 12, 31)
EMPTY_MONTH = (2017, 8)  # no study at all: an empty month folder
BUSY_DAY = dt.date(2020, 6, 15)  # always has studies (the example day)
READY_MARK = "scale-loaded.json"

#: modality -> study descriptions
MODALITIES = {
    "CT": ("CT CHEST", "CT ABDOMEN PELVIS", "CT HEAD"),
    "MR": ("MR BRAIN", "MR KNEE", "MR SPINE LUMBAR"),
    "CR": ("XR CHEST PA", "XR HAND"),
    "US": ("US ABDOMEN", "US THYROID"),
    "DX": ("DX KNEE", "DX SHOULDER"),
}

#: Family names from every letter, common letters more often (each name is one draw).
FAMILY_NAMES = (
    "Adams", "Allen", "Anderson", "Alvarez", "Baker", "Bailey", "Brown", "Bennett", "Clark",
    "Campbell", "Carter", "Cooper", "Davis", "Diaz", "Dubois", "Edwards", "Evans", "Ellis",
    "Fischer", "Foster", "Garcia", "Green", "Gonzalez", "Hall", "Harris", "Hughes", "Ito",
    "Ibrahim", "Jackson", "Johnson", "Jones", "Kim", "King", "Kowalski", "Lee", "Lewis", "Lopez",
    "Martin", "Miller", "Moore", "Murphy", "Nguyen", "Nelson", "Novak", "Olsen", "Ortiz",
    "Parker", "Perez", "Peterson", "Quinn", "Quintero", "Roberts", "Rossi", "Rodriguez", "Smith",
    "Schmidt", "Scott", "Silva", "Taylor", "Thomas", "Turner", "Ueda", "Underwood", "Vargas",
    "Vasquez", "Walker", "White", "Wilson", "Xu", "Ximenes", "Young", "Yilmaz", "Zhang",
    "Zimmermann", "Müller", "Ødegaard", "Çelik", "Łukasik",
)
GIVEN_NAMES = (
    "Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ines", "James", "Kate",
    "Liam", "Maria", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will",
    "Yara", "Zoe",
)


@dataclass(frozen=True)
class ScaleStudy:
    """One generated study (one series, one instance)."""

    index: int
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date: str  # YYYYMMDD
    patient_id: str
    patient_name: str  # DICOM PN, FAMILY^Given
    modality: str
    description: str


def _open_days(rng: random.Random) -> tuple[list[dt.date], list[float]]:
    """Every day of the ten years with its weight: 0 for closed days and the empty month."""
    days, weights = [], []
    day = FIRST_DAY
    while day <= LAST_DAY:
        if (day.year, day.month) == EMPTY_MONTH:
            weight = 0.0
        elif day.weekday() >= 5:
            weight = 0.15 if rng.random() < 0.5 else 0.0
        else:
            weight = 0.0 if rng.random() < 0.1 else rng.lognormvariate(0.0, 0.6)
        if day == BUSY_DAY:
            weight = max(weight, 1.0)
        days.append(day)
        weights.append(weight)
        day += dt.timedelta(days=1)
    return days, weights


def _patient_name(rng: random.Random) -> str:
    family, given = rng.choice(FAMILY_NAMES), rng.choice(GIVEN_NAMES)
    if rng.random() < 0.5:  # many PACS store names upper case, others as typed
        return f"{family.upper()}^{given.upper()}"
    return f"{family}^{given}"


@cache
def scale_studies(n: int) -> tuple[ScaleStudy, ...]:
    """The ``n`` studies of the archive of size ``n``, sorted by date (deterministic)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    rng = random.Random(f"{SEED}/{SCALE_VERSION}/{n}")
    days, weights = _open_days(rng)
    dates = sorted(rng.choices(days, weights, k=n))
    if BUSY_DAY not in dates:
        dates[len(dates) // 2] = BUSY_DAY
        dates.sort()
    patients = max(1, int(n * 0.6))
    names = [_patient_name(rng) for _ in range(patients)]
    studies = []
    for i, date in enumerate(dates):
        patient = int(patients * rng.random() ** 1.7)  # skewed: low numbers have many studies
        modality = rng.choice(sorted(MODALITIES))
        key = f"scale/{n}/{i}"
        studies.append(ScaleStudy(
            index=i,
            study_uid=demo_uid(f"{key}/study"),
            series_uid=demo_uid(f"{key}/series"),
            sop_uid=demo_uid(f"{key}/instance"),
            study_date=date.strftime("%Y%m%d"),
            patient_id=f"P{patient + 1:06d}",
            patient_name=names[patient],
            modality=modality,
            description=rng.choice(MODALITIES[modality]),
        ))
    return tuple(studies)


def zip_path(root: Path, n: int) -> Path:
    """Where :func:`build_zip` caches the archive of ``n`` studies under ``root``."""
    return Path(root).absolute() / f"scale-v{SCALE_VERSION}-{n}.zip"


def build_zip(root: Path, n: int) -> Path:
    """The ZIP of the ``n``-study archive under ``root``, built unless already there.

    Stored uncompressed (the files are tiny and Orthanc unpacks faster); written next to its
    final name and renamed, so a half-built ZIP is never taken for a cached one.
    """
    dest = zip_path(root, n)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(f".{dest.name}.lock")):
        if dest.exists():
            return dest
        staging = dest.with_name(dest.name + ".building")
        with zipfile.ZipFile(staging, "w", compression=zipfile.ZIP_STORED) as zf:
            for study in scale_studies(n):
                zf.writestr(f"{study.index:07d}.dcm", tiny_instance(
                    study_uid=study.study_uid, series_uid=study.series_uid,
                    sop_uid=study.sop_uid, patient_name=study.patient_name,
                    patient_id=study.patient_id, study_date=study.study_date,
                    study_description=study.description, series_number=1,
                    modality=study.modality, series_description=study.description,
                    instance_number=1))
        staging.rename(dest)
    return dest


def load_zip(orthanc: LocalOrthanc, path: Path) -> float:
    """POST the ZIP to Orthanc's ``/instances``; seconds it took. Raises if any was refused."""
    started = time.monotonic()
    with open(path, "rb") as fh:
        answer = orthanc.client.post(
            "/instances", content=fh.read(), headers={"Content-Type": "application/zip"},
            timeout=3600.0,
        )
    if answer.status_code != 200:
        raise OrthancError(f"Orthanc refused {path}: {answer.status_code} {answer.text[:500]}")
    refused = [item for item in answer.json()
               if item.get("Status") not in ("Success", "AlreadyStored")]
    if refused:
        raise OrthancError(f"Orthanc refused {len(refused)} instances of {path}: {refused[:3]}")
    return time.monotonic() - started


def storage_path(root: Path, n: int) -> Path:
    """The Orthanc storage folder that :func:`scale_orthanc` keeps for ``n`` studies."""
    return Path(root).absolute() / f"orthanc-v{SCALE_VERSION}-{n}"


def _loaded(storage: Path, n: int) -> bool:
    try:
        mark = json.loads((storage / READY_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(mark.get("studies") == n and mark.get("version") == SCALE_VERSION)


def prepare_storage(root: Path, n: int) -> dict[str, float]:
    """Make sure ``root`` holds a loaded Orthanc storage folder for ``n`` studies.

    Returns the seconds spent building the ZIP and loading it (zeros when reused). A storage
    folder without its completion mark (an interrupted load) is wiped and loaded again.
    """
    storage = storage_path(root, n)
    storage.parent.mkdir(parents=True, exist_ok=True)
    with _locked(storage.with_name(f".{storage.name}.lock")):
        if _loaded(storage, n):
            return {"build": 0.0, "load": 0.0}
        shutil.rmtree(storage, ignore_errors=True)
        started = time.monotonic()
        archive = build_zip(root, n)
        built = time.monotonic() - started
        with LocalOrthanc(storage) as orthanc:
            loaded = load_zip(orthanc, archive)
            count = int(orthanc.statistics()["CountStudies"])
        if count != n:
            raise OrthancError(f"Orthanc holds {count} studies after loading {n}")
        (storage / READY_MARK).write_text(
            json.dumps({"studies": n, "version": SCALE_VERSION}), encoding="utf-8")
        return {"build": built, "load": loaded}


@contextlib.contextmanager
def scale_orthanc(root: Path, n: int) -> Iterator[LocalOrthanc]:
    """A private Orthanc serving the ``n``-study archive from its kept storage under ``root``.

    The storage folder outlives the server (loading 20,000 studies takes minutes on a busy
    machine); only one server may use it at a time (see :func:`copied_scale_orthanc`).
    """
    prepare_storage(root, n)
    with LocalOrthanc(storage_path(root, n)) as orthanc:
        yield orthanc


@contextlib.contextmanager
def copied_scale_orthanc(root: Path, n: int, work: Path) -> Iterator[LocalOrthanc]:
    """A private Orthanc on a copy (in ``work``) of the kept ``n``-study storage: for tests,
    which may run side by side and must not share one SQLite index."""
    prepare_storage(root, n)
    copy = Path(work).absolute() / f"orthanc-scale-{n}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(storage_path(root, n), copy)
    with LocalOrthanc(copy) as orthanc:
        yield orthanc
