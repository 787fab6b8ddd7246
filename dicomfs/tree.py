"""The virtual tree: which names exist, what they are, and their attributes.

It turns paths into nodes and nodes into archive calls, and owns inode numbers
(stable for the life of a mount). It knows nothing of FUSE: the adapter turns
nodes into kernel attributes and errors into errnos.

Layout::

    /studies/<Study>/metadata.json
    /studies/<Study>/<Series>/metadata.json
    /studies/<Study>/<Series>/<Instance>.dcm
    /patients/<Patient>/<Study>/<Series>/<Number>.dcm    readable names, see names.py
    /dates/<YYYY>/<YYYY-MM>/<YYYY-MM-DD>/<Study>/...     the same, studies by date
    /query/<QIDO query>/<Study>/<Series>/<Instance>.dcm  like /studies, for one search
    /rendered/<Study>/<Series>/<Instance>.png|.jpg

A file has one node wherever it shows (its inode, bytes and cache entry are
shared, like a hard link), so tools that do not follow symlinks still read each
instance once. A folder has one parent: the same study under /studies and
/patients is two folders, because the kernel and every tree walker expect no
directory hard links. ``scope`` (``dicomfs mount --query``) narrows every study
listing to one QIDO query.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cachetools
import trio

from dicomfs import dicomjson, names
from dicomfs.archive import Archive
from dicomfs.capabilities import Capabilities
from dicomfs.dicomjson import Dataset
from dicomfs.errors import BadRequest, DicomfsError
from dicomfs.store import Blob, Key, OpenFile
from dicomfs.uids import is_uid

if TYPE_CHECKING:
    from dicomfs.upload import Uploads

log = logging.getLogger(__name__)

ROOT_INODE = 1
METADATA = "metadata.json"
QUERY_README = "README.txt"
QUERY_HELP = b"""\
Each folder here is a QIDO-RS search of the server, made when you open it:

    ls '/path/to/mount/query/PatientID=123&StudyDate=20240101-20241231'

lists the matching studies (named by StudyInstanceUID, as in /studies). Keys are
DICOM keywords (PatientName, ModalitiesInStudy, ...) or 8-hex tags, joined by &;
values may use * and ? wildcards and date ranges; fuzzymatching=true is passed on.
A name that is no such query does not exist (see the mount's log for why).
"""
RENDERED_FORMATS = ("png", "jpg")
# Shown before the first read when nothing better is known. Never 0: tools such as
# file(1) call a 0-byte file empty without opening it.
PLACEHOLDER_SIZE = 4096
LIST_AHEAD_FOLDERS = 64  # of a listing, the first so many folders are listed ahead
NAMED_FOLDERS = 4096  # readable folders whose names are kept ready (the rest are remade)


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
    PATIENTS = "patients"
    PATIENT = "patient"
    DATES = "dates"
    DATE = "date"  # a year, month or day folder, or the one of studies without a date
    QUERIES = "queries"
    QUERY = "query"
    TEXT = "text"  # a fixed help text
    UPLOADS = "upload"  # /upload and what is copied into it (dicomfs.upload)
    UPLOAD_FOLDER = "upload-folder"
    UPLOAD_FILE = "upload-file"


TOP = {"studies": Kind.STUDIES, "patients": Kind.PATIENTS, "dates": Kind.DATES,
       "query": Kind.QUERIES, "rendered": Kind.RENDERED}
DIRECTORIES = {Kind.ROOT, Kind.STUDIES, Kind.STUDY, Kind.SERIES, Kind.RENDERED,
               Kind.RENDERED_STUDY, Kind.RENDERED_SERIES, Kind.PATIENTS, Kind.PATIENT,
               Kind.DATES, Kind.DATE, Kind.QUERIES, Kind.QUERY, Kind.UPLOADS,
               Kind.UPLOAD_FOLDER}
UPLOAD = "upload"
UPLOAD_FOLDERS = {Kind.UPLOADS, Kind.UPLOAD_FOLDER}
# Folders whose children are named for people (names.py) and found by listing them.
READABLE = {Kind.PATIENTS, Kind.PATIENT, Kind.DATES, Kind.DATE}
# What a UID names below each kind of folder.
UID_CHILD = {Kind.STUDIES: Kind.STUDY, Kind.STUDY: Kind.SERIES, Kind.QUERY: Kind.STUDY,
             Kind.RENDERED: Kind.RENDERED_STUDY, Kind.RENDERED_STUDY: Kind.RENDERED_SERIES}


@dataclass(slots=True)
class Node:
    """One file or folder. ``exact`` is False while ``size`` is only an estimate.

    ``readable`` folders name their children for people; ``selector`` is what a
    virtual folder stands for (a patient's key, a date prefix).
    """

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
    readable: bool = False
    selector: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind in DIRECTORIES

    @property
    def immutable(self) -> bool:
        """Instances and rendered images never change; metadata grows with its study,
        and a file in /upload as it is written."""
        return self.kind not in (Kind.METADATA, Kind.UPLOAD_FILE)

    @property
    def key(self) -> Key:
        """The cache entry behind a file node."""
        if self.kind is Kind.METADATA:
            return Key(self.study or "", self.series)
        fmt = "dcm" if self.kind is Kind.INSTANCE else self.fmt or ""
        return Key(self.study or "", self.series, self.instance, fmt)


@dataclass(frozen=True, slots=True)
class _Index:
    """A study listing grouped for /patients and /dates; rebuilt when the listing is."""

    source: list[Dataset]
    patients: dict[str, list[Dataset]]  # patient key -> studies
    patient_names: dict[str, str]  # patient key -> unique folder name
    days: dict[str, list[Dataset]]  # YYYY-MM-DD or "unknown" -> studies


class Tree:
    """Paths and nodes over an :class:`Archive`."""

    def __init__(self, archive: Archive, *, scope: Mapping[str, str] | None = None,
                 offers: Capabilities | None = None) -> None:
        self.archive = archive
        # What the server offers besides instances: nothing is listed that cannot open.
        self.offers = offers or Capabilities()
        self._tops = [name for name in TOP if name != "rendered" or self.offers.rendered]
        self.scope = dict(names.check_query(scope.items())) if scope else {}
        self.mount_time = time.time()
        self._nodes: dict[int, Node] = {}
        self._inodes: dict[tuple[object, ...], int] = {}
        self._index: _Index | None = None
        # Per readable folder: the listing its names were made from, and name -> node.
        self._named: cachetools.LRUCache[int, tuple[object, dict[str, Node]]] = \
            cachetools.LRUCache(NAMED_FOLDERS)
        # /query names refused (by us or the server): asked again, they cost nothing.
        self._bad_queries: cachetools.LRUCache[str, str] = cachetools.LRUCache(4096)
        # What /upload holds, with --allow-upload (mount.py sets it); without, /upload is
        # an empty read-only folder, unlisted, so that writing into it answers EROFS.
        self.uploads: Uploads | None = None
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
        """Get or create the node for ``(kind, ident)``; fresh facts (and names) update it."""
        key = (kind, *ident)
        existing = self._inodes.get(key)
        if existing is not None:
            node = self._nodes[existing]
            node.name = name
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

    def current(self, inode: int) -> Node:
        """The node, its size made exact as soon as the cache holds the file (a series
        stream lands files before they are opened), so the kernel stops asking."""
        node = self.node(inode)
        if not node.exact and not node.is_dir:
            self._refresh_size(node, estimate=node.size)
        return node

    def _existing(self, kind: Kind, *ident: object) -> Node | None:
        inode = self._inodes.get((kind, *ident))
        return self._nodes[inode] if inode is not None else None

    def _top(self, name: str) -> Node:
        kind = TOP[name]
        return self._add(kind, (), name, readable=kind in READABLE)

    # -- lookup and listing -------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: str) -> Node:
        """The child ``name`` of a folder; FileNotFoundError when there is none.

        Names that cannot be UIDs are refused before any request, so desktop
        probes (.Trash, desktop.ini, ...) cost nothing; so are names in /query
        that are no valid query.
        """
        parent = self.node(parent_inode)
        child: Node | None = None
        if parent.kind is Kind.ROOT:
            child = self._top(name) if name in self._tops else \
                self.upload_folder() if name == UPLOAD else None
        elif parent.kind in UPLOAD_FOLDERS:
            child = self.uploads.lookup(parent, name) if self.uploads else None
        elif parent.kind is Kind.QUERIES:
            child = self._help_node() if name == QUERY_README else \
                await self._lookup_query(name)
        elif name == METADATA and parent.kind in (Kind.STUDY, Kind.SERIES):
            child = next(iter(self._metadata_nodes(parent)), None)
        elif parent.readable:
            # A name given out before resolves without its listing, even an expired one:
            # walking a path must not wait for a 10,000-study QIDO walk.
            named = self._named.get(parent.inode)
            child = named[1].get(name) if named else None
            if child is None:
                child = (await self._named_children(parent)).get(name)
        elif parent.kind in UID_CHILD:
            child = await self._lookup_uid(parent, name) if is_uid(name) else None
        elif parent.kind in (Kind.SERIES, Kind.RENDERED_SERIES):
            child = await self._lookup_file(parent, name)
        if child is None:
            raise FileNotFoundError(name)
        return child

    async def _lookup_uid(self, parent: Node, uid: str) -> Node | None:
        kind = UID_CHILD[parent.kind]
        known = self._existing(kind, parent.inode, uid)
        if known is not None:
            return known
        if kind in (Kind.SERIES, Kind.RENDERED_SERIES):
            series = await self.archive.find_series(parent.study or "", uid)
            return self._series_node(kind, parent, series) if series is not None else None
        if parent.kind is Kind.QUERY:  # only what the search found
            study = _pick(await self._query_studies(parent.name), dicomjson.STUDY_UID, uid)
        else:  # also a study a server's listing cap (or the scope) leaves out
            async with trio.open_nursery() as nursery:
                # The next lookup (a series of it) is answered by its listing, fetched
                # meanwhile: a path opens in one round trip per two levels.
                nursery.start_soon(self._series_quietly, uid)
                study = await self.archive.find_study(uid)
        return self._study_node(kind, parent, study) if study is not None else None

    async def _series_quietly(self, study: str) -> None:
        with contextlib.suppress(DicomfsError):  # the series lookup asks again, and says
            await self.archive.series(study)

    async def _lookup_file(self, parent: Node, name: str) -> Node | None:
        stem, dot, ext = name.rpartition(".")
        wanted = ("dcm",) if parent.kind is Kind.SERIES else RENDERED_FORMATS
        if not dot or ext not in wanted or not is_uid(stem):
            return None
        kind = Kind.INSTANCE if parent.kind is Kind.SERIES else Kind.RENDERED_FILE
        known = self._existing(kind, parent.series, stem, ext)
        if known is not None:
            return known
        if kind is Kind.INSTANCE:
            self.archive.expect(parent.study or "", parent.series or "", stem)
        # One QIDO match by UID, not the listing of a series that may hold thousands.
        found = await self.archive.find_instance(parent.study or "", parent.series or "", stem)
        if found is None:
            return None
        return next((node for node in self._instance_nodes(parent, [found])
                     if node.name == name), None)

    async def _lookup_query(self, name: str) -> Node | None:
        """A /query folder, once the query is known good: checked here, then by the server.

        A refused name is remembered with its reason and logged once, so that
        retries (shells, file managers) never become a flood of requests.
        """
        if name in self._bad_queries:
            return None
        try:
            await self._query_studies(name)
        except (names.InvalidQuery, BadRequest) as exc:
            reason = " ".join(str(exc).split())
            # The name may hold a patient's name or ID: only debug logs show it.
            log.warning("/query: a folder name was refused: %s", reason)
            log.debug("/query: refused %r", name)
            self._bad_queries[name] = reason
            return None
        return self._add(Kind.QUERY, (name,), name)

    async def children(self, inode: int) -> list[Node]:
        """Everything in a folder, in a stable order; the listings of the folders in it
        are fetched ahead (see ``Archive.list_ahead``), for walkers."""
        found = await self._children(self.node(inode))
        for child in found[:LIST_AHEAD_FOLDERS]:
            if child.kind in (Kind.STUDY, Kind.RENDERED_STUDY):
                self.archive.list_ahead(child.study or "")
            elif child.kind in (Kind.SERIES, Kind.RENDERED_SERIES):
                self.archive.list_ahead(child.study or "", child.series or "")
            elif child.kind in (Kind.PATIENT, Kind.DATE):
                for study in (await self._grouped_studies(child))[:LIST_AHEAD_FOLDERS]:
                    self.archive.list_ahead(_uid(study, dicomjson.STUDY_UID))
        return found

    async def _children(self, parent: Node) -> list[Node]:
        kind = parent.kind
        if kind is Kind.ROOT:
            tops = [self._top(name) for name in self._tops]
            return [*tops, self.upload_folder()] if self.uploads else tops
        if kind in UPLOAD_FOLDERS:
            return self.uploads.children(parent) if self.uploads else []
        if kind is Kind.QUERIES:
            return [self._help_node()]
        if parent.readable:
            return [child if child.name == name else dataclasses.replace(child, name=name)
                    for name, child in (await self._named_children(parent)).items()]
        if kind in (Kind.STUDIES, Kind.RENDERED, Kind.QUERY):
            found = await (self._query_studies(parent.name) if kind is Kind.QUERY
                           else self._studies())
            return [self._study_node(UID_CHILD[kind], parent, ds)
                    for ds in _sorted_by_uid(found, dicomjson.STUDY_UID)]
        if kind in (Kind.STUDY, Kind.RENDERED_STUDY):
            found = await self.archive.series(parent.study or "")
            nodes = [self._series_node(UID_CHILD[kind], parent, ds)
                     for ds in _sorted_by_uid(found, dicomjson.SERIES_UID)]
            return [*self._metadata_nodes(parent), *nodes] if kind is Kind.STUDY else nodes
        if kind in (Kind.SERIES, Kind.RENDERED_SERIES):
            found = await self.archive.instances(parent.study or "", parent.series or "")
            files = self._instance_nodes(parent, found)
            return [*self._metadata_nodes(parent), *files] if kind is Kind.SERIES else files
        raise NotADirectoryError(parent.name)

    # -- study listings ---------------------------------------------------------------------

    async def _studies(self) -> list[Dataset]:
        """Every study the mount shows: the whole server, or the scope's."""
        return await self.archive.studies(self.scope)

    async def _query_studies(self, text: str) -> list[Dataset]:
        """The studies a /query folder name finds, within the scope.

        A key the scope also sets, to another value, cannot be sent twice: the
        server answers the query's value and the scope's listing filters.
        """
        items = names.parse_query(text)
        narrower = any(self.scope.get(key, value) != value for key, value in items)
        found = await self.archive.studies({**self.scope, **dict(items)})
        if narrower:
            allowed = {dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in await self._studies()}
            found = [ds for ds in found if dicomjson.uid(ds, dicomjson.STUDY_UID) in allowed]
        return found

    async def _grouped_studies(self, folder: Node) -> list[Dataset]:
        """The studies below a patient or date folder."""
        index = await self._grouped()
        if folder.kind is Kind.PATIENT:
            return index.patients.get(folder.selector or "", [])
        prefix = folder.selector or ""
        return [ds for day, studies in index.days.items() if day.startswith(prefix)
                for ds in studies]

    async def _grouped(self) -> _Index:
        """The study listing by patient and by day, made again when the listing is."""
        studies = await self._studies()
        if self._index is None or self._index.source is not studies:
            patients: dict[str, list[Dataset]] = {}
            wanted: dict[str, tuple[str, str]] = {}
            days: dict[str, list[Dataset]] = {}
            for ds in studies:
                key = _patient_key(ds)
                patients.setdefault(key, []).append(ds)
                wanted.setdefault(key, (names.patient_folder(ds), ""))
                day = names.iso_date(dicomjson.text(ds, dicomjson.STUDY_DATE))
                days.setdefault(day or names.UNKNOWN_DATE, []).append(ds)
            self._index = _Index(studies, patients, names.unique(wanted), days)
        return self._index

    # -- readable folders -----------------------------------------------------------------

    async def _named_children(self, parent: Node) -> dict[str, Node]:
        """Name -> node in a readable folder (sorted by name)."""
        if parent.kind in READABLE:
            index = await self._grouped()
            return self._memo(parent, index, lambda: self._name_grouped(parent, index))
        if parent.kind is Kind.STUDY:
            series = await self.archive.series(parent.study or "")
            return self._memo(parent, series, lambda: self._name_series(parent, series))
        found = await self.archive.instances(parent.study or "", parent.series or "")
        return self._memo(parent, found, lambda: self._name_instances(parent, found))

    def _memo(self, parent: Node, source: object,
              naming: Callable[[], dict[str, Node]]) -> dict[str, Node]:
        """Names made from ``source``, made again only for a new listing (not per lookup)."""
        cached = self._named.get(parent.inode)
        if cached is None or cached[0] is not source:
            cached = self._named[parent.inode] = (source, dict(sorted(naming().items())))
        return cached[1]

    def _name_series(self, parent: Node, found: list[Dataset]) -> dict[str, Node]:
        width = names.number_width(dicomjson.integer(ds, dicomjson.SERIES_NUMBER)
                                   for ds in found)
        unique = names.unique({_uid(ds, dicomjson.SERIES_UID): (names.series_folder(ds, width), "")
                               for ds in found}, reserved={METADATA})
        children = {node.name: node for node in self._metadata_nodes(parent)}
        for ds in found:
            name = unique[_uid(ds, dicomjson.SERIES_UID)]
            children[name] = self._series_node(Kind.SERIES, parent, ds, name=name)
        return children

    def _name_instances(self, parent: Node, found: list[Dataset]) -> dict[str, Node]:
        width = names.number_width(dicomjson.integer(ds, dicomjson.INSTANCE_NUMBER)
                                   for ds in found)
        unique = names.unique({_uid(ds, dicomjson.SOP_UID): (names.instance_stem(ds, width),
                                                              ".dcm") for ds in found},
                              reserved={METADATA})
        children = {node.name: node for node in self._metadata_nodes(parent)}
        children.update((unique[node.instance or ""], node)
                        for node in self._instance_nodes(parent, found))
        return children

    def _name_grouped(self, parent: Node, index: _Index) -> dict[str, Node]:
        """Children of /patients, a patient, /dates and its year, month and day folders."""
        if parent.kind is Kind.PATIENTS:
            return {name: self._add(Kind.PATIENT, (key,), name, readable=True, selector=key)
                    for key, name in index.patient_names.items()}
        if parent.kind is Kind.PATIENT:
            return self._study_folders(parent, index.patients.get(parent.selector or "", []),
                                       names.study_folder)
        prefix = parent.selector or ""
        if parent.kind is Kind.DATE and (len(prefix) == len("YYYY-MM-DD")
                                         or prefix == names.UNKNOWN_DATE):
            return self._study_folders(parent, index.days.get(prefix, []),
                                       names.dated_study_folder)
        # /dates holds years (and "unknown"), a year months, a month days.
        size = {0: 4, 4: 7, 7: 10}[len(prefix)]
        folders = {day[:size] if day != names.UNKNOWN_DATE else day for day in index.days
                   if day.startswith(prefix)}
        return {name: self._add(Kind.DATE, (name,), name, readable=True, selector=name)
                for name in folders}

    def _study_folders(self, parent: Node, studies: list[Dataset],
                       naming: Callable[[Dataset], str]) -> dict[str, Node]:
        unique = names.unique({_uid(ds, dicomjson.STUDY_UID): (naming(ds), "")
                               for ds in studies})
        children: dict[str, Node] = {}
        for ds in studies:
            name = unique[_uid(ds, dicomjson.STUDY_UID)]
            children[name] = self._study_node(Kind.STUDY, parent, ds, name=name)
        return children

    # -- node builders -------------------------------------------------------------------

    def upload_folder(self) -> Node:
        return self._add(Kind.UPLOADS, (), UPLOAD)

    def new_upload_node(self, kind: Kind, name: str) -> Node:
        """A fresh node for something created in /upload: its own inode, whatever its name
        (an entry can be renamed, removed and made again)."""
        return self._add(kind, (len(self._nodes),), name, mtime=time.time(), exact=True)

    def _study_node(self, kind: Kind, parent: Node, ds: Dataset, *,
                    name: str | None = None) -> Node:
        uid = _uid(ds, dicomjson.STUDY_UID)
        return self._add(kind, (parent.inode, uid), name or uid, study=uid,
                         readable=parent.readable,
                         mtime=dicomjson.timestamp(ds, dicomjson.STUDY_DATE,
                                                   dicomjson.STUDY_TIME))

    def _series_node(self, kind: Kind, parent: Node, ds: Dataset, *,
                     name: str | None = None) -> Node:
        uid = _uid(ds, dicomjson.SERIES_UID)
        mtime = dicomjson.timestamp(ds, dicomjson.SERIES_DATE, dicomjson.SERIES_TIME)
        return self._add(kind, (parent.inode, uid), name or uid, study=parent.study,
                         series=uid, readable=parent.readable, mtime=mtime or parent.mtime)

    def _metadata_nodes(self, parent: Node) -> list[Node]:
        """The folder's metadata.json, when the server offers metadata."""
        return [self._metadata_node(parent)] if self.offers.metadata else []

    def _metadata_node(self, parent: Node) -> Node:
        node = self._add(Kind.METADATA, (parent.study, parent.series), METADATA,
                         study=parent.study, series=parent.series, mtime=parent.mtime)
        self._refresh_size(node, estimate=PLACEHOLDER_SIZE)
        return node

    def _help_node(self) -> Node:
        return self._add(Kind.TEXT, (QUERY_README,), QUERY_README, size=len(QUERY_HELP),
                         exact=True)

    def _instance_nodes(self, parent: Node, found: Iterable[Dataset]) -> list[Node]:
        """File nodes for a series' instances, ordered by instance number."""
        rendered = parent.kind is Kind.RENDERED_SERIES
        nodes: list[Node] = []
        for ds in dicomjson.in_instance_order(found):
            uid = _uid(ds, dicomjson.SOP_UID)
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
        cached = self.archive.cached_size(node.key)
        if cached is not None:
            node.size, node.exact = cached, True
        elif not node.exact:
            node.size = estimate

    # -- files ------------------------------------------------------------------------------

    async def open(self, inode: int) -> OpenFile:
        """The file's bytes, fetched (and cached) on first open; the size becomes exact."""
        node = self.node(inode)
        if node.kind is Kind.INSTANCE:
            blob = await self.archive.instance(node.study or "", node.series or "",
                                               node.instance or "")
        elif node.kind is Kind.RENDERED_FILE:
            blob = await self.archive.rendered(node.study or "", node.series or "",
                                               node.instance or "", node.fmt or "png")
        elif node.kind is Kind.METADATA:
            blob = await self.archive.metadata(node.study or "", node.series)
        elif node.kind is Kind.TEXT:
            blob = _text_blob(QUERY_HELP)
        else:
            raise IsADirectoryError(node.name)
        node.size, node.exact = blob.size, True
        return blob


def _uid(ds: Dataset, tag: str) -> str:
    return dicomjson.uid(ds, tag) or ""


def _pick(datasets: list[Dataset], tag: str, uid: str) -> Dataset | None:
    return next((ds for ds in datasets if dicomjson.uid(ds, tag) == uid), None)


def _patient_key(ds: Dataset) -> str:
    """Who a study belongs to, as far as QIDO tells: the same ID and the same name."""
    name = names.person_name(dicomjson.value(ds, dicomjson.PATIENT_NAME))
    patient_id = dicomjson.text(ds, dicomjson.PATIENT_ID)
    return f"{names.clean(patient_id, '')}\n{names.clean(name, '')}"


def _text_blob(data: bytes) -> Blob:
    """Fixed bytes as an open file, for the adapter that reads by descriptor."""
    fd = os.memfd_create("dicomfs-text", os.MFD_CLOEXEC)
    os.write(fd, data)
    return Blob(fd, len(data))


def _sorted_by_uid(datasets: list[Dataset], tag: str) -> list[Dataset]:
    return sorted(datasets, key=lambda ds: dicomjson.uid(ds, tag) or "")


def _estimate(ds: Dataset, *, rendered: bool = False) -> int:
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
