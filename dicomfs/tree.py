"""The virtual tree: which names exist, what they are, and their attributes.

It turns paths into nodes and nodes into archive calls, and owns inode numbers
(stable for the life of a mount). It knows nothing of FUSE: the adapter turns
nodes into kernel attributes and errors into errnos.

Layout::

    /studies/<Study>/metadata.json
    /studies/<Study>/<Series>/metadata.json
    /studies/<Study>/<Series>/<Instance>.dcm
    /rendered/<Study>/<Series>/<Instance>.png|.jpg
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass

from dicomfs import dicomjson
from dicomfs.archive import Archive
from dicomfs.dicomjson import Dataset
from dicomfs.prefetch import Prefetcher
from dicomfs.store import Blob, Key
from dicomfs.uids import is_uid

ROOT_INODE = 1
METADATA = "metadata.json"
RENDERED_FORMATS = ("png", "jpg")
HEADER_ESTIMATE = 2048  # bytes of Part 10 header an estimated instance size adds
# Shown before the first read when nothing better is known. Never 0: tools such as
# file(1) call a 0-byte file empty without opening it.
PLACEHOLDER_SIZE = 4096


class Kind(enum.Enum):
    ROOT = "root"
    STUDIES = "studies"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"
    METADATA = "metadata"
    RENDERED = "rendered"
    RENDERED_STUDY = "rendered-study"
    RENDERED_SERIES = "rendered-series"
    RENDERED_FILE = "rendered-file"


DIRECTORIES = {Kind.ROOT, Kind.STUDIES, Kind.STUDY, Kind.SERIES, Kind.RENDERED,
               Kind.RENDERED_STUDY, Kind.RENDERED_SERIES}
# What a UID names below each kind of folder.
UID_CHILD = {Kind.STUDIES: Kind.STUDY, Kind.STUDY: Kind.SERIES,
             Kind.RENDERED: Kind.RENDERED_STUDY, Kind.RENDERED_STUDY: Kind.RENDERED_SERIES}


@dataclass(slots=True)
class Node:
    """One file or folder. ``exact`` is False while ``size`` is only an estimate."""

    inode: int
    kind: Kind
    name: str
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    fmt: str | None = None
    size: int = 0
    exact: bool = True
    mtime: float = 0.0

    @property
    def is_dir(self) -> bool:
        return self.kind in DIRECTORIES

    @property
    def immutable(self) -> bool:
        """Instances and rendered images never change; metadata grows with its study."""
        return self.kind is not Kind.METADATA

    @property
    def key(self) -> Key:
        """The cache entry behind a file node."""
        if self.kind is Kind.METADATA:
            return Key(self.study or "", self.series)
        fmt = "dcm" if self.kind is Kind.INSTANCE else self.fmt or ""
        return Key(self.study or "", self.series, self.instance, fmt)


class Tree:
    """Paths and nodes over an :class:`Archive`."""

    def __init__(self, archive: Archive, prefetcher: Prefetcher | None = None) -> None:
        self.archive = archive
        self.prefetcher = prefetcher
        self.mount_time = time.time()
        self._nodes: dict[int, Node] = {}
        self._inodes: dict[tuple[object, ...], int] = {}
        self._add(Kind.ROOT, (), "", inode=ROOT_INODE)

    # -- nodes ------------------------------------------------------------------------

    def node(self, inode: int) -> Node:
        """The node of a known inode; FileNotFoundError for one the kernel should not have."""
        try:
            return self._nodes[inode]
        except KeyError:
            raise FileNotFoundError(inode) from None

    def _add(self, kind: Kind, ident: tuple[object, ...], name: str, *,
             inode: int | None = None, **fields: object) -> Node:
        """Get or create the node for ``(kind, ident)``; fresh facts update it."""
        key = (kind, *ident)
        existing = self._inodes.get(key)
        if existing is not None:
            node = self._nodes[existing]
            for field, value in fields.items():
                if value is not None:
                    setattr(node, field, value)
            return node
        if inode is None:
            inode = len(self._nodes) + ROOT_INODE + 1
        node = Node(inode, kind, name, mtime=self.mount_time,
                    exact=kind in DIRECTORIES)
        for field, value in fields.items():
            if value is not None:
                setattr(node, field, value)
        self._nodes[inode] = node
        self._inodes[key] = inode
        return node

    def _existing(self, kind: Kind, *ident: object) -> Node | None:
        inode = self._inodes.get((kind, *ident))
        return self._nodes[inode] if inode is not None else None

    # -- lookup and listing -------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: str) -> Node:
        """The child ``name`` of a folder; FileNotFoundError when there is none.

        Names that cannot be UIDs are refused before any request, so desktop
        probes (.Trash, desktop.ini, ...) cost nothing.
        """
        parent = self.node(parent_inode)
        if parent.kind is Kind.ROOT:
            if name == "studies":
                return self._add(Kind.STUDIES, (), name)
            if name == "rendered":
                return self._add(Kind.RENDERED, (), name)
        elif name == METADATA and parent.kind in (Kind.STUDY, Kind.SERIES):
            return self._metadata_node(parent)
        elif parent.kind in UID_CHILD and is_uid(name):
            child = await self._lookup_uid(parent, name)
            if child is not None:
                return child
        elif parent.kind in (Kind.SERIES, Kind.RENDERED_SERIES):
            child = await self._lookup_file(parent, name)
            if child is not None:
                return child
        raise FileNotFoundError(name)

    async def _lookup_uid(self, parent: Node, uid: str) -> Node | None:
        kind = UID_CHILD[parent.kind]
        if kind in (Kind.STUDY, Kind.RENDERED_STUDY):
            known = self._existing(kind, uid)
            if known is not None:
                return known
            study = await self.archive.find_study(uid)
            return self._study_node(kind, study) if study is not None else None
        known = self._existing(kind, parent.study, uid)
        if known is not None:
            return known
        series = await self.archive.find_series(parent.study or "", uid)
        return self._series_node(kind, parent, series) if series is not None else None

    async def _lookup_file(self, parent: Node, name: str) -> Node | None:
        stem, dot, ext = name.rpartition(".")
        wanted = ("dcm",) if parent.kind is Kind.SERIES else RENDERED_FORMATS
        if not dot or ext not in wanted or not is_uid(stem):
            return None
        kind = Kind.INSTANCE if parent.kind is Kind.SERIES else Kind.RENDERED_FILE
        known = self._existing(kind, parent.series, stem, ext)
        if known is not None:
            return known
        for child in await self.children(parent.inode):
            if child.instance == stem and child.name == name:
                return child
        return None

    async def children(self, inode: int) -> list[Node]:
        """Everything in a folder, in a stable order."""
        parent = self.node(inode)
        kind = parent.kind
        if kind is Kind.ROOT:
            return [self._add(Kind.STUDIES, (), "studies"),
                    self._add(Kind.RENDERED, (), "rendered")]
        if kind in (Kind.STUDIES, Kind.RENDERED):
            child_kind = UID_CHILD[kind]
            return [self._study_node(child_kind, ds)
                    for ds in _sorted_by_uid(await self.archive.studies(), dicomjson.STUDY_UID)]
        if kind in (Kind.STUDY, Kind.RENDERED_STUDY):
            found = await self.archive.series(parent.study or "")
            nodes = [self._series_node(UID_CHILD[kind], parent, ds)
                     for ds in _sorted_by_uid(found, dicomjson.SERIES_UID)]
            return [self._metadata_node(parent), *nodes] if kind is Kind.STUDY else nodes
        if kind in (Kind.SERIES, Kind.RENDERED_SERIES):
            found = await self.archive.instances(parent.study or "", parent.series or "")
            files = self._instance_nodes(parent, found)
            return [self._metadata_node(parent), *files] if kind is Kind.SERIES else files
        raise NotADirectoryError(parent.name)

    # -- node builders -------------------------------------------------------------------

    def _study_node(self, kind: Kind, ds: Dataset) -> Node:
        uid = dicomjson.uid(ds, dicomjson.STUDY_UID) or ""
        return self._add(kind, (uid,), uid, study=uid,
                         mtime=dicomjson.timestamp(ds, dicomjson.STUDY_DATE,
                                                   dicomjson.STUDY_TIME))

    def _series_node(self, kind: Kind, parent: Node, ds: Dataset) -> Node:
        uid = dicomjson.uid(ds, dicomjson.SERIES_UID) or ""
        mtime = dicomjson.timestamp(ds, dicomjson.SERIES_DATE, dicomjson.SERIES_TIME)
        return self._add(kind, (parent.study, uid), uid, study=parent.study, series=uid,
                         mtime=mtime or parent.mtime)

    def _metadata_node(self, parent: Node) -> Node:
        node = self._add(Kind.METADATA, (parent.study, parent.series), METADATA,
                         study=parent.study, series=parent.series, mtime=parent.mtime)
        self._refresh_size(node, estimate=PLACEHOLDER_SIZE)
        return node

    def _instance_nodes(self, parent: Node, found: Iterable[Dataset]) -> list[Node]:
        """File nodes for a series' instances, ordered by instance number."""
        ordered = sorted(
            ((dicomjson.integer(ds, dicomjson.INSTANCE_NUMBER) or 0,
              dicomjson.uid(ds, dicomjson.SOP_UID) or "", ds) for ds in found),
            key=lambda item: item[:2])
        rendered = parent.kind is Kind.RENDERED_SERIES
        nodes: list[Node] = []
        for _number, uid, ds in ordered:
            mtime = dicomjson.timestamp(ds, dicomjson.CREATION_DATE, dicomjson.CREATION_TIME)
            for ext in RENDERED_FORMATS if rendered else ("dcm",):
                node = self._add(
                    Kind.RENDERED_FILE if rendered else Kind.INSTANCE,
                    (parent.series, uid, ext), f"{uid}.{ext}", study=parent.study,
                    series=parent.series, instance=uid, fmt=ext, mtime=mtime or parent.mtime)
                self._refresh_size(node, estimate=_estimate(ds, rendered=rendered))
                nodes.append(node)
        return nodes

    def _refresh_size(self, node: Node, *, estimate: int) -> None:
        """Exact size when the entry is cached, else the estimate."""
        cached = self.archive.store.size(node.key)
        if cached is not None:
            node.size, node.exact = cached, True
        elif not node.exact:
            node.size = estimate

    # -- files ------------------------------------------------------------------------------

    async def open(self, inode: int) -> Blob:
        """The file's bytes, fetched (and cached) on first open; the size becomes exact."""
        node = self.node(inode)
        if node.kind is Kind.INSTANCE:
            if self.prefetcher and self.archive.store.size(node.key) is None:
                self.prefetcher.note_miss(node.study or "", node.series or "")
            blob = await self.archive.instance(node.study or "", node.series or "",
                                               node.instance or "")
        elif node.kind is Kind.RENDERED_FILE:
            blob = await self.archive.rendered(node.study or "", node.series or "",
                                               node.instance or "", node.fmt or "png")
        elif node.kind is Kind.METADATA:
            blob = await self.archive.metadata(node.study or "", node.series)
        else:
            raise IsADirectoryError(node.name)
        node.size, node.exact = blob.size, True
        return blob


def _sorted_by_uid(datasets: list[Dataset], tag: str) -> list[Dataset]:
    return sorted(datasets, key=lambda ds: dicomjson.uid(ds, tag) or "")


def _estimate(ds: Dataset, *, rendered: bool = False) -> int:
    """A size guess from QIDO's image attributes, for ``ls -l`` before the first read."""
    rows = dicomjson.integer(ds, dicomjson.ROWS)
    columns = dicomjson.integer(ds, dicomjson.COLUMNS)
    if not rows or not columns:
        return PLACEHOLDER_SIZE
    if rendered:
        return max(rows * columns // 2, PLACEHOLDER_SIZE)  # one 8-bit frame, compressed
    bits = dicomjson.integer(ds, dicomjson.BITS_ALLOCATED) or 16
    samples = dicomjson.integer(ds, dicomjson.SAMPLES_PER_PIXEL) or 1
    frames = dicomjson.integer(ds, dicomjson.NUMBER_OF_FRAMES) or 1
    return HEADER_ESTIMATE + rows * columns * samples * frames * max(bits // 8, 1)
