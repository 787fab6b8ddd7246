"""Readable names (dicomfs.names): safe, bounded, unique, deterministic; /query parsing."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomfs import dicomjson, names
from dicomfs.names import InvalidQuery


def valid_component(name: str) -> bool:
    """What the kernel accepts as one name in a folder."""
    return (bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")
            and len(name.encode("utf-8")) <= names.MAX_BYTES)


def study(**values: Any) -> dicomjson.Dataset:
    """A QIDO-style dataset from keyword arguments named after dicomjson constants."""
    ds: dicomjson.Dataset = {}
    for constant, value in values.items():
        tag = getattr(dicomjson, constant.upper())
        ds[tag] = {"vr": "XX", "Value": [value]} if value is not None else {"vr": "XX"}
    return ds


# -- safe names ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("CT CHEST", "CT CHEST"),
    ("CT/ABDOMEN", "CT-ABDOMEN"),
    ("a\0b", "a b"),
    ("line\nbreak\ttab\r", "line break tab"),
    ("  many   spaces  ", "many spaces"),
    ("\u202eevil\u202c", "evil"),  # a direction override would show another name
    (".hidden", "_hidden"),
    (".", "_"),
    ("..", "_."),
    ("", "_"),
    ("\x01\x02", "_"),
    ("e\u0301", "\u00e9"),  # NFC: one way to spell é
    ("\ud800x", "\ufffdx"),  # an unpaired surrogate cannot be encoded
])
def test_clean(raw: str, expected: str) -> None:
    assert names.safe_name(raw) == expected


def test_placeholders() -> None:
    assert names.safe_name(None, names.NO_NAME) == "(no name)"
    assert names.safe_name("   ", names.NO_DESCRIPTION) == "(no description)"


def test_truncation_keeps_whole_characters_and_the_tail() -> None:
    for char in ("x", "é", "語", "😀"):
        name = names.fit(char * 300, " (ID-1)")
        assert len(name.encode()) <= 255
        assert name.endswith("… (ID-1)")
        assert set(name.removesuffix("… (ID-1)")) == {char}
    # an accent stays with its letter: cut before the pair, never between
    decomposed = "e\u0301" * 200
    kept = names.fit(decomposed).removesuffix(names.ELLIPSIS)
    assert kept == "e\u0301" * (len(kept) // 2)
    assert unicodedata.category(kept[-1]) == "Mn"
    assert names.fit("short", ".dcm") == "short.dcm"


def test_a_tail_longer_than_half_the_room_is_shortened_too() -> None:
    name = names.fit("head", " (" + "i" * 300 + ")")
    assert len(name.encode()) <= 255
    assert name.startswith("head") or name.startswith(names.ELLIPSIS)


@given(st.text())
def test_any_text_gives_one_valid_name(text: str) -> None:
    assert valid_component(names.safe_name(text))


@given(st.text(), st.text(max_size=300), st.text(max_size=30))
def test_composed_names_are_valid(name: str, patient_id: str, description: str) -> None:
    ds = study(patient_name={"Alphabetic": name}, patient_id=patient_id,
               study_description=description, study_date=description)
    for made in (names.patient_folder(ds), names.study_folder(ds),
                 names.dated_study_folder(ds), names.series_folder(ds)):
        assert valid_component(made), made


# -- DICOM values --------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("Doe^Jane", "Doe, Jane"),
    ({"Alphabetic": "Doe^Jane"}, "Doe, Jane"),
    ("Doe^Jane^Q^Dr^Jr", "Doe, Dr Jane Q, Jr"),
    ("Anonymized", "Anonymized"),
    ("^Jane", "Jane"),
    ("^^^^", ""),
    ("", ""),
    (None, ""),
    ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada, Tarou"),
    ({"Alphabetic": "Hong^Gildong", "Ideographic": "洪^吉洞"}, "Hong, Gildong"),
    ({"Ideographic": "洪^吉洞"}, "洪, 吉洞"),  # no alphabetic group: the ideographic one
    ("=山田^太郎", "山田, 太郎"),
    ("Müller/Schmidt^Zoë", "Müller/Schmidt, Zoë"),  # made safe later, by clean()
])
def test_person_name(value: object, expected: str) -> None:
    assert names.person_name(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("20240115", "2024-01-15"),
    ("1997.04.24", "1997-04-24"),  # ACR-NEMA dates still appear
    (" 20240115 ", "2024-01-15"),
    ("20241301", None),
    ("2024", None),
    ("20240101-20241231", None),
    ("", None),
    (None, None),
])
def test_iso_date(value: str | None, expected: str | None) -> None:
    assert names.iso_date(value) == expected


def test_numbers_sort_as_numbers() -> None:
    width = names.number_width([1, 2, 10, 400])
    assert width == 4
    assert sorted(names.number(n, width) for n in (400, 2, 10, 1)) == \
        ["0001", "0002", "0010", "0400"]
    width = names.number_width([1, 12000, None])
    assert [names.number(n, width) for n in (1, 12000)] == ["00001", "12000"]
    assert names.number(None) is None


def test_study_series_and_instance_names() -> None:
    ds = study(patient_name={"Alphabetic": "Doe^Jane"}, patient_id="DFS-0001",
               study_date="20240115", study_description="CT CHEST", series_number=2,
               modality="CT", series_description="Axial 5mm", instance_number=7,
               sop_uid="1.2.3.4")
    assert names.patient_folder(ds) == "Doe, Jane (DFS-0001)"
    assert names.study_folder(ds) == "2024-01-15 CT CHEST"
    assert names.dated_study_folder(ds) == "Doe, Jane (DFS-0001) CT CHEST"
    assert names.series_folder(ds) == "0002 CT Axial 5mm"
    assert names.instance_stem(ds) == "0007"
    empty = study(sop_uid="1.2.3.5")
    assert names.patient_folder(empty) == "(no name) (no ID)"
    assert names.study_folder(empty) == "(no date) (no description)"
    assert names.series_folder(empty) == "(no description)"
    assert names.instance_stem(empty) == "1.2.3.5"  # no number: the UID names it


# -- uniqueness -----------------------------------------------------------------------


def test_unique_names_are_deterministic_and_order_free() -> None:
    wanted = {"1.2.3": ("CT", ""), "1.2.4": ("CT", ""), "1.2.5": ("MR", "")}
    made = names.unique(wanted)
    assert made["1.2.5"] == "MR"
    assert made["1.2.3"] == f"CT [{names.digest('1.2.3')}]"
    assert made["1.2.4"] == f"CT [{names.digest('1.2.4')}]"
    assert names.unique(dict(reversed(wanted.items()))) == made
    # a new entry renames only the one it collides with
    more = names.unique({**wanted, "1.2.6": ("MR", "")})
    assert more["1.2.3"] == made["1.2.3"] and more["1.2.5"] != made["1.2.5"]


def test_unique_suffix_goes_before_the_extension_and_avoids_reserved_names() -> None:
    made = names.unique({"1.1": ("0001", ".dcm"), "1.2": ("0001", ".dcm"),
                         "1.3": ("metadata", ".json")}, reserved={"metadata.json"})
    assert made["1.1"] == f"0001 [{names.digest('1.1')}].dcm"
    assert made["1.3"] == f"metadata [{names.digest('1.3')}].json"


def test_unique_survives_a_name_that_looks_like_a_suffixed_one() -> None:
    tag = names.digest("1.1")
    made = names.unique({"1.1": ("CT", ""), "1.2": ("CT", ""), "1.3": (f"CT [{tag}]", "")})
    assert len(set(made.values())) == 3
    assert made["1.3"] == f"CT [{tag}]"


def test_unique_after_truncation() -> None:
    long = "x" * 400
    made = names.unique({"1.1": (long + "a", ""), "1.2": (long + "b", "")})
    assert len(set(made.values())) == 2
    assert all(valid_component(name) for name in made.values())


@given(st.dictionaries(st.from_regex(r"1\.[0-9]{1,6}", fullmatch=True),
                       st.tuples(st.sampled_from(["CT", "", "x" * 300, "metadata", "."]),
                                 st.sampled_from(["", ".dcm", ".json"])), max_size=30))
def test_unique_property(wanted: dict[str, tuple[str, str]]) -> None:
    made = names.unique({k: (names.clean(stem), ext) for k, (stem, ext) in wanted.items()},
                        reserved={"metadata.json"})
    assert set(made) == set(wanted)
    assert len(set(made.values())) == len(made)
    assert "metadata.json" not in made.values()
    assert all(valid_component(name) for name in made.values())


# -- /query names ------------------------------------------------------------------------


def test_parse_query() -> None:
    assert names.parse_query("PatientID=123&StudyDate=20240101-20241231") == (
        ("PatientID", "123"), ("StudyDate", "20240101-20241231"))
    assert names.parse_query("00100010=Doe^Jane*") == (("PatientName", "Doe^Jane*"),)
    assert names.parse_query("00091001=x") == (("00091001", "x"),)  # private: stays a tag
    assert names.parse_query("PatientName=M%C3%BCller") == (("PatientName", "Müller"),)
    assert names.parse_query("FuzzyMatching=true&PatientName=do") == (
        ("PatientName", "do"), ("fuzzymatching", "true"))


@pytest.mark.parametrize("text", [
    "", "PatientID", "Foo=bar", "patientid=1", "limit=10", "offset=5", "includefield=all",
    "PatientID=1&&StudyDate=2", "PatientID=1&PatientID=2", "PatientID=1&00100020=2",
    "PatientID=%00", "PatientID=a%0Ab", "PatientName=%FF", "0010002=short-tag",
    "PatientID=" + "x" * 300, "&".join(f"{k}=1" for k in list(
        ["PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber",
         "StudyID", "StudyInstanceUID", "ModalitiesInStudy", "ReferringPhysicianName",
         "StudyDescription", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
         "OtherPatientIDs", "InstitutionName", "Modality", "SeriesNumber"])),
])
def test_invalid_queries(text: str) -> None:
    with pytest.raises(InvalidQuery):
        names.parse_query(text)


def test_check_query_for_a_mount_scope() -> None:
    assert names.check_query({"00100020": "123"}.items()) == (("PatientID", "123"),)
    with pytest.raises(InvalidQuery):
        names.check_query({"Nonsense": "1"}.items())
