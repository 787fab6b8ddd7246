"""Running a mount: wiring the layers, the FUSE session, readiness, signals, background.

``dicomfs mount`` starts a fresh ``--foreground`` process of itself in the
background rather than forking: trio, httpx and libfuse hold threads and file
descriptors that do not survive a fork. The child reports over a pipe whether
the mount came up, so the parent exits 0 only for a working mount and
otherwise prints the child's reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyfuse3
import trio

from dicomfs import capabilities, metrics, status
from dicomfs.archive import Archive
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import CacheError, DicomfsError, Unauthorized
from dicomfs.fs import DicomFS
from dicomfs.store import GiB, Store
from dicomfs.tree import Tree
from dicomfs.upload import Uploads

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
MAX_TASKS = 64
READAHEAD_KB = 1024


@dataclass
class MountOptions:
    """Everything a mount needs, as parsed by the CLI."""

    client: ClientConfig
    mountpoint: Path
    cache_dir: Path
    cache_size: int = 10 * GiB
    listing_ttl: float = 60.0
    deadline: float = 120.0
    fuse_options: list[str] = field(default_factory=list)
    uid: int | None = None
    gid: int | None = None
    scope: dict[str, str] = field(default_factory=dict)
    metrics_address: tuple[str, int] | None = None
    allow_upload: bool = False
    upload_max_size: int = 4 * GiB


class MountError(DicomfsError):
    """The mount could not be started; the message says why, for a person."""


def fsname(url: str) -> str:
    """The name ``mount`` and ``df`` show: the server, without any credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "server"
    return f"dicomfs:{host}" + (f":{parts.port}" if parts.port else "")


async def serve(options: MountOptions, *, ready: Callable[[], None] | None = None) -> None:
    """Mount, serve until unmounted or signalled, then unmount. Raises MountError."""
    try:
        store = Store.for_server(options.cache_dir, options.client.base_url,
                                 max_bytes=options.cache_size)
    except CacheError as exc:
        raise MountError(str(exc)) from None
    async with DicomwebClient(options.client) as client:
        await _check_server(client, store)
        offers = await capabilities.learn(client, store)
        archive = Archive(client, store, listing_ttl=options.listing_ttl,
                          retries=options.client.retries, deadline=options.deadline)
        fuse_options = {*pyfuse3.default_options, "default_permissions",
                        *(() if options.allow_upload else ("ro",)),
                        f"fsname={fsname(options.client.base_url)}", "subtype=dicomfs",
                        *options.fuse_options}
        try:
            tree = Tree(archive, scope=options.scope, offers=offers)
        except ValueError as exc:
            raise MountError(f"bad --query: {exc}") from None
        if options.allow_upload:
            tree.uploads = Uploads(tree, archive, max_size=options.upload_max_size)
        operations = DicomFS(tree, uid=options.uid, gid=options.gid)
        listeners = await _metrics_listeners(options.metrics_address)
        metrics.watch(archive.engine, store)
        recent = status.RecentLog()
        publisher = status.Publisher(store, status.MountInfo(
            options.client.base_url, str(options.mountpoint),
            metrics.bound_address(listeners) if listeners else None), recent)
        try:
            pyfuse3.init(operations, str(options.mountpoint), sorted(fuse_options))
        except RuntimeError as exc:
            raise MountError(f"cannot mount at {options.mountpoint}: {exc}") from None
        logging.getLogger().addHandler(recent)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_unmount_on_signal, nursery.cancel_scope)
                nursery.start_soon(_report_ready, options.mountpoint, ready)
                await nursery.start(archive.run)
                nursery.start_soon(publisher.run)
                if listeners:
                    nursery.start_soon(metrics.serve, listeners)
                    log.info("metrics at %s", publisher.info.metrics)
                await pyfuse3.main(max_tasks=MAX_TASKS)
                nursery.cancel_scope.cancel()
        finally:
            logging.getLogger().removeHandler(recent)
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", options.mountpoint)


async def _metrics_listeners(address: tuple[str, int] | None) -> list[trio.SocketListener]:
    """The metrics endpoint's sockets, bound before mounting: a taken port fails the mount."""
    if address is None:
        return []
    try:
        return await metrics.open_listeners(address)
    except OSError as exc:
        raise MountError(f"cannot serve metrics at {address[0]}:{address[1]}: {exc}"
                         ) from None


async def _check_server(client: DicomwebClient, store: Store) -> None:
    """Fail fast on a wrong URL or credentials; go on offline when the cache can serve."""
    try:
        await client.probe()
    except Unauthorized as exc:
        raise MountError(f"the server refused our credentials: {exc}") from None
    except DicomfsError as exc:
        if not store.has_listings():
            raise MountError(f"cannot reach {client.config.base_url}: {exc}") from None
        log.error("server unreachable (%s); mounting with what is cached", exc)


async def _unmount_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def _report_ready(mountpoint: Path, ready: Callable[[], None] | None) -> None:
    """Tell the parent once the kernel has really answered through our loop."""
    info = await trio.to_thread.run_sync(os.stat, mountpoint)
    _raise_readahead(info.st_dev)
    log.info("mounted at %s", mountpoint)
    if ready is not None:
        ready()


def _raise_readahead(device: int) -> None:
    """Let the kernel read ahead up to FUSE's largest request (1 MiB) instead of 128 KiB.

    Sequential readers then cost a quarter of the round trips. Only root may
    change it; others keep the default, which is correct, only slower.
    """
    path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        path.write_text(str(READAHEAD_KB))
    except OSError as exc:
        log.debug("readahead left at the default: %s", exc)


def run_foreground(options: MountOptions, ready_fd: int | None = None) -> int:
    """Run the mount in this process until it ends; report readiness on ``ready_fd``."""

    def report(message: str) -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)

    try:
        trio.run(lambda: serve(options, ready=lambda: report("ok")))
    except MountError as exc:
        log.error("%s", exc)
        report(f"error: {exc}")
        return 1
    return 0


def start_background(argv: list[str], log_file: Path, secrets_fd: int | None = None) -> int:
    """Start ``dicomfs mount --foreground`` detached and wait until it is ready or failed.

    Secrets reach the child through ``secrets_fd``; the environment variable that may
    have carried the password is not passed on.
    """
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "dicomfs", *argv, "--foreground",
               "--ready-fd", str(write_end)]
    fds = [write_end]
    if secrets_fd is not None:
        command += ["--secrets-fd", str(secrets_fd)]
        fds.append(secrets_fd)
    environment = {k: v for k, v in os.environ.items() if k != "DICOMFS_PASSWORD"}
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_file, "ab") as log_stream:
        os.chmod(log_file, 0o600)
        child = subprocess.Popen(command, pass_fds=fds, stdin=subprocess.DEVNULL, env=environment,
                                 stdout=log_stream, stderr=log_stream, start_new_session=True)
    for fd in fds:
        os.close(fd)
    answer = _read_answer(read_end, child)
    os.close(read_end)
    if answer == "ok":
        return 0
    if not answer:
        child.poll()
        answer = (f"the mount process ended (exit {child.returncode})" if
                  child.returncode is not None else "the mount did not become ready in time")
    print(f"dicomfs: {answer.removeprefix('error: ')} (log: {log_file})", file=sys.stderr)
    if child.poll() is None:
        child.terminate()
    return 1


def _read_answer(fd: int, child: subprocess.Popen[bytes]) -> str:
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while b"\n" not in data and time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.5)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        elif child.poll() is not None:
            break
    return data.decode("utf-8", "replace").strip()


def unmount(mountpoint: Path) -> int:
    """Unmount a dicomfs mount; the mount process then exits by itself."""
    error = "neither fusermount3 nor umount is installed"
    for command in (["fusermount3", "-u", str(mountpoint)], ["umount", str(mountpoint)]):
        with contextlib.suppress(FileNotFoundError):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                return 0
            error = result.stderr.strip()
    print(f"dicomfs: cannot unmount {mountpoint}: {error}", file=sys.stderr)
    return 1
