"""Uploads: files copied into /upload are stored on the server with STOW-RS.

Opt-in (``--allow-upload``); without it :attr:`dicomfs.tree.Tree.uploads` is None and
/upload is an empty read-only folder. What is written goes to a private temporary
file in the cache folder (0600, through :meth:`dicomfs.store.Store.writer`, so a dead
mount's leftovers are swept), never to memory. When the writer closes the file
(FUSE flush), the file is checked (a whole DICOM Part 10 object, :mod:`dicomfs.part10`)
and only then sent in one STOW-RS request streamed from disk; ``close()`` returns
when the server has answered, so ``cp`` reports the outcome, and the log says why
a file was refused.

After a success the instance's listings are dropped (the next ``ls`` of its study
and series asks the server again) and the entry leaves /upload, with any folder
the upload left empty. For :data:`LINGER` seconds the name still answers lookups,
attribute changes and a rename, as no-ops: ``rsync`` renames its temporary file
and ``cp -r`` and file managers set times and modes after closing. A failed upload
stays, with its bytes, until removed (or written again, which retries it).
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
import os
import time
from dataclasses import dataclass, field

import pydicom
import trio

from dicomfs import part10
from dicomfs.archive import Archive
from dicomfs.errors import DicomfsError, IntegrityError, InvalidUpload, TooLarge
from dicomfs.store import Writer
from dicomfs.tree import Kind, Node, Tree
from dicomfs.uids import is_uid

log = logging.getLogger(__name__)

LINGER = 60.0  # seconds a stored entry's name still resolves (see the module doc)
PREAMBLE = 128


class State(enum.Enum):
    WRITING = "writing"
    UPLOADING = "uploading"
    FAILED = "failed"
    STORED = "stored"


@dataclass(eq=False)
class _Entry:
    """A file or folder of /upload; ``children`` is None for a file."""

    node: Node
    parent: _Entry | None
    children: dict[str, _Entry] | None = None
    writer: Writer | None = None  # a file's bytes, in its private temporary file
    state: State = State.WRITING
    dirty: bool = False  # written since the last upload attempt
    opens: int = 0
    gone_since: float | None = None  # stored, or emptied by storing: hidden, lingering
    removed: bool = False

    @property
    def path(self) -> str:
        """Where it is in the mount, for the log."""
        parts: list[str] = []
        entry: _Entry | None = self
        while entry is not None:
            parts.append(entry.node.name)
            entry = entry.parent
        return "/" + "/".join(reversed(parts))

    def visible(self) -> bool:
        return self.gone_since is None


@dataclass
class Uploads:
    """What /upload holds, and storing it: the tree asks :meth:`lookup` and
    :meth:`children`, the FUSE adapter everything that writes."""

    tree: Tree
    archive: Archive
    max_size: int
    _entries: dict[int, _Entry] = field(default_factory=dict)
    _lingering: collections.deque[_Entry] = field(default_factory=collections.deque)

    # -- the folder tree ------------------------------------------------------------

    def lookup(self, folder: Node, name: str) -> Node | None:
        self._prune()
        child = self._children_of(folder).get(name)
        return child.node if child is not None else None

    def children(self, folder: Node) -> list[Node]:
        self._prune()
        found = self._children_of(folder)
        return [found[name].node for name in sorted(found) if found[name].visible()]

    def entry(self, node: Node) -> _Entry:
        """The entry behind an upload node; the top folder's is made on first use."""
        entry = self._entries.get(node.inode)
        if entry is None:
            if node is not self.tree.upload_folder():
                raise FileNotFoundError(node.name)
            entry = self._entries[node.inode] = _Entry(node, None, children={})
        return entry

    def _children_of(self, folder: Node) -> dict[str, _Entry]:
        children = self.entry(folder).children
        if children is None:
            raise NotADirectoryError(folder.name)
        return children

    def _existing(self, folder: Node, name: str) -> _Entry:
        """The entry ``name`` of ``folder``, to remove or rename: it must be there."""
        entry = self._children_of(folder).get(name)
        if entry is None:
            raise FileNotFoundError(name)
        return entry

    def _add(self, folder: Node, name: str, kind: Kind) -> _Entry:
        """A new entry ``name`` in ``folder``, replacing a lingering one of that name."""
        if not name or "/" in name or name in (".", ".."):
            raise OSError(errno.EINVAL, "not a file name")
        parent = self.entry(folder)
        siblings = self._children_of(folder)
        old = siblings.get(name)
        if old is not None and old.visible():
            raise OSError(errno.EEXIST, "exists", name)
        entry = _Entry(self.tree.new_upload_node(kind, name), parent,
                       children={} if kind is Kind.UPLOAD_FOLDER else None)
        siblings[name] = self._entries[entry.node.inode] = entry
        self._revive(parent)
        return entry

    def mkdir(self, folder: Node, name: str) -> Node:
        return self._add(folder, name, Kind.UPLOAD_FOLDER).node

    def create(self, folder: Node, name: str) -> Node:
        """A new, empty file, open for writing (the caller counts the open)."""
        entry = self._add(folder, name, Kind.UPLOAD_FILE)
        entry.writer = self.archive.writer()
        entry.dirty = True  # closing it as it is uploads it: an empty file is refused
        entry.opens += 1
        return entry.node

    def unlink(self, folder: Node, name: str) -> None:
        entry = self._existing(folder, name)
        if entry.children is not None:
            raise IsADirectoryError(name)
        self._detach(entry)

    def rmdir(self, folder: Node, name: str) -> None:
        entry = self._existing(folder, name)
        if entry.children is None:
            raise NotADirectoryError(name)
        if any(child.visible() for child in entry.children.values()):
            raise OSError(errno.ENOTEMPTY, "folder not empty")
        self._detach(entry)

    def rename(self, old_folder: Node, old_name: str, new_folder: Node, new_name: str,
               *, replace: bool = True) -> None:
        source = self._existing(old_folder, old_name)
        if not source.visible():  # rsync renaming the temporary file it just closed
            self._detach(source)
            return
        target_folder = self.entry(new_folder)
        ancestor: _Entry | None = target_folder
        while ancestor is not None:
            if ancestor is source:
                raise OSError(errno.EINVAL, "a folder cannot move into itself")
            ancestor = ancestor.parent
        target = self._children_of(new_folder).get(new_name)
        if target is source:
            return
        if target is not None and target.visible():
            if not replace:
                raise OSError(errno.EEXIST, "exists", new_name)
            if target.children is not None:
                if source.children is None:
                    raise IsADirectoryError(new_name)
                if any(child.visible() for child in target.children.values()):
                    raise OSError(errno.ENOTEMPTY, "folder not empty")
            elif source.children is not None:
                raise NotADirectoryError(new_name)
        if target is not None:
            self._detach(target)
        del self._children_of(old_folder)[old_name]
        self._children_of(new_folder)[new_name] = source
        source.parent, source.node.name = target_folder, new_name
        self._revive(target_folder)

    def _detach(self, entry: _Entry) -> None:
        """Take an entry out of its folder; a file's bytes go once nobody has it open."""
        siblings = entry.parent.children if entry.parent is not None else None
        if siblings is not None and siblings.get(entry.node.name) is entry:
            del siblings[entry.node.name]
        entry.removed = True
        self._drop_bytes(entry)
        self._forget_if_done(entry)

    # -- files ------------------------------------------------------------------------

    def open(self, node: Node, *, write: bool, truncate: bool) -> None:
        entry = self.entry(node)
        if entry.children is not None:
            raise IsADirectoryError(node.name)
        if write and entry.state is State.UPLOADING:
            raise OSError(errno.EBUSY, "being stored on the server")
        if write and truncate:  # opened without: nothing changes before a write
            self._writable(entry)
            self._truncate(entry, 0)
        entry.opens += 1

    def read(self, node: Node, offset: int, size: int) -> bytes:
        entry = self.entry(node)
        if entry.writer is None:
            return b""
        fd = os.open(entry.writer.path, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def write(self, node: Node, offset: int, data: bytes) -> int:
        entry = self.entry(node)
        writer = self._writable(entry)
        end = offset + len(data)
        if end > self.max_size:
            log.error("upload %s refused: larger than --upload-max-size (%d bytes)",
                      entry.path, self.max_size)
            raise TooLarge("larger than --upload-max-size")
        # Straight to the page cache: a worker thread would cost more than the write.
        written = os.pwrite(writer.fd, data, offset)
        node.size = max(node.size, offset + written)
        entry.dirty = True
        return written

    def truncate(self, node: Node, size: int) -> None:
        entry = self.entry(node)
        if entry.children is not None:
            raise IsADirectoryError(node.name)
        if size > self.max_size:
            log.error("upload %s refused: larger than --upload-max-size", entry.path)
            raise TooLarge("larger than --upload-max-size")
        self._writable(entry)
        self._truncate(entry, size)

    def _truncate(self, entry: _Entry, size: int) -> None:
        assert entry.writer is not None
        os.ftruncate(entry.writer.fd, size)
        entry.node.size = size
        entry.dirty = True

    def _writable(self, entry: _Entry) -> Writer:
        """The entry's temporary file, ready for writes: a stored or failed file written
        again is a new upload (of its bytes kept so far, while it is open)."""
        if entry.state is State.UPLOADING:
            raise OSError(errno.EBUSY, "being stored on the server")
        if entry.writer is None:
            entry.writer = self.archive.writer()
            entry.node.size = 0
        entry.state = State.WRITING
        if not entry.visible() and not entry.removed:
            entry.gone_since = None
            if entry.parent is not None and entry.parent.children is not None:
                entry.parent.children.setdefault(entry.node.name, entry)
            self._revive(entry.parent)
        return entry.writer

    async def flush(self, node: Node) -> None:
        """Store the file if it was written since it was last stored; raise why not.

        Called at every close of a descriptor; a file closed without new writes (a
        second descriptor, a reader) is not sent again.
        """
        entry = self.entry(node)
        if entry.state is not State.WRITING or not entry.dirty or entry.removed:
            return
        assert entry.writer is not None
        entry.dirty = False
        entry.state = State.UPLOADING
        try:
            sop, study, series = await self._send(entry, entry.writer)
        except DicomfsError as exc:
            entry.state = State.FAILED
            log.error("upload %s not stored: %s", entry.path, exc)
            raise
        except BaseException:
            entry.state, entry.dirty = State.WRITING, True  # cancelled: not sent, or unknown
            raise
        entry.state = State.STORED
        log.info("upload %s stored: instance %s of study %s", entry.path, sop, study or "?")
        if study and series:
            self.archive.forget_listings(study, series, sop)
        self._vanish(entry)

    async def _send(self, entry: _Entry, writer: Writer) -> tuple[str, str | None, str | None]:
        size = entry.node.size
        try:
            sop, study, series = await trio.to_thread.run_sync(_identify, writer, size)
        except IntegrityError as exc:
            raise InvalidUpload(f"refused before sending: {exc}") from None
        result = await self.archive.upload(writer.path)
        if sop in result.failed:
            raise DicomfsError(f"the server refused instance {sop}: {result.failed[sop]}")
        if result.failed or (result.stored and sop not in result.stored):
            raise DicomfsError(f"the server did not confirm instance {sop} "
                               f"(it names {sorted(result.stored) or 'none'})")
        return sop, study, series

    def release(self, node: Node) -> None:
        entry = self.entry(node)
        entry.opens -= 1
        if entry.state is State.STORED or entry.removed:
            self._drop_bytes(entry)
        self._forget_if_done(entry)

    def _forget_if_done(self, entry: _Entry) -> None:
        """Out of its folder and closed: nothing will ask for it again."""
        if entry.removed and entry.opens <= 0:
            self._entries.pop(entry.node.inode, None)

    def _drop_bytes(self, entry: _Entry) -> None:
        if entry.writer is not None and entry.opens <= 0 and \
                entry.state is not State.UPLOADING:
            entry.writer.abort()
            entry.writer = None

    # -- leaving /upload ----------------------------------------------------------------

    def _vanish(self, entry: _Entry) -> None:
        """Hide a stored file, and every folder that storing it left empty. The file
        lingers empty: a tool that compares sizes (rsync) must not take a new file of
        the same name, copied while it lingers, for one already there."""
        now = time.monotonic()
        entry.node.size = 0
        current = entry
        while current.parent is not None:  # /upload itself stays
            if current.children is not None and \
                    any(child.visible() for child in current.children.values()):
                break
            current.gone_since = now
            self._lingering.append(current)
            current = current.parent
        self._drop_bytes(entry)

    def _revive(self, folder: _Entry | None) -> None:
        """Something new in a hidden folder: it (and its parents) show again."""
        while folder is not None and not folder.visible():
            folder.gone_since = None
            folder = folder.parent

    def _prune(self) -> None:
        """Forget names that have lingered long enough."""
        limit = time.monotonic() - LINGER
        while self._lingering and (self._lingering[0].gone_since or 0) <= limit:
            entry = self._lingering.popleft()
            if entry.gone_since is not None:
                self._detach(entry)

    def statvfs(self) -> os.statvfs_result:
        """The space uploads are written to (file managers check it before copying)."""
        return self.archive.space()


def _identify(writer: Writer, size: int) -> tuple[str, str | None, str | None]:
    """(SOP Instance UID, Study UID, Series UID) of a whole DICOM Part 10 file; the
    study and series are None when unreadable. IntegrityError for anything else.
    Blocking: run in a worker thread."""
    fd = os.open(writer.path, os.O_RDONLY)
    try:
        if os.pread(fd, 4, PREAMBLE) != b"DICM":
            raise IntegrityError("not a DICOM Part 10 file (no DICM after the preamble)")
        sop = part10.whole_instance_uid(b"", fd, size)
    finally:
        os.close(fd)
    try:
        ds = pydicom.dcmread(writer.path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    except Exception as exc:  # any failure: refreshing listings is a nicety
        log.debug("no study and series UIDs from %s: %s", writer.path, exc)
        return sop, None, None
    return sop, study if is_uid(study) else None, series if is_uid(series) else None
