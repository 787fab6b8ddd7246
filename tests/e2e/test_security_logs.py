"""The default log level (info) carries no patient names or IDs."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests.support import SampleArchive

if TYPE_CHECKING:
    from tests.support.harness import MountFactory


def test_info_log_has_no_patient_data(mount_factory: MountFactory, archive: SampleArchive) -> None:
    """Browse and read a patient's files at the default log level: the log never names them."""
    mr = archive.series_files(archive.series_uid("mr"))
    patient = mr[0]
    assert patient.patient_name == "Smith^John" and patient.patient_id == "DFS-0002"
    j2k = next(f for f in archive.files if f.label == "pydicom/JPEG2000.dcm")
    mount = mount_factory(args=["--log-level", "info"])
    study = mount.path / "studies" / patient.study_uid
    subprocess.run(["ls", "-lR", str(study)], capture_output=True, check=True, timeout=60)
    assert (study / "metadata.json").read_bytes().count(b"Smith") > 0
    series = study / patient.series_uid
    assert b"Smith" in (series / "metadata.json").read_bytes()
    for entry in mr[:4]:
        assert (series / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
    rendered = mount.path / "rendered" / patient.study_uid / patient.series_uid
    assert (rendered / f"{mr[0].sop_uid}.png").read_bytes().startswith(b"\x89PNG")
    # The readable trees and a search: the patient's folder, a /query folder for their ID,
    # and a query the server refuses (its reason is logged, the folder name is not).
    patients = mount.path / "patients"
    folder = next(name for name in os.listdir(patients) if patient.patient_id in name)
    subprocess.run(["ls", "-lR", str(patients / folder)], capture_output=True, check=True,
                   timeout=60)
    query = mount.path / "query" / f"PatientID={patient.patient_id}"
    assert patient.study_uid in os.listdir(query)
    refused = mount.path / "query" / f"PatientID={patient.patient_id}&fuzzymatching=maybe"
    with pytest.raises(FileNotFoundError):
        os.listdir(refused)
    # An error on the way (Orthanc cannot render JPEG 2000): its message is logged too.
    bad = mount.path / "rendered" / j2k.study_uid / j2k.series_uid / f"{j2k.sop_uid}.png"
    with pytest.raises(OSError):
        bad.read_bytes()
    log_lines = mount.log().splitlines()[1:]  # the first is the harness's command line
    log = "\n".join(log_lines)
    assert "ERROR" in log  # the rendering error was logged
    identifiers = {patient.patient_name, patient.patient_id, "Smith", "John",
                   j2k.patient_name, j2k.patient_id, "CompressedSamples"}
    leaked = {word for word in identifiers if word and word in log}
    assert leaked == set(), [line for line in log_lines if any(w in line for w in leaked)]
