"""The commands: ``dicomfs mount``, ``unmount``, ``cache``, ``prefetch`` and ``status``.

What can be typed (the parser, the FUSE helper form that mount.fuse3 and
``/etc/fstab`` use) is :mod:`dicomfs.options`; here parsed options become what
each command runs with (secrets, TLS, the client's settings, logging), and run.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import logging
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

import certifi

from dicomfs.auth import (
    CredentialError,
    Secrets,
    build_auth,
    parse_header,
    receive_secrets,
    send_secrets,
)
from dicomfs.client import ClientConfig
from dicomfs.options import build_parser, fuse_helper_argv, without_secrets
from dicomfs.store import server_folder_name


def gather_secrets(args: argparse.Namespace) -> Secrets:
    """Secrets from the pipe a parent process sent, or from options, env, file, prompt."""
    if args.secrets_fd is not None:
        return receive_secrets(args.secrets_fd)
    secrets = Secrets(bearer_token=args.bearer_token, headers=list(args.header))
    for header in secrets.headers:
        parse_header(header)
    if args.user:
        if args.password_file:
            try:
                secrets.password = args.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise CredentialError(f"cannot read {args.password_file}: {exc.strerror}"
                                      ) from None
        elif "DICOMFS_PASSWORD" in os.environ:
            secrets.password = os.environ["DICOMFS_PASSWORD"]
        elif sys.stdin.isatty():
            secrets.password = getpass.getpass(f"password for {args.user} at {args.url}: ")
        else:
            raise CredentialError("no password for --user: set DICOMFS_PASSWORD, give "
                                  "--password-file, or run in a terminal to be asked")
    return secrets


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """The private CA and client certificate as one SSLContext (True: the default CAs)."""
    if not (args.ca_bundle or args.client_cert):
        return True
    try:
        context = ssl.create_default_context(cafile=args.ca_bundle or certifi.where())
        if args.client_cert:
            context.load_cert_chain(args.client_cert, args.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError(f"cannot load the TLS certificates or key: {exc}") from None
    return context


def client_config(args: argparse.Namespace, secrets: Secrets) -> ClientConfig:
    return ClientConfig(
        base_url=args.url, qido_url=args.qido_url, wado_url=args.wado_url,
        timeout=args.timeout, connect_timeout=args.connect_timeout,
        max_connections=args.max_connections, page_size=args.page_size,
        page_concurrency=args.page_concurrency, retries=args.retries, single_part=args.single_part,
        transfer_syntax=args.transfer_syntax,
        headers=dict(parse_header(h) for h in secrets.headers),
        auth=build_auth(secrets=secrets, user=args.user, token_file=args.token_file,
                        token_command=args.token_command, token_lifetime=args.token_lifetime),
        verify=tls_context(args))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message and, when
    there is one, the exception's traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
                 .isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, log_file: Path | None, log_format: str = "text") -> None:
    if log_file:  # private from the start: a log names studies and servers
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler())
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every request URL at INFO, and a query URL can carry patient IDs:
    # those lines are for debugging only. httpcore's byte-level chatter never helps.
    logging.getLogger("httpx").setLevel(logging.INFO if level == "debug" else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def run_mount(args: argparse.Namespace, argv: list[str]) -> int:
    from dicomfs import mount

    if not args.mountpoint.is_dir():
        print(f"dicomfs: mount point {args.mountpoint} is not a folder", file=sys.stderr)
        return 2
    secrets = gather_secrets(args)
    clean = without_secrets(argv)
    tls_context(args)  # unreadable certificates fail here, not in a background process
    if not args.foreground:
        log_file = args.log_file or (args.cache_dir / server_folder_name(args.url) / "mount.log")
        return mount.start_background([*clean, "--log-file", str(log_file)], log_file,
                                      send_secrets(secrets) if secrets else None)
    if clean != argv:  # secrets on our own command line: run again without them
        fd = send_secrets(secrets)
        os.execv(sys.executable, [sys.executable, "-m", "dicomfs", *clean,
                                  "--secrets-fd", str(fd)])
    setup_logging(args.log_level, args.log_file, args.log_format)
    fuse_options = [o for group in args.options for o in group.split(",") if o]
    options = mount.MountOptions(
        client=client_config(args, secrets),
        mountpoint=args.mountpoint.resolve(), cache_dir=args.cache_dir.resolve(),
        cache_size=args.cache_size, listing_ttl=args.listing_ttl, deadline=args.deadline,
        fuse_options=fuse_options, uid=args.uid, gid=args.gid, scope=dict(args.query),
        metrics_address=args.metrics_address, allow_upload=args.allow_upload,
        upload_max_size=args.upload_max_size)
    return mount.run_foreground(options, ready_fd=args.ready_fd)


def run_cache(args: argparse.Namespace) -> int:
    from dicomfs import store
    from dicomfs.progress import human_bytes

    if args.cache_command == "clear":
        removed = store.clear(args.cache_dir, args.url)
        print(f"removed {removed} server cache(s) from {args.cache_dir}")
        return 0
    servers = store.summarize(args.cache_dir)
    print(f"cache folder: {args.cache_dir}")
    if not servers:
        print("empty")
    for server in servers:
        print(f"{server.url}\n  {server.folder}\n  {human_bytes(server.bytes)} in "
              f"{server.entries} entries, {server.listings} saved listings")
    print(f"total: {human_bytes(sum(s.bytes for s in servers))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = fuse_helper_argv(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except CredentialError as exc:
        print(f"dicomfs: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "mount":
        return run_mount(args, argv)
    if args.command == "unmount":
        from dicomfs.mount import unmount

        return unmount(args.mountpoint)
    if args.command == "cache":
        return run_cache(args)
    if args.command == "prefetch":
        return run_prefetch(args)
    if args.command == "status":
        return run_status(args)
    return 2


def run_status(args: argparse.Namespace) -> int:
    from dicomfs import status

    wanted = str(args.mountpoint.resolve()) if args.mountpoint else None
    found = [f for f in status.running(args.cache_dir)
             if wanted is None or f["mountpoint"] == wanted]
    shown = {f["mountpoint"] for f in found}
    # Mounts whose cache folder is elsewhere are running all the same: say so.
    elsewhere = [m for m in status.dicomfs_mounts()
                 if m not in shown and (wanted is None or m == wanted)]
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print("\n\n".join(status.describe(f) for f in found) if found else
              f"no running mount with its cache below {args.cache_dir}")
        for mountpoint in elsewhere:
            print(f"{mountpoint}: mounted, but its cache folder is not below "
                  f"{args.cache_dir} (give --cache-dir)")
    return 1 if wanted is not None and not found else 0


def _unwrapped(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups of one each (trio nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_prefetch(args: argparse.Namespace) -> int:
    import trio

    from dicomfs import capabilities
    from dicomfs.archive import Archive
    from dicomfs.client import DicomwebClient
    from dicomfs.errors import CacheError, DicomfsError
    from dicomfs.prefetch import prefetch
    from dicomfs.store import Store

    setup_logging(args.log_level, None, args.log_format)
    try:
        store = Store.for_server(args.cache_dir, args.url, max_bytes=args.cache_size)
    except CacheError as exc:
        print(f"dicomfs: {exc}", file=sys.stderr)
        return 1
    config = client_config(args, gather_secrets(args))

    async def run() -> int:
        async with DicomwebClient(config) as client, trio.open_nursery() as nursery:
            offers = await capabilities.learn(client, store)
            if not offers.metadata:
                print("dicomfs: the server offers no WADO-RS metadata: fetching the instances "
                      "only", file=sys.stderr)
            archive = Archive(client, store, retries=args.retries, deadline=args.deadline,
                              readahead=False)
            await nursery.start(archive.run)
            failed = await prefetch(archive, args.study, args.series, metadata=offers.metadata)
            nursery.cancel_scope.cancel()
            return failed

    try:
        failed = trio.run(run)
    except BaseException as exc:  # the fetch engine's nursery wraps what it raises
        cause = _unwrapped(exc)
        if isinstance(cause, DicomfsError):
            print(f"dicomfs: prefetch failed: {cause}", file=sys.stderr)
            return 1
        if isinstance(cause, KeyboardInterrupt):
            print("\ndicomfs: interrupted; run the same command again to resume",
                  file=sys.stderr)
            return 130
        raise
    if failed:
        print(f"dicomfs: {failed} instances could not be fetched (see above)", file=sys.stderr)
        return 1
    return 0
