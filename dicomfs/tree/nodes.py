"""Nodes: what the kernel sees of each file and folder, and the table that numbers them.

A file has one node wherever it shows (its inode, bytes and cache entry are
shared, like a hard link), so tools that do not follow symlinks still read each
instance once. A folder has one parent: the same study under /studies and
/patients is two folders, because the kernel and every tree walker expect no
directory hard links.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicomfs import dicomjson
from dicomfs.capabilities import Capabilities
from dicomfs.dicomjson import Dataset
from dicomfs.store import Key
from dicomfs.tree.catalog import Catalog

if TYPE_CHECKING:
    from dicomfs.tree.view import View

ROOT_INODE = 1
METADATA = "metadata.json"
# Shown before the first read when nothing better is known. Never 0: tools such as
# file(1) call a 0-byte file empty without opening it.
PLACEHOLDER_SIZE = 4096


class Kind(enum.Enum):
    """What a node is to the kernel and the cache; where it is, its view knows."""

    FOLDER = "folder"
    INSTANCE = "instance"  # <Instance>.dcm: the instance as the server stores it
    METADATA = "metadata"  # metadata.json of a study or series
    RENDERED = "rendered"  # <Instance>.png or .jpg, rendered by the server
    TEXT = "text"  # a fixed help text
    UPLOAD_FOLDER = "upload-folder"  # /upload and the folders made in it
    UPLOAD_FILE = "upload-file"


FOLDERS = {Kind.FOLDER, Kind.UPLOAD_FOLDER}


@dataclass(slots=True)
class Node:
    """One file or folder. ``exact`` is False while ``size`` is only an estimate.

    ``view`` answers for a folder's contents. ``study``, ``series`` and ``instance``
    are the UIDs a node stands for ("" where none); ``group`` is what a patient or
    date folder gathers (a patient's key, a date prefix).
    """

    inode: int
    kind: Kind
    name: str
    view: View
    study: str = ""
    series: str = ""
    instance: str = ""
    fmt: str = ""
    size: int = 0
    exact: bool = True
    mtime: float = 0.0
    group: str = ""

    @property
    def is_dir(self) -> bool:
        return self.kind in FOLDERS

    @property
    def immutable(self) -> bool:
        """Instances and rendered images never change; metadata grows with its study,
        and a file in /upload as it is written."""
        return self.kind not in (Kind.METADATA, Kind.UPLOAD_FILE)

    @property
    def key(self) -> Key:
        """The cache entry behind a file node."""
        if self.kind is Kind.METADATA:
            return Key(self.study, self.series or None)
        return Key(self.study, self.series or None, self.instance or None, self.fmt)


class Nodes:
    """Every node handed out, by inode (stable for the life of a mount), and the
    builders of the nodes that several views show: studies, series, files."""

    def __init__(self, archive: Catalog, offers: Capabilities) -> None:
        self.archive = archive
        self.offers = offers
        self.mount_time = time.time()
        self._nodes: dict[int, Node] = {}
        self._inodes: dict[tuple[object, ...], int] = {}

    def __getitem__(self, inode: int) -> Node:
        """FileNotFoundError for an inode the kernel should not have."""
        try:
            return self._nodes[inode]
        except KeyError:
            raise FileNotFoundError(inode) from None

    def known(self, *ident: object) -> Node | None:
        inode = self._inodes.get(ident)
        return self._nodes[inode] if inode is not None else None

    def add(self, view: View, kind: Kind, ident: tuple[object, ...], name: str, *,
            inode: int | None = None, **fields: object) -> Node:
        """Get or create the node known as ``ident``; fresh facts (and names) update it."""
        node = self.known(*ident)
        if node is None:
            inode = inode or len(self._nodes) + ROOT_INODE + 1
            node = Node(inode, kind, name, view, mtime=self.mount_time,
                        exact=kind in FOLDERS)
            self._nodes[inode] = node
            self._inodes[ident] = inode
        node.name = name
        for field, value in fields.items():
            if value is not None:
                setattr(node, field, value)
        return node

    def fresh(self, view: View, kind: Kind, name: str) -> Node:
        """A node of its own whatever its name (an entry of /upload can be renamed,
        removed and made again)."""
        return self.add(view, kind, ("fresh", len(self._nodes)), name, mtime=time.time(),
                        exact=True)

    # -- what several views show ------------------------------------------------------

    def study(self, view: View, parent: Node, ds: Dataset, *, name: str = "") -> Node:
        """A study folder, its contents answered by ``view``."""
        uid = dicomjson.uid(ds, dicomjson.STUDY_UID) or ""
        return self.add(view, Kind.FOLDER, (view, parent.inode, uid), name or uid,
                        study=uid, mtime=dicomjson.timestamp(ds, dicomjson.STUDY_DATE,
                                                             dicomjson.STUDY_TIME))

    def series(self, view: View, parent: Node, ds: Dataset, *, name: str = "") -> Node:
        uid = dicomjson.uid(ds, dicomjson.SERIES_UID) or ""
        mtime = dicomjson.timestamp(ds, dicomjson.SERIES_DATE, dicomjson.SERIES_TIME)
        return self.add(view, Kind.FOLDER, (view, parent.inode, uid), name or uid,
                        study=parent.study, series=uid, mtime=mtime or parent.mtime)

    def files(self, view: View, parent: Node, found: Iterable[Dataset], *,
              formats: tuple[str, ...] = ("dcm",)) -> list[Node]:
        """A series' instances (``.dcm``) or renderings, ordered by instance number."""
        kind = Kind.INSTANCE if formats == ("dcm",) else Kind.RENDERED
        nodes: list[Node] = []
        for ds in dicomjson.in_instance_order(found):
            uid = dicomjson.uid(ds, dicomjson.SOP_UID) or ""
            mtime = dicomjson.timestamp(ds, dicomjson.CREATION_DATE, dicomjson.CREATION_TIME)
            for fmt in formats:
                node = self.add(view, kind, (kind, parent.series, uid, fmt), f"{uid}.{fmt}",
                                study=parent.study, series=parent.series, instance=uid,
                                fmt=fmt, mtime=mtime or parent.mtime)
                self.refresh_size(node, estimate=estimate(ds, rendered=kind is Kind.RENDERED))
                nodes.append(node)
        return nodes

    def metadata(self, view: View, parent: Node) -> list[Node]:
        """The folder's metadata.json, when the server offers metadata."""
        if not self.offers.metadata:
            return []
        node = self.add(view, Kind.METADATA, (Kind.METADATA, parent.study, parent.series),
                        METADATA, study=parent.study, series=parent.series, mtime=parent.mtime)
        self.refresh_size(node, estimate=PLACEHOLDER_SIZE)
        return [node]

    def refresh_size(self, node: Node, *, estimate: int) -> None:
        """Exact size when the entry is cached, else the estimate."""
        cached = self.archive.cached_size(node.key)
        if cached is not None:
            node.size, node.exact = cached, True
        elif not node.exact:
            node.size = estimate


def estimate(ds: Dataset, *, rendered: bool = False) -> int:
    """A size guess from QIDO's image attributes, for ``ls -l`` before the first read.

    The pixel data alone, without the header: for uncompressed images a floor of the
    real size, which lets the first open grow the kernel's idea of the size to the
    exact one without it dropping the pages pushed in (see ``fs.DicomFS.open``).
    """
    rows = dicomjson.integer(ds, dicomjson.ROWS)
    columns = dicomjson.integer(ds, dicomjson.COLUMNS)
    if not rows or not columns:
        return PLACEHOLDER_SIZE
    if rendered:
        return max(rows * columns // 2, PLACEHOLDER_SIZE)  # one 8-bit frame, compressed
    bits = dicomjson.integer(ds, dicomjson.BITS_ALLOCATED) or 16
    samples = dicomjson.integer(ds, dicomjson.SAMPLES_PER_PIXEL) or 1
    frames = dicomjson.integer(ds, dicomjson.NUMBER_OF_FRAMES) or 1
    return rows * columns * samples * frames * max(bits // 8, 1)
