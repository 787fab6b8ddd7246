"""Browsing for people without a server: concurrent QIDO pages on a capping server, refused
queries remembered, and the --query mount scope, over fake servers and fake archives.
"""

from __future__ import annotations

import pytest

from dicomfs import dicomjson, names
from dicomfs.tree import Kind, Tree
from tests.support.catalog import FakeCatalog, fake_study
from tests.support.fakeserver import WARNING_299, qido_pager, serving, study_item


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
    archive = FakeCatalog([fake_study("1.1", "A"), fake_study("1.2", "B")])
    tree = Tree(archive)
    queries = await tree.lookup(1, "query")
    for _ in range(3):
        for name in ("Foo=bar", "fuzzymatching=maybe", "PatientID"):
            with pytest.raises(FileNotFoundError):
                await tree.lookup(queries.inode, name)
    assert archive.asked == [{"fuzzymatching": "maybe"}]
    found = await tree.lookup(queries.inode, "00100020=A")
    assert found.kind is Kind.FOLDER and found.group == "00100020=A"
    assert [child.name for child in await tree.children(found.inode)] == ["1.1"]


async def test_scope_reaches_every_study_listing() -> None:
    archive = FakeCatalog([fake_study("1.1", "A"), fake_study("1.2", "B")])
    tree = Tree(archive, scope={"00100020": "A"})
    assert tree.scope.query == {"PatientID": "A"}
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
        Tree(FakeCatalog([]), scope={"NoSuchKeyword": "1"})
