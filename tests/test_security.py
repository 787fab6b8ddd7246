"""Security: hostile servers, credentials that must not leak, rotating tokens, fuzzed JSON,
and logs free of patient data.

* A hostile DICOMweb server (``fakes.FakeServer``) answers QIDO with traversal, oversized and
  junk UIDs, non-object entries and broken JSON, and WADO with broken multipart, lying
  lengths, parts that are not DICOM or not the instance asked for, and two parts for one
  instance. The mount lists only valid UIDs, gives EIO for every bad file, stays up, logs why,
  writes nothing outside its cache folder and caches nothing bad.
* Orthanc with basic authentication: the password (environment, file) and bearer tokens
  (command line, foreground and background) never show in the filesystem process's command
  line or in its log; a wrong password fails the mount with a message about credentials.
* A token-checking proxy rotating its only valid token every ~1.5 s, and a token command:
  reads go on across rotations, the proxy saw 401s and the command ran again.
* Hypothesis fuzzing of the DICOM JSON helpers and of the QIDO client.
* The default log level (info) carries no patient names or IDs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pydicom
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dicomfs.auth
import dicomfs.client
from dicomfs import dicomjson, part10
from dicomfs.auth import CredentialError
from dicomfs.client import ClientConfig, DicomwebClient
from dicomfs.errors import DicomfsError, IntegrityError, ProtocolError, ServerError
from dicomfs.store import server_folder_name
from dicomfs.uids import is_uid
from tests.support import LocalOrthanc, SampleArchive
from tests.support.fakes import (
    TOKEN_COMMAND,
    Proxy,
    StreamingJsonServer,
    TokenGate,
    wait_until,
)
from tests.support.fakeserver import Reply, Seen, element, one_series_app, serving
from tests.support.harness import REPO_ROOT
from tests.support.mounts import force_unmount, is_mounted, mount_points, run_quietly
from tests.support.sample import part10_dataset
from tests.support.tls import Pair, Pki, TlsProxy

if TYPE_CHECKING:
    from tests.support.harness import MountFactory, OrthancFactory

PYTHON = sys.executable


# =========================================================================== helpers


def make_dicom(study: str, series: str, sop: str) -> bytes:
    """A small, valid Part 10 secondary-capture instance."""
    ds = part10_dataset("1.2.840.10008.5.1.4.1.1.7", sop)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Hostile^Server"
    ds.PatientID = "HOSTILE-1"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256))
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def proc_text(pid: int, name: str) -> str:
    """/proc/<pid>/<name> with NULs as spaces ("" if the process is gone)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        return ""


def tree(root: Path, *, skip: Iterable[Path] = (), max_depth: int = 12) -> set[str]:
    """Every path below ``root`` (relative), not following links nor entering mounts."""
    skipped = {str(p) for p in skip}
    mounts = mount_points()
    found: set[str] = set()

    def walk(folder: str, depth: int) -> None:
        if depth > max_depth:
            return
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if entry.path in skipped:
                continue
            found.add(os.path.relpath(entry.path, root))
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir and entry.path not in mounts:
                walk(entry.path, depth + 1)

    walk(str(root), 0)
    return found


# =========================================================================== hostile server


def ls_sections(output: str) -> dict[str, list[str]]:
    """``ls -R`` output as {folder: names}."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.endswith(":") and line.startswith("/"):
            current = sections.setdefault(line[:-1], [])
        elif line and current is not None:
            current.append(line)
    return sections


def uid_name(name: str) -> bool:
    """A name the UID trees may show: a UID, UID.dcm/.png/.jpg or metadata.json."""
    stem, dot, ext = name.rpartition(".")
    return name == "metadata.json" or is_uid(name) or (
        bool(dot) and ext in ("dcm", "png", "jpg") and is_uid(stem))

ROOT = "1.2.826.0.1.3680043.10.4242"
GOOD_STUDY, BROKEN_STUDY = f"{ROOT}.1", f"{ROOT}.2"
GOOD_SERIES, NOT_ARRAY_SERIES = f"{ROOT}.1.1", f"{ROOT}.1.2"
GOOD = f"{ROOT}.1.1.1"
LONGEST = f"{ROOT}.1.1.9." + "7" * (64 - len(f"{ROOT}.1.1.9."))  # exactly 64 characters
UNLISTED = f"{ROOT}.1.1.99"  # a valid instance the listing never names
BOUNDARY = "hostile-boundary-0123456789"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
CANARY = f"dicomfs-canary-{os.getpid()}"
TRAVERSALS = ["../../etc", "1.2/../../x", f"../../{CANARY}", f"1.2/../../{CANARY}",
              f"/tmp/{CANARY}", f"../../../../../../../../../../../../tmp/{CANARY}"]
JUNK_UIDS = [*TRAVERSALS, "1." + "2" * 64, "9" * 65, "1.2.3.abc", "", "1..2", ".1.2", "1.2.",
             "1.2\n3", "1.2\x003", "\uff11.\uff12", "\u0661.\u0662", " 1.2 ", "1.2 ", "-1.2",
             "1e5", True, None, {"Alphabetic": "../x"}, ["1.2"], 1.5e400]
NON_OBJECTS: list[Any] = [42, "1.2.3", None, ["1.2.3"], True, 3.5]
# Free-text attributes the readable trees (/patients, /dates) build names from.
HOSTILE_TEXT = (element(dicomjson.PATIENT_NAME, {"Alphabetic": "../../etc/passwd"}, "PN")
                | element(dicomjson.PATIENT_ID, "..", "LO")
                | element(dicomjson.STUDY_DESCRIPTION, "/", "LO")
                | element(dicomjson.STUDY_DATE, "../..", "DA")
                | element(dicomjson.SERIES_DESCRIPTION, "a\x00b\nc/../d", "LO")
                | element(dicomjson.SERIES_NUMBER, "../1", "IS")
                | element(dicomjson.INSTANCE_NUMBER, "-1/..", "IS")
                | element(dicomjson.MODALITY, ".", "CS"))
assert len(LONGEST) == 64 and is_uid(LONGEST) and not is_uid("9" * 65)


def part(body: bytes, *, length: int | str | None = "auto") -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
    if length == "auto":
        head += f"Content-Length: {len(body)}\r\n"
    elif length is not None:
        head += f"Content-Length: {length}\r\n"
    return head.encode() + b"\r\n" + body + b"\r\n"


CLOSE = f"--{BOUNDARY}--\r\n".encode()


def multipart(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (CLOSE if close else b"")


def bad_instances() -> dict[str, tuple[Reply, str]]:
    """Instance UID -> (the hostile WADO answer, what the mount log must say about it)."""
    uid = iter(range(10, 100))

    def new() -> str:
        return f"{ROOT}.1.1.{next(uid)}"

    good = make_dicom(GOOD_STUDY, GOOD_SERIES, GOOD)
    rng = random.Random(7)
    answers: dict[str, tuple[Reply, str]] = {}

    def add(reply: Reply, reason: str, sop: str | None = None) -> None:
        answers[sop or new()] = (reply, reason)

    ctype = [("Content-Type", MULTIPART)]
    one = new()
    add(Reply(200, ctype, multipart(part(make_dicom(GOOD_STUDY, GOOD_SERIES, one),
                                         length=None), close=False)),
        "without its closing delimiter", one)
    one = new()
    add(Reply(200, [("Content-Type", MULTIPART.replace(BOUNDARY, "another-boundary"))],
              multipart(part(make_dicom(GOOD_STUDY, GOOD_SERIES, one)))),
        "ended before its first boundary delimiter", one)
    add(Reply(200, ctype, rng.randbytes(20000)), "ended before its first boundary delimiter")
    one = new()
    body = multipart(part(make_dicom(GOOD_STUDY, GOOD_SERIES, one)))
    add(Reply(200, ctype, body, length=len(body) - 40), "multipart answer ended", one)
    one = new()
    body = multipart(part(make_dicom(GOOD_STUDY, GOOD_SERIES, one)))
    add(Reply(200, ctype, body, length=len(body) + 1000), "connection broke mid-answer", one)
    one = new()
    data = make_dicom(GOOD_STUDY, GOOD_SERIES, one)
    add(Reply(200, ctype, multipart(part(data, length=len(data) - 10))),
        "not followed by the boundary delimiter", one)
    one = new()
    data = make_dicom(GOOD_STUDY, GOOD_SERIES, one)
    add(Reply(200, ctype, multipart(part(data, length=len(data) + 10))),
        "Content-Length", one)
    add(Reply(200, ctype, multipart(part(b"<html>I am not a DICOM file</html>" * 20))),
        "not a whole DICOM object")
    one = new()
    add(Reply(200, ctype, multipart(part(b"\0" * 128 + b"DICM" + rng.randbytes(300)))),
        "not a whole DICOM object", one)
    add(Reply(200, ctype, multipart(part(good))), f"got '{GOOD}'")
    one = new()
    data = make_dicom(GOOD_STUDY, GOOD_SERIES, one)
    add(Reply(200, ctype, multipart(part(data), part(data))), "several parts", one)
    add(Reply(200, [("Content-Type", "text/html")], b"<html>login</html>"),
        "unexpected content type")
    one = new()
    data = make_dicom(GOOD_STUDY, GOOD_SERIES, one)
    add(Reply(200, [("Content-Type", "application/dicom")], data, length=len(data) + 500),
        "connection broke mid-answer", one)
    return answers


class Hostile:
    """The hostile server's script; ``log`` collects every path asked for."""

    def __init__(self) -> None:
        self.good = make_dicom(GOOD_STUDY, GOOD_SERIES, GOOD)
        self.longest = make_dicom(GOOD_STUDY, GOOD_SERIES, LONGEST)
        self.bad = bad_instances()
        self.series_metadata = json.dumps([element(dicomjson.SOP_UID, GOOD)]).encode()

    def listing(self, tag: str, valid: list[str]) -> Reply:
        items: list[Any] = [element(tag, uid) | HOSTILE_TEXT for uid in valid]
        items += [element(tag, junk) for junk in JUNK_UIDS]
        items += [{tag: {"vr": "UI", "Value": "1.2.3"}}, {tag: "1.2.3"}, {tag: None}, {},
                  {tag: {"vr": "UI", "Value": ["../x", "1.2.3"]}} | {"junk": 1}]
        items += NON_OBJECTS
        body = json.dumps(items, allow_nan=True).encode()
        return Reply(200, [("Content-Type", "application/dicom+json")], body)

    def __call__(self, seen: Seen) -> Reply:
        path = seen.path.removeprefix("/dicom-web")
        json_type = [("Content-Type", "application/dicom+json")]
        if path == "/studies":
            return self.listing(dicomjson.STUDY_UID, [GOOD_STUDY, BROKEN_STUDY])
        if path == f"/studies/{BROKEN_STUDY}/series":
            return Reply(200, json_type, b'[{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}, ')
        if path == f"/studies/{GOOD_STUDY}/series":
            return self.listing(dicomjson.SERIES_UID, [GOOD_SERIES, NOT_ARRAY_SERIES])
        if path == f"/studies/{GOOD_STUDY}/series/{NOT_ARRAY_SERIES}/instances":
            return Reply(200, json_type, json.dumps(element(dicomjson.SOP_UID, GOOD)).encode())
        series = f"/studies/{GOOD_STUDY}/series/{GOOD_SERIES}"
        if path == f"{series}/instances":
            return self.listing(dicomjson.SOP_UID, [GOOD, LONGEST, *self.bad])
        if path == f"/studies/{GOOD_STUDY}/metadata":
            return Reply(200, json_type, b'[{"00080018": {"vr": "UI", "Value": ["1.2')
        if path == f"{series}/metadata":
            return Reply(200, json_type, self.series_metadata)
        if path == series:  # bulk retrieve: junk, an unlisted instance, then cut off
            body = multipart(part(b"not DICOM at all" * 50),
                             part(make_dicom(GOOD_STUDY, GOOD_SERIES, UNLISTED)),
                             part(b"\0" * 128 + b"DICM" + b"\xff" * 64), close=False)
            return Reply(200, [("Content-Type", MULTIPART)], body)
        if path.startswith(f"{series}/instances/"):
            sop = path.rsplit("/", 1)[1]
            if path.endswith("/metadata"):  # it offers metadata (asked once, at mount)
                return Reply(200, json_type, b"[]")
            if path.endswith("/rendered"):
                return Reply(200, [("Content-Type", "image/png")], b"not a PNG at all")
            if sop == GOOD:
                return Reply(200, [("Content-Type", MULTIPART)], multipart(part(self.good)))
            if sop == LONGEST:
                return Reply(200, [("Content-Type", MULTIPART)],
                             multipart(part(self.longest, length=None)))
            if sop in self.bad:
                return self.bad[sop][0]
        return Reply(404, json_type, b'{"error": "no such thing"}')


def test_hostile_server(mount_factory: MountFactory, tmp_path: Path) -> None:
    hostile = Hostile()
    private_tmp = tmp_path / "private-tmp"
    private_tmp.mkdir()
    watched = [Path("/tmp"), tmp_path.parent, REPO_ROOT]
    skip = [REPO_ROOT / ".venv", REPO_ROOT / ".git"]
    before = {root: tree(root, skip=skip, max_depth=1 if root == Path("/tmp") else 12)
              for root in watched}
    with serving() as server:
        server.app = hostile
        mount = mount_factory(server.url, args=["--timeout", "2", "--retries", "1"],
                              env={"TMPDIR": str(private_tmp)})
        root = mount.path

        # ls -R: only valid UIDs in the UID trees, only safe names anywhere; the folders
        # whose listing is broken fail, nothing else under /studies and /rendered.
        result = subprocess.run(["ls", "-R", str(root)], capture_output=True, text=True,
                                timeout=60)
        sections = ls_sections(result.stdout)
        assert sections, result.stderr
        uid_names: set[str] = set()
        for folder, names in sections.items():
            for name in names:
                assert name not in (".", "..") and "/" not in name and "\0" not in name, \
                    (folder, name)
                assert CANARY not in name and name != "etc", (folder, name)
            top = Path(folder).relative_to(root).parts[:1]
            if top in (("studies",), ("rendered",)):
                assert all(uid_name(name) for name in names), (folder, names)
                uid_names |= set(names)
        files = {GOOD, LONGEST, *hostile.bad}
        expected = {"metadata.json", GOOD_STUDY, BROKEN_STUDY, GOOD_SERIES, NOT_ARRAY_SERIES}
        expected |= {f"{uid}.{ext}" for uid in files for ext in ("dcm", "png", "jpg")}
        assert uid_names == expected, (uid_names ^ expected, result.stderr)
        failed_dirs = {Path(d) for d in re.findall(r"cannot open directory '([^']+)'",
                                                   result.stderr)}
        failed_uid_dirs = {d.name for d in failed_dirs
                           if d.relative_to(root).parts[0] in ("studies", "rendered")}
        assert failed_uid_dirs == {BROKEN_STUDY, NOT_ARRAY_SERIES}, result.stderr
        assert "Input/output error" in result.stderr

        series = root / "studies" / GOOD_STUDY / GOOD_SERIES
        assert (series / f"{GOOD}.dcm").read_bytes() == hostile.good
        assert (series / f"{LONGEST}.dcm").read_bytes() == hostile.longest
        assert (series / "metadata.json").read_bytes() == hostile.series_metadata

        # Every bad file: EIO, never a file.
        bad_paths = [series / f"{sop}.dcm" for sop in hostile.bad]
        bad_paths += [root / "studies" / GOOD_STUDY / "metadata.json",
                      root / "rendered" / GOOD_STUDY / GOOD_SERIES / f"{GOOD}.png"]
        for path in bad_paths:
            with pytest.raises(OSError) as caught:
                path.read_bytes()
            assert caught.value.errno == errno.EIO, (path.name, caught.value)
        # Names that are not what a listing gave: not found, without asking the server.
        for name in ("1.2.3.abc.dcm", f"{UNLISTED}.dcm", "..dcm", f"{GOOD}.txt"):
            with pytest.raises(FileNotFoundError):
                (series / name).read_bytes()

        # Still alive and still answering.
        assert mount.proc.poll() is None
        assert set(os.listdir(root / "studies")) == {GOOD_STUDY, BROKEN_STUDY}
        assert (series / f"{GOOD}.dcm").read_bytes() == hostile.good

        # Background prefetches settle, then the cache holds only the good instances.
        folder = mount.cache_dir / server_folder_name(server.url)
        assert wait_until(lambda: not any((folder / "tmp").iterdir()), 20), \
            list((folder / "tmp").iterdir())
        log = mount.log()
    for sop, (_reply, reason) in hostile.bad.items():
        assert reason in log, (sop, reason)
    for reason in ("not valid JSON", "expected a JSON array", "skipped an entry without a "
                   "valid UID", "entries that are not JSON objects", "is not a png",
                   "stream stopped", "skipped a part"):
        assert reason in log, reason
    assert "Traceback" not in log

    cached = {str(p.relative_to(mount.cache_dir)) for p in mount.cache_dir.rglob("*")}
    outside = {p for p in cached if not p.startswith(folder.name)}
    assert outside == set(), outside
    instances = {Path(p).name for p in cached if p.endswith(".dcm")}
    assert instances == {f"{GOOD}.dcm", f"{LONGEST}.dcm"}, instances
    assert not any(sop in p for p in cached for sop in hostile.bad)
    assert not any(".." in Path(p).parts for p in cached)

    # Nothing written anywhere else: no canary anywhere, this test's folder holds only the
    # mount's folder (mount point, cache, log) and the private TMPDIR, left empty.
    after = {root: tree(root, skip=skip, max_depth=1 if root == Path("/tmp") else 12)
             for root in watched}
    for watched_root in watched:
        new = after[watched_root] - before[watched_root]
        assert not [p for p in new if CANARY in p or p.endswith(("/etc", "/x"))], new
    ours = os.path.relpath(tmp_path, tmp_path.parent)
    new_here = after[tmp_path.parent] - before[tmp_path.parent]
    assert all(p.startswith(ours) for p in new_here), new_here - {
        p for p in new_here if p.startswith(ours)}
    assert {Path(p).relative_to(ours).parts[0] for p in new_here} <= {"mount0"}
    mount_dir = tmp_path / "mount0"
    assert {p.name for p in mount_dir.iterdir()} == {"mnt", "cache", "dicomfs.log"}
    assert list(private_tmp.iterdir()) == []
    assert not any(CANARY in p for p in tree(Path("/tmp"), max_depth=0))


def test_hostile_number_does_not_hide_a_series(mount_factory: MountFactory) -> None:
    """``1e400`` is a valid JSON number (Python reads it as inf): one instance whose Rows
    says so must not make the whole series unlistable."""
    study, series = f"{ROOT}.5", f"{ROOT}.5.1"
    sops = [f"{ROOT}.5.1.{i}" for i in (1, 2)]
    instances = [element(dicomjson.SOP_UID, sop) | element(dicomjson.ROWS, 512, "US")
                 | element(dicomjson.COLUMNS, 512, "US") for sop in sops]
    instances[1] |= element(dicomjson.ROWS, 1e400, "US")  # json.dumps writes Infinity
    body = json.dumps(instances).replace("Infinity", "1e400").encode()
    assert b"1e400" in body

    with serving() as server:
        server.app = one_series_app(study, series, body)
        mount = mount_factory(server.url)
        folder = mount.path / "studies" / study / series
        try:
            names: set[str] | str = set(os.listdir(folder))
        except OSError as exc:
            names = f"{exc!r}"
        # No metadata.json: the scripted server answers 404 for metadata.
        assert names == {f"{sop}.dcm" for sop in sops}, (names, mount.log_tail(20))


def test_single_part_shorter_than_the_instance_is_not_served(
        mount_factory: MountFactory) -> None:
    """A single-part answer whose Content-Length stops inside the instance (the server sends
    more, or the file it keeps is cut) frames correctly, but the Part 10 file is incomplete:
    it must not become a file (the multipart form of the same lie is caught by the parser)."""
    study, series, sop = f"{ROOT}.6", f"{ROOT}.6.1", f"{ROOT}.6.1.1"
    data = make_dicom(study, series, sop)

    def retrieve(path: str) -> Reply | None:
        if path == f"/studies/{study}/series/{series}/instances/{sop}":
            return Reply(200, [("Content-Type", "application/dicom")], data,
                         length=len(data) - 100)
        return None

    with serving() as server:
        server.app = one_series_app(study, series, [sop], retrieve)
        mount = mount_factory(server.url, args=["--retries", "0"])
        path = mount.path / "studies" / study / series / f"{sop}.dcm"
        try:
            got: bytes | int = path.read_bytes()
        except OSError as exc:
            got = exc.errno or -1
        assert got == errno.EIO, (
            f"served {len(got)} of {len(data)} bytes" if isinstance(got, bytes) else got)


def test_corrupt_dicom_header_is_refused_cleanly(mount_factory: MountFactory) -> None:
    """A part whose Part 10 header is cut or corrupt is "not a whole DICOM object": EIO with a
    reason, like any other bad part; not an unexpected exception with a traceback. In a
    series stream it is skipped and the rest of the series is still kept."""
    study, series = f"{ROOT}.8", f"{ROOT}.8.1"
    sops = [f"{ROOT}.8.1.{i}" for i in (1, 2, 3)]
    files = {sop: make_dicom(study, series, sop) for sop in sops}
    files[sops[1]] = files[sops[1]][:152]  # cut inside the file meta group
    ctype = [("Content-Type", MULTIPART)]

    def retrieve(path: str) -> Reply | None:
        if path == f"/studies/{study}/series/{series}":
            return Reply(200, ctype, multipart(*(part(files[sop]) for sop in sops)))
        sop = path.rsplit("/", 1)[1]
        if path.startswith(f"/studies/{study}/series/{series}/instances/") and sop in files:
            return Reply(200, ctype, multipart(part(files[sop])))
        return None

    with serving() as server:
        server.app = one_series_app(study, series, sops, retrieve)
        mount = mount_factory(server.url, args=["--retries", "0"])
        folder = mount.path / "studies" / study / series
        assert (folder / f"{sops[0]}.dcm").read_bytes() == files[sops[0]]
        with pytest.raises(OSError) as caught:
            (folder / f"{sops[1]}.dcm").read_bytes()
        assert caught.value.errno == errno.EIO
        # Two uncached opens started a bulk fetch of the series: the third instance comes
        # with it, the corrupt part notwithstanding.
        cached = mount.cache_dir.rglob(f"{sops[2]}.dcm")
        assert wait_until(lambda: any(mount.cache_dir.rglob(f"{sops[2]}.dcm")), 5), \
            (list(cached), mount.log_tail(15))
        assert mount.proc.poll() is None
        log = mount.log()
    assert "unexpectedly" not in log and "Traceback" not in log, log[-3000:]
    assert "not a whole DICOM object" in log


# --------------------------------------------------------------------------- bounded JSON


async def test_endless_json_answer_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_JSON_BYTES (512 MiB) is the bound; lowered to 1 MiB here, a server streaming a
    512 MiB array is cut off early: the client stops reading and says why."""
    monkeypatch.setattr(dicomfs.client, "MAX_JSON_BYTES", 1024 * 1024)
    with StreamingJsonServer(total=512 * 1024 * 1024) as server:
        async with DicomwebClient(ClientConfig(base_url=server.url, retries=0)) as client:
            with pytest.raises(ProtocolError, match="larger than"):
                await client.search_studies()
        assert await trio.to_thread.run_sync(server.finished.wait, 10)
    assert server.sent < 64 * 1024 * 1024, server.sent


async def test_endless_error_body_is_bounded() -> None:
    """An error answer's text is read only as far as the message needs."""

    class Endless500(StreamingJsonServer):
        def _serve(self, conn: Any) -> None:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n")
                while self.sent < self.total and not self._stop.is_set():
                    conn.sendall(b"x" * 65536)
                    self.sent += 65536
            except OSError:
                pass
            finally:
                self.finished.set()

    with Endless500(total=512 * 1024 * 1024) as server:
        async with DicomwebClient(ClientConfig(base_url=server.url, retries=0)) as client:
            with pytest.raises(ServerError) as caught:
                await client.search_studies()
        assert await trio.to_thread.run_sync(server.finished.wait, 10)
    assert len(str(caught.value)) < 1000
    assert server.sent < 64 * 1024 * 1024, server.sent


# =========================================================================== credentials

PASSWORD = "s3cret"
ORTHANC_USERS = {"alice": PASSWORD}


def _auth_orthanc(orthanc_factory: OrthancFactory, archive: SampleArchive) -> LocalOrthanc:
    server = orthanc_factory(users=ORTHANC_USERS)
    mr = archive.series_files(archive.series_uid("mr"))[:5]
    server.upload([archive.path(f) for f in mr], sop_uids=[f.sop_uid for f in mr])
    return server


def _read_some(root: Path, archive: SampleArchive, count: int = 3) -> None:
    for entry in archive.series_files(archive.series_uid("mr"))[:count]:
        path = root / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
        assert path.read_bytes() == archive.read(entry)


def _assert_secret_hidden(pid: int, secrets: Iterable[str], log: str, *,
                          environ: bool = False) -> None:
    """Not in the running process's command line, nor in its log (nor its environment)."""
    if log.startswith("$ "):  # the harness's own record of the command it ran
        log = log.split("\n", 1)[1] if "\n" in log else ""
    cmdline = proc_text(pid, "cmdline")
    assert cmdline, f"process {pid} is gone"
    for secret in secrets:
        assert secret not in cmdline, f"{secret!r} in /proc/{pid}/cmdline: {cmdline}"
        assert secret not in log, f"{secret!r} in the log"
        if environ:
            assert secret not in proc_text(pid, "environ"), f"{secret!r} in its environment"


def test_basic_auth_mounts_without_leaking_the_password(
        orthanc_factory: OrthancFactory, archive: SampleArchive, mount_factory: MountFactory,
        tmp_path: Path) -> None:
    server = _auth_orthanc(orthanc_factory, archive)
    basic = httpx.BasicAuth("alice", PASSWORD)._auth_header.removeprefix("Basic ")
    # From the environment.
    mount = mount_factory(server.dicomweb_url, args=["--user", "alice"],
                          env={"DICOMFS_PASSWORD": PASSWORD})
    _read_some(mount.path, archive)
    _assert_secret_hidden(mount.proc.pid, [PASSWORD, basic], mount.log())
    # From a file.
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    mount = mount_factory(server.dicomweb_url,
                          args=["--user", "alice", "--password-file", str(password_file)])
    _read_some(mount.path, archive)
    _assert_secret_hidden(mount.proc.pid, [PASSWORD, basic], mount.log())
    # In the background, the password from the environment does not reach the filesystem
    # process's environment either.
    with background_mount(server.dicomweb_url, tmp_path / "bg", ["--user", "alice"],
                          env={"DICOMFS_PASSWORD": PASSWORD}) as (pid, mountpoint, log):
        _read_some(mountpoint, archive)
        _assert_secret_hidden(pid, [PASSWORD, basic], log.read_text(), environ=True)


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_wrong_password_fails_clearly(orthanc_factory: OrthancFactory, archive: SampleArchive,
                                      tmp_path: Path, foreground: bool) -> None:
    server = _auth_orthanc(orthanc_factory, archive)
    wrong = "not-the-Pa55word"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cache = tmp_path / "cache"
    command = [PYTHON, "-m", "dicomfs", "mount", server.dicomweb_url, str(mountpoint),
               "--user", "alice", "--cache-dir", str(cache)]
    if foreground:
        command.append("--foreground")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "DICOMFS_PASSWORD": wrong},
                                stdin=subprocess.DEVNULL)
    finally:
        force_unmount(mountpoint)
    assert result.returncode != 0
    assert "credentials" in result.stderr, result.stderr
    assert not is_mounted(mountpoint)
    logs = "".join(p.read_text() for p in cache.rglob("*.log"))
    assert wrong not in result.stdout + result.stderr + logs


TOKEN = "Tok3n-0f-9a7b-secret-d1c0mfs"
API_KEY = "k3y-not-for-your-eyes-51"


class background_mount:  # used like a function
    """``dicomfs mount`` without --foreground: yields (pid of the filesystem process,
    mount point, log file) and unmounts, ending that process, afterwards."""

    def __init__(self, url: str, folder: Path, args: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.url = url
        self.mountpoint = folder / "mnt"
        self.cache = folder / "cache"
        self.args = args
        self.env = env or {}
        self.pid: int | None = None

    def __enter__(self) -> tuple[int, Path, Path]:
        self.mountpoint.mkdir(parents=True)
        command = [PYTHON, "-m", "dicomfs", "mount", self.url, str(self.mountpoint),
                   "--cache-dir", str(self.cache), "--log-level", "debug", *self.args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                    env={**os.environ, **self.env}, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, result.stderr
            self.pid = self._find_pid()
        except BaseException:
            self.__exit__()
            raise
        log = self.cache / server_folder_name(self.url) / "mount.log"
        return self.pid, self.mountpoint, log

    def _find_pid(self) -> int:
        wanted = str(self.mountpoint)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                words = proc_text(int(entry.name), "cmdline").split()
                if "dicomfs" in words and wanted in words and "--foreground" in words:
                    return int(entry.name)
        raise AssertionError(f"no filesystem process for {wanted}")

    def _alive(self) -> bool:
        stat = proc_text(self.pid, "stat") if self.pid else ""
        return bool(stat) and stat.split(") ", 1)[-1][:1] not in ("Z", "X")

    def __exit__(self, *exc: object) -> None:
        if is_mounted(self.mountpoint):
            run_quietly(["fusermount3", "-u", str(self.mountpoint)])
        if self.pid is not None and not wait_until(lambda: not self._alive(), 10):
            os.kill(self.pid, signal.SIGTERM)
            if not wait_until(lambda: not self._alive(), 5):
                os.kill(self.pid, signal.SIGKILL)
        force_unmount(self.mountpoint)


def test_bearer_token_never_on_a_command_line(orthanc: LocalOrthanc, archive: SampleArchive,
                                              mount_factory: MountFactory,
                                              tmp_path: Path) -> None:
    gate = TokenGate(tmp_path / "gate", static=TOKEN)
    with Proxy(orthanc.url, gate) as proxy:
        url = proxy.url("/dicom-web")
        # Foreground: the process re-runs itself without the token before it serves.
        mount = mount_factory(url, args=["--bearer-token", TOKEN, "--header",
                                         f"X-Api-Key: {API_KEY}"])
        _read_some(mount.path, archive)
        _assert_secret_hidden(mount.proc.pid, [TOKEN, API_KEY], mount.log())
        # Background: the filesystem process never had it on its command line.
        with background_mount(url, tmp_path / "bg", ["--bearer-token", TOKEN, "--header",
                                                      f"X-Api-Key: {API_KEY}"]
                              ) as (pid, mountpoint, log):
            _read_some(mountpoint, archive)
            _assert_secret_hidden(pid, [TOKEN, API_KEY], log.read_text(), environ=True)
    assert gate.accepted[TOKEN] > 0
    assert gate.rejections == 0, gate.rejected


def test_rotating_token_from_a_command(orthanc: LocalOrthanc, archive: SampleArchive,
                                       mount_factory: MountFactory, tmp_path: Path) -> None:
    gate = TokenGate(tmp_path / "gate", period=1.5, grace=0.5)
    script = tmp_path / "print_token.py"
    script.write_text(TOKEN_COMMAND)
    command = shlex.join([PYTHON, str(script), str(gate.folder)])
    # Many small series: each read asks the server something new.
    files = [f for f in archive.files if f.label.startswith(("pydicom/", "charset/"))
             and f.size < 400_000]
    with Proxy(orthanc.url, gate) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"), args=["--token-command", command])
        started = time.monotonic()
        read = 0
        for entry in files:
            path = (mount.path / "studies" / entry.study_uid / entry.series_uid
                    / f"{entry.sop_uid}.dcm")
            assert path.read_bytes() == archive.read(entry), (entry.label, mount.log_tail(10))
            read += 1
            if gate.index >= 5:
                break
            time.sleep(0.08)
        log = mount.log()
    print(f"\ntoken rotation: {read} reads in {time.monotonic() - started:.1f} s, tokens up to "
          f"t{gate.index}, accepted {dict(gate.accepted)}, rejected {dict(gate.rejected)}, "
          f"command runs {gate.runs()}")
    assert gate.index >= 4, gate.index
    assert gate.rejections >= 2, gate.rejected  # the proxy refused old tokens...
    assert gate.runs() >= 3  # ...and the command ran again for new ones
    assert len([t for t in gate.accepted if t != "t1"]) >= 2, gate.accepted
    assert "obtained a new access token" in log
    assert not any(f"t{i}" in log.split() for i in range(1, gate.index + 1))


# =========================================================================== fuzzing

TAGS = [dicomjson.STUDY_UID, dicomjson.SERIES_UID, dicomjson.SOP_UID, dicomjson.ROWS,
        dicomjson.INSTANCE_NUMBER, dicomjson.SERIES_DATE, dicomjson.SERIES_TIME,
        dicomjson.PATIENT_NAME, dicomjson.NUMBER_OF_FRAMES]
json_leaves = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
               | st.floats(allow_nan=True, allow_infinity=True)
               | st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -0.0,
                                  2**64, -(2**63), 4300 * 9, 0.5])
               | st.sampled_from(["1.2.3", "20240131", "235960", "99999999", "1" * 70, "../x",
                                  "0000", "-5", "1e3", " 12 ",
                                  "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668"]))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
elements = st.fixed_dictionaries(
    {}, optional={"vr": st.text(max_size=3), "Value": json_values | st.lists(json_values,
                                                                             max_size=3),
                  "Alphabetic": json_values}) | json_values
datasets = st.dictionaries(st.sampled_from(TAGS) | st.text(max_size=9), elements, max_size=6)
answers = (st.lists(datasets | json_values, max_size=6) | json_values).map(
    lambda value: json.dumps(value, allow_nan=True).encode())
raw_bodies = st.binary(max_size=300) | answers | answers.map(lambda b: b[: len(b) // 2])
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(raw_bodies)
def test_fuzz_load_array_raises_only_declared_errors(body: bytes) -> None:
    try:
        result = dicomjson.load_array(body, what="fuzz")
    except DicomfsError:
        return
    assert isinstance(result, list) and all(isinstance(ds, dict) for ds in result)


@FUZZ
@given(st.lists(datasets, min_size=1, max_size=4).map(
    lambda value: json.dumps(value, allow_nan=True).encode()))
def test_fuzz_value_readers_never_raise(body: bytes) -> None:
    """Whatever JSON a server sends, reading a value from it gives a value or None."""
    for ds in dicomjson.load_array(body, what="fuzz"):
        for tag in [*TAGS, *ds]:
            found = dicomjson.text(ds, tag)
            assert found is None or isinstance(found, str)
            number = dicomjson.integer(ds, tag)
            assert number is None or isinstance(number, int)
            uid = dicomjson.uid(ds, tag)
            assert uid is None or is_uid(uid)
        for date_tag, time_tag in ((dicomjson.SERIES_DATE, dicomjson.SERIES_TIME),
                                   (dicomjson.STUDY_DATE, dicomjson.STUDY_TIME)):
            stamp = dicomjson.timestamp(ds, date_tag, time_tag)
            assert stamp is None or isinstance(stamp, float)


SAMPLE = make_dicom(f"{ROOT}.7", f"{ROOT}.7.1", f"{ROOT}.7.1.1")


@FUZZ
@given(position=st.integers(0, len(SAMPLE)), patch=st.binary(max_size=16),
       keep=st.integers(0, len(SAMPLE) + 16))
def test_fuzz_part10_check_raises_only_integrity_errors(position: int, patch: bytes,
                                                        keep: int) -> None:
    """The check that a part is the instance asked for, on corrupted and cut files: it
    finds a valid UID, or says it is not a DICOM instance, and nothing else."""
    data = (SAMPLE[:position] + patch + SAMPLE[position + len(patch):])[:keep]
    try:
        found = part10.whole_instance_uid(data, None, len(data))
    except IntegrityError:
        return
    assert is_uid(found)


async def _client_over(handler: Any) -> DicomwebClient:
    """A real client whose HTTP goes to ``handler`` instead of the network."""
    client = DicomwebClient(ClientConfig(base_url="http://dicomweb.invalid/dw", retries=0))
    await client._http.aclose()
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return client


@FUZZ
@given(body=raw_bodies, status=st.sampled_from([200, 200, 200, 204, 400, 401, 404, 429, 500]),
       warning=st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                   max_size=30),
       content_type=st.sampled_from(["application/dicom+json", "text/html", ""]))
def test_fuzz_qido_search_raises_only_declared_errors(body: bytes, status: int,
                                                      warning: str | None,
                                                      content_type: str) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {"Content-Type": content_type} if content_type else {}
        if warning is not None:
            headers["Warning"] = warning
        return httpx.Response(status, headers=headers, content=body)

    async def search() -> None:
        async with await _client_over(handler) as client:
            for call, key in ((client.search_studies, dicomjson.STUDY_UID),
                              (lambda: client.search_series("1.2.3"), dicomjson.SERIES_UID),
                              (lambda: client.search_instances("1.2", "1.2.3"),
                               dicomjson.SOP_UID)):
                try:
                    found = await call()
                except DicomfsError:
                    continue
                uids = [dicomjson.uid(ds, key) for ds in found]
                assert all(is_uid(uid) for uid in uids)
                assert len(set(uids)) == len(uids)

    trio.run(search)
    assert len(requests) <= 3 * 2  # a page that brings nothing new ends the walk


# =========================================================================== patient data


def test_info_log_has_no_patient_data(mount_factory: MountFactory, archive: SampleArchive) -> None:
    """Browse and read a patient's files at the default log level: the log never names them."""
    mr = archive.series_files(archive.series_uid("mr"))
    patient = mr[0]
    assert patient.patient_name == "Smith^John" and patient.patient_id == "DFS-0002"
    j2k = next(f for f in archive.files if f.label == "pydicom/JPEG2000.dcm")
    mount = mount_factory(args=["--log-level", "info"])
    study = mount.path / "studies" / patient.study_uid
    subprocess.run(["ls", "-lR", str(study)], capture_output=True, check=True, timeout=60)
    assert (study / "metadata.json").read_bytes().count(b"Smith") > 0
    series = study / patient.series_uid
    assert b"Smith" in (series / "metadata.json").read_bytes()
    for entry in mr[:4]:
        assert (series / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
    rendered = mount.path / "rendered" / patient.study_uid / patient.series_uid
    assert (rendered / f"{mr[0].sop_uid}.png").read_bytes().startswith(b"\x89PNG")
    # The readable trees and a search: the patient's folder, a /query folder for their ID,
    # and a query the server refuses (its reason is logged, the folder name is not).
    patients = mount.path / "patients"
    folder = next(name for name in os.listdir(patients) if patient.patient_id in name)
    subprocess.run(["ls", "-lR", str(patients / folder)], capture_output=True, check=True,
                   timeout=60)
    query = mount.path / "query" / f"PatientID={patient.patient_id}"
    assert patient.study_uid in os.listdir(query)
    refused = mount.path / "query" / f"PatientID={patient.patient_id}&fuzzymatching=maybe"
    with pytest.raises(FileNotFoundError):
        os.listdir(refused)
    # An error on the way (Orthanc cannot render JPEG 2000): its message is logged too.
    bad = mount.path / "rendered" / j2k.study_uid / j2k.series_uid / f"{j2k.sop_uid}.png"
    with pytest.raises(OSError):
        bad.read_bytes()
    log_lines = mount.log().splitlines()[1:]  # the first is the harness's command line
    log = "\n".join(log_lines)
    assert "ERROR" in log  # the rendering error was logged
    identifiers = {patient.patient_name, patient.patient_id, "Smith", "John",
                   j2k.patient_name, j2k.patient_id, "CompressedSamples"}
    leaked = {word for word in identifiers if word and word in log}
    assert leaked == set(), [line for line in log_lines if any(w in line for w in leaked)]




# =========================================================================== TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA with good and bad server certificates and a client certificate."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def https_orthanc(orthanc: LocalOrthanc, tmp_path: Path) -> Iterator[Any]:
    """``https_orthanc(server_pair, client_ca=None)``: nginx with that certificate in front
    of the session Orthanc (demanding a client certificate signed by ``client_ca``)."""
    proxies: list[TlsProxy] = []

    def start(server: Pair, client_ca: Path | None = None) -> TlsProxy:
        proxy = TlsProxy(tmp_path / f"nginx{len(proxies)}", orthanc.url, server,
                         client_ca=client_ca)
        proxies.append(proxy)
        return proxy.start()

    yield start
    for proxy in proxies:
        proxy.stop()


def _combined_pem(pki: Pki, folder: Path) -> Path:
    """The client certificate with its key in one file (what --client-cert also takes)."""
    combined = folder / "client-combined.pem"
    combined.write_bytes(pki.client.cert.read_bytes() + pki.client.key.read_bytes())
    return combined


@pytest.mark.parametrize("mutual", [False, True], ids=["server-tls", "mutual-tls"])
def test_https_mount_reads_every_file(pki: Pki, https_orthanc: Any, archive: SampleArchive,
                                      mount_factory: MountFactory, mutual: bool) -> None:
    proxy = https_orthanc(pki.server, pki.ca.cert if mutual else None)
    args = ["--ca-bundle", str(pki.ca.cert)]
    if mutual:
        args += ["--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key)]
    mount = mount_factory(proxy.url("/dicom-web"), args=args)
    files = archive.series_files(archive.series_uid("mr"))
    folder = mount.path / "studies" / archive.study_uid("mr") / archive.series_uid("mr")
    assert sorted(os.listdir(folder)) == sorted([f"{f.sop_uid}.dcm" for f in files]
                                                + ["metadata.json"])
    for entry in files:
        assert (folder / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
    served = {target for _connection, target in proxy.requests()}
    assert any(archive.series_uid("mr") in target for target in served), served


def test_mutual_tls_without_a_client_certificate_fails_clearly(
        pki: Pki, https_orthanc: Any, tmp_path: Path) -> None:
    proxy = https_orthanc(pki.server, pki.ca.cert)
    result = _dicomfs_mount(proxy.url("/dicom-web"), tmp_path, "--ca-bundle", str(pki.ca.cert))
    assert result.returncode != 0
    assert "No required SSL certificate was sent" in result.stderr, result.stderr


def test_https_prefetch_with_a_client_certificate(pki: Pki, https_orthanc: Any,
                                                  archive: SampleArchive, tmp_path: Path) -> None:
    proxy = https_orthanc(pki.server, pki.ca.cert)
    url = proxy.url("/dicom-web")
    study, series = archive.study_uid("mr"), archive.series_uid("mr")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [PYTHON, "-m", "dicomfs", "prefetch", url, study, series, "--cache-dir", str(cache),
         "--ca-bundle", str(pki.ca.cert), "--client-cert", str(_combined_pem(pki, tmp_path))],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder = cache / server_folder_name(url) / "objects" / study / series
    for entry in archive.series_files(series):
        assert (folder / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)


def _dicomfs_mount(url: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dicomfs mount`` in the background form: returns once mounted or failed."""
    mountpoint = folder / "mnt"
    mountpoint.mkdir(exist_ok=True)
    try:
        return subprocess.run([PYTHON, "-m", "dicomfs", "mount", url, str(mountpoint),
                               "--cache-dir", str(folder / "cache"), *args],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    finally:
        assert force_unmount(mountpoint)


BAD_CERTIFICATES = {  # case -> (server certificate, CA the client trusts, reason expected)
    "wrong-ca": ("server", "other_ca", "unable to get local issuer certificate"),
    "expired": ("expired", "ca", "certificate has expired"),
    "wrong-host": ("wrong_host", "ca",
                   "IP address mismatch, certificate is not valid for '127.0.0.1'"),
}


@pytest.mark.parametrize("case", BAD_CERTIFICATES)
def test_untrusted_certificates_fail_mount_and_prefetch_clearly(
        pki: Pki, https_orthanc: Any, archive: SampleArchive, tmp_path: Path, case: str) -> None:
    server, trusted, reason = BAD_CERTIFICATES[case]
    proxy = https_orthanc(getattr(pki, server))
    url = proxy.url("/dicom-web")
    ca = ["--ca-bundle", str(getattr(pki, trusted).cert)]
    message = f"the server's TLS certificate is not trusted: {reason}"
    mounted = _dicomfs_mount(url, tmp_path, *ca)
    assert mounted.returncode == 1
    assert message in mounted.stderr, mounted.stderr
    fetched = subprocess.run([PYTHON, "-m", "dicomfs", "prefetch", url, archive.study_uid("mr"),
                              "--cache-dir", str(tmp_path / "cache"), *ca],
                             capture_output=True, text=True, timeout=60)
    assert fetched.returncode == 1
    assert f"prefetch failed: {message}" in fetched.stderr, fetched.stderr
    assert proxy.requests() == []  # no request ever went out over the untrusted connection


# =========================================================================== token sources


def test_token_file_is_read_again_on_401_and_after_its_lifetime(
        orthanc: LocalOrthanc, archive: SampleArchive, mount_factory: MountFactory,
        tmp_path: Path) -> None:
    gate = TokenGate(tmp_path / "gate", static="first")
    token_file = gate.folder / "token"
    files = iter(sorted({f.series_uid: f for f in archive.files
                         if f.label.startswith("pydicom/")}.values(),
                        key=lambda f: f.sop_uid))  # one per series: each read asks anew

    def read_next() -> None:
        entry = next(files)
        path = mount.path / "studies" / entry.study_uid / entry.series_uid / \
            f"{entry.sop_uid}.dcm"
        assert path.read_bytes() == archive.read(entry)

    with Proxy(orthanc.url, gate) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"), args=[
            "--token-file", str(token_file), "--token-lifetime", "1"])
        read_next()
        # A new token, the old one refused at once: the 401 makes the mount read the file.
        gate.static = "second"
        token_file.write_text("second\n")
        read_next()
        assert gate.rejected["first"] >= 1 and gate.accepted["second"] >= 1
        # A new token in the file while the old one still works: once the lifetime has
        # passed (the behaviour under test is time), the mount uses it without a 401.
        token_file.write_text("third\n")
        time.sleep(1.5)
        gate.static = "third"
        read_next()
    assert gate.accepted["third"] >= 1, gate.accepted
    assert gate.rejected["second"] == 0, gate.rejected


def test_token_command_has_a_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token command that hangs is stopped after TOKEN_COMMAND_TIMEOUT (60 s, lowered
    here) and reported, instead of hanging every request behind it."""
    monkeypatch.setattr(dicomfs.auth, "TOKEN_COMMAND_TIMEOUT", 0.5)
    with pytest.raises(CredentialError, match=r"timed out after 0\.5 seconds"):
        dicomfs.auth.run_token_command(f"{PYTHON} -c 'import time; time.sleep(60)'")
