"""Sample data and a private Orthanc: the one source of test, demo and benchmark data.

Tests, ``python -m dicomfs.demo`` and the benchmarks all use the same archive
(:func:`build_archive`) served by the same kind of server (:class:`LocalOrthanc`),
so a bug seen in one is reproducible in the others.
"""

from dicomfs.demo.archive import Archive, ArchiveFile, build_archive, demo_uid
from dicomfs.demo.orthanc import LocalOrthanc, OrthancError, UploadReport

__all__ = [
    "Archive",
    "ArchiveFile",
    "LocalOrthanc",
    "OrthancError",
    "UploadReport",
    "build_archive",
    "demo_uid",
]
