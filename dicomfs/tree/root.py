"""The tree: paths to nodes, through the view that made each folder.

It owns the root folder, hands every other folder's ``lookup`` and ``children``
to its view (:mod:`dicomfs.tree.view`), and opens files through the archive. It
knows nothing of FUSE: the adapter turns nodes into kernel attributes and errors
into errnos.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dicomfs.capabilities import Capabilities
from dicomfs.store import CachedFile, OpenFile
from dicomfs.tree.catalog import Catalog
from dicomfs.tree.dates import DatesView
from dicomfs.tree.nodes import ROOT_INODE, Kind, Node, Nodes
from dicomfs.tree.patients import PatientsView
from dicomfs.tree.query import HELP, QueryView
from dicomfs.tree.rendered import RenderedFolders
from dicomfs.tree.scope import Scope
from dicomfs.tree.studies import NamedStudyFolders, StudiesView, StudyFolders
from dicomfs.tree.view import LIST_AHEAD_FOLDERS, Entries, View

if TYPE_CHECKING:
    from dicomfs.upload import Uploads

UPLOAD = "upload"


class Tree:
    """Paths and nodes over a :class:`~dicomfs.tree.catalog.Catalog` (the archive).

    ``scope`` (``dicomfs mount --query``) narrows every study listing to one QIDO
    query; ``offers`` says what the server serves besides instances, so that
    nothing is listed that cannot open.
    """

    def __init__(self, archive: Catalog, *, scope: Mapping[str, str] | None = None,
                 offers: Capabilities | None = None) -> None:
        self.archive = archive
        self.offers = offers or Capabilities()
        self.nodes = Nodes(archive, self.offers)
        self.scope = Scope(archive, scope)
        by_uid, named = StudyFolders(self.nodes), NamedStudyFolders(self.nodes)
        self._tops: dict[str, View] = {
            "studies": StudiesView(self.nodes, self.scope, by_uid),
            "patients": PatientsView(self.nodes, self.scope, named),
            "dates": DatesView(self.nodes, self.scope, named),
            "query": QueryView(self.nodes, self.scope, by_uid),
        }
        if self.offers.rendered:
            self._tops["rendered"] = StudiesView(self.nodes, self.scope,
                                                 RenderedFolders(self.nodes))
        # What /upload holds, with --allow-upload (mount.py sets it); without, /upload is
        # an empty read-only folder, unlisted, so that writing into it answers EROFS.
        self.uploads: Uploads | None = None
        self._upload_view = _UploadView(self)
        self.root = self.nodes.add(_RootView(self), Kind.FOLDER, ("root",), "",
                                   inode=ROOT_INODE)

    def node(self, inode: int) -> Node:
        """The node of a known inode; FileNotFoundError for one the kernel should not have."""
        return self.nodes[inode]

    def current(self, inode: int) -> Node:
        """The node, its size made exact as soon as the cache holds the file (a series
        stream lands files before they are opened), so the kernel stops asking."""
        node = self.node(inode)
        if not node.exact and not node.is_dir:
            self.nodes.refresh_size(node, estimate=node.size)
        return node

    async def lookup(self, parent_inode: int, name: str) -> Node:
        """The child ``name`` of a folder; FileNotFoundError when there is none."""
        parent = self.node(parent_inode)
        child = await parent.view.lookup(parent, name) if parent.is_dir else None
        if child is None:
            raise FileNotFoundError(name)
        return child

    async def open_folder(self, inode: int) -> Entries:
        """A folder's entries for one reader, possibly still arriving; the listings of
        the first folders in it are fetched ahead (``Archive.list_ahead``), for walkers."""
        folder = self.node(inode)
        if not folder.is_dir:
            raise NotADirectoryError(folder.name)
        entries = await folder.view.entries(folder)
        if not folder.view.lists_ahead(folder):
            return entries
        seen = 0

        async def list_ahead(new: list[Node]) -> None:
            nonlocal seen
            for child in new[:max(LIST_AHEAD_FOLDERS - seen, 0)]:
                if child.is_dir:
                    await child.view.list_ahead(child)
            seen += len(new)

        await list_ahead(entries.nodes)
        entries.seen = list_ahead
        return entries

    async def children(self, inode: int) -> list[Node]:
        """Everything in a folder, once all of it has arrived."""
        entries = await self.open_folder(inode)
        try:
            return await entries.all()
        finally:
            entries.close()

    async def open(self, inode: int) -> OpenFile:
        """The file's bytes, fetched (and cached) on first open; the size becomes exact."""
        node = self.node(inode)
        if node.kind is Kind.INSTANCE:
            opened = await self.archive.instance(node.study, node.series, node.instance)
        elif node.kind is Kind.RENDERED:
            opened = await self.archive.rendered(node.study, node.series, node.instance,
                                                 node.fmt)
        elif node.kind is Kind.METADATA:
            opened = await self.archive.metadata(node.study, node.series or None)
        elif node.kind is Kind.TEXT:
            opened = _text_file(HELP)
        else:
            raise IsADirectoryError(node.name)
        node.size, node.exact = opened.size, True
        return opened

    # -- /upload ------------------------------------------------------------------------

    def upload_folder(self) -> Node:
        return self.nodes.add(self._upload_view, Kind.UPLOAD_FOLDER, (UPLOAD,), UPLOAD)

    def new_upload_node(self, kind: Kind, name: str) -> Node:
        """A fresh node for something created in /upload: its own inode, whatever its name
        (an entry can be renamed, removed and made again)."""
        return self.nodes.fresh(self._upload_view, kind, name)

    def _top(self, name: str) -> Node:
        view = self._tops[name]
        return self.nodes.add(view, Kind.FOLDER, (view,), name)


class _RootView(View):
    """The root: the views' folders, and /upload."""

    def __init__(self, tree: Tree) -> None:
        super().__init__(tree.nodes)
        self.tree = tree

    async def lookup(self, folder: Node, name: str) -> Node | None:
        if name in self.tree._tops:
            return self.tree._top(name)
        return self.tree.upload_folder() if name == UPLOAD else None

    async def children(self, folder: Node) -> list[Node]:
        tops = [self.tree._top(name) for name in self.tree._tops]
        return [*tops, self.tree.upload_folder()] if self.tree.uploads else tops


class _UploadView(View):
    """/upload and what is copied into it: answered by :class:`dicomfs.upload.Uploads`."""

    def __init__(self, tree: Tree) -> None:
        super().__init__(tree.nodes)
        self.tree = tree

    async def lookup(self, folder: Node, name: str) -> Node | None:
        return self.tree.uploads.lookup(folder, name) if self.tree.uploads else None

    async def children(self, folder: Node) -> list[Node]:
        return self.tree.uploads.children(folder) if self.tree.uploads else []


def _text_file(data: bytes) -> CachedFile:
    """Fixed bytes as an open file, for the adapter that reads by descriptor."""
    fd = os.memfd_create("dicomfs-text", os.MFD_CLOEXEC)
    os.write(fd, data)
    return CachedFile(fd, len(data))
