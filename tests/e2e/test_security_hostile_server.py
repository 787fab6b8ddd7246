"""Security against a hostile DICOMweb server.

A hostile server (``tests.support.fakeserver.FakeServer``) answers QIDO with traversal,
oversized and junk UIDs, non-object entries and broken JSON, and WADO with broken multipart,
lying lengths, parts that are not DICOM or not the instance asked for, and two parts for one
instance. The mount lists only valid UIDs, gives EIO for every bad file, stays up, logs why,
writes nothing outside its cache folder and caches nothing bad.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dicomfs import dicomjson
from dicomfs.store import server_folder_name
from dicomfs.uids import is_uid
from tests.support.fakes import wait_until
from tests.support.fakeserver import Reply, Seen, element, one_series_app, serving
from tests.support.harness import REPO_ROOT
from tests.support.mounts import mount_points
from tests.support.tiny import make_dicom

if TYPE_CHECKING:
    from tests.support.harness import MountFactory


# =========================================================================== helpers


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
