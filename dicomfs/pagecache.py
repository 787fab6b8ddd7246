"""What the kernel's page cache holds of each file, and filling it at first open.

Files are immutable, so once the kernel has every page of one and its exact
size, it keeps them across opens (``keep_cache``) and reads never reach us. The
first open pushes a small file whole with ``notify_store``, read through an mmap
of the cache file (one copy, not two), instead of answering a READ per 1 MiB;
later opens of a file the kernel holds need no descriptor at all (see
:meth:`PageCache.holds`).

The kernel trusts the size it was last told and drops all pages of a file whose
size shrinks, so a file is pushed only when that size is a floor of the real
one (sizes shown before the first read are estimates; see ``tree._estimate``).

Pushing the next files of a folder from a worker thread while a reader walks
it was measured (``cat`` of a 400-file series, 2 cores) and left out: it took
more CPU than it saved, and the reader was no faster.
"""

from __future__ import annotations

import errno
import logging
import mmap

import pyfuse3

from dicomfs.store import CachedFile, OpenFile
from dicomfs.tree import Node

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PUSH_AT_OPEN_BYTES = 8 * MiB  # larger files are read through READ requests instead


def push(inode: int, opened: CachedFile) -> bool:
    """Put a whole cache file into the kernel's page cache for ``inode``."""
    if opened.size == 0:
        return True
    try:
        with mmap.mmap(opened.fd, opened.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                       prot=mmap.PROT_READ) as view:
            pyfuse3.notify_store(inode, 0, view)
    except OSError as exc:  # ENOENT: the kernel has forgotten the inode
        if exc.errno != errno.ENOENT:
            log.debug("notify_store(%d): %s", inode, exc)
        return False
    return True


class PageCache:
    """What the kernel holds of each file. The adapter reports every size it tells
    the kernel (:meth:`told`) and every inode the kernel forgets (:meth:`forget`)."""

    def __init__(self) -> None:
        self._told: dict[int, int] = {}  # inode -> the size the kernel was last given
        self._held: set[int] = set()  # the kernel has every page and the exact size

    def told(self, node: Node) -> None:
        self._told[node.inode] = node.size

    def holds(self, inode: int) -> bool:
        """Whether the kernel holds all of the file: an open then needs no descriptor.

        Pages are kept across opens (``keep_cache``) because the file is immutable;
        if memory pressure drops some, the kernel asks with READ as usual.
        """
        return inode in self._held

    def forget(self, inode: int) -> None:
        """The kernel dropped the inode, and with it its pages and attributes."""
        self._held.discard(inode)
        self._told.pop(inode, None)

    def first_open(self, node: Node, opened: OpenFile) -> None:
        """Bring the kernel's view of a file just opened (not held) in line with ``opened``.

        Pushing the pages also sets the exact size; when that is impossible or not
        worth it, the kernel is made to ask for the size again before trusting one.
        """
        told = self._told.get(node.inode)
        if (node.immutable and isinstance(opened, CachedFile) and opened.size <= PUSH_AT_OPEN_BYTES
                and told is not None and told <= opened.size and push(node.inode, opened)):
            self._held.add(node.inode)
        elif told != opened.size:
            try:
                pyfuse3.invalidate_inode(node.inode, attr_only=True)
            except OSError as exc:
                log.debug("invalidate_inode(%d): %s", node.inode, exc)
