"""A catalog (what the tree needs from the archive) held in memory, for tree tests
that need no server: it answers study queries from a list and records each one, as
the server would have seen it."""

from __future__ import annotations

from collections.abc import Mapping

from dicomfs import dicomjson, names
from dicomfs.client import Query
from dicomfs.dicomjson import Dataset
from dicomfs.errors import BadRequest
from dicomfs.listings import Arriving
from dicomfs.store import Key, OpenFile


def fake_study(uid: str, patient_id: str = "", *, name: str = "", date: str = "") -> Dataset:
    ds: Dataset = {dicomjson.STUDY_UID: {"vr": "UI", "Value": [uid]},
                   dicomjson.PATIENT_ID: {"vr": "LO", "Value": [patient_id]}}
    if name:
        ds[dicomjson.PATIENT_NAME] = {"vr": "PN", "Value": [{"Alphabetic": name}]}
    if date:
        ds[dicomjson.STUDY_DATE] = {"vr": "DA", "Value": [date]}
    return ds


class FakeCatalog:
    """Studies in memory; ``asked`` holds every study query, ``ahead`` every folder
    listed ahead. More studies than ``page_size`` make it a large server."""

    def __init__(self, studies: list[Dataset], *, page_size: int = 1000) -> None:
        self.all = studies
        self.page_size = page_size
        self.asked: list[dict[str, str]] = []
        self.ahead: list[tuple[str, str | None]] = []
        self.large: set[tuple[tuple[str, str], ...]] = set()  # queries found large

    async def studies(self, query: Query = ()) -> list[Dataset]:
        wanted = dict(query)
        self.asked.append(wanted)
        if "fuzzymatching" in wanted:
            raise BadRequest("HTTP 400: not a proper value", status=400)
        return [ds for ds in self.all if _matches(ds, wanted)]

    async def few_studies(self, query: Query = ()) -> list[Dataset] | None:
        """Like the archive's: one query, and a query found large stays so."""
        key = tuple(sorted(dict(query).items()))
        if key in self.large:
            return None
        found = await self.studies(query)
        if len(found) >= self.page_size:
            self.large.add(key)
            return None
        return found

    async def follow_studies(self, query: Query = ()) -> Arriving:
        return Arriving(await self.studies(query))

    async def series(self, study: str) -> list[Dataset]:
        return []

    async def instances(self, study: str, series: str) -> list[Dataset]:
        return []

    async def find_study(self, study: str) -> Dataset | None:
        return dicomjson.pick(self.all, dicomjson.STUDY_UID, study)

    async def find_series(self, study: str, series: str) -> Dataset | None:
        return None

    async def find_instance(self, study: str, series: str, instance: str) -> Dataset | None:
        return None

    def list_ahead(self, study: str, series: str | None = None) -> None:
        self.ahead.append((study, series))

    def expect(self, study: str, series: str, instance: str) -> None:
        """Nothing to fetch here."""

    def cached_size(self, key: Key) -> int | None:
        return None

    async def instance(self, study: str, series: str, instance: str) -> OpenFile:
        raise FileNotFoundError(instance)

    async def rendered(self, study: str, series: str, instance: str, fmt: str) -> OpenFile:
        raise FileNotFoundError(instance)

    async def metadata(self, study: str, series: str | None = None) -> OpenFile:
        raise FileNotFoundError(study)


def _matches(ds: Dataset, query: Mapping[str, str]) -> bool:
    """QIDO matching of the keys the tree sends: IDs exactly, dates by day or range,
    names by a trailing wildcard, ignoring case."""
    for key, value in query.items():
        if key == "PatientID" and dicomjson.text(ds, dicomjson.PATIENT_ID) != value:
            return False
        if key == "StudyDate":
            date = dicomjson.text(ds, dicomjson.STUDY_DATE) or ""
            first, _, last = value.partition("-")
            if not first <= date <= (last or first):
                return False
        if key == "PatientName":
            name = names.person_name(dicomjson.value(ds, dicomjson.PATIENT_NAME))
            if not name.lower().startswith(value.rstrip("*").lower()):
                return False
    return True
