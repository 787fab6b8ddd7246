"""/patients: a folder per patient, named for people, holding that patient's studies.

``/patients/<Name> (<ID>)/<Date> <Description>/<Series>/<Number>.dcm`` (see names.py).
A patient is who QIDO says a study belongs to: the same ID and the same name.

On a server with few studies (one QIDO page, see ``Listings.few_studies``) the
patients come from that one listing. On a larger one, listing everything to show
one patient would take minutes: /patients then holds a folder per initial, ``A`` to
``Z``, each listing the patients whose family name starts with it (one
``PatientName=S*`` query, case-insensitive on most servers); an initial with more
studies than a page holds a folder per two letters (``SA`` to ``SZ``, and ``S^`` for a
family name of one letter), and so on, so that every folder is one page away; a family
name more common than a page goes on into the given name (``MARTIN^``, ``MARTIN^I``).
A patient's folder comes from its letters' listing. Names that start otherwise are
found through /query there.
"""

from __future__ import annotations

import string

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.tree.nodes import Kind, Node, Nodes
from dicomfs.tree.scope import Scope
from dicomfs.tree.studies import NamedStudyFolders, named_studies
from dicomfs.tree.view import LIST_AHEAD_FOLDERS, Grouped, NamedView

LETTERS = string.ascii_uppercase
NEXT = LETTERS + "^"  # after the first letter: the family name may end (``MARTIN^``)


class PatientsView(NamedView):
    """/patients, its letters' folders on a large server (``group`` the letters), and
    each patient's folder (``group`` the patient's key)."""

    def __init__(self, nodes: Nodes, scope: Scope, contents: NamedStudyFolders) -> None:
        super().__init__(nodes)
        self.scope = scope
        self.contents = contents
        # A large server's patient folder -> the query that lists it (its letters, or its ID).
        self._lists: dict[int, dict[str, str]] = {}
        self._by_patient = Grouped(patient_key)

    async def names(self, folder: Node) -> dict[str, Node]:
        few = await self.scope.few()
        group = folder.group
        if "\n" in group:  # a patient's folder: its key
            query = self._lists.get(folder.inode)
            if few is None and query is None:  # made while the server was small
                return {}
            studies = few if few is not None else await self.scope.studies(query)
            mine = self._by_patient(studies).get(group, [])
            return self.memo(folder, studies, lambda: named_studies(
                self.contents, folder, mine, names.study_folder))
        listed = few if few is not None else await self._starting(group) if group else None
        if listed is None:  # /patients, or letters with more than a page: a letter more
            return self.memo(folder, LETTERS, lambda: {
                group + letter: self.nodes.add(self, Kind.FOLDER, (self, group + letter),
                                               group + letter, group=group + letter)
                for letter in (NEXT if group else LETTERS)})
        by_patient = self._by_patient(listed)
        return self.memo(folder, listed, lambda: self._name_patients(folder, by_patient))

    def lists_ahead(self, folder: Node) -> bool:
        return not self.scope.large

    async def list_ahead(self, folder: Node) -> None:
        few = await self.scope.few()
        if few is not None and folder.group:
            for ds in self._by_patient(few).get(folder.group, [])[:LIST_AHEAD_FOLDERS]:
                self.archive.list_ahead(dicomjson.uid(ds, dicomjson.STUDY_UID) or "")

    def _name_patients(self, folder: Node, by_patient: dict[str, list[Dataset]]
                       ) -> dict[str, Node]:
        unique = names.unique({key: (names.patient_folder(studies[0]), "")
                               for key, studies in by_patient.items()})
        children = {}
        for key, name in unique.items():
            child = children[name] = self.nodes.add(self, Kind.FOLDER, (self, folder.group, key),
                                                    name, group=key)
            if folder.group:
                self._lists[child.inode] = {"PatientName": f"{folder.group}*"}
        return children

    async def lookup(self, folder: Node, name: str) -> Node | None:
        """A patient's folder looked up by its path in a letters folder not listed yet is
        found by the ID in its name, with one query whatever the server's size (a very
        common family name would otherwise cost a page per letter on the way)."""
        if self.scope.large and folder.group and "\n" not in folder.group and \
                folder.inode not in self._named:
            found = await self._by_id(folder, name)
            if found is not None:
                return found
        return await super().lookup(folder, name)

    async def _by_id(self, folder: Node, name: str) -> Node | None:
        _, paren, tail = name.rpartition(" (")
        if not paren or not tail.endswith(")") or name[:1].upper() != folder.group[:1]:
            return None
        query = {"PatientID": tail[:-1]}
        for ds in await self.scope.studies(query):
            if names.patient_folder(ds) == name:
                node = self.nodes.add(self, Kind.FOLDER, (self, folder.group, patient_key(ds)),
                                      name, group=patient_key(ds))
                self._lists[node.inode] = query
                return node
        return None

    async def _starting(self, letters: str) -> list[Dataset] | None:
        """The studies of the patients whose family name starts with ``letters``, if they
        fit one page."""
        return await self.scope.few({"PatientName": f"{letters}*"})


def patient_key(ds: Dataset) -> str:
    """Who a study belongs to, as far as QIDO tells: the same ID and the same name."""
    name = names.person_name(dicomjson.value(ds, dicomjson.PATIENT_NAME))
    patient_id = dicomjson.text(ds, dicomjson.PATIENT_ID)
    return f"{names.clean(patient_id, '')}\n{names.clean(name, '')}"
