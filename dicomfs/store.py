"""The on-disk cache store: immutable entries (instances, rendered images, metadata)
and listings, under one private folder.

It knows disk and nothing else: no HTTP, no DICOMweb. Every entry is written to
a temporary file and renamed into place, so a reader sees a whole entry or
none, even after ``kill -9`` in the middle of a write, and two processes
sharing the folder never see each other's partial files. Entries are named by
validated UIDs only, so nothing a server says can steer a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from dicomfs import metrics
from dicomfs.errors import CacheError
from dicomfs.uids import check_uid

log = logging.getLogger(__name__)

GiB = 1024**3
RESERVE_SHARE = 10  # the disk reserve is at most 1/10 of the cache's filesystem
STALE_TEMP_SECONDS = 24 * 3600
RECENCY_RESOLUTION = 3600.0
OBJECTS = "objects"
LISTINGS = "listings"
TEMP = "tmp"


@dataclass(frozen=True, slots=True)
class Key:
    """Names one immutable entry: an instance, a rendered image or a metadata answer."""

    study: str
    series: str | None = None
    instance: str | None = None
    kind: str = "metadata"  # "dcm", "png", "jpg" or "metadata"

    def relpath(self) -> str:
        """The entry's path below the objects folder, built from checked UIDs only."""
        parts = [check_uid(self.study)]
        if self.series is not None:
            parts.append(check_uid(self.series))
        if self.kind == "metadata":
            parts.append("metadata.json")
        elif self.instance is not None and self.kind in ("dcm", "png", "jpg"):
            parts.append(f"{check_uid(self.instance)}.{self.kind}")
        else:
            raise ValueError(f"malformed cache key {self!r}")
        return "/".join(parts)


class OpenFile(Protocol):
    """A file open for reading: a cache entry (:class:`CachedFile`), or an instance still
    arriving (``transfer.ArrivingFile``)."""

    size: int

    @property
    def fd(self) -> int:
        """The file read from, -1 when there is none yet."""
        ...

    async def read(self, offset: int, size: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class CachedFile:
    """An open, read-only cache entry; the store does not evict it while it is open."""

    fd: int
    size: int
    on_close: Callable[[], None] | None = None

    async def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)
        if self.on_close is not None:
            self.on_close()
            self.on_close = None


def server_folder_name(url: str) -> str:
    """A readable, collision-free folder name for a server URL."""
    parts = urlsplit(url)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", parts.hostname or "server")
    port = f"_{parts.port}" if parts.port else ""
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
    return f"{host}{port}-{digest}"


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700: the cache holds patient data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to another user; refusing to cache there")
    os.chmod(path, 0o700)


HEAD_BYTES = 64 * 1024


class Writer:
    """A temporary file that becomes a cache entry on :meth:`Store.commit`.

    It keeps the first HEAD_BYTES in memory too, so a header can be checked
    without reading the file back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.size += len(data)

    def move_to(self, path: Path) -> None:
        """Close the file and rename it to ``path`` (atomically); drop it if that fails."""
        try:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            os.replace(self.path, path)
        except OSError:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the partial file; safe to call more than once."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Store:
    """A bounded LRU store of immutable entries for one server.

    The size bound counts the entries; listings are small and kept apart
    so that offline browsing survives eviction. Recency is the file's mtime,
    refreshed on use, so the LRU order survives a remount. Entries open for
    reading are pinned: a reader never has its file evicted from under it.

    Thread-safe: commits (renames, eviction unlinks) run in worker threads, so
    that the trio thread serving every FUSE request never waits on the disk.
    The disk reserve (free space left to others) is ``reserve_bytes`` or a tenth
    of the filesystem, whichever is smaller: 1 GiB would leave a cache on a small
    filesystem no room at all.
    """

    def __init__(self, folder: Path, *, max_bytes: int = 10 * GiB,
                 reserve_bytes: int = GiB) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._objects = folder / OBJECTS
        self._listings = folder / LISTINGS
        self._temp = folder / TEMP
        for path in (folder, self._objects, self._listings, self._temp):
            make_private_dir(path)
        self.reserve_bytes = min(reserve_bytes, shutil.disk_usage(folder).total // RESERVE_SHARE)
        self._lock = threading.RLock()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self._total = 0
        self._clean_temp()
        self._scan()

    @classmethod
    def for_server(cls, cache_root: Path, url: str, **kwargs: int) -> Store:
        """The store of ``url`` below ``cache_root``, recording which server it is.

        The one way a command opens its cache: a folder it cannot use raises
        CacheError naming the folder, for the command to tell a person.
        """
        try:
            make_private_dir(cache_root)
            folder = cache_root / server_folder_name(url)
            store = cls(folder, **kwargs)
            marker = folder / "server.json"
            if not marker.exists():
                store._write_atomic(marker, json.dumps({"url": url}).encode())
        except (OSError, CacheError) as exc:
            raise CacheError(f"cannot use the cache folder {cache_root}: {exc}") from None
        return store

    # -- start-up -----------------------------------------------------------------

    def _clean_temp(self) -> None:
        """Remove what dead writers left; a live process's temporary files stay."""
        now = time.time()
        for entry in os.scandir(self._temp):
            pid = entry.name.split(".", 1)[0]
            alive = pid.isdigit() and pid_alive(int(pid))
            with contextlib.suppress(FileNotFoundError):
                if not alive or now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                    os.unlink(entry.path)

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for dirpath, _dirs, files in os.walk(self._objects):
            for name in files:
                path = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(path)
                    found.append((st.st_mtime, os.path.relpath(path, self._objects),
                                  st.st_size))
        for _mtime, rel, size in sorted(found):
            self._sizes[rel] = size
            self._total += size

    # -- entries ------------------------------------------------------------------

    def open(self, key: Key) -> CachedFile | None:
        """The entry, open for reading and pinned until closed, or None when not cached."""
        rel = key.relpath()
        path = self._objects / rel
        with self._lock:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                self._forget(rel)
                return None
            except OSError as exc:
                raise CacheError(f"cannot read the cache: {exc}") from None
            info = os.fstat(fd)
            self._touch(rel, path, info)
            self._pins[rel] += 1
        return CachedFile(fd, info.st_size, lambda: self._unpin(rel))

    def _unpin(self, rel: str) -> None:
        with self._lock:
            self._pins[rel] -= 1
            if self._pins[rel] <= 0:
                del self._pins[rel]
                if self._total > self.max_bytes:  # it was kept over the bound for its reader
                    self._evict(keep="")

    def holds(self, key: Key) -> bool:
        """Whether anything is cached for the study or series a metadata ``key`` names."""
        return (self._objects / key.relpath()).parent.is_dir()

    def size(self, key: Key) -> int | None:
        """The entry's size if this process knows it is cached (no disk access)."""
        return self._sizes.get(key.relpath())

    @property
    def used(self) -> int:
        """Bytes in the entries this process knows of (the bound counts these)."""
        return self._total

    def capacity(self) -> int:
        """How many bytes the cache can hold now: its bound, or what the disk has room
        for beyond the reserve, whichever is smaller."""
        free = shutil.disk_usage(self.folder).free
        return max(0, min(self.max_bytes, self._total + free - self.reserve_bytes))

    def writer(self) -> Writer:
        """A new temporary file in this store's folder, named after this process."""
        with _cache_errors():
            return Writer(self._temp / f"{os.getpid()}.{os.urandom(6).hex()}.part")

    def commit(self, writer: Writer, key: Key) -> None:
        """Move a finished temporary file into place as ``key``; evict to stay in bounds."""
        rel = key.relpath()
        path = self._objects / rel
        with self._lock:  # renames and evictions in turn: the bound holds on disk too
            with _cache_errors():
                try:
                    _make_dirs(self._objects, path.parent)
                except OSError:
                    writer.abort()
                    raise
                writer.move_to(path)
            self._forget(rel)
            self._sizes[rel] = writer.size
            self._total += writer.size
            self._evict(keep=rel)

    def put_bytes(self, key: Key, data: bytes) -> None:
        """Store ``data`` as ``key`` (in one go: it is small, metadata or an image)."""
        self.commit(self._written(data), key)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """A file beside the entries (a listing, a note, the server's name), written the
        way :meth:`put_bytes` writes an entry, but not counted against the bound."""
        with _cache_errors():
            self._written(data).move_to(path)

    def _written(self, data: bytes) -> Writer:
        """``data`` in a new temporary file, to be renamed into place; dropped on failure."""
        writer = self.writer()
        try:
            with _cache_errors():
                writer.write(data)
        except BaseException:
            writer.abort()
            raise
        return writer

    # -- listings -----------------------------------------------------------------

    def save_listing(self, name: str, data: bytes) -> None:
        self._write_atomic(self._listing_path(name), data)

    def load_listing(self, name: str) -> tuple[bytes, float] | None:
        """A saved listing and its age in seconds, or None."""
        path = self._listing_path(name)
        try:
            data = path.read_bytes()
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return data, age

    def drop_listing(self, name: str) -> None:
        """Forget a saved listing (its folder changed: an upload added to it); one that
        cannot be removed only stays stale for a TTL."""
        with contextlib.suppress(OSError):
            self._listing_path(name).unlink()

    def has_listings(self) -> bool:
        """Whether anything was ever listed here: enough to start a mount offline."""
        with os.scandir(self._listings) as entries:
            return any(True for _ in entries)

    def _listing_path(self, name: str) -> Path:
        return self._listings / (hashlib.sha256(name.encode()).hexdigest()[:40] + ".json")

    # -- notes --------------------------------------------------------------------

    def save_note(self, name: str, data: bytes) -> None:
        """A small private file of this server's folder (what it offers, ...), atomically."""
        self._write_atomic(self._note_path(name), data)

    def load_note(self, name: str) -> bytes | None:
        try:
            return self._note_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def _note_path(self, name: str) -> Path:
        if not re.fullmatch(r"[a-z][a-z0-9-]*\.json", name):
            raise ValueError(f"not a note name: {name!r}")
        return self.folder / name

    # -- accounting ---------------------------------------------------------------

    def _touch(self, rel: str, path: Path, info: os.stat_result) -> None:
        """Mark an entry as just used; on disk at most hourly (the LRU order a remount
        starts from), since writing an inode on every open costs more than a read."""
        if rel in self._sizes:
            self._sizes.move_to_end(rel)
        else:
            self._sizes[rel] = info.st_size
            self._total += info.st_size
        if time.time() - info.st_mtime > RECENCY_RESOLUTION:
            with contextlib.suppress(OSError):
                os.utime(path)

    def _forget(self, rel: str) -> None:
        size = self._sizes.pop(rel, None)
        if size is not None:
            self._total -= size

    def _evict(self, keep: str) -> None:
        """Drop least recently used entries until under the bound and the disk reserve;
        entries open for reading (and ``keep``, just written) stay."""
        free = shutil.disk_usage(self.folder).free
        while self._total > self.max_bytes or free < self.reserve_bytes:
            rel = next(self._victims(keep), None)
            if rel is None:
                break
            size = self._sizes[rel]
            self._forget(rel)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._objects / rel)
                free += size
            metrics.CACHE_EVICTIONS.inc()
            log.debug("evicted %s (%d bytes)", rel, size)

    def _victims(self, keep: str) -> Iterator[str]:
        """Entries in LRU order that may be evicted."""
        return (rel for rel in self._sizes if rel != keep and rel not in self._pins)


@contextlib.contextmanager
def _cache_errors() -> Iterator[None]:
    """OS errors of the cache folder as CacheError (EIO), never as "no such file"."""
    try:
        yield
    except OSError as exc:
        raise CacheError(f"the cache folder failed: {exc}") from None


def _make_dirs(base: Path, folder: Path) -> None:
    """Create ``folder`` below ``base`` with every new level 0700 (makedirs would give
    intermediate levels the umask's mode)."""
    current = base
    for part in folder.relative_to(base).parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            current.mkdir(mode=0o700)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True, slots=True)
class ServerCache:
    """What ``dicomfs cache info`` shows of one server's folder."""

    url: str
    folder: Path
    bytes: int
    entries: int
    listings: int


def _server_folders(cache_root: Path) -> list[tuple[Path, str]]:
    """(folder, url) of every server folder below ``cache_root``."""
    found = []
    if cache_root.is_dir():
        for folder in sorted(cache_root.iterdir()):
            try:
                found.append((folder, json.loads((folder / "server.json").read_text())["url"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return found


def summarize(cache_root: Path) -> list[ServerCache]:
    result = []
    for folder, url in _server_folders(cache_root):
        size = entries = 0
        for dirpath, _dirs, files in os.walk(folder / OBJECTS):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    size += os.stat(os.path.join(dirpath, name)).st_size
                    entries += 1
        listings = len(os.listdir(folder / LISTINGS)) if (folder / LISTINGS).is_dir() else 0
        result.append(ServerCache(url, folder, size, entries, listings))
    return result


def clear(cache_root: Path, url: str | None = None) -> int:
    """Delete the cache of ``url``, or of every server; returns how many were removed."""
    removed = 0
    for folder, folder_url in _server_folders(cache_root):
        if url is None or folder_url.rstrip("/") == url.rstrip("/"):
            shutil.rmtree(folder)
            removed += 1
    return removed
