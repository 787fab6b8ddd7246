"""The FUSE adapter: kernel requests in, tree calls out.

Thin on purpose: it translates nodes to attributes and exceptions to errnos,
keeps open file and folder handles, and refuses every write with EROFS but in
/upload with ``--allow-upload`` (passed on to :mod:`dicomfs.upload`). What a
path means lives in :mod:`dicomfs.tree`; what the kernel's page cache holds of
each file, and pushing files into it, in :mod:`dicomfs.pagecache`.

Errors of uploads, as ``close()`` (or ``write()``) returns them: EINVAL for a file
that is no whole DICOM Part 10 object (nothing was sent), EEXIST when the server
answered 409 (it holds the instance, or refuses it), EFBIG for 413 or a file over
``--upload-max-size``, EACCES for 401/403, EIO for anything else (400, 5xx after
retries, no answer); the log says why.

pyfuse3 lets any exception other than FUSEError escape into its main loop and
end the mount, so every handler goes through :func:`_errno`. Extended attributes
are left to pyfuse3's ENOSYS: the kernel then stops asking, instead of costing
``ls -l`` two round trips per file.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from dicomfs import metrics
from dicomfs.errors import (
    Conflict,
    DicomfsError,
    InvalidUpload,
    NotFound,
    TooLarge,
    Unauthorized,
)
from dicomfs.pagecache import PageCache
from dicomfs.store import OpenFile
from dicomfs.tree import Entries, Kind, Node, Tree
from dicomfs.upload import Uploads

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

IMMUTABLE_TIMEOUT = 3600.0  # exact attributes of immutable files and known names
FOLDER_TIMEOUT = 60.0  # folders can gain children: series arrive in a study
NEGATIVE_TIMEOUT = 10.0  # a UID that is not there yet may appear
MUTABLE_TIMEOUT = 1.0  # metadata.json: its study may still be receiving instances
BLOCK = 512
UPLOAD_KINDS = {Kind.UPLOAD_FOLDER, Kind.UPLOAD_FILE}


def _errno(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Map whatever a handler raises to an errno the kernel can pass on."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (FileNotFoundError, NotFound):
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except IsADirectoryError:
            raise pyfuse3.FUSEError(errno.EISDIR) from None
        except Unauthorized as exc:
            log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EACCES) from None
        except (Conflict, TooLarge, InvalidUpload) as exc:  # logged by dicomfs.upload
            code = errno.EEXIST if isinstance(exc, Conflict) else \
                errno.EFBIG if isinstance(exc, TooLarge) else errno.EINVAL
            raise pyfuse3.FUSEError(code) from None
        except OSError as exc:  # the errno says it (ENOTEMPTY, EEXIST, ... of /upload)
            log.debug("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except (DicomfsError, ValueError) as exc:
            log.error("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return _counted(wrapper)


def _counted(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Count every call of a handler and every errno it answers (dicomfs.metrics)."""
    name = handler.__name__
    calls = metrics.FUSE_OPERATIONS.labels(name)

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        calls.inc()
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            metrics.fuse_error(name, exc.errno)
            raise

    return wrapper


async def _read_only(*_args: Any, **_kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


async def _read(held: OpenFile, size: int, off: int) -> bytes:
    """Answer a READ; at debug level say from which cache file ("(deleted)": evicted),
    or that the file is still arriving."""
    if log.isEnabledFor(logging.DEBUG):
        source = (os.readlink(f"/proc/self/fd/{held.fd}") if held.fd >= 0
                  else "the transfer under way")
        log.debug("READ %d bytes at %d from %s", size, off, source)
    return await held.read(off, size)


class DicomFS(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`Tree`."""

    enable_writeback_cache = False

    def __init__(self, tree: Tree, *, uid: int | None = None, gid: int | None = None) -> None:
        super().__init__()
        self.tree = tree
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.pages = PageCache()
        self._handles = itertools.count(1)
        # An inode instead of a CachedFile: opened without a descriptor (the kernel held
        # every page); one is opened if a READ comes after all.
        self._files: dict[int, OpenFile | int] = {}
        self._folders: dict[int, Entries] = {}
        self._written: dict[int, Node] = {}  # handles of files in /upload

    @property
    def uploads(self) -> Uploads | None:
        return self.tree.uploads

    def _upload_folder(self, inode: int) -> tuple[Uploads, Node]:
        """Uploads and the folder of ``inode``, or EROFS: only /upload takes writes."""
        node = self.tree.node(inode)
        if self.uploads is None or node.kind is not Kind.UPLOAD_FOLDER:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.uploads, node

    def _upload_file(self, inode: int) -> tuple[Uploads, Node] | None:
        node = self.tree.node(inode)
        if self.uploads is None or node.kind is not Kind.UPLOAD_FILE:
            return None
        return self.uploads, node

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        if self.uploads is not None and node.kind in UPLOAD_KINDS:
            # Written, renamed and removed at any time: the kernel keeps nothing.
            attr.st_mode = stat.S_IFDIR | 0o755 if node.is_dir else stat.S_IFREG | 0o644
            attr.st_nlink = 2 if node.is_dir else 1
            attr.attr_timeout = attr.entry_timeout = 0
        elif node.is_dir:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.attr_timeout = attr.entry_timeout = FOLDER_TIMEOUT
        else:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            # An estimated size must be asked for again, so the kernel never clamps
            # reads to it once the exact size is known; metadata can grow.
            attr.attr_timeout = (IMMUTABLE_TIMEOUT if node.exact and node.immutable
                                 else MUTABLE_TIMEOUT if node.exact else 0)
            attr.entry_timeout = IMMUTABLE_TIMEOUT
            self.pages.told(node)
        attr.st_size = node.size
        attr.st_blksize = 128 * 1024
        attr.st_blocks = -(-node.size // BLOCK)  # full blocks: cp must not think it sparse
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = int(node.mtime * 1e9)
        return attr

    @_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        try:
            node = await self.tree.lookup(parent_inode, os.fsdecode(name))
        except (FileNotFoundError, NotFound):
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the miss
            negative.entry_timeout = 0 if self.tree.node(parent_inode).kind is \
                Kind.UPLOAD_FOLDER else NEGATIVE_TIMEOUT
            return negative
        return self.attributes(node)

    @_errno
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.attributes(self.tree.current(inode))

    @_errno
    async def opendir(self, inode: int, ctx: Any) -> int:
        entries = await self.tree.open_folder(inode)
        try:
            await entries.after(0)  # the first page, or the listing's error, here
        except BaseException:
            entries.close()
            raise
        handle = next(self._handles)
        self._folders[handle] = entries
        return handle

    @_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Waits for the next page of a listing still arriving; nothing returned = the end.
        children = await self._folders[fh].after(start_id)
        for index, child in enumerate(children, start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(child.name),
                                         self.attributes(child), index + 1):
                break

    @_errno
    async def releasedir(self, fh: int) -> None:
        entries = self._folders.pop(fh, None)
        if entries is not None:
            entries.close()

    @_errno
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        upload = self._upload_file(inode)
        if upload is not None:
            uploads, node = upload
            uploads.open(node, write=bool(flags & (os.O_WRONLY | os.O_RDWR)),
                         truncate=bool(flags & os.O_TRUNC))
            return self._written_handle(node)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.tree.node(inode)
        opened: OpenFile | int = inode
        if not self.pages.holds(inode):
            opened = await self.tree.open(inode)
            self.pages.first_open(node, opened)
        handle = next(self._handles)
        self._files[handle] = opened
        return pyfuse3.FileInfo(fh=handle, keep_cache=node.immutable)

    def _written_handle(self, node: Node) -> pyfuse3.FileInfo:
        handle = next(self._handles)
        self._written[handle] = node
        return pyfuse3.FileInfo(fh=handle, keep_cache=False)

    @_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        written = self._written.get(fh)
        if written is not None and self.uploads is not None:
            return self.uploads.read(written, off, size)
        held = self._files[fh]
        if isinstance(held, int):
            opened = await self.tree.open(held)
            held = self._files.get(fh)
            if not isinstance(held, int):  # released, or another READ opened it meanwhile
                try:
                    return await _read(opened, size, off)
                finally:
                    opened.close()
            held = self._files[fh] = opened
        return await _read(held, size, off)

    @_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._written.get(fh)
        if node is None or self.uploads is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.uploads.write(node, off, buf)

    @_errno
    async def flush(self, fh: int) -> None:
        """A close(): a file written in /upload is stored now, and close() says how it went."""
        node = self._written.get(fh)
        if node is not None and self.uploads is not None:
            await self.uploads.flush(node)

    @_errno
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        uploads, folder = self._upload_folder(parent_inode)
        node = uploads.create(folder, os.fsdecode(name))
        return self._written_handle(node), self.attributes(node)

    @_errno
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        uploads, folder = self._upload_folder(parent_inode)
        return self.attributes(uploads.mkdir(folder, os.fsdecode(name)))

    @_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        uploads, folder = self._upload_folder(parent_inode)
        uploads.unlink(folder, os.fsdecode(name))

    @_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        uploads, folder = self._upload_folder(parent_inode)
        uploads.rmdir(folder, os.fsdecode(name))

    @_errno
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        uploads, old = self._upload_folder(parent_inode_old)
        _, new = self._upload_folder(parent_inode_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        uploads.rename(old, os.fsdecode(name_old), new, os.fsdecode(name_new),
                       replace=not flags & pyfuse3.RENAME_NOREPLACE)

    @_errno
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        """In /upload: a new size truncates, times are kept, the rest is accepted and
        ignored (cp, rsync and file managers set modes after copying)."""
        node = self.tree.node(inode)
        if self.uploads is None or node.kind not in UPLOAD_KINDS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if fields.update_size:
            self.uploads.truncate(node, attr.st_size)
        if fields.update_mtime:
            node.mtime = attr.st_mtime_ns / 1e9
        return self.attributes(node)

    async def release(self, fh: int) -> None:
        written = self._written.pop(fh, None)
        if written is not None and self.uploads is not None:
            with contextlib.suppress(FileNotFoundError):
                self.uploads.release(written)
            return
        held = self._files.pop(fh, None)
        if held is not None and not isinstance(held, int):
            held.close()

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, _lookups in inode_list:
            self.pages.forget(inode)

    @_errno
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        node = self.tree.node(inode)
        if mode & os.W_OK and (self.uploads is None or node.kind not in UPLOAD_KINDS):
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    @_errno
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK
        data.f_namemax = 255
        if self.uploads is not None:  # what uploads may take; tools check before copying
            space = self.uploads.statvfs()
            data.f_bsize, data.f_frsize = space.f_bsize, space.f_frsize
            data.f_blocks, data.f_bfree, data.f_bavail = (space.f_blocks, space.f_bfree,
                                                          space.f_bavail)
        return data

    # Read-only: every other call that would change something.
    mknod = symlink = link = setxattr = removexattr = _read_only
