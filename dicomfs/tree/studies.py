"""/studies: every study in the scope, by UID, and what is in a study folder.

``/studies/<Study>/<Series>/<Instance>.dcm``, with ``metadata.json`` beside the
series and the instances. The same study folders, named for people, show below
/patients and /dates (:class:`NamedStudyFolders`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.errors import DicomfsError
from dicomfs.listings import Arriving
from dicomfs.tree.nodes import METADATA, Kind, Node, Nodes
from dicomfs.tree.scope import Scope
from dicomfs.tree.view import Entries, NamedView, View
from dicomfs.uids import is_uid


class StudyFolders(View):
    """A study's series and a series' files, named by UID, each with its metadata.json."""

    formats: tuple[str, ...] = ("dcm",)

    def metadata(self, folder: Node) -> list[Node]:
        return self.nodes.metadata(self, folder)

    async def lookup(self, folder: Node, name: str) -> Node | None:
        if name == METADATA:
            return next(iter(self.metadata(folder)), None)
        if not folder.series:
            return await self._series(folder, name) if is_uid(name) else None
        return await self._file(folder, name)

    async def children(self, folder: Node) -> list[Node]:
        if not folder.series:
            found = await self.archive.series(folder.study)
            return [*self.metadata(folder),
                    *(self.nodes.series(self, folder, ds)
                      for ds in dicomjson.sorted_by_uid(found, dicomjson.SERIES_UID))]
        found = await self.archive.instances(folder.study, folder.series)
        return [*self.metadata(folder),
                *self.nodes.files(self, folder, found, formats=self.formats)]

    async def _series(self, folder: Node, uid: str) -> Node | None:
        known = self.nodes.known(self, folder.inode, uid)
        if known is not None:
            return known
        found = await self.archive.find_series(folder.study, uid)
        return self.nodes.series(self, folder, found) if found is not None else None

    async def _file(self, folder: Node, name: str) -> Node | None:
        stem, dot, fmt = name.rpartition(".")
        if not dot or fmt not in self.formats or not is_uid(stem):
            return None
        kind = Kind.INSTANCE if fmt == "dcm" else Kind.RENDERED
        known = self.nodes.known(kind, folder.series, stem, fmt)
        if known is not None:
            return known
        if kind is Kind.INSTANCE:  # most likely opened next: on its way meanwhile
            self.archive.expect(folder.study, folder.series, stem)
        # One QIDO match by UID, not the listing of a series that may hold thousands.
        found = await self.archive.find_instance(folder.study, folder.series, stem)
        if found is None:
            return None
        return next(node for node in self.nodes.files(self, folder, [found],
                                                      formats=self.formats)
                    if node.name == name)


class NamedStudyFolders(NamedView):
    """A study's series and a series' files named for people: ``<number> <description>``
    folders and ``<number>.dcm`` files (see names.py), each with its metadata.json."""

    async def names(self, folder: Node) -> dict[str, Node]:
        if not folder.series:
            series = await self.archive.series(folder.study)
            return self.memo(folder, series, lambda: self._name_series(folder, series))
        found = await self.archive.instances(folder.study, folder.series)
        return self.memo(folder, found, lambda: self._name_files(folder, found))

    def _name_series(self, folder: Node, found: list[Dataset]) -> dict[str, Node]:
        unique = _numbered(found, dicomjson.SERIES_NUMBER, dicomjson.SERIES_UID,
                           lambda ds, width: (names.series_folder(ds, width), ""))
        children = {node.name: node for node in self.nodes.metadata(self, folder)}
        for ds in found:
            name = unique[_uid(ds, dicomjson.SERIES_UID)]
            children[name] = self.nodes.series(self, folder, ds, name=name)
        return children

    def _name_files(self, folder: Node, found: list[Dataset]) -> dict[str, Node]:
        unique = _numbered(found, dicomjson.INSTANCE_NUMBER, dicomjson.SOP_UID,
                           lambda ds, width: (names.instance_stem(ds, width), ".dcm"))
        children = {node.name: node for node in self.nodes.metadata(self, folder)}
        children.update((unique[node.instance], node)
                        for node in self.nodes.files(self, folder, found))
        return children


def _numbered(found: list[Dataset], number: str, uid: str,
              naming: Callable[[Dataset, int], tuple[str, str]]) -> dict[str, str]:
    """UID -> a name made from the number (as wide as the folder's largest), unique in
    the folder and never metadata.json."""
    width = names.number_width(dicomjson.integer(ds, number) for ds in found)
    return names.unique({_uid(ds, uid): naming(ds, width) for ds in found},
                        reserved={METADATA})


def named_studies(contents: NamedStudyFolders, folder: Node, studies: list[Dataset],
                  naming: Callable[[Dataset], str]) -> dict[str, Node]:
    """Study folders named for people (``naming``), in a patient or date folder."""
    unique = names.unique({_uid(ds, dicomjson.STUDY_UID): (naming(ds), "") for ds in studies})
    children: dict[str, Node] = {}
    for ds in studies:
        name = unique[_uid(ds, dicomjson.STUDY_UID)]
        children[name] = contents.nodes.study(contents, folder, ds, name=name)
    return children


async def study_entries(contents: StudyFolders, folder: Node, arriving: Arriving
                        ) -> Entries:
    """Study folders (by UID) of a study listing: sorted when it is at hand, else
    in the server's order as it arrives."""
    def make(ds: Dataset) -> Node:
        return contents.nodes.study(contents, folder, ds)

    if not arriving.done:
        return Entries([], arriving, make)
    try:
        found = await arriving.complete()
    finally:
        arriving.leave()
    return Entries([make(ds) for ds in dicomjson.sorted_by_uid(found, dicomjson.STUDY_UID)])


class StudiesView(View):
    """/studies (and /rendered): the scope's studies by UID, also a study the
    server's listing cap (or the scope) leaves out, found by its UID."""

    def __init__(self, nodes: Nodes, scope: Scope, contents: StudyFolders) -> None:
        super().__init__(nodes)
        self.scope = scope
        self.contents = contents

    async def lookup(self, folder: Node, name: str) -> Node | None:
        if not is_uid(name):
            return None
        known = self.nodes.known(self.contents, folder.inode, name)
        if known is not None:
            return known
        async with trio.open_nursery() as nursery:
            # The next lookup (a series of it) is answered by its listing, fetched
            # meanwhile: a path opens in one round trip per two levels.
            nursery.start_soon(self._series_quietly, name)
            study = await self.archive.find_study(name)
        return self.nodes.study(self.contents, folder, study) if study is not None else None

    async def children(self, folder: Node) -> list[Node]:
        return await (await self.entries(folder)).all()

    async def entries(self, folder: Node) -> Entries:
        return await study_entries(self.contents, folder, await self.scope.follow())

    async def _series_quietly(self, study: str) -> None:
        with contextlib.suppress(DicomfsError):  # the series lookup asks again, and says
            await self.archive.series(study)


def _uid(ds: Dataset, tag: str) -> str:
    return dicomjson.uid(ds, tag) or ""
