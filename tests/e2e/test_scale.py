"""The generated large archive (tests/support/scale.py) as the scale tests rely on it.

Why: request-count tests on it assume the server holds exactly what :func:`scale_studies`
describes (a kept storage folder from an older recipe would make them lie), and that the
archive has the shapes the views must handle: busy days, empty days and an empty month,
patients with several studies, names from every letter.
"""

from __future__ import annotations

from collections import Counter

import httpx

from tests.support.orthanc import LocalOrthanc
from tests.support.scale import BUSY_DAY, EMPTY_MONTH, TEST_STUDIES, scale_studies


def qido(server: LocalOrthanc, **params: str) -> list[dict]:
    """Study QIDO straight to Orthanc (wildcards sent as is: Orthanc reads ``%2A`` literally)."""
    query = "&".join(f"{key}={value}" for key, value in params.items())
    answer = httpx.get(f"{server.dicomweb_url}/studies?{query}", timeout=120.0)
    answer.raise_for_status()
    return answer.json() if answer.content else []


def uids(found: list[dict]) -> set[str]:
    return {item["0020000D"]["Value"][0] for item in found}


def test_server_holds_exactly_the_generated_studies(scale_server: LocalOrthanc) -> None:
    served = {
        item["0020000D"]["Value"][0]: (item["00080020"]["Value"][0],
                                       item["00100020"]["Value"][0],
                                       item["00100010"]["Value"][0]["Alphabetic"])
        for item in qido(scale_server)
    }
    assert served == {s.study_uid: (s.study_date, s.patient_id, s.patient_name)
                      for s in scale_studies(TEST_STUDIES)}


def test_dates_have_busy_days_empty_days_and_an_empty_month(scale_server: LocalOrthanc) -> None:
    studies = scale_studies(TEST_STUDIES)
    per_day = Counter(s.study_date for s in studies)
    busy = f"{BUSY_DAY:%Y%m%d}"
    assert uids(qido(scale_server, StudyDate=busy)) == {
        s.study_uid for s in studies if s.study_date == busy}
    assert max(per_day.values()) >= 3
    assert len({d[:4] for d in per_day}) == 10
    year, month = EMPTY_MONTH
    assert qido(scale_server, StudyDate=f"{year}{month:02d}01-{year}{month:02d}31") == []
    assert not any(s.study_date.startswith(f"{year}{month:02d}") for s in studies)


def test_patients_have_several_studies_and_names_from_every_letter(
        scale_server: LocalOrthanc) -> None:
    studies = scale_studies(TEST_STUDIES)
    per_patient = Counter(s.patient_id for s in studies)
    busiest, count = per_patient.most_common(1)[0]
    assert count >= 5
    assert uids(qido(scale_server, PatientID=busiest)) == {
        s.study_uid for s in studies if s.patient_id == busiest}
    initials = {s.patient_name[0].upper() for s in studies}
    assert set("ABCDEFGHIJKLMNOPQRSTUVWXYZ") <= initials
    assert not {s.patient_name[0] for s in studies} <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_generator_is_deterministic() -> None:
    assert scale_studies.__wrapped__(50) == scale_studies(50)
