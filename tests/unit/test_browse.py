"""Browsing for people without a server: concurrent QIDO pages on a capping server, refused
queries remembered, and the --query mount scope, over fake servers and fake archives.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from dicomfs import dicomjson, names
from dicomfs.errors import BadRequest
from dicomfs.tree import Kind, Tree
from tests.support.fakeserver import WARNING_299, qido_pager, serving, study_item


class FakeStore:
    def size(self, key: object) -> int | None:
        return None


class FakeArchive:
    """The part of SampleArchive that study listings use, counting what reaches the server."""

    def __init__(self, studies: list[dicomjson.Dataset]) -> None:
        self.all = studies
        self.store = FakeStore()
        self.asked: list[dict[str, str]] = []

    async def studies(self, query: Mapping[str, str]) -> list[dicomjson.Dataset]:
        self.asked.append(dict(query))
        if "fuzzymatching" in query:
            raise BadRequest("HTTP 400: not a proper value", status=400)
        return [ds for ds in self.all
                if all(dicomjson.text(ds, dicomjson.PATIENT_ID) == v
                       for k, v in query.items() if k == "PatientID")]

    def list_ahead(self, study: str, series: str | None = None) -> None:
        """Listing ahead asks nothing of its own here: only what the tree asks counts."""


def fake_study(uid: str, patient_id: str) -> dicomjson.Dataset:
    return {dicomjson.STUDY_UID: {"vr": "UI", "Value": [uid]},
            dicomjson.PATIENT_ID: {"vr": "LO", "Value": [patient_id]}}


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_concurrent_pages_on_a_capping_server(concurrency: int) -> None:
    """A server that caps pages (with a Warning) puts the walk back on one page at a time."""
    items = [study_item(f"1.2.{i}") for i in range(23)]
    with serving() as fake:
        fake.app = qido_pager(items, cap=4, warn=WARNING_299)
        async with fake.client(page_size=10, page_concurrency=concurrency) as client:
            found = await client.search_studies()
    assert [dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in found] == [
        f"1.2.{i}" for i in range(23)]


async def test_refused_queries_are_remembered() -> None:
    archive = FakeArchive([fake_study("1.1", "A"), fake_study("1.2", "B")])
    tree = Tree(archive)  # type: ignore[arg-type]
    queries = await tree.lookup(1, "query")
    for _ in range(3):
        for name in ("Foo=bar", "fuzzymatching=maybe", "PatientID"):
            with pytest.raises(FileNotFoundError):
                await tree.lookup(queries.inode, name)
    assert archive.asked == [{"fuzzymatching": "maybe"}]
    found = await tree.lookup(queries.inode, "00100020=A")
    assert found.kind is Kind.QUERY
    assert [child.name for child in await tree.children(found.inode)] == ["1.1"]


async def test_scope_reaches_every_study_listing() -> None:
    archive = FakeArchive([fake_study("1.1", "A"), fake_study("1.2", "B")])
    tree = Tree(archive, scope={"00100020": "A"})  # type: ignore[arg-type]
    assert tree.scope == {"PatientID": "A"}
    studies = await tree.lookup(1, "studies")
    assert [child.name for child in await tree.children(studies.inode)] == ["1.1"]
    patients = await tree.lookup(1, "patients")
    assert [child.name for child in await tree.children(patients.inode)] == [
        "(no name) (A)"]
    queries = await tree.lookup(1, "query")
    other = await tree.lookup(queries.inode, "PatientID=B")  # the scope says A
    assert await tree.children(other.inode) == []
    assert {"PatientID": "B"} in archive.asked
    assert all(asked.get("PatientID") in ("A", "B") for asked in archive.asked)


def test_an_invalid_scope_is_refused() -> None:
    with pytest.raises(names.InvalidQuery):
        Tree(FakeArchive([]), scope={"NoSuchKeyword": "1"})  # type: ignore[arg-type]
