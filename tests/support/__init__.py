"""Test support: sample data, private servers, mounts and fakes, for tests, demo and benchmarks.

Nothing here ships in the package (``pip wheel .`` holds only ``dicomfs``).

Tests, ``scripts/demo`` and the benchmarks all use the same archive
(:func:`build_archive`) served by the same kind of server (:class:`LocalOrthanc`),
so a bug seen in one is reproducible in the others.
"""

from tests.support.orthanc import LocalOrthanc, OrthancError, UploadReport
from tests.support.sample import SampleArchive, SampleFile, build_archive, demo_uid

__all__ = [
    "LocalOrthanc",
    "OrthancError",
    "SampleArchive",
    "SampleFile",
    "UploadReport",
    "build_archive",
    "demo_uid",
]
