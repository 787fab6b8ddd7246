"""What the end-to-end fixtures hand out (tests/e2e/conftest.py), and checks made with it.

* :class:`Mount`: a running ``dicomfs mount`` process and its mount point, as ``mount_factory``
  starts it (:func:`_wait_for_mount` waits until it answers); :class:`MountFactory`,
  :class:`OrthancFactory`, :class:`TinyPacsFactory` and :class:`LinkFactory` type the factory
  fixtures.
* :func:`tiny_pacs_files`: what the tiny-pacs fixtures load.
* :func:`check_listings_equal_qido`: a mount lists exactly what the server answers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

from tests.support import LocalOrthanc, SampleArchive, SampleFile
from tests.support.mounts import Mount
from tests.support.netem import LinkProxy
from tests.support.tinypacs import LocalTinyPacs

REPO_ROOT = Path(__file__).resolve().parents[2]
# Built data (sample archive, generated large archives), kept between sessions.
TESTDATA_DIR = Path(os.environ.get("DICOMFS_TESTDATA") or REPO_ROOT / ".cache" / "testdata")
MOUNT_TIMEOUT = 20.0


# --------------------------------------------------------------------------- servers


class OrthancFactory(Protocol):
    def __call__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        load: SampleArchive | None = None,
    ) -> LocalOrthanc: ...


BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


def tiny_pacs_files(archive: SampleArchive) -> list[SampleFile]:
    """What the tiny-pacs fixtures load: every study of the archive (the MR series to page
    through, the non-ASCII names, every transfer syntax it stores) but the 200 MB CT series,
    which pages no better and would slow the suite, deflated objects, which tiny-pacs
    refuses over STOW-RS (409), and raw big-endian datasets, which it wraps in a file meta
    saying explicit VR little endian: an object neither pydicom nor dicomfs can read
    (dicomfs answers EIO for it)."""
    return [f for f in archive.files if f.label != "ct" and f.transfer_syntax != DEFLATED
            and not (f.transfer_syntax == BIG_ENDIAN and archive.read(f)[128:132] != b"DICM")]


class TinyPacsFactory(Protocol):
    def __call__(self, *, tokens: Sequence[str] = (),
                 load: Sequence[SampleFile] = ()) -> LocalTinyPacs: ...


# --------------------------------------------------------------------------- mounts


class MountFactory(Protocol):
    def __call__(
        self,
        url: str | None = None,
        *,
        cache_dir: Path | None = None,
        args: Sequence[str] = (),
        mountpoint: Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = MOUNT_TIMEOUT,
        command: Sequence[str] | None = None,
    ) -> Mount: ...


# --------------------------------------------------------------------------- server truth


def qido_uids(client: httpx.Client | str, path: str, key: str) -> set[str]:
    """The UIDs a QIDO-RS search answers (``client`` on the DICOMweb root, or its URL): the
    server's truth a listing must match. 204 and ``[]`` both mean none."""
    answer = (httpx.get(client + path, params={"limit": "100000"}) if isinstance(client, str)
              else client.get(path, params={"limit": "100000"}))
    answer.raise_for_status()
    return {item[key]["Value"][0] for item in answer.json()} if answer.content else set()


def check_listings_equal_qido(root: Path, client: httpx.Client | str, *,
                              metadata: bool) -> None:
    """Every folder of ``root/studies`` lists what QIDO answers, and ``metadata.json`` in
    each study and series folder exactly when ``metadata`` (the server offers it)."""
    extra = {"metadata.json"} if metadata else set()
    studies = qido_uids(client, "/studies", "0020000D")
    assert studies
    assert set(os.listdir(root / "studies")) == studies
    for study in studies:
        series = qido_uids(client, f"/studies/{study}/series", "0020000E")
        assert set(os.listdir(root / "studies" / study)) == series | extra
        for one in series:
            instances = qido_uids(client, f"/studies/{study}/series/{one}/instances",
                                  "00080018")
            names = set(os.listdir(root / "studies" / study / one))
            assert names == {f"{uid}.dcm" for uid in instances} | extra


# --------------------------------------------------------------------------- emulated links


class LinkFactory(Protocol):
    def __call__(self, target: str, *, delay: float = 0.0,
                 rate: float | None = None) -> LinkProxy: ...
