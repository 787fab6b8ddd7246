"""Optional endpoints: what a server answers for metadata and /rendered decides what is listed.

Scripted servers give each answer in turn; tiny-pacs (test_tinypacs) and Orthanc
(test_mount, test_browse) show the same on real servers.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import pytest

from dicomfs import capabilities
from dicomfs.store import server_folder_name
from tests.support import demo_uid
from tests.support.fakeserver import Reply, one_series_app, serving

if TYPE_CHECKING:
    from tests.support.harness import MountFactory

STUDY, SERIES, SOP = (demo_uid(f"capabilities/{n}") for n in ("study", "series", "sop"))
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


@pytest.mark.parametrize(("metadata", "rendered", "shown", "remembered"), [
    (404, 404, (False, False), True),
    (400, 501, (False, False), True),
    (501, 405, (False, False), True),
    # Orthanc answers 400 to render some images (JPEG 2000, RT dose): says nothing of others.
    (200, 400, (True, True), True),
    # A server in trouble (503) or one that wants other credentials: unknown, ask next time.
    (503, 200, (True, True), False),
    (403, 404, (True, True), False),
])
def test_what_is_listed_follows_what_the_server_answers(
        mount_factory: MountFactory, metadata: int, rendered: int,
        shown: tuple[bool, bool], remembered: bool) -> None:
    def retrieve(path: str) -> Reply | None:
        if path.endswith("/metadata"):
            return Reply(metadata, [("Content-Type", "application/dicom+json")],
                         b"[]" if metadata == 200 else b"")
        if path.endswith("/rendered"):
            return Reply(rendered, [("Content-Type", "image/png")],
                         PNG if rendered == 200 else b"")
        return None

    with serving() as server:
        server.app = one_series_app(STUDY, SERIES, [SOP], retrieve)
        mount = mount_factory(server.url, args=["--retries", "0"])
        study = mount.path / "studies" / STUDY
        metadata_shown, rendered_shown = shown
        assert ("metadata.json" in os.listdir(study)) is metadata_shown
        assert ("metadata.json" in os.listdir(study / SERIES)) is metadata_shown
        assert ("rendered" in os.listdir(mount.path)) is rendered_shown
        assert (study / "metadata.json").exists() is metadata_shown
        note = mount.cache_dir / server_folder_name(server.url) / capabilities.FILE_NAME
        assert note.exists() is remembered
        if remembered:
            assert json.loads(note.read_text()) == {"metadata": metadata_shown,
                                                    "rendered": rendered_shown}
