"""/query: a folder per QIDO search, named by the search itself.

``/query/PatientID=123&StudyDate=20240101-20241231/<Study>/...`` lists what the
search finds (study folders as in /studies), within the mount's scope. A name
that is no valid query does not exist; it is checked here, then by the server.
"""

from __future__ import annotations

import logging

import cachetools

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.errors import BadRequest
from dicomfs.tree.nodes import Kind, Node, Nodes
from dicomfs.tree.scope import Scope
from dicomfs.tree.studies import StudyFolders, study_entries
from dicomfs.tree.view import Entries, View
from dicomfs.uids import is_uid

log = logging.getLogger(__name__)

README = "README.txt"
REFUSED_KEPT = 4096  # refused names remembered
HELP = b"""\
Each folder here is a QIDO-RS search of the server, made when you open it:

    ls '/path/to/mount/query/PatientID=123&StudyDate=20240101-20241231'

lists the matching studies (named by StudyInstanceUID, as in /studies). Keys are
DICOM keywords (PatientName, ModalitiesInStudy, ...) or 8-hex tags, joined by &;
values may use * and ? wildcards and date ranges; fuzzymatching=true is passed on.
A name that is no such query does not exist (see the mount's log for why).
"""


class QueryView(View):
    """/query (its README and the searches made in it) and each search's folder
    (``group`` holds the search)."""

    def __init__(self, nodes: Nodes, scope: Scope, contents: StudyFolders) -> None:
        super().__init__(nodes)
        self.scope = scope
        self.contents = contents
        # Names refused (by us or the server): asked again, they cost nothing.
        self._refused: cachetools.LRUCache[str, bool] = cachetools.LRUCache(REFUSED_KEPT)

    async def lookup(self, folder: Node, name: str) -> Node | None:
        if not folder.group:  # /query itself
            return self._help() if name == README else await self._search(name)
        if not is_uid(name):
            return None
        known = self.nodes.known(self.contents, folder.inode, name)
        if known is not None:
            return known
        found = dicomjson.pick(await self._studies(folder.group), dicomjson.STUDY_UID, name)
        return self.nodes.study(self.contents, folder, found) if found is not None else None

    async def children(self, folder: Node) -> list[Node]:
        return await (await self.entries(folder)).all()

    async def entries(self, folder: Node) -> Entries:
        if not folder.group:
            return Entries([self._help()])
        query = dict(names.parse_query(folder.group))
        return await study_entries(self.contents, folder, await self.scope.follow(query))

    async def _search(self, name: str) -> Node | None:
        """A search's folder, once the search is known good.

        A refused name is remembered and logged once, so that retries (shells,
        file managers) never become a flood of requests.
        """
        if name in self._refused:
            return None
        try:
            await self._studies(name)
        except (names.InvalidQuery, BadRequest) as exc:
            reason = " ".join(str(exc).split())
            # The name may hold a patient's name or ID: only debug logs show it.
            log.warning("/query: a folder name was refused: %s", reason)
            log.debug("/query: refused %r", name)
            self._refused[name] = True
            return None
        return self.nodes.add(self, Kind.FOLDER, (self, name), name, group=name)

    async def _studies(self, text: str) -> list[Dataset]:
        return await self.scope.studies(dict(names.parse_query(text)))

    def _help(self) -> Node:
        return self.nodes.add(self, Kind.TEXT, (Kind.TEXT, README), README, size=len(HELP),
                              exact=True)
