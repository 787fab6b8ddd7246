"""The read-through cache's own promises under a real mount: cache-folder failures."""

from __future__ import annotations

import errno
import shutil

import pytest

from dicomfs.store import server_folder_name
from tests.support import SampleArchive
from tests.support.harness import MountFactory


def test_a_cache_folder_removed_under_a_live_mount_gives_eio(
        mount_factory: MountFactory, archive: SampleArchive) -> None:
    """``rm -rf`` of the cache folder (or ``dicomfs cache clear``) while mounted: an
    uncached file then fails with EIO (the file exists, the cache failed), never with
    ENOENT, which the kernel would remember as "no such file"."""
    entry = archive.series_files(archive.series_uid("mr"))[3]
    mount = mount_factory()
    path = mount.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
    assert path.stat().st_size > 0  # the name is known
    shutil.rmtree(mount.cache_dir / server_folder_name(mount.url))
    with pytest.raises(OSError) as caught:
        path.read_bytes()
    assert caught.value.errno == errno.EIO
    assert mount.proc.poll() is None
