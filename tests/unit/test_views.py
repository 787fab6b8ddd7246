"""The views' requests, without a server: what each folder of /dates and /patients asks
(small servers: one listing; large ones: only the part a folder shows)."""

from __future__ import annotations

import time

import pytest

from dicomfs.errors import Unreachable
from dicomfs.listings import Arriving
from dicomfs.tree import Entries, Node, Tree
from tests.support.catalog import FakeCatalog, fake_study

STUDIES = [
    fake_study("1.1", "P1", name="Smith^Ann", date="20200615"),
    fake_study("1.2", "P1", name="Smith^Ann", date="20200616"),
    fake_study("1.3", "P2", name="Stone^Bo", date="20200615"),
    fake_study("1.4", "P3", name="Adams^Cy", date="20190101"),
    fake_study("1.5", "P4", name="Brown^Di"),  # no date
]


async def walk(tree: Tree, *names: str) -> Node:
    node = tree.node(1)
    for name in names:
        node = await tree.lookup(node.inode, name)
    return node


async def listed(tree: Tree, *names: str) -> list[str]:
    return [child.name for child in await tree.children((await walk(tree, *names)).inode)]


async def test_a_small_server_shows_dates_and_patients_from_one_listing() -> None:
    catalog = FakeCatalog(STUDIES)
    tree = Tree(catalog)
    assert await listed(tree, "dates") == ["2019", "2020", "unknown"]
    assert await listed(tree, "dates", "2020") == ["2020-06"]
    assert await listed(tree, "dates", "2020", "2020-06") == ["2020-06-15", "2020-06-16"]
    assert len(await listed(tree, "dates", "2020", "2020-06", "2020-06-15")) == 2
    assert len(await listed(tree, "dates", "unknown")) == 1
    assert await listed(tree, "patients") == [
        "Adams, Cy (P3)", "Brown, Di (P4)", "Smith, Ann (P1)", "Stone, Bo (P2)"]
    assert len(await listed(tree, "patients", "Smith, Ann (P1)")) == 2
    assert catalog.asked == [{}] * len(catalog.asked)  # the whole listing, nothing else
    assert catalog.ahead, "a small server's folders are listed ahead for walkers"


async def test_a_large_server_dates_ask_a_month_and_a_day() -> None:
    catalog = FakeCatalog(STUDIES, page_size=4)
    tree = Tree(catalog)
    years = await listed(tree, "dates")
    assert years[0] == "1985" and years[-1] == str(time.localtime().tm_year)
    assert "unknown" not in years
    assert await listed(tree, "dates", "2020") == [f"2020-{m:02}" for m in range(1, 13)]
    probes = len(catalog.asked)
    assert catalog.asked == [{}] * probes  # the calendar costs no query beyond the probe
    assert await listed(tree, "dates", "2020", "2020-06") == ["2020-06-15", "2020-06-16"]
    assert catalog.asked[probes:] == [{"StudyDate": "20200601-20200630"}]
    day = await listed(tree, "dates", "2020", "2020-06", "2020-06-15")
    assert day == ["Smith, Ann (P1) (no description)", "Stone, Bo (P2) (no description)"]
    assert {"StudyDate": "20200615"} in catalog.asked
    assert all(query in ({}, {"StudyDate": "20200601-20200630"}, {"StudyDate": "20200615"})
               for query in catalog.asked)
    assert catalog.ahead == []  # a person browsing a day costs no request per study


async def test_a_large_server_patients_by_initial() -> None:
    catalog = FakeCatalog(STUDIES, page_size=4)
    tree = Tree(catalog)
    initials = await listed(tree, "patients")
    assert initials[0] == "A" and initials[-1] == "Z" and len(initials) == 26
    assert await listed(tree, "patients", "S") == ["Smith, Ann (P1)", "Stone, Bo (P2)"]
    assert {"PatientName": "S*"} in catalog.asked
    asked = len(catalog.asked)
    studies = await listed(tree, "patients", "S", "Smith, Ann (P1)")
    assert studies == ["2020-06-15 (no description)", "2020-06-16 (no description)"]
    assert all(query in ({}, {"PatientName": "S*"}) for query in catalog.asked[asked:])
    assert {"PatientName": "S*"} in catalog.asked and {"PatientName": "A*"} not in catalog.asked
    assert catalog.ahead == []


async def test_busy_folders_show_finer_folders() -> None:
    """A month or an initial with more than a page: its days as a calendar (each asked
    alone), two-letter folders; so every folder is one page away on any server."""
    catalog = FakeCatalog(STUDIES, page_size=3)
    tree = Tree(catalog)
    days = await listed(tree, "dates", "2020", "2020-06")
    assert days == [f"2020-06-{day:02}" for day in range(1, 31)]
    assert len(await listed(tree, "dates", "2020", "2020-06", "2020-06-15")) == 2
    assert {"StudyDate": "20200615"} in catalog.asked
    assert len(await listed(tree, "dates", "2020", "2020-06", "2020-06-01")) == 0
    letters = await listed(tree, "patients", "S")
    assert letters[0] == "SA" and letters[-1] == "S^" and "SZ" in letters
    assert await listed(tree, "patients", "S", "SM") == ["Smith, Ann (P1)"]
    assert len(await listed(tree, "patients", "S", "SM", "Smith, Ann (P1)")) == 2
    assert {"PatientName": "SM*"} in catalog.asked


async def test_the_scope_narrows_large_server_queries() -> None:
    catalog = FakeCatalog(STUDIES, page_size=2)
    tree = Tree(catalog, scope={"PatientID": "P1"})
    assert len(await listed(tree, "dates", "2020", "2020-06", "2020-06-15")) == 1
    assert {"PatientID": "P1", "StudyDate": "20200615"} in catalog.asked
    assert all(query.get("PatientID") == "P1" for query in catalog.asked)


async def test_a_patient_by_path_costs_one_query_for_its_id() -> None:
    """On a large server a patient's folder looked up by path is found by the ID in its
    name, whatever the letters in between would cost to list."""
    catalog = FakeCatalog(STUDIES, page_size=3)
    tree = Tree(catalog)
    await listed(tree, "patients")
    asked = len(catalog.asked)
    studies = await listed(tree, "patients", "S", "Smith, Ann (P1)")
    assert studies == ["2020-06-15 (no description)", "2020-06-16 (no description)"]
    assert {tuple(query.items()) for query in catalog.asked[asked:]} == {(("PatientID", "P1"),)}
    with pytest.raises(FileNotFoundError):  # not under another initial
        await walk(tree, "patients", "A", "Smith, Ann (P1)")
    with pytest.raises(FileNotFoundError):  # the ID and the name must agree
        await walk(tree, "patients", "S", "Smith, Ann (P3)")


async def test_a_listing_that_breaks_midway_is_no_shorter_listing() -> None:
    """The pages that arrived are shown; then the folder's read fails, never ends as if
    the listing were whole."""
    arriving = Arriving()
    arriving.follow()
    arriving.add([fake_study("1.1"), fake_study("1.2")])
    arriving.finish(Unreachable("the server went away"))
    tree = Tree(FakeCatalog([]))
    studies = await walk(tree, "studies")
    entries = Entries([], arriving, lambda ds: tree.nodes.study(tree.root.view, studies, ds))
    assert [node.name for node in await entries.after(0)] == ["1.1", "1.2"]
    with pytest.raises(Unreachable):
        await entries.after(2)
