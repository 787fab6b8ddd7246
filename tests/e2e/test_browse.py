"""Browsing for people: /patients, /dates, /query and the --query mount scope.

Real Orthanc, real mounts. What the folders must hold is taken from the archive's
manifest (decoded by pydicom from the files themselves) or from the server's own QIDO
answer, never from dicomfs.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from dicomfs import dicomjson, names
from dicomfs.client import ClientConfig, DicomwebClient
from tests.support import LocalOrthanc, SampleArchive, demo_uid
from tests.support.tiny import tiny_instance

if TYPE_CHECKING:
    from tests.support.harness import Mount, MountFactory, OrthancFactory


# -- helpers ---------------------------------------------------------------------------


def qido(orthanc: LocalOrthanc, query: str = "") -> list[dict[str, Any]]:
    """The server's own answer to ``GET /studies?<query>``, the query sent as written."""
    answer = httpx.get(f"{orthanc.dicomweb_url}/studies" + (f"?{query}" if query else ""))
    answer.raise_for_status()
    return answer.json() if answer.content else []


def uids(found: Iterable[dict[str, Any]]) -> set[str]:
    return {ds[dicomjson.STUDY_UID]["Value"][0] for ds in found}


def expected_patients(archive: SampleArchive) -> dict[tuple[str, str], set[str]]:
    """(patient name, patient ID) -> their StudyInstanceUIDs, from the manifest alone."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for entry in archive.files:
        name = entry.patient_name if entry.patient_name.strip("^= ") else ""  # "^^^^" is empty
        out[(name, entry.patient_id)].add(entry.study_uid)
    return out


def walk_names(root: Path) -> list[str]:
    """Every path under ``root`` (relative), sorted: a mount's naming in one value."""
    found = []
    for folder, dirs, files in os.walk(root):
        base = Path(folder).relative_to(root)
        found += [str(base / name) for name in dirs + files]
    return sorted(found)


# -- the readable trees ----------------------------------------------------------------------


def test_top_level(mnt: Mount) -> None:
    assert sorted(os.listdir(mnt.path)) == ["dates", "patients", "query", "rendered", "studies"]
    assert os.listdir(mnt.path / "query") == ["README.txt"]
    assert b"PatientID=123" in (mnt.path / "query" / "README.txt").read_bytes()


def test_patients_are_the_archives(mnt: Mount, archive: SampleArchive) -> None:
    """Every patient of the archive, named from what pydicom decoded out of the files
    (each per its SpecificCharacterSet), with exactly its studies."""
    expected = expected_patients(archive)
    folders = mnt.path / "patients"
    listed = os.listdir(folders)
    assert len(listed) == len(expected)
    ids = [patient_id for _name, patient_id in expected]
    for (name, patient_id), studies in expected.items():
        if not patient_id or ids.count(patient_id) > 1:
            continue  # named by the name alone, checked by the cases below
        folder = [f for f in listed if f.endswith(f" ({patient_id})")]
        assert len(folder) == 1, (patient_id, listed)
        words = re.findall(r"\w+", name.split("^")[0])  # the family name, less separators
        assert all(word in folder[0] for word in words), (name, folder)
        assert len(os.listdir(folders / folder[0])) == len(studies), folder


@pytest.mark.parametrize("folder", [
    "Люкceмбypг (SCSRUSS)",  # noqa: RUF001 (ISO_IR 144; the sample has Latin c, e, y, p)
    "Διονυσιος (SCSGREEK)",  # ISO_IR 126
    "قباني, لنزار (SCSARAB)",  # ISO_IR 127
    "שרון, דבורה (SCSHBRW)",  # ISO_IR 138
    "やまだ, たろう (2008-4)",  # ISO 2022 IR 87
    "Yamada, Tarou (H31EXAMPLE)",  # Alphabetic group of a three-group Japanese name
    "ﾔﾏﾀﾞ, ﾀﾛｳ (H32EXAMPLE)",  # ISO 2022 IR 13 half-width katakana
    "김희중 (2008-3)",  # ISO 2022 IR 149
    "Hong, Gildong (I2EXAMPLE)",
    "Wang, XiaoDong (X1EXAMPLE)",  # GB18030 sample
    "Äneas, Rüdiger (SCSGERM)",
    "Buc, Jérôme (SCSFREN)",
    "Müller-Schmidt, Zoë (DFS-0005)",  # UTF-8, with a '/' in the name
])
def test_non_latin_names(mnt: Mount, folder: str) -> None:
    assert folder in os.listdir(mnt.path / "patients")
    assert len(os.listdir(mnt.path / "patients" / folder)) == 1


def test_same_name_other_id_and_empty_names(mnt: Mount) -> None:
    patients = mnt.path / "patients"
    assert sorted(os.listdir(patients / "Doe, Jane (DFS-0001)")) == [
        "2024-01-15 CT CHEST", "2024-06-10 CT CHEST FOLLOW-UP"]
    assert os.listdir(patients / "Doe, Jane (DFS-0003)") == ["2023-09-05 CT SINUS"]
    assert os.listdir(patients / "(no name) (DFS-0004)") == ["2022-03-01 MR KNEE"]
    # no name and no ID: the placeholders; a "^^^^" name is empty too
    assert len(os.listdir(patients / "(no name) (no ID)")) >= 2
    # two anonymised studies without an ID, same name: one folder, as far as QIDO can tell
    assert sorted(os.listdir(patients / "Anonymized (no ID)")) == [
        "1996-10-29 (no description)", "1997-04-24 (no description)"]  # 1997.04.24 on file


def test_patient_tree_down_to_the_files(mnt: Mount, archive: SampleArchive) -> None:
    study = mnt.path / "patients" / "Doe, Jane (DFS-0001)" / "2024-06-10 CT CHEST FOLLOW-UP"
    assert sorted(os.listdir(study)) == ["0001 CT Axial 5mm", "0002 CT Scout", "metadata.json"]
    series = study / "0001 CT Axial 5mm"
    files = archive.series_files(archive.series_uid("followup-ct"))
    assert sorted(os.listdir(series)) == [f"{n:04d}.dcm" for n in range(1, len(files) + 1)] + [
        "metadata.json"]
    ct = (mnt.path / "patients" / "Doe, Jane (DFS-0001)" / "2024-01-15 CT CHEST"
          / "0001 CT Axial 1.25mm")
    assert len([n for n in os.listdir(ct) if n.endswith(".dcm")]) == archive.ct_slices
    assert (ct / "0001.dcm").read_bytes() == archive.read(
        archive.series_files(archive.series_uid("ct"))[0])


def test_twin_files_share_inode_bytes_and_one_download(mnt: Mount, archive: SampleArchive,
                                                       orthanc: LocalOrthanc) -> None:
    entry = archive.series_files(archive.series_uid("mr"))[0]  # instance number 1
    readable = (mnt.path / "patients" / "Smith, John (DFS-0002)" / "2024-02-20 MR BRAIN"
                / "0003 MR T1 axial")
    by_uid = mnt.path / "studies" / entry.study_uid / entry.series_uid
    dated = (mnt.path / "dates" / "2024" / "2024-02" / "2024-02-20"
             / "Smith, John (DFS-0002) MR BRAIN" / "0003 MR T1 axial")
    twins = [readable / "0001.dcm", by_uid / f"{entry.sop_uid}.dcm", dated / "0001.dcm"]
    assert len({path.stat().st_ino for path in twins}) == 1
    assert len({(folder / "metadata.json").stat().st_ino
                for folder in (readable, by_uid, dated)}) == 1
    assert len({folder.stat().st_ino for folder in (readable, by_uid, dated)}) == 3
    assert twins[0].read_bytes() == archive.read(entry)
    mark = orthanc.mark()
    for twin in twins[1:]:
        assert twin.read_bytes() == archive.read(entry)
    assert orthanc.requests_since(mark) == []


def test_tools_read_a_patient_folder(mnt: Mount, archive: SampleArchive) -> None:
    """dcmdump walks /patients without following any link, and reads every file."""
    patient = mnt.path / "patients" / "Smith, John (DFS-0002)"
    result = subprocess.run(["dcmdump", "-q", "+sd", "+r", "+sp", "*.dcm", str(patient)],
                            capture_output=True)
    assert result.returncode == 0, result.stderr[-2000:].decode(errors="replace")
    dumped = result.stdout.count(b"(0008,0018) UI")
    assert dumped == sum(count for uid, count in archive.studies.items()
                         if archive.study_files(uid)[0].patient_id == "DFS-0002")


def test_dates_tree_matches_the_study_dates(mnt: Mount, orthanc: LocalOrthanc) -> None:
    by_day: dict[str, set[str]] = defaultdict(set)
    for ds in qido(orthanc):
        raw = dicomjson.text(ds, dicomjson.STUDY_DATE) or ""
        day = f"{raw[:4]}-{raw[4:6]}-{raw[6:8]}" if raw.isdigit() and len(raw) == 8 else (
            raw.replace(".", "-") if len(raw) == 10 else "unknown")
        by_day[day].add(dicomjson.text(ds, dicomjson.STUDY_UID) or "")
    dates = mnt.path / "dates"
    days = {day for day in by_day if day != "unknown"}
    assert sorted(os.listdir(dates)) == sorted({day[:4] for day in days} | {"unknown"})
    for day in days:
        assert sorted(os.listdir(dates / day[:4])) == sorted(
            {d[:7] for d in days if d.startswith(day[:4])})
        assert len(os.listdir(dates / day[:4] / day[:7] / day)) == len(by_day[day]), day
    assert len(os.listdir(dates / "unknown")) == len(by_day["unknown"])
    day = dates / "2024" / "2024-01" / "2024-01-15"
    assert os.listdir(day) == ["Doe, Jane (DFS-0001) CT CHEST"]
    assert "0001 CT Axial 1.25mm" in os.listdir(day / "Doe, Jane (DFS-0001) CT CHEST")
    assert "Διονυσιος (SCSGREEK) (no description)" in os.listdir(dates / "unknown")


# -- /query ------------------------------------------------------------------------------------

QUERIES = [
    "PatientID=DFS-0001",
    "StudyDate=20240101-20241231",
    "PatientName=Doe*",
    "PatientName=Doe^Jane",
    "00100020=DFS-0003",
    "ModalitiesInStudy=CT,MR",
    "PatientName=Doe*&StudyDate=20240101-20241231",
    "StudyDescription=CT?CHEST*",
    "PatientID=no-such-patient",
]


@pytest.mark.parametrize("query", QUERIES)
def test_query_folder_is_the_servers_answer(mnt: Mount, orthanc: LocalOrthanc,
                                            archive: SampleArchive, query: str) -> None:
    answer = uids(qido(orthanc, query))
    assert set(os.listdir(mnt.path / "query" / query)) == answer
    key, _, value = query.partition("=")
    if key in ("PatientID", "00100020"):  # the manifest's own answer: a hollow QIDO cannot pass
        assert answer == {f.study_uid for f in archive.files if f.patient_id == value}
    else:
        assert answer, "a query case whose answer is empty proves nothing"


def test_query_folders_hold_the_same_files(mnt: Mount, archive: SampleArchive) -> None:
    entry = archive.series_files(archive.series_uid("mr"))[0]
    folder = mnt.path / "query" / "PatientID=DFS-0002"
    assert os.listdir(folder) == [entry.study_uid]
    study = folder / entry.study_uid
    assert sorted(os.listdir(study)) == sorted(os.listdir(mnt.path / "studies" / entry.study_uid))
    path = study / entry.series_uid / f"{entry.sop_uid}.dcm"
    twin = mnt.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
    assert path.stat().st_ino == twin.stat().st_ino
    assert path.read_bytes() == archive.read(entry)
    # a study the query did not find is not there, even by UID
    assert not (folder / archive.study_uid("ct")).exists()


INVALID = ["foo", "Foo=bar", "patientid=DFS-0001", "limit=5", "includefield=all",
           "PatientID=1&PatientID=2", "PatientID=a%00b", "PatientID=1&&StudyDate=2",
           "PatientName=%FF", ".Trash", "desktop.ini", "x" * 255]


def test_invalid_query_names_cost_no_request(mnt: Mount, orthanc: LocalOrthanc) -> None:
    queries = mnt.path / "query"
    mark = orthanc.mark()
    for _ in range(5):
        for name in INVALID:
            assert not os.path.exists(queries / name)
            with pytest.raises(FileNotFoundError):
                os.listdir(queries / name)
    assert orthanc.requests_since(mark) == []
    log = mnt.log()
    assert log.count("/query: refused 'Foo=bar'") == 1
    assert "'Foo' is neither a DICOM keyword nor an 8-hex-digit tag" in log


def test_a_query_the_server_refuses_is_asked_once(mnt: Mount, orthanc: LocalOrthanc) -> None:
    name = "fuzzymatching=maybe"  # well formed, but Orthanc answers 400
    assert httpx.get(f"{orthanc.dicomweb_url}/studies?{name}").status_code == 400
    mark = orthanc.mark()
    for _ in range(20):
        assert not os.path.exists(mnt.path / "query" / name)
    assert orthanc.requests_since(mark) == ["GET /dicom-web/studies"]
    assert mnt.log().count(f"/query: refused {name!r}") == 1


# -- the --query scope --------------------------------------------------------------------------


def test_scope_narrows_every_listing(mount_factory: MountFactory,
                                     orthanc: LocalOrthanc) -> None:
    mount = mount_factory(args=["--query", "PatientName=Doe*", "--query",
                                "StudyDate=20230101-20241231"])
    expected = qido(orthanc, "PatientName=Doe*&StudyDate=20230101-20241231")
    assert len(expected) == 3
    assert set(os.listdir(mount.path / "studies")) == uids(expected)
    assert sorted(os.listdir(mount.path / "patients")) == ["Doe, Jane (DFS-0001)",
                                                           "Doe, Jane (DFS-0003)"]
    assert sorted(os.listdir(mount.path / "dates")) == ["2023", "2024"]
    assert sorted(os.listdir(mount.path / "dates" / "2024")) == ["2024-01", "2024-06"]
    # query folders search within the scope, also on a key the scope sets too
    queries = mount.path / "query"
    assert set(os.listdir(queries / "PatientID=DFS-0001")) == uids(
        qido(orthanc, "PatientID=DFS-0001"))
    assert set(os.listdir(queries / "StudyDate=20240101-20240131")) == uids(
        qido(orthanc, "StudyDate=20240115"))
    assert os.listdir(queries / "StudyDate=20220101-20221231") == []
    assert os.listdir(queries / "PatientID=DFS-0002") == []


def test_scope_by_tag(mount_factory: MountFactory, orthanc: LocalOrthanc,
                      archive: SampleArchive) -> None:
    mount = mount_factory(args=["--query", "00100020=DFS-0002"])
    assert os.listdir(mount.path / "studies") == [archive.study_uid("mr")]
    assert os.listdir(mount.path / "patients") == ["Smith, John (DFS-0002)"]


# -- collisions and awkward values, end to end -----------------------------------------------


def tiny(study: str, series: str, number: int | None, sop: str, **values: Any) -> bytes:
    return tiny_instance(study_uid=demo_uid(f"browse/{study}"),
                         series_uid=demo_uid(f"browse/{study}/{series}"),
                         sop_uid=demo_uid(f"browse/{study}/{series}/{sop}"),
                         instance_number=number, **values)


def awkward_files() -> list[bytes]:
    roe = {"patient_name": "Roe^Richard", "patient_id": "C-1", "study_date": "20200202",
           "study_description": "SAME"}
    axial = {"series_number": 1, "modality": "CT", "series_description": "Axial"}
    return [
        tiny("a", "s1", 1, "i1", **roe, **axial),
        tiny("a", "s1", 1, "i2", **roe, **axial),  # the same instance number twice
        tiny("a", "s1", None, "i3", **roe, **axial),  # no instance number
        tiny("a", "s1", 2, "i4", **roe, **axial),
        tiny("a", "s2", 1, "i1", **roe, **axial),  # the same series name twice
        tiny("a", "s3", 1, "i1", **roe, series_number=3, series_description="T1/T2\nmix"),
        tiny("a", "s4", 1, "i1", **roe, series_number=4, series_description="😀" * 64),
        tiny("b", "s1", 1, "i1", **roe, series_number=1, series_description="one"),
        tiny("c", "s1", 1, "i1", patient_name="Roe^Richard", patient_id="C-2"),
        tiny("d", "s1", 1, "i1", patient_name="Ä" * 30 + "^" + "Ö" * 30, patient_id="C-3",
             study_date="20200303"),
    ]


def suffix(*parts: str) -> str:
    return f" [{names.digest(demo_uid('browse/' + '/'.join(parts)))}]"


def test_collisions_are_unique_and_the_same_on_every_mount(
        mount_factory: MountFactory, orthanc_factory: OrthancFactory) -> None:
    server = orthanc_factory()
    for data in awkward_files():
        server.client.post("/instances", content=data).raise_for_status()
    first = mount_factory(server.dicomweb_url)
    patients = first.path / "patients"
    assert sorted(os.listdir(patients))[:2] == ["Roe, Richard (C-1)", "Roe, Richard (C-2)"]
    roe = patients / "Roe, Richard (C-1)"
    a, b = "2020-02-02 SAME" + suffix("a"), "2020-02-02 SAME" + suffix("b")
    assert sorted(os.listdir(roe)) == sorted([a, b])
    assert sorted(os.listdir(roe / a)) == sorted([
        "0001 CT Axial" + suffix("a", "s1"), "0001 CT Axial" + suffix("a", "s2"),
        "0003 OT T1-T2 mix", "0004 OT " + "😀" * 61 + names.ELLIPSIS, "metadata.json"])
    assert sorted(os.listdir(roe / a / ("0001 CT Axial" + suffix("a", "s1")))) == sorted([
        f"0001{suffix('a', 's1', 'i1')}.dcm", f"0001{suffix('a', 's1', 'i2')}.dcm",
        f"{demo_uid('browse/a/s1/i3')}.dcm", "0002.dcm", "metadata.json"])
    assert os.listdir(patients / "Roe, Richard (C-2)") == ["(no date) (no description)"]
    assert "Roe, Richard (C-2) (no description)" in os.listdir(first.path / "dates" / "unknown")
    day = first.path / "dates" / "2020" / "2020-02" / "2020-02-02"
    assert sorted(os.listdir(day)) == sorted(
        ["Roe, Richard (C-1) SAME" + suffix("a"), "Roe, Richard (C-1) SAME" + suffix("b")])
    (long_name,) = [n for n in os.listdir(patients) if n.endswith(" (C-3)")]
    assert long_name.startswith("Ä" * 30 + ", Ö") and long_name.endswith(names.ELLIPSIS + " (C-3)")
    assert len(long_name.encode()) <= 255
    second = mount_factory(server.dicomweb_url)
    assert walk_names(second.path / "patients") == walk_names(patients)
    assert walk_names(second.path / "dates") == walk_names(first.path / "dates")


# -- listing at scale: speculative concurrent pages ---------------------------------------


async def test_concurrent_pages_find_every_study_once(orthanc: LocalOrthanc) -> None:
    expected = uids(qido(orthanc))
    config = ClientConfig(base_url=orthanc.dicomweb_url, page_size=5, page_concurrency=4)
    async with DicomwebClient(config) as client:
        sent: list[httpx.Request] = []

        async def hook(request: httpx.Request) -> None:
            sent.append(request)

        client._http.event_hooks = {"request": [hook], "response": []}
        found = await client.search_studies()
    got = [dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in found]
    assert len(got) == len(set(got)) == len(expected) and set(got) == expected
    offsets = sorted(int(r.url.params["offset"]) for r in sent)
    assert offsets[:len(expected) // 5 + 1] == list(range(0, len(expected) + 1, 5))
    assert len(offsets) <= len(expected) // 5 + 4  # at most 3 pages past the end
