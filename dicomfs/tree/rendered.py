"""/rendered: each instance as the server renders it, PNG and JPEG, by UID.

``/rendered/<Study>/<Series>/<Instance>.png|.jpg``; listed only when the server
renders (see capabilities.py). The study listing is the one of /studies.
"""

from __future__ import annotations

from dicomfs.tree.nodes import Node
from dicomfs.tree.studies import StudyFolders

RENDERED_FORMATS = ("png", "jpg")


class RenderedFolders(StudyFolders):
    """A study's series and a series' renderings, by UID; no metadata.json."""

    formats = RENDERED_FORMATS

    def metadata(self, folder: Node) -> list[Node]:
        return []
