"""/dates: studies by date, named for people.

``/dates/<YYYY>/<YYYY-MM>/<YYYY-MM-DD>/<Time> <Description>/...``, and
``/dates/unknown`` for studies without a usable date.
"""

from __future__ import annotations

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.tree.nodes import Kind, Node, Nodes
from dicomfs.tree.scope import Scope
from dicomfs.tree.studies import NamedStudyFolders, named_studies
from dicomfs.tree.view import LIST_AHEAD_FOLDERS, NamedView

DAY = len("YYYY-MM-DD")
NEXT_LEVEL = {0: len("YYYY"), len("YYYY"): len("YYYY-MM"), len("YYYY-MM"): DAY}


class DatesView(NamedView):
    """/dates and its year, month and day folders (``group`` holds the date prefix)."""

    def __init__(self, nodes: Nodes, scope: Scope, contents: NamedStudyFolders) -> None:
        super().__init__(nodes)
        self.scope = scope
        self.contents = contents
        self._grouped: tuple[list[Dataset], dict[str, list[Dataset]]] = ([], {})

    async def names(self, folder: Node) -> dict[str, Node]:
        studies, by_day = await self._by_day()
        prefix = folder.group
        if len(prefix) == DAY or prefix == names.UNKNOWN_DATE:
            return self.memo(folder, studies, lambda: named_studies(
                self.contents, folder, by_day.get(prefix, []), names.dated_study_folder))
        # /dates holds years (and "unknown"), a year months, a month days.
        size = NEXT_LEVEL[len(prefix)]
        folders = {day[:size] if day != names.UNKNOWN_DATE else day
                   for day in by_day if day.startswith(prefix)}
        return self.memo(folder, studies, lambda: {
            name: self.nodes.add(self, Kind.FOLDER, (self, name), name, group=name)
            for name in folders})

    async def list_ahead(self, folder: Node) -> None:
        if folder.group:
            by_day = (await self._by_day())[1]
            below = [ds for day, studies in by_day.items() if day.startswith(folder.group)
                     for ds in studies]
            for ds in below[:LIST_AHEAD_FOLDERS]:
                self.archive.list_ahead(dicomjson.uid(ds, dicomjson.STUDY_UID) or "")

    async def _by_day(self) -> tuple[list[Dataset], dict[str, list[Dataset]]]:
        """The scope's studies by day, grouped again when the listing is new."""
        studies = await self.scope.studies()
        if self._grouped[0] is not studies:
            by_day: dict[str, list[Dataset]] = {}
            for ds in studies:
                day = names.iso_date(dicomjson.text(ds, dicomjson.STUDY_DATE))
                by_day.setdefault(day or names.UNKNOWN_DATE, []).append(ds)
            self._grouped = (studies, by_day)
        return self._grouped
