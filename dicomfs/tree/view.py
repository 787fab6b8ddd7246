"""What every view does: answer for the contents of the folders it made.

A view is one way of showing the server: /studies by UID, /patients and /dates
named for people, /query, /rendered. The tree hands each folder's ``lookup`` and
``children`` to the view that made the folder (``Node.view``); a view makes the
folders it shows through :class:`~dicomfs.tree.nodes.Nodes` and may hand them on to
another view (a patient folder's studies are answered by the named study view).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import cachetools

from dicomfs.dicomjson import Dataset
from dicomfs.listings import Arriving
from dicomfs.tree.nodes import Node, Nodes

LIST_AHEAD_FOLDERS = 64  # of a listing, the first so many folders are listed ahead
NAMED_FOLDERS = 4096  # folders named for people whose names are kept ready (others remade)


class View:
    """The base: a view with nothing in it (a file's node, the empty /upload)."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes
        self.archive = nodes.archive

    async def lookup(self, folder: Node, name: str) -> Node | None:
        """The child ``name`` of ``folder``, or None. Names that cannot be there are
        refused without a request (desktop probes: .Trash, desktop.ini, ...)."""
        return None

    async def children(self, folder: Node) -> list[Node]:
        """Everything in ``folder``, in a stable order."""
        return []

    async def entries(self, folder: Node) -> Entries:
        """What one ``opendir`` of ``folder`` shows; views of whole-server listings
        override it to show the first page while the rest arrives."""
        return Entries(await self.children(folder))

    def lists_ahead(self, folder: Node) -> bool:
        """Whether listing ``folder`` fetches the listings of the folders in it ahead."""
        return True

    async def list_ahead(self, folder: Node) -> None:
        """Start fetching the listings a walker opening ``folder`` will need."""
        if folder.study:
            self.archive.list_ahead(folder.study, folder.series or None)


class NamedView(View):
    """A view whose folders name their children for people (see names.py): names are
    made from the folder's listing, kept per folder, and made again only when the
    listing is new."""

    def __init__(self, nodes: Nodes) -> None:
        super().__init__(nodes)
        self._named: cachetools.LRUCache[int, tuple[object, dict[str, Node]]] = \
            cachetools.LRUCache(NAMED_FOLDERS)

    async def lookup(self, folder: Node, name: str) -> Node | None:
        # A name given out before resolves without its listing, even an expired one:
        # walking a path must not wait for a 10,000-study QIDO walk.
        named = self._named.get(folder.inode)
        child = named[1].get(name) if named else None
        return child if child is not None else (await self.names(folder)).get(name)

    async def children(self, folder: Node) -> list[Node]:
        # A file shown under two names (UID and number) is one node: the copy carries
        # the name of this folder.
        return [child if child.name == name else dataclasses.replace(child, name=name)
                for name, child in (await self.names(folder)).items()]

    async def names(self, folder: Node) -> dict[str, Node]:
        """Name -> node in ``folder``, sorted by name."""
        raise NotImplementedError

    def memo(self, folder: Node, source: object,
             naming: Callable[[], dict[str, Node]]) -> dict[str, Node]:
        """Names made from ``source``, made again only for a new listing (not per lookup)."""
        cached = self._named.get(folder.inode)
        if cached is None or cached[0] is not source:
            cached = self._named[folder.inode] = (source, dict(sorted(naming().items())))
        return cached[1]


class Entries:
    """A folder's entries for one ``opendir``: all known at once, or growing while the
    study listing behind them arrives (``arriving``, each study made a node by
    ``make``), so that ``find``, ``ls -U`` and file managers show the first page of a
    million-study server after one round trip. Each name is listed once; the order is
    the server's while it arrives.
    """

    def __init__(self, nodes: list[Node], arriving: Arriving | None = None,
                 make: Callable[[Dataset], Node] | None = None) -> None:
        self.nodes = nodes  # with ``arriving``, one per item of it so far
        self._arriving = arriving
        self._make = make
        self.seen: Callable[[list[Node]], Awaitable[None]] | None = None

    async def after(self, start: int) -> list[Node]:
        """The entries from ``start`` on: at least one, unless the folder has no more."""
        arriving = self._arriving
        if arriving is not None and self._make is not None:
            await arriving.wait(beyond=start)
            new = [self._make(ds) for ds in arriving.items[len(self.nodes):]]
            self.nodes.extend(new)
            if self.seen is not None:
                await self.seen(new)
            if arriving.done and arriving.error is None:  # a failed one says so next time
                self.close()
        return self.nodes[start:]

    async def all(self) -> list[Node]:
        while self._arriving is not None:
            await self.after(len(self.nodes))
        return self.nodes

    def close(self) -> None:
        """No more reading (``releasedir``): the listing stops if nobody else follows."""
        if self._arriving is not None:
            self._arriving.leave()
            self._arriving = None


class Grouped:
    """Studies grouped by ``key`` (a patient, a day), grouped again only when the
    listing is a new one."""

    def __init__(self, key: Callable[[Dataset], str]) -> None:
        self.key = key
        self._source: list[Dataset] | None = None
        self._groups: dict[str, list[Dataset]] = {}

    def __call__(self, studies: list[Dataset]) -> dict[str, list[Dataset]]:
        if self._source is not studies:
            self._groups = {}
            for ds in studies:
                self._groups.setdefault(self.key(ds), []).append(ds)
            self._source = studies
        return self._groups

