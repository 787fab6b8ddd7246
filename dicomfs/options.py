"""The command line's words: every option of every ``dicomfs`` command, and how argv is read.

The parser, the types that check option values, and the two rewritings of argv
(:func:`fuse_helper_argv` for mount.fuse3 and fstab, :func:`without_secrets`
before a process is left running) live here, so that what can be typed is in one
place; what each command then does is :mod:`dicomfs.cli`'s.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from dicomfs import __version__, metrics
from dicomfs.names import InvalidQuery, query_key
from dicomfs.uids import is_uid

COMMANDS = {"mount", "unmount", "cache", "prefetch", "status", "-h", "--help", "--version"}
# Options mount(8) and mount.fuse3 hand to a helper that mean nothing to a read-only FUSE mount.
IGNORED_MOUNT_OPTIONS = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
                         "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
                         "defaults", "atime", "noatime", "relatime"}
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicomfs"


def parse_size(text: str) -> int:
    """'10G', '500MiB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 10G or 500M)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def positive(kind: type[int] | type[float]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def url(text: str) -> str:
    if not re.match(r"https?://[^/]", text):
        raise argparse.ArgumentTypeError(
            f"not an http(s) URL: {text!r} (e.g. http://pacs:8042/dicom-web)")
    return text.rstrip("/")


def query_term(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    try:
        if not sep or not value:
            raise InvalidQuery("no value")
        return query_key(key), value
    except InvalidQuery as exc:
        raise argparse.ArgumentTypeError(
            f"not a QIDO match {text!r} ({exc}): use KEY=VALUE with a DICOM keyword or tag"
        ) from None


def metrics_address(text: str) -> tuple[str, int]:
    try:
        return metrics.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def uid_argument(text: str) -> str:
    if not is_uid(text):
        raise argparse.ArgumentTypeError(f"not a DICOM UID: {text!r}")
    return text


class Parser(argparse.ArgumentParser):
    """A parser that takes options only as spelled in full, it and its subcommands alike.

    argparse would take ``--bearer`` for ``--bearer-token``; only exact spellings are known
    to be secrets (SECRET_OPTIONS), so an abbreviation would put a token on the command line
    of the background process, for every user to read in ``ps``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dicomfs", description="Mount a DICOMweb server as a read-only folder.")
    parser.add_argument("--version", action="version", version=f"dicomfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser("mount", help="mount a DICOMweb server",
                                description="Mount a DICOMweb server at MOUNTPOINT. Returns "
                                "once the mount is ready; it runs in the background.")
    mount.add_argument("url", type=url, metavar="URL", help="DICOMweb root, e.g. "
                       "http://127.0.0.1:8042/dicom-web")
    mount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    _cache_dir_option(mount, with_size=True)
    mount.add_argument("--listing-ttl", type=positive(float), default=60.0, metavar="SECONDS",
                       help="how long a folder listing is reused (default 60)")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="stay attached and log to stderr")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                       help="FUSE mount options, comma separated (allow_other, ...)")
    _log_options(mount, default_level="info")
    mount.add_argument("--log-file", type=Path, metavar="FILE",
                       help="log here (default: stderr in the foreground, else mount.log "
                       "in the server's cache folder)")
    mount.add_argument("--metrics-address", type=metrics_address, metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                       "(default: off; they hold no patient data, but anyone who reaches "
                       "HOST may read them)")
    _client_options(mount)
    mount.add_argument("--query", action="append", type=query_term, default=[],
                       metavar="KEY=VALUE", help="show only the studies matching this QIDO "
                       "match (repeatable), e.g. PatientID=123 or StudyDate=20240101-20241231")
    mount.add_argument("--allow-upload", action="store_true",
                       help="accept files copied into /upload and store them on the server "
                       "(STOW-RS); everything else stays read-only")
    mount.add_argument("--upload-max-size", type=parse_size, default=parse_size("4G"),
                       metavar="SIZE", help="largest file /upload accepts (default 4G)")
    mount.add_argument("--uid", type=int, help="owner of every file (default: you)")
    mount.add_argument("--gid", type=int, help="group of every file (default: yours)")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    prefetch = commands.add_parser(
        "prefetch", help="fill the cache with a study or series ahead of time",
        description="Download a study (or one of its series) into the cache, to read it "
        "fast or offline later. Interrupted, it resumes where it stopped.")
    prefetch.add_argument("url", type=url, metavar="URL", help="DICOMweb root")
    prefetch.add_argument("study", type=uid_argument, metavar="STUDY_UID")
    prefetch.add_argument("series", type=uid_argument, nargs="?", metavar="SERIES_UID")
    _cache_dir_option(prefetch, with_size=True)
    _log_options(prefetch, default_level="warning")
    _client_options(prefetch)

    status = commands.add_parser(
        "status", help="what each running mount is doing",
        description="Show each running dicomfs mount of yours whose cache is below the cache "
        "folder: server, cache use, uptime, requests, throughput, cache hits, transfers, "
        "last errors.")
    status.add_argument("mountpoint", type=Path, nargs="?", metavar="MOUNTPOINT",
                        help="only this mount")
    status.add_argument("--json", action="store_true", help="one JSON object per mount, "
                        "in a list, for scripts")
    _cache_dir_option(status)

    unmount = commands.add_parser("unmount", help="unmount a dicomfs mount")
    unmount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    cache = commands.add_parser("cache", help="inspect or clear the disk cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True,
                                          metavar="ACTION")
    info = cache_commands.add_parser("info", help="size and entries per server")
    _cache_dir_option(info)
    clear = cache_commands.add_parser("clear", help="delete cached data")
    _cache_dir_option(clear)
    clear.add_argument("url", type=url, nargs="?", metavar="URL",
                       help="only this server's data (default: all)")
    return parser


def _log_options(parser: argparse.ArgumentParser, *, default_level: str) -> None:
    parser.add_argument("--log-level", default=default_level,
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text (default) or json: one JSON object per line, for log "
                        "shippers")


def _client_options(parser: argparse.ArgumentParser) -> None:
    """How to talk to the server: shared by every command that does."""
    parser.add_argument("--timeout", type=positive(float), default=30.0, metavar="SECONDS",
                        help="longest wait for the next bytes of an answer (default 30)")
    parser.add_argument("--connect-timeout", type=positive(float), default=10.0,
                        metavar="SECONDS", help="longest wait for a connection (default 10)")
    parser.add_argument("--deadline", type=positive(float), default=120.0, metavar="SECONDS",
                        help="longest a single file fetch may take, retries included "
                        "(default 120)")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="retries of a failed request (default 3)")
    parser.add_argument("--max-connections", type=positive(int), default=16, metavar="N",
                        help="most connections to the server at once (default 16)")
    parser.add_argument("--page-size", type=positive(int), default=1000, metavar="N",
                        help="QIDO page size (limit) (default 1000)")
    parser.add_argument("--page-concurrency", type=positive(int), default=1, metavar="N",
                        help="QIDO pages asked at once in long listings (default 1; helps "
                        "servers with small page caps, slows Orthanc)")
    parser.add_argument("--qido-url", type=url, metavar="URL",
                        help="QIDO-RS root, when it differs from URL")
    parser.add_argument("--wado-url", type=url, metavar="URL",
                        help="WADO-RS root, when it differs from URL")
    parser.add_argument("--single-part", action="store_true",
                        help="ask for instances as single-part application/dicom")
    parser.add_argument("--transfer-syntax", default="*", metavar="UID",
                        help="transfer syntax to ask for (default *: as stored)")

    credentials = parser.add_argument_group(
        "authentication", "Pick one of the first four. Secrets given here are handed to the "
        "running filesystem through a pipe, never left on its command line; prefer "
        "--token-file, --token-command or DICOMFS_PASSWORD all the same: a shell keeps history.")
    scheme = credentials.add_mutually_exclusive_group()
    scheme.add_argument("--bearer-token", metavar="TOKEN", help="a fixed OAuth bearer token")
    scheme.add_argument("--token-file", type=Path, metavar="FILE",
                        help="read the bearer token from FILE (again when it expires)")
    scheme.add_argument("--token-command", metavar="COMMAND",
                        help="run COMMAND to get a bearer token, again on 401 or expiry "
                        "(e.g. 'gcloud auth print-access-token')")
    scheme.add_argument("--user", metavar="NAME", help="HTTP basic auth user; the password "
                        "comes from DICOMFS_PASSWORD, --password-file or a prompt")
    credentials.add_argument("--password-file", type=Path, metavar="FILE",
                             help="basic auth password from FILE")
    credentials.add_argument("--token-lifetime", type=positive(float), default=3000.0,
                             metavar="SECONDS", help="fetch a token from a file or command "
                             "again after this long (default 3000)")
    credentials.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                             help="an extra HTTP header for every request (repeatable)")
    credentials.add_argument("--ca-bundle", type=Path, metavar="FILE",
                             help="trust the server certificates signed by these CAs")
    credentials.add_argument("--client-cert", type=Path, metavar="FILE",
                             help="TLS client certificate (PEM, may include the key)")
    credentials.add_argument("--client-key", type=Path, metavar="FILE",
                             help="TLS client key, when not in --client-cert")
    parser.add_argument("--secrets-fd", type=int, help=argparse.SUPPRESS)


# Options whose values are secrets: moved off the command line before a process keeps running.
SECRET_OPTIONS = ("--bearer-token", "--header")


def without_secrets(argv: list[str]) -> list[str]:
    """``argv`` less every secret-valued option, in either '--opt value' or '--opt=value'."""
    kept: list[str] = []
    words = iter(argv)
    for word in words:
        if word in SECRET_OPTIONS:
            next(words, None)
        elif not word.startswith(tuple(f"{option}=" for option in SECRET_OPTIONS)):
            kept.append(word)
    return kept


def _cache_dir_option(parser: argparse.ArgumentParser, *, with_size: bool = False) -> None:
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), metavar="DIR",
                        help="cache folder (default $XDG_CACHE_HOME/dicomfs)")
    if with_size:
        parser.add_argument("--cache-size", type=parse_size, default=parse_size("10G"),
                            metavar="SIZE", help="bound of the disk cache (default 10G)")


def fuse_helper_argv(argv: list[str]) -> list[str]:
    """Read ``dicomfs URL DIR -o a,b=c`` (mount.fuse3's form) as ``dicomfs mount ...``.

    Our own settings may come as ``-o cache_dir=/x``; mount(8)'s generic options
    are dropped; everything else is left for FUSE.
    """
    if not argv or argv[0] in COMMANDS:
        return argv
    own = fstab_options()
    result = ["mount"]
    words = iter(argv)
    for word in words:
        if word != "-o":
            result.append(word)
            continue
        fuse: list[str] = []
        for option in next(words, "").split(","):
            name, _, value = option.partition("=")
            if name in IGNORED_MOUNT_OPTIONS or not name:
                continue
            if name.replace("_", "-") in own:
                result += [f"--{name.replace('_', '-')}"] + ([value] if value else [])
            else:
                fuse.append(option)
        if fuse:
            result += ["-o", ",".join(fuse)]
    return result


# ``dicomfs mount`` options an fstab line may not carry: the helper must detach for mount(8),
# and an fstab line is readable by every user, so secrets stay off it.
NOT_FSTAB_OPTIONS = {"--foreground", "--help", *SECRET_OPTIONS}


def fstab_options() -> set[str]:
    """The ``dicomfs mount`` options ``-o`` may give (without their dashes), read off the
    parser so that a new option is taken from fstab too; hidden ones are internal."""
    commands = next(action for action in build_parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    return {option.removeprefix("--") for action in commands.choices["mount"]._actions
            if action.help != argparse.SUPPRESS for option in action.option_strings
            if option.startswith("--") and option not in NOT_FSTAB_OPTIONS}
