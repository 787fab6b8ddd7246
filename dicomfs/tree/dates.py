"""/dates: studies by date, named for people.

``/dates/<YYYY>/<YYYY-MM>/<YYYY-MM-DD>/<Time> <Description>/...``.

On a server with few studies (one QIDO page, see ``Listings.few_studies``) every
folder comes from that one listing: only dates with studies show, and
``/dates/unknown`` holds the studies without a usable date. On a larger server,
listing everything would take minutes, so each folder asks only for itself: years
(from 1985, the year of ACR-NEMA, to this one) and months are a fixed calendar, a
month lists the days that have studies with one ``StudyDate`` range query (its first
page; a month busier than a page shows all its days instead), a day its studies with
one query. A day is three requests away whatever the server's size. Studies dated
outside the calendar or not at all are found through /studies and /query there.
"""

from __future__ import annotations

import calendar
import time

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.tree.nodes import Kind, Node, Nodes
from dicomfs.tree.scope import Scope
from dicomfs.tree.studies import NamedStudyFolders, named_studies
from dicomfs.tree.view import LIST_AHEAD_FOLDERS, Grouped, NamedView

FIRST_YEAR = 1985
YEAR, MONTH, DAY = len("YYYY"), len("YYYY-MM"), len("YYYY-MM-DD")
NEXT_LEVEL = {0: YEAR, YEAR: MONTH, MONTH: DAY}
CALENDAR = "calendar"  # what calendar folders' names are made from: nothing that changes


class DatesView(NamedView):
    """/dates and its year, month and day folders (``group`` holds the date prefix)."""

    def __init__(self, nodes: Nodes, scope: Scope, contents: NamedStudyFolders) -> None:
        super().__init__(nodes)
        self.scope = scope
        self.contents = contents
        self._by_day = Grouped(_day)

    async def names(self, folder: Node) -> dict[str, Node]:
        few = await self.scope.few()
        if few is None:
            return await self._by_query(folder)
        by_day = self._by_day(few)
        prefix = folder.group
        if len(prefix) == DAY or prefix == names.UNKNOWN_DATE:
            return self.memo(folder, few, lambda: named_studies(
                self.contents, folder, by_day.get(prefix, []), names.dated_study_folder))
        # /dates holds years (and "unknown"), a year months, a month days.
        size = NEXT_LEVEL[len(prefix)]
        return self.memo(folder, few, lambda: self._folders(
            {day[:size] if day != names.UNKNOWN_DATE else day
             for day in by_day if day.startswith(prefix)}))

    def lists_ahead(self, folder: Node) -> bool:
        return not self.scope.large

    async def list_ahead(self, folder: Node) -> None:
        few = await self.scope.few()
        if few is None or not folder.group:
            return
        below = [ds for day, studies in self._by_day(few).items()
                 if day.startswith(folder.group) for ds in studies]
        for ds in below[:LIST_AHEAD_FOLDERS]:
            self.archive.list_ahead(dicomjson.uid(ds, dicomjson.STUDY_UID) or "")

    async def _by_query(self, folder: Node) -> dict[str, Node]:
        """A large server: a calendar of years and months, a query per month and day."""
        prefix = folder.group
        if prefix == names.UNKNOWN_DATE:  # made while the server was small
            return {}
        if len(prefix) < MONTH:
            return self.memo(folder, CALENDAR, lambda: self._folders(_calendar(prefix)))
        if len(prefix) == MONTH:
            month = await self.scope.few({"StudyDate": _date_range(prefix)})
            if month is None:  # more than a page: its days as a calendar, each asked alone
                return self.memo(folder, CALENDAR, lambda: self._folders(_calendar(prefix)))
            return self.memo(folder, month, lambda: self._folders(
                {day for ds in month if (day := _day(ds)).startswith(prefix)}))
        studies = await self.scope.studies({"StudyDate": _date_range(prefix)})
        return self.memo(folder, studies, lambda: named_studies(
            self.contents, folder, [ds for ds in studies if _day(ds) == prefix],
            names.dated_study_folder))

    def _folders(self, prefixes: set[str]) -> dict[str, Node]:
        return {name: self.nodes.add(self, Kind.FOLDER, (self, name), name, group=name)
                for name in prefixes}


def _day(ds: Dataset) -> str:
    return names.iso_date(dicomjson.text(ds, dicomjson.STUDY_DATE)) or names.UNKNOWN_DATE


def _calendar(prefix: str) -> set[str]:
    """Years up to this one; a year's months, a month's days, none after today."""
    now = time.localtime()
    if not prefix:
        return {str(year) for year in range(FIRST_YEAR, now.tm_year + 1)}
    year = int(prefix[:4])
    if len(prefix) == YEAR:
        last = now.tm_mon if year == now.tm_year else 12
        return {f"{year}-{month:02}" for month in range(1, last + 1)}
    month = int(prefix[5:7])
    last = now.tm_mday if (year, month) == (now.tm_year, now.tm_mon) else \
        calendar.monthrange(year, month)[1]
    return {f"{prefix}-{day:02}" for day in range(1, last + 1)}


def _date_range(prefix: str) -> str:
    """The QIDO StudyDate value of a month (a range) or a day."""
    year, month = int(prefix[:4]), int(prefix[5:7])
    if len(prefix) == DAY:
        return prefix.replace("-", "")
    last = calendar.monthrange(year, month)[1]
    return f"{year}{month:02}01-{year}{month:02}{last:02}"
