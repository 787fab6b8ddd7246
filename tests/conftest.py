"""Fixtures both suites (tests/unit, tests/e2e) use.

* ``archive`` (session): the sample archive (:func:`tests.support.build_archive`, 400 CT
  slices), cached across sessions in ``<repo>/.cache/testdata`` (``DICOMFS_TESTDATA`` moves it).

Servers, FUSE mounts and emulated links are in tests/e2e/conftest.py; the scripted fake
server of the unit tests is in tests/unit/conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import SampleArchive, build_archive
from tests.support.harness import REPO_ROOT

TESTDATA_DIR = Path(os.environ.get("DICOMFS_TESTDATA") or REPO_ROOT / ".cache" / "testdata")
CT_SLICES = 400


@pytest.fixture(scope="session")
def archive() -> SampleArchive:
    """The sample archive, built once and reused by later sessions."""
    return build_archive(TESTDATA_DIR, ct_slices=CT_SLICES)
