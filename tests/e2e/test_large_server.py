"""A server too large to list whole (tests/support/scale.py: 3,000 studies, QIDO pages of
1000): each folder of /dates and /patients costs the requests it must and lists exactly
what the same QIDO query finds; study listings show their first page while the rest
arrive, and stop when nobody reads them."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.tree.patients import patient_key
from tests.support.fakes import Forward, Proxy
from tests.support.harness import Mount, MountFactory
from tests.support.orthanc import LocalOrthanc
from tests.support.scale import BUSY_DAY, TEST_STUDIES

DAY = BUSY_DAY.isoformat()  # 2020-06-15
YEAR, MONTH = DAY[:4], DAY[:7]


@pytest.fixture
def large(scale_server: LocalOrthanc, mount_factory: MountFactory
          ) -> Iterator[tuple[Mount, Proxy]]:
    """A fresh mount of the large server through a proxy that sees every request."""
    with Proxy(scale_server.url, lambda request: Forward()) as proxy:
        yield mount_factory(proxy.url("/dicom-web")), proxy


def searches(proxy: Proxy, since: int) -> list[dict[str, str]]:
    """The study searches the server got since ``since``: their query, paging included."""
    return [{k: v for k, v in parse_qsl(urlsplit(r.target).query) if k != "includefield"}
            for r in proxy.seen[since:] if urlsplit(r.target).path.endswith("/studies")]


def qido(server: LocalOrthanc, **query: str) -> list[Dataset]:
    """The same search, straight to the server (wildcards as they are: see QUERY_SAFE)."""
    text = "&".join(f"{key}={value}" for key, value in query.items())
    answer = httpx.get(f"{server.dicomweb_url}/studies?{text}&includefield=00081030",
                       timeout=60.0)
    answer.raise_for_status()
    return answer.json() if answer.content else []


def named(studies: list[Dataset], naming: object) -> list[str]:
    return sorted(names.unique({dicomjson.uid(ds, dicomjson.STUDY_UID) or "": (naming(ds), "")
                                for ds in studies}).values())  # type: ignore[operator]


def test_a_day_costs_three_searches(large: tuple[Mount, Proxy],
                                    scale_server: LocalOrthanc) -> None:
    mount, proxy = large
    dates = mount.path / "dates"
    start = mark = len(proxy.seen)
    years = sorted(os.listdir(dates))
    assert years[0] == "1985" and YEAR in years and "unknown" not in years
    assert searches(proxy, mark) == [{"limit": "1000", "offset": "0"}]  # small or large?
    mark = len(proxy.seen)
    assert sorted(os.listdir(dates / YEAR)) == [f"{YEAR}-{m:02}" for m in range(1, 13)]
    assert proxy.seen[mark:] == []  # a calendar
    days = sorted(os.listdir(dates / YEAR / MONTH))
    assert searches(proxy, mark) == [
        {"StudyDate": f"{YEAR}0601-{YEAR}0630", "limit": "1000", "offset": "0"}]
    month = qido(scale_server, StudyDate=f"{YEAR}0601-{YEAR}0630")
    assert days == sorted({names.iso_date(dicomjson.text(ds, dicomjson.STUDY_DATE))
                           for ds in month})
    mark = len(proxy.seen)
    listed = sorted(os.listdir(dates / YEAR / MONTH / DAY))
    assert searches(proxy, mark) == [
        {"StudyDate": DAY.replace("-", ""), "limit": "1000", "offset": "0"}]
    expected = named(qido(scale_server, StudyDate=DAY.replace("-", "")),
                     names.dated_study_folder)
    assert listed == expected and listed
    assert not any("/series" in r.target for r in proxy.seen[start:])  # nothing listed ahead


def test_a_patient_costs_one_search_by_initial(large: tuple[Mount, Proxy],
                                               scale_server: LocalOrthanc) -> None:
    mount, proxy = large
    patients = mount.path / "patients"
    assert sorted(os.listdir(patients)) == list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    mark = len(proxy.seen)
    listed = sorted(os.listdir(patients / "S"))
    assert searches(proxy, mark) == [{"PatientName": "S*", "limit": "1000", "offset": "0"}]
    found = qido(scale_server, PatientName="S*")
    folders = names.unique({patient_key(ds): (names.patient_folder(ds), "") for ds in found})
    assert listed == sorted(folders.values())
    busiest = Counter(patient_key(ds) for ds in found).most_common(1)[0][0]
    mark = len(proxy.seen)
    studies = sorted(os.listdir(patients / "S" / folders[busiest]))
    assert proxy.seen[mark:] == []  # from the initial's listing
    patient_id = busiest.split("\n")[0]
    mine = [ds for ds in qido(scale_server, PatientID=patient_id) if patient_key(ds) == busiest]
    assert studies == named(mine, names.study_folder) and len(studies) >= 2


def test_a_study_listing_shows_its_first_page_first(large: tuple[Mount, Proxy],
                                                    scale_server: LocalOrthanc) -> None:
    mount, proxy = large
    mark = len(proxy.seen)
    with os.scandir(mount.path / "studies") as entries:
        first = next(entries).name
        # The first page is shown; the walk has not reached the last one.
        offsets = {int(query["offset"]) for query in searches(proxy, mark)}
        assert 0 in offsets and max(offsets) < TEST_STUDIES
    # Closed early, the walk stopped and kept nothing: listing again starts from the first
    # page (a walk still going, or kept whole, would have been joined instead).
    listed = os.listdir(mount.path / "studies")
    assert [query["offset"] for query in searches(proxy, mark)].count("0") == 2
    assert first in listed
    assert len(listed) == len(set(listed)) == TEST_STUDIES
    assert set(listed) == {dicomjson.uid(ds, dicomjson.STUDY_UID)
                           for ds in qido(scale_server, limit="5000")}


def test_small_servers_keep_one_listing(mount_factory: MountFactory,
                                        orthanc: LocalOrthanc) -> None:
    """The sample archive fits one page: /dates comes from that one listing, with only the
    years that have studies, and the undated ones."""
    with Proxy(orthanc.url, lambda request: Forward()) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"))
        mark = len(proxy.seen)
        dates = mount.path / "dates"
        years = sorted(os.listdir(dates))
        for year in years:
            if year != names.UNKNOWN_DATE:
                for month in os.listdir(dates / year):
                    os.listdir(dates / year / month)
        assert searches(proxy, mark) == [{"limit": "1000", "offset": "0"}]
    days = {names.iso_date(dicomjson.text(ds, dicomjson.STUDY_DATE)) for ds in qido(orthanc)}
    assert years == sorted({day[:4] if day else names.UNKNOWN_DATE for day in days})


def test_busy_folders_are_one_page_away(scale_server: LocalOrthanc,
                                        mount_factory: MountFactory) -> None:
    """Pages of 20: the month and the initial fill a page, so they show finer folders
    (every day, two letters) after that one page, and a day is one more search."""
    with Proxy(scale_server.url, lambda request: Forward()) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"), args=["--page-size", "20"])
        month = mount.path / "dates" / YEAR / MONTH
        mark = len(proxy.seen)
        assert sorted(os.listdir(month)) == [f"{MONTH}-{day:02}" for day in range(1, 31)]
        assert searches(proxy, mark) == [
            {"limit": "20", "offset": "0"},
            {"StudyDate": f"{YEAR}0601-{YEAR}0630", "limit": "20", "offset": "0"}]
        mark = len(proxy.seen)
        listed = sorted(os.listdir(month / DAY))
        assert [query["StudyDate"] for query in searches(proxy, mark)] == \
            [DAY.replace("-", "")] * len(searches(proxy, mark))
        assert listed == named(qido(scale_server, StudyDate=DAY.replace("-", "")),
                               names.dated_study_folder)
        letters = sorted(os.listdir(mount.path / "patients" / "S"))
        assert letters == sorted(f"S{letter}" for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ^")
        mark = len(proxy.seen)
        smith = os.listdir(mount.path / "patients" / "S" / "SM")
        assert smith and all(name.upper().startswith("SM") for name in smith)
        assert {query.get("PatientName") for query in searches(proxy, mark)} <= {"SM*"}
        # A patient by path, its letters never listed: one search, by the ID in its name.
        patient = qido(scale_server, PatientName="T*")[0]
        folder = names.patient_folder(patient)
        mark = len(proxy.seen)
        assert named(qido(scale_server, PatientID=dicomjson.text(patient, dicomjson.PATIENT_ID)
                          or ""), names.study_folder) == \
            sorted(os.listdir(mount.path / "patients" / "T" / folder))
        assert searches(proxy, mark) == [{"PatientID": dicomjson.text(
            patient, dicomjson.PATIENT_ID) or "", "limit": "20", "offset": "0"}]
