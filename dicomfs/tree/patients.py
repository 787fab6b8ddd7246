"""/patients: a folder per patient, named for people, holding that patient's studies.

``/patients/<Name> (<ID>)/<Date> <Description>/<Series>/<Number>.dcm`` (see names.py).
A patient is who QIDO says a study belongs to: the same ID and the same name.
"""

from __future__ import annotations

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.tree.nodes import Kind, Node, Nodes
from dicomfs.tree.scope import Scope
from dicomfs.tree.studies import NamedStudyFolders, named_studies
from dicomfs.tree.view import LIST_AHEAD_FOLDERS, NamedView


class PatientsView(NamedView):
    """/patients and each patient's folder (``group`` holds the patient's key)."""

    def __init__(self, nodes: Nodes, scope: Scope, contents: NamedStudyFolders) -> None:
        super().__init__(nodes)
        self.scope = scope
        self.contents = contents
        self._grouped: tuple[list[Dataset], dict[str, list[Dataset]]] = ([], {})

    async def names(self, folder: Node) -> dict[str, Node]:
        studies, by_patient = await self._by_patient()
        if folder.group:
            mine = by_patient.get(folder.group, [])
            return self.memo(folder, studies, lambda: named_studies(
                self.contents, folder, mine, names.study_folder))
        return self.memo(folder, studies, lambda: self._name_patients(by_patient))

    async def list_ahead(self, folder: Node) -> None:
        if folder.group:
            for ds in (await self._by_patient())[1].get(folder.group, [])[:LIST_AHEAD_FOLDERS]:
                self.archive.list_ahead(dicomjson.uid(ds, dicomjson.STUDY_UID) or "")

    def _name_patients(self, by_patient: dict[str, list[Dataset]]) -> dict[str, Node]:
        unique = names.unique({key: (names.patient_folder(studies[0]), "")
                               for key, studies in by_patient.items()})
        return {name: self.nodes.add(self, Kind.FOLDER, (self, key), name, group=key)
                for key, name in unique.items()}

    async def _by_patient(self) -> tuple[list[Dataset], dict[str, list[Dataset]]]:
        """The scope's studies by patient, grouped again when the listing is new."""
        studies = await self.scope.studies()
        if self._grouped[0] is not studies:
            by_patient: dict[str, list[Dataset]] = {}
            for ds in studies:
                by_patient.setdefault(patient_key(ds), []).append(ds)
            self._grouped = (studies, by_patient)
        return self._grouped


def patient_key(ds: Dataset) -> str:
    """Who a study belongs to, as far as QIDO tells: the same ID and the same name."""
    name = names.person_name(dicomjson.value(ds, dicomjson.PATIENT_NAME))
    patient_id = dicomjson.text(ds, dicomjson.PATIENT_ID)
    return f"{names.clean(patient_id, '')}\n{names.clean(name, '')}"
