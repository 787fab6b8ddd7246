"""The "Speed" benchmark: dicomfs side by side with the wire, local disk, rclone and friends.

Everything runs against a private Orthanc on loopback, on the sample archive the tests use
(a 400-slice 512x512 CT, ~200 MB), eight generated 25 MB series for the parallel test and a
2000-slice (~1 GB) study for the memory test. "Cold" means a fresh cache folder and a fresh
mount for every run; nothing global is dropped (no drop_caches), so Orthanc's own files are
in the page cache for every row alike. Every figure is the median of ``--runs`` runs.

The network section (scripts/bench_network.py; ``--only network``, ``--skip-network``)
reads the CT series over emulated links, and measures latency there
(scripts/bench_latency.py, also alone with ``--only latency``): first bytes by path,
``ls -R``, a big instance. Each section writes only what it measured into its own
generated block of the Markdown report (``--output``, default docs/performance.md),
keeping the hand-written explanations around it, and a plot next to it (.png, and
-network.png). Run it through ``scripts/bench``, which installs what it needs.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing: use its copy
    sys.path.insert(0, str(REPO))

from tests.support.mounts import force_unmount, is_mounted, mount_points  # noqa: E402
from tests.support.orthanc import LocalOrthanc  # noqa: E402
from tests.support.sample import (  # noqa: E402
    SampleArchive,
    SampleFile,
    build_archive,
    build_big_instance,
)

if __name__ == "__main__":  # scripts/bench_network.py imports this module: not a second copy
    sys.modules.setdefault("bench", sys.modules[__name__])

CACHE = REPO / ".cache"
WORK = CACHE / "bench-work"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CT_SLICES = 400
BIG_SLICES = 2000
PARALLEL_SERIES = 8
PARALLEL_SLICES = 48
ORTHANC_CONFIG = {"WebDavEnabled": True, "WebDavDeleteAllowed": False,
                  "WebDavUploadAllowed": False}
PARALLEL_NAMESPACE = uuid.UUID("0f4c2a8e-3b7d-5e1f-9a6c-8d2e4b1f7a30")


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says what failed and how."""


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- results model


@dataclass
class Measure:
    """One thing measured: its runs, in seconds or MB."""

    label: str
    short: str  # name in the reference column of the rows compared with it
    unit: str = "s"
    values: list[float] = field(default_factory=list)
    error: str | None = None
    wrong: list[str] = field(default_factory=list)  # runs whose bytes or listing were wrong

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def add(self, value: float) -> None:
        self.values.append(value)
        shown = f"{value:.3f} s" if self.unit == "s" else f"{value:.1f} {self.unit}"
        say(f"  {self.label}: run {len(self.values)}: {shown}")


@dataclass(frozen=True)
class Target:
    """A goal from the issue: on the ratio to the reference, or on the value itself."""

    text: str
    limit: float
    hard: float | None = None  # a looser hard limit: "not met, within hard limit"
    on_ratio: bool = True
    strict: bool = False  # "<" rather than "<="

    def verdict(self, value: float) -> str:
        def ok(limit: float) -> bool:
            return value < limit if self.strict else value <= limit

        if ok(self.limit):
            return "met"
        if self.hard is not None and ok(self.hard):
            return "not met (hard limit met)"
        return "NOT MET"


@dataclass(frozen=True)
class Row:
    """A line of the table: a measure, the measure it is compared with, and a target."""

    key: str
    ref: str | None = None
    target: Target | None = None


COLD_TARGET = Target("<= 1.5x (hard limit 3x)", 1.5, hard=3.0)
ROWS: tuple[Row, ...] = (
    Row("wire"),
    Row("local"),
    Row("cold", "wire", COLD_TARGET),
    Row("wire_file"),
    Row("cold", "wire_file"),
    Row("cold", "rclone", Target("<= 0.1x (>= 10x faster)", 0.1)),
    Row("cpu_wire_server"),
    Row("cpu_cold_server", "cpu_wire_server"),
    Row("cpu_cold_fs"),
    Row("cpu_cold_reader"),
    Row("mount"),
    Row("rclone", "wire"),
    Row("dwc", "wire"),
    Row("warm_disk", "local", Target("<= 3x", 3.0)),
    Row("warm_page", "local", Target("<= 1.2x", 1.2)),
    Row("ls_local"),
    Row("ls_cold", "ls_local", Target("< 0.5 s", 0.5, on_ratio=False, strict=True)),
    Row("ls_warm", "ls_local"),
    Row("wire_one"),
    Row("ttfb", "wire_one"),
    Row("par_wire"),
    Row("par_cold", "par_wire"),
    Row("wire_1g"),
    Row("cold_1g", "wire_1g", COLD_TARGET),
    Row("rss_idle"),
    Row("rss_1g", None, Target("< 200 MB", 200.0, on_ratio=False, strict=True)),
)


def make_measures() -> dict[str, Measure]:
    """Every measure the rows name: the label the table shows and a short name for the
    reference column."""
    n = PARALLEL_SERIES
    labels = {
        "wire": ("wire: curl WADO-RS series retrieve (CT, 400 files)", "wire (curl series)"),
        "local": ("local disk: cat the 400 CT files (page cache warm)", "local disk cat"),
        "wire_file": ("wire into a new file on the cache's disk: curl -o", "curl -o file"),
        "cold": ("dicomfs cold series read: cat 400 files", ""),
        "mount": ("dicomfs mount time (fresh cache, until ready)", ""),
        "cpu_wire_server": ("CPU: Orthanc, for one wire series retrieve", "Orthanc CPU (wire)"),
        "cpu_cold_server": ("CPU: Orthanc, during a dicomfs cold series read", ""),
        "cpu_cold_fs": ("CPU: the dicomfs process, during that cold read", ""),
        "cpu_cold_reader": ("CPU: cat (and its shell), during that cold read", ""),
        "rclone": ("rclone mount of Orthanc WebDAV, cold: cat 400 files", "rclone cold cat"),
        "dwc": ("dicomweb-client iter_series, whole process", ""),
        "warm_disk": ("dicomfs warm from disk cache (fresh mount): cat", ""),
        "warm_page": ("dicomfs warm from page cache (2nd cat, same mount)", ""),
        "ls_local": ("local disk: ls -l of the CT folder", "local disk ls -l"),
        "ls_cold": ("dicomfs ls -l of the CT series, cold", ""),
        "ls_warm": ("dicomfs ls -l of the CT series, warm (2nd ls)", ""),
        "wire_one": ("wire: curl WADO-RS one instance (whole)", "wire (curl instance)"),
        "ttfb": ("dicomfs time to first byte, one instance, cold", ""),
        "par_wire": (f"wire: {n} concurrent curl series retrieves", f"wire ({n} curl series)"),
        "par_cold": (f"dicomfs {n} concurrent cat of {n} series, cold", ""),
        "wire_1g": ("wire: curl WADO-RS study retrieve (~1 GB, 2000 files)",
                    "wire (curl study)"),
        "cold_1g": ("dicomfs cold read of the ~1 GB study: cat 2000 files", ""),
        "rss_idle": ("dicomfs peak RSS (VmHWM) after mount, before reading", ""),
        "rss_1g": ("dicomfs peak RSS (VmHWM) after reading the ~1 GB study", ""),
    }
    return {key: Measure(label, short, "MB" if key.startswith("rss") else "s")
            for key, (label, short) in labels.items()}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FileRef:
    """A file a mount must show: its size, SHA-256 and the original on local disk."""

    size: int
    sha256: str
    origin: Path


@dataclass(frozen=True)
class SeriesRef:
    """One series (or study) to read: its UIDs and its files by name (``<SOP UID>.dcm``)."""

    study: str
    series: str
    files: dict[str, FileRef]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def middle(self) -> str:
        """The name of the middle file in archive order (the time-to-first-byte file)."""
        return sorted(self.files, key=lambda n: self.files[n].origin)[len(self.files) // 2]


def series_ref(archive: SampleArchive, entries: Sequence[SampleFile], study: str,
               series: str) -> SeriesRef:
    """A :class:`SeriesRef` from archive entries."""
    return SeriesRef(study, series, {f"{f.sop_uid}.dcm": FileRef(f.size, f.sha256,
                                                                 archive.path(f))
                                     for f in entries})


def build_parallel_series(dest: Path) -> list[SeriesRef]:
    """Eight series of 48 512x512 int16 slices (~25 MB each) for the parallel-read row.

    Deterministic (UIDs from uuid5, seeded pixels); reused when ``dest`` already holds them.
    """
    manifest = dest / "manifest.json"

    def refs_of(data: dict[str, Any]) -> list[SeriesRef]:
        return [SeriesRef(s["study"], s["series"], {
            name: FileRef(size, digest, dest / s["series"] / name)
            for name, (size, digest) in s["files"].items()}) for s in data["series"]]

    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        refs = refs_of(data)
        if data.get("slices") == PARALLEL_SLICES and len(refs) == PARALLEL_SERIES and all(
            f.origin.stat().st_size == f.size for r in refs for f in r.files.values()
        ):
            return refs
    import numpy as np

    from tests.support.sample import part10_dataset

    def uid(name: str) -> str:
        return f"2.25.{uuid.uuid5(PARALLEL_NAMESPACE, name).int}"

    shutil.rmtree(dest, ignore_errors=True)
    study = uid("study")
    series_list: list[dict[str, Any]] = []
    for s in range(PARALLEL_SERIES):
        series = uid(f"series/{s}")
        folder = dest / series
        folder.mkdir(parents=True)
        rng = np.random.default_rng(1000 + s)
        files: dict[str, tuple[int, str]] = {}
        for i in range(PARALLEL_SLICES):
            sop = uid(f"instance/{s}/{i}")
            ds = part10_dataset("1.2.840.10008.5.1.4.1.1.2", sop)
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ds.SOPInstanceUID = sop
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.PatientID = "DFS-BENCH"
            ds.PatientName = "Bench^Parallel"
            ds.StudyDate = "20240301"
            ds.StudyDescription = "BENCH PARALLEL"
            ds.Modality = "CT"
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = f"Parallel {s + 1}"
            ds.InstanceNumber = i + 1
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = 512
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = rng.integers(-1000, 2000, (512, 512), dtype=np.int16).tobytes()
            path = folder / f"{sop}.dcm"
            ds.save_as(path, enforce_file_format=True)
            data_bytes = path.read_bytes()
            files[path.name] = (len(data_bytes), hashlib.sha256(data_bytes).hexdigest())
        series_list.append({"study": study, "series": series, "files": files})
    content = {"slices": PARALLEL_SLICES, "series": series_list}
    manifest.write_text(json.dumps(content), encoding="utf-8")
    return refs_of(content)


def verify_into(measures: Sequence[Measure], folder: Path, ref: SeriesRef,
                read: Collection[str] | None = None) -> None:
    """:func:`check_folder`, a problem recorded against the run of ``measures`` just timed
    (which is kept)."""
    problem = check_folder(folder, ref, read)
    if problem is None:
        return
    for m in measures:
        m.wrong.append(f"run {len(m.values)}: {problem}")
    say(f"WRONG RESULT ({', '.join(m.label for m in measures)}): {problem}")


def first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (the shorter length if none)."""
    step = 4096
    for start in range(0, min(len(a), len(b)), step):
        if a[start:start + step] != b[start:start + step]:
            return next(i for i in range(start, start + step) if a[i:i + 1] != b[i:i + 1])
    return min(len(a), len(b))


def check_folder(folder: Path, ref: SeriesRef, read: Collection[str] | None = None
                 ) -> str | None:
    """None when ``folder`` shows exactly the series' files with their bytes, else what not.

    Untimed, after the timed read: every file (or every name in ``read``) is read again and
    hashed.
    """
    try:
        found = {p.name: p.stat().st_size for p in folder.glob("*.dcm")}
    except OSError as exc:
        return f"listing {folder}: {exc}"
    problems = []
    missing = set(ref.files) - set(found)
    if missing:
        problems.append(f"{len(missing)} of {len(ref.files)} files missing")
    if extra := set(found) - set(ref.files):
        problems.append(f"{len(extra)} unexpected files")
    checked = set(found) & set(ref.files) & set(ref.files if read is None else read)
    # (a file not read yet may show an estimated size: only read files must be exact)
    wrong_size = [n for n in checked if found[n] != ref.files[n].size]
    if wrong_size:
        problems.append(f"{len(wrong_size)} files with the wrong size")
    wrong: list[tuple[str, int]] = []
    for name in sorted(checked):
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            problems.append(f"reading {name}: {exc}")
            continue
        if hashlib.sha256(data).hexdigest() != ref.files[name].sha256:
            wrong.append((name, first_difference(data, ref.files[name].origin.read_bytes())))
    if wrong:
        offsets = sorted({offset for _, offset in wrong})
        problems.append(f"{len(wrong)} of {len(ref.files)} files with wrong bytes (e.g. "
                        f"{ref.files[wrong[0][0]].origin.name}), first difference at offset "
                        f"{', '.join(map(str, offsets[:4]))}")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- processes


def run_timed(cmd: Sequence[str], what: str, *, timeout: float = 600.0,
              daemon_log: Path | None = None) -> tuple[float, str]:
    """Run ``cmd``; its wall-clock seconds and stdout. BenchError when it fails.

    ``daemon_log``: the command leaves a daemon behind, which would hold pipes open; its
    output then goes to that file instead.
    """
    started = time.perf_counter()
    try:
        if daemon_log is None:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        else:
            with open(daemon_log, "ab") as log:
                done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout:.0f} s: {shlex.join(cmd)}") from None
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        errors = tail(daemon_log) if daemon_log else done.stderr.strip()[-1500:]
        raise BenchError(f"{what}: exit {done.returncode}: {shlex.join(cmd)}\n{errors}")
    return elapsed, done.stdout if daemon_log is None else ""


def run_parallel(cmds: Sequence[Sequence[str]], what: str) -> tuple[float, list[str]]:
    """Start every command at once; wall-clock until the last ends, and their stdouts."""
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outputs = [p.communicate(timeout=600) for p in procs]
    elapsed = time.perf_counter() - started
    for proc, (_, err), cmd in zip(procs, outputs, cmds, strict=True):
        if proc.returncode != 0:
            raise BenchError(f"{what}: exit {proc.returncode}: {shlex.join(cmd)}\n"
                             f"{err.strip()[-1500:]}")
    return elapsed, [out for out, _ in outputs]


def dicomweb_client_seconds(url: str, ref: SeriesRef) -> float:
    """Wall time of a process that reads the series with dicomweb-client's ``iter_series``
    (interpreter start and imports included)."""
    code = ("import sys\n"
            "from dicomweb_client.api import DICOMwebClient\n"
            "client = DICOMwebClient(sys.argv[1])\n"
            "found = client.iter_series(sys.argv[2], sys.argv[3],\n"
            "                           media_types=(('application/dicom', '*'),))\n"
            "print(sum(1 for _ in found))\n")
    seconds, out = run_timed([sys.executable, "-c", code, url, ref.study, ref.series],
                             "dicomweb-client")
    if out.strip() != str(len(ref.files)):
        raise BenchError(f"dicomweb-client returned {out.strip()} instances, "
                         f"expected {len(ref.files)}")
    return seconds


def cat_cmd(folder: Path, pattern: str = "*.dcm") -> list[str]:
    """``cat FOLDER/PATTERN > /dev/null`` (the glob is expanded by bash, inside the timing)."""
    return ["bash", "-c", f'shopt -s failglob; cat -- "$1"/{pattern} > /dev/null', "bash",
            str(folder)]


def curl_cmd(url: str, output: Path | None = None) -> list[str]:
    return ["curl", "-sS", "-o", str(output or "/dev/null"), "-w",
            "%{http_code} %{size_download}", "-H", f"Accept: {ACCEPT}", url]


def check_curl(output: str, at_least: int, what: str) -> None:
    status, _, size = output.partition(" ")
    if status != "200" or float(size or 0) < at_least:
        raise BenchError(f"{what}: HTTP {status}, {size} bytes (expected >= {at_least})")


def process_state(pid: int) -> str | None:
    """The state letter of a process (``Z`` for a zombie), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_state(pid) in (None, "Z"):
            return True
        time.sleep(0.02)
    return False


def end_process(pid: int | None, timeout: float = 10.0) -> None:
    """Wait for ``pid`` to exit by itself, then SIGTERM, then SIGKILL."""
    if pid is None or wait_gone(pid, timeout):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if wait_gone(pid, 5.0):
            return


def find_pid(pattern: str, timeout: float = 5.0) -> int | None:
    """The pid of the one process whose command line matches ``pattern`` (pgrep -f)."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True,
                              check=False)
        pids = [int(p) for p in done.stdout.split()]
        if len(pids) == 1 or time.monotonic() > deadline:
            return pids[0] if len(pids) == 1 else None
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` (all its threads) has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError) as exc:
        raise BenchError(f"cannot read the CPU time of process {pid}: {exc}") from None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of ``pid`` in MB (10^6 bytes)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the status of the mount process {pid}: {exc}") from None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if not match:
        raise BenchError(f"no VmHWM in /proc/{pid}/status")
    return int(match.group(1)) * 1024 / 1e6


# --------------------------------------------------------------------------- mounts


@dataclass
class MountHandle:
    kind: str  # "dicomfs" | "rclone"
    path: Path
    pid: int | None
    log: Path
    seconds: float = 0.0


class Mounts:
    """Starts and stops dicomfs and rclone mounts, each on a mount point of its own."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.logs = work / "logs"
        self.active: list[MountHandle] = []
        self._count = 0
        self._caches = 0

    def _new_point(self, kind: str) -> tuple[Path, Path]:
        self._count += 1
        path = self.work / "mnt" / f"{kind}-{self._count}"
        path.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        return path, self.logs / f"{kind}-{self._count}.log"

    def fresh_cache(self) -> Path:
        """A new, empty cache folder."""
        self._caches += 1
        path = self.work / "caches" / str(self._caches)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def dicomfs(self, url: str, cache_dir: Path) -> MountHandle:
        """``python -m dicomfs mount URL MNT --cache-dir DIR`` (returns once ready), timed."""
        path, log = self._new_point("dicomfs")
        cmd = [sys.executable, "-m", "dicomfs", "mount", url, str(path),
               "--cache-dir", str(cache_dir), "--log-file", str(log)]
        handle = MountHandle("dicomfs", path, None, log)
        self.active.append(handle)
        try:
            handle.seconds, _ = run_timed(cmd, "dicomfs mount", timeout=180)
        except BenchError as exc:
            raise BenchError(f"{exc}\nmount log {log}:\n{tail(log)}") from None
        handle.pid = find_pid(rf"dicomfs mount \S+ {re.escape(str(path))} .*--foreground")
        if handle.pid is None:
            raise BenchError(f"cannot find the dicomfs process serving {path}")
        return handle

    def rclone(self, webdav_url: str) -> MountHandle:
        """``rclone mount :webdav: MNT --read-only --vfs-cache-mode off --daemon``."""
        path, log = self._new_point("rclone")
        config = self.work / "rclone.conf"
        config.touch()
        cmd = ["rclone", "mount", ":webdav:", str(path), "--webdav-url", webdav_url,
               "--read-only", "--vfs-cache-mode", "off", "--daemon", "--config", str(config),
               "--log-file", str(log)]
        handle = MountHandle("rclone", path, None, log)
        self.active.append(handle)
        try:
            handle.seconds, _ = run_timed(cmd, "rclone mount", timeout=120,
                                          daemon_log=log.with_suffix(".out"))
        except BenchError as exc:
            raise BenchError(f"{exc}\nrclone log {log}:\n{tail(log)}") from None
        handle.pid = find_pid(rf"rclone mount :webdav: {re.escape(str(path))}( |$)")
        if not is_mounted(path):
            raise BenchError(f"rclone said it mounted {path}, but nothing is mounted there")
        return handle

    def unmount(self, handle: MountHandle) -> None:
        """Unmount (``dicomfs unmount`` / ``fusermount3 -u``), wait for the process to end."""
        if handle.kind == "dicomfs":
            cmd = [sys.executable, "-m", "dicomfs", "unmount", str(handle.path)]
        else:
            cmd = ["fusermount3", "-u", str(handle.path)]
        if is_mounted(handle.path):
            subprocess.run(cmd, capture_output=True, timeout=60, check=False)
        end_process(handle.pid)
        if is_mounted(handle.path):
            force_unmount(handle.path)
        with contextlib.suppress(ValueError):
            self.active.remove(handle)
        with contextlib.suppress(OSError):
            handle.path.rmdir()

    @contextlib.contextmanager
    def mounted(self, handle: MountHandle) -> Iterator[MountHandle]:
        try:
            yield handle
        finally:
            self.unmount(handle)

    def cleanup(self) -> None:
        for handle in list(self.active):
            say(f"unmounting {handle.path}")
            try:
                self.unmount(handle)
            except Exception as exc:  # keep going: the rest must be cleaned up too
                say(f"could not unmount {handle.path}: {exc}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def unmount_stale(work: Path) -> None:
    """Detach mounts a killed earlier run left below ``work`` (before deleting anything)."""
    prefix = str(work) + os.sep
    for point in sorted(mount_points()):
        if point.startswith(prefix):
            say(f"removing a stale mount {point}")
            force_unmount(point)


# --------------------------------------------------------------------------- the benchmark


class Bench:
    """Data, servers and every measurement; :meth:`cleanup` undoes what it started."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs: int = args.runs
        self.measures = make_measures()
        self.orthancs: list[LocalOrthanc] = []
        self.mounts = Mounts(WORK)
        self.facts: dict[str, str] = {}
        self.data_notes: list[str] = []
        self.failures: list[str] = []
        self._cleaned = False

    # -- set-up ------------------------------------------------------------------------

    def prepare(self) -> None:
        unmount_stale(WORK)
        shutil.rmtree(WORK, ignore_errors=True)
        WORK.mkdir(parents=True)
        self.archive = self._build("sample archive", CACHE / "testdata", lambda: build_archive(
            CACHE / "testdata", ct_slices=CT_SLICES))
        ct = self.archive.series_uid("ct")
        self.ct = series_ref(self.archive, self.archive.series_files(ct),
                             self.archive.study_uid("ct"), ct)
        self.ct_folder = self.archive.path(self.archive.series_files(ct)[0]).parent
        self.orthanc = self._start_orthanc(CACHE / "bench-orthanc")
        self._load(self.orthanc, "sample archive", self.archive)
        self.probe_webdav_range()
        if not self.args.skip_network:
            dest = CACHE / "bench-big-instance"
            self.big_instance = self._build("big multi-frame instance", dest,
                                            lambda: build_big_instance(dest))
            self.big_instance_path = dest / self.big_instance.path
            self._load(self.orthanc, "big multi-frame instance", [self.big_instance_path])
        if self.args.only is not None:
            return
        self.parallel = self._build("parallel series", CACHE / "bench-parallel",
                                    lambda: build_parallel_series(CACHE / "bench-parallel"))
        self._load(self.orthanc, "parallel series",
                   [f.origin for r in self.parallel for f in r.files.values()])
        if not self.args.skip_1g:
            # The 1 GB archive reuses the sample archive's UIDs (same recipe, more slices):
            # it needs an Orthanc of its own, or the CT series would mix both.
            self.big = self._build("~1 GB archive", CACHE / "bench-1g", lambda: build_archive(
                CACHE / "bench-1g", ct_slices=BIG_SLICES))
            study = self.big.study_uid("ct")
            self.big_ref = series_ref(self.big, self.big.study_files(study), study,
                                      self.big.series_uid("ct"))
            self.orthanc_1g = self._start_orthanc(CACHE / "bench-orthanc-1g")
            self._load(self.orthanc_1g, "~1 GB archive", self.big)

    def _build(self, what: str, dest: Path, build: Callable[[], Any]) -> Any:
        existed = (dest / "manifest.json").exists()
        say(f"building the {what} in {dest} (reused when already built)")
        started = time.monotonic()
        result = build()
        seconds = time.monotonic() - started
        how = "checked and reused" if existed else "generated"
        self.data_notes.append(f"{what} ({dest.relative_to(REPO)}): {how} in {seconds:.1f} s")
        return result

    def _start_orthanc(self, storage: Path) -> LocalOrthanc:
        orthanc = LocalOrthanc(storage, config=ORTHANC_CONFIG)
        self.orthancs.append(orthanc)
        orthanc.start()
        say(f"Orthanc on {orthanc.url}, storage {storage}")
        return orthanc

    def _load(self, orthanc: LocalOrthanc, what: str, source: SampleArchive | list[Path]) -> None:
        report = (orthanc.load_archive(source) if isinstance(source, SampleArchive)
                  else orthanc.upload(source))
        self.data_notes.append(
            f"{what} into Orthanc: {report.uploaded} uploaded, "
            f"{report.skipped + report.already_stored} already stored, "
            f"{report.seconds:.1f} s")
        say(self.data_notes[-1])

    # -- measurements ------------------------------------------------------------------

    @property
    def orthanc_pid(self) -> int:
        pid = self.orthanc.pid
        if pid is None:
            raise BenchError("the benchmark's Orthanc is not running")
        return pid

    def series_url(self, orthanc: LocalOrthanc, ref: SeriesRef) -> str:
        return f"{orthanc.dicomweb_url}/studies/{ref.study}/series/{ref.series}"

    def measure(self, keys: Sequence[str], body: Callable[[int], None]) -> None:
        """Run ``body(run)`` ``--runs`` times; a BenchError marks ``keys`` failed, no more."""
        for run in range(self.runs):
            try:
                body(run)
            except BenchError as exc:
                message = str(exc)
                say(f"FAILED: {message}")
                for key in keys:
                    self.measures[key].error = message.splitlines()[0]
                self.failures.append(f"{', '.join(keys)} (run {run + 1}): {message}")
                return

    def verify(self, keys: Sequence[str], folder: Path, ref: SeriesRef) -> None:
        """Check (untimed) what a read showed; a wrong listing or wrong bytes are recorded
        against the run just timed, which is kept."""
        verify_into([self.measures[key] for key in keys], folder, ref)

    def probe_webdav_range(self) -> None:
        """Does Orthanc's WebDAV honour ``Range``? (rclone relies on it when it seeks.)"""
        origin = self.ct.files[self.ct.middle]
        path = f"/webdav/by-uids/{self.ct.study}/{self.ct.series}/{self.ct.middle}"
        offset = 393216
        try:
            answer = self.orthanc.client.get(path, headers={"Range": f"bytes={offset}-"})
        except Exception as exc:
            self.data_notes.append(f"WebDAV Range probe failed: {exc}")
            return
        expected = origin.origin.read_bytes()[offset:]
        honoured = answer.status_code == 206 and answer.content == expected
        self.data_notes.append(
            f"Orthanc WebDAV and `Range: bytes={offset}-`: HTTP {answer.status_code}, "
            f"{len(answer.content)} bytes, "
            + ("the requested range (honoured)" if honoured else
               "the whole file from byte 0 (Range ignored)"
               if answer.content == origin.origin.read_bytes() else "unexpected content"))
        say(self.data_notes[-1])

    def cold_mount(self, orthanc: LocalOrthanc | None = None) -> MountHandle:
        handle = self.mounts.dicomfs((orthanc or self.orthanc).dicomweb_url,
                                     self.mounts.fresh_cache())
        self.measures["mount"].add(handle.seconds)
        return handle

    def run_all(self) -> None:
        m = self.measures
        wire_url = self.series_url(self.orthanc, self.ct)
        say("reference: wire (one untimed warm-up first)")
        run_timed(curl_cmd(wire_url), "curl warm-up")

        def wire(_: int) -> None:
            server = cpu_seconds(self.orthanc_pid)
            seconds, out = run_timed(curl_cmd(wire_url), "curl series")
            m["cpu_wire_server"].add(cpu_seconds(self.orthanc_pid) - server)
            check_curl(out, self.ct.size, "curl series")
            m["wire"].add(seconds)

        self.measure(["wire", "cpu_wire_server"], wire)

        def wire_file(run: int) -> None:
            # A new file each run, deleted only at the end: what a cold read has to
            # do at least (the bytes land in new page-cache pages), and deleting
            # here would make the next runs pay for the disk's discards.
            target = WORK / f"wire-{run}.multipart"
            seconds, out = run_timed(curl_cmd(wire_url, target), "curl series to a file")
            check_curl(out, self.ct.size, "curl series to a file")
            m["wire_file"].add(seconds)

        self.measure(["wire_file"], wire_file)

        say("reference: local disk (one untimed warm-up first)")
        run_timed(cat_cmd(self.ct_folder), "cat warm-up")
        self.measure(["local"], lambda _: m["local"].add(
            run_timed(cat_cmd(self.ct_folder), "cat local")[0]))
        self.measure(["ls_local"], lambda _: m["ls_local"].add(
            run_timed(["ls", "-l", str(self.ct_folder)], "ls local")[0]))

        say("dicomfs cold, then warm from disk cache and from page cache")
        self.measure(["cold", "warm_disk", "warm_page", "cpu_cold_server", "cpu_cold_fs",
                      "cpu_cold_reader"], self._cold_and_warm)

        say("rclone on Orthanc's WebDAV, cold")
        self.measure(["rclone"], self._rclone)

        say("dicomweb-client iter_series")
        self.measure(["dwc"], self._dicomweb_client)

        say("ls -l through dicomfs")
        self.measure(["ls_cold", "ls_warm"], self._ls)

        say("time to first byte")
        sample = self.ct.middle
        one_url = f"{wire_url}/instances/{sample.removesuffix('.dcm')}"

        def wire_one(_: int) -> None:
            seconds, out = run_timed(curl_cmd(one_url), "curl instance")
            check_curl(out, self.ct.files[sample].size, "curl instance")
            m["wire_one"].add(seconds)

        self.measure(["wire_one"], wire_one)
        self.measure(["ttfb"], self._ttfb)

        say(f"{PARALLEL_SERIES} parallel readers")
        self.measure(["par_wire"], self._parallel_wire)
        self.measure(["par_cold"], self._parallel_dicomfs)

        if not self.args.skip_1g:
            say("~1 GB study: wire, then dicomfs cold read and peak RSS")
            big_url = f"{self.orthanc_1g.dicomweb_url}/studies/{self.big_ref.study}"
            run_timed(curl_cmd(big_url), "curl warm-up")

            def wire_1g(_: int) -> None:
                seconds, out = run_timed(curl_cmd(big_url), "curl study")
                check_curl(out, self.big_ref.size, "curl study")
                m["wire_1g"].add(seconds)

            self.measure(["wire_1g"], wire_1g)
            self.measure(["cold_1g", "rss_idle", "rss_1g"], self._big)

    def _cold_and_warm(self, _: int) -> None:
        m = self.measures
        cache = self.mounts.fresh_cache()
        with self.mounts.mounted(self.mounts.dicomfs(self.orthanc.dicomweb_url, cache)) as h:
            m["mount"].add(h.seconds)
            folder = h.path / "studies" / self.ct.study / self.ct.series
            assert h.pid is not None
            before = (cpu_seconds(self.orthanc_pid), cpu_seconds(h.pid), children_cpu_seconds())
            m["cold"].add(self._read(folder, h))
            after = (cpu_seconds(self.orthanc_pid), cpu_seconds(h.pid), children_cpu_seconds())
            for key, start, end in zip(("cpu_cold_server", "cpu_cold_fs", "cpu_cold_reader"),
                                       before, after, strict=True):
                m[key].add(end - start)
            self.verify(["cold"], folder, self.ct)
        with self.mounts.mounted(self.mounts.dicomfs(self.orthanc.dicomweb_url, cache)) as h:
            folder = h.path / "studies" / self.ct.study / self.ct.series
            m["warm_disk"].add(self._read(folder, h))
            m["warm_page"].add(self._read(folder, h))
            self.verify(["warm_disk", "warm_page"], folder, self.ct)
        # The cache stays until the end: deleting 200 MB here makes the disk discard
        # its blocks (mounted with -o discard) while the next runs write.

    def _read(self, folder: Path, handle: MountHandle, pattern: str = "*.dcm") -> float:
        try:
            return run_timed(cat_cmd(folder, pattern), f"cat through {handle.kind}")[0]
        except BenchError as exc:
            raise BenchError(f"{exc}\n{handle.kind} log {handle.log}:\n{tail(handle.log)}"
                             ) from None

    def _rclone(self, _: int) -> None:
        with self.mounts.mounted(self.mounts.rclone(f"{self.orthanc.url}/webdav/")) as h:
            folder = h.path / "by-uids" / self.ct.study / self.ct.series
            self.measures["rclone"].add(self._read(folder, h))
            self.verify(["rclone"], folder, self.ct)

    def _dicomweb_client(self, _: int) -> None:
        self.measures["dwc"].add(dicomweb_client_seconds(self.orthanc.dicomweb_url, self.ct))

    def _ls(self, _: int) -> None:
        with self.mounts.mounted(self.cold_mount()) as h:
            folder = h.path / "studies" / self.ct.study / self.ct.series
            cmd = ["ls", "-l", str(folder)]
            cold, out = run_timed(cmd, "ls -l through dicomfs")
            warm, _ = run_timed(cmd, "ls -l through dicomfs")
            shown = sum(1 for line in out.splitlines() if line.endswith(".dcm"))
            if shown != len(self.ct.files):
                raise BenchError(f"ls -l showed {shown} .dcm files, expected "
                                 f"{len(self.ct.files)}")
            self.measures["ls_cold"].add(cold)
            self.measures["ls_warm"].add(warm)

    def _ttfb(self, _: int) -> None:
        with self.mounts.mounted(self.cold_mount()) as h:
            path = h.path / "studies" / self.ct.study / self.ct.series / self.ct.middle
            started = time.perf_counter()
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    first = os.read(fd, 1)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise BenchError(f"open+read(1) of {path}: {exc}\n{tail(h.log)}") from None
            seconds = time.perf_counter() - started
            if len(first) != 1:
                raise BenchError(f"read(1) of {path} returned {len(first)} bytes")
            self.measures["ttfb"].add(seconds)

    def _parallel_wire(self, _: int) -> None:
        urls = [self.series_url(self.orthanc, r) for r in self.parallel]
        seconds, outs = run_parallel([curl_cmd(u) for u in urls], "parallel curl")
        for out, ref in zip(outs, self.parallel, strict=True):
            check_curl(out, ref.size, "parallel curl")
        self.measures["par_wire"].add(seconds)

    def _parallel_dicomfs(self, _: int) -> None:
        with self.mounts.mounted(self.cold_mount()) as h:
            folders = [h.path / "studies" / r.study / r.series for r in self.parallel]
            try:
                seconds, _ = run_parallel([cat_cmd(f) for f in folders], "parallel cat")
            except BenchError as exc:
                raise BenchError(f"{exc}\nmount log {h.log}:\n{tail(h.log)}") from None
            self.measures["par_cold"].add(seconds)
            for folder, ref in zip(folders, self.parallel, strict=True):
                self.verify(["par_cold"], folder, ref)

    def _big(self, _: int) -> None:
        with self.mounts.mounted(self.cold_mount(self.orthanc_1g)) as h:
            assert h.pid is not None
            idle = vm_hwm_mb(h.pid)
            study = h.path / "studies" / self.big_ref.study
            seconds = self._read(study, h, "*/*.dcm")
            peak = vm_hwm_mb(h.pid)
            self.measures["cold_1g"].add(seconds)
            self.measures["rss_idle"].add(idle)
            self.measures["rss_1g"].add(peak)
            self.verify(["cold_1g"], study / self.big_ref.series, self.big_ref)

    # -- clean-up ----------------------------------------------------------------------

    def cleanup(self) -> None:
        """Unmount everything, stop Orthanc, delete the work folder. Idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
        started = time.monotonic()
        if self.mounts.active:
            say(f"cleaning up: {len(self.mounts.active)} mount(s)")
        self.mounts.cleanup()
        for orthanc in self.orthancs:
            if orthanc.running:
                say(f"stopping Orthanc {orthanc.url}")
            try:
                orthanc.stop()
            except Exception as exc:
                say(f"could not stop Orthanc {orthanc.url}: {exc}")
        unmount_stale(WORK)
        if time.monotonic() - started > 2:
            say(f"clean-up took {time.monotonic() - started:.1f} s")
        if self.failures:
            say(f"logs kept in {WORK / 'logs'}")
            shutil.rmtree(WORK / "caches", ignore_errors=True)
        else:
            shutil.rmtree(WORK, ignore_errors=True)


# --------------------------------------------------------------------------- report


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    return f"{value:.1f}"


@dataclass(frozen=True)
class TableLine:
    measurement: str
    median: str
    spread: str
    runs: str
    reference: str
    ratio: str
    target: str
    result: str


def table_lines(measures: dict[str, Measure]) -> list[TableLine]:
    """The table, one line per row, as strings."""
    lines = []
    for row in ROWS:
        m = measures[row.key]
        ref = measures[row.ref] if row.ref else None
        median = m.median
        unit = "s" if m.unit == "s" else " MB"
        shown = "-" if median is None else fmt_value(median, m.unit) + unit
        spread = ("-" if not m.values else
                  f"{fmt_value(min(m.values), m.unit)}-{fmt_value(max(m.values), m.unit)}")
        ratio = None
        if ref is not None and median is not None and ref.median:
            ratio = median / ref.median
        ratio_text = "-" if ratio is None else f"{ratio:.2f}x"
        if row.ref == "rclone" and ratio:
            ratio_text += f" ({1 / ratio:.0f}x faster)"
        result = ""
        if row.target is not None:
            value = ratio if row.target.on_ratio else median
            result = "no data" if value is None else row.target.verdict(value)
        problems = []
        if m.wrong:
            problems.append(f"WRONG BYTES in {len(m.wrong)}/{len(m.values)} runs")
        if m.error:
            problems.append("FAILED" + (" (a run)" if m.values else ""))
        result = "; ".join([p for p in [result, *problems] if p])
        lines.append(TableLine(
            m.label, shown, spread, str(len(m.values)),
            ref.short if ref else "-",
            ratio_text, row.target.text if row.target else "", result))
    return lines


def text_table(lines: list[TableLine]) -> str:
    headers = ("measurement", "median", "min-max", "n", "reference", "ratio", "target",
               "result")
    return plain_table(headers, [astuple(line) for line in lines])


def astuple(line: TableLine) -> tuple[str, ...]:
    return tuple(getattr(line, f) for f in line.__dataclass_fields__)


def markdown_table(lines: list[TableLine]) -> str:
    out = ["| measurement | median | min-max | runs | reference | ratio | target | result |",
           "|---|---:|---:|---:|---|---:|---|---|"]
    for line in lines:
        cells = [c.replace("|", "\\|") for c in astuple(line)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded with spaces, for the terminal."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [headers, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])


def machine_facts(orthanc: LocalOrthanc | None) -> dict[str, str]:
    """nproc, RAM, kernel, CPU, OS, tool versions."""
    facts: dict[str, str] = {}
    facts["nproc"] = str(os.cpu_count())
    meminfo = Path("/proc/meminfo").read_text()
    total = re.search(r"MemTotal:\s+(\d+)", meminfo)
    facts["RAM"] = f"{int(total.group(1)) / 1024**2:.1f} GiB" if total else "?"
    facts["kernel"] = platform.release()
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    facts["CPU"] = cpu.group(1).strip() if cpu else "?"
    with contextlib.suppress(OSError):
        os_release = Path("/etc/os-release").read_text()
        name = re.search(r'PRETTY_NAME="?([^"\n]+)', os_release)
        facts["OS"] = name.group(1) if name else "?"
    facts["Python"] = platform.python_version()
    if orthanc is not None:
        with contextlib.suppress(Exception):
            facts["Orthanc"] = str(orthanc.client.get("/system").json()["Version"])
            plugin = orthanc.client.get("/plugins/dicom-web").json()
            facts["Orthanc DICOMweb plugin"] = str(plugin.get("Version", "?"))
    facts["rclone"] = first_line(["rclone", "version"])
    facts["curl"] = " ".join(first_line(["curl", "--version"]).split()[:2])
    from importlib import metadata

    for dist in ("dicomfs", "dicomweb-client", "pyfuse3", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            facts[dist] = metadata.version(dist)
    return facts


def first_line(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "not installed"
    return (done.stdout.strip().splitlines() or ["?"])[0]


def busy_note(facts: dict[str, str]) -> str:
    """A warning when something else kept the machine busy (1-minute load >= 1)."""
    loads = [float(facts[k].split()[0]) for k in ("_load_start", "_load_end") if k in facts]
    if max(loads, default=0.0) < 1.0:
        return ""
    return ("\nThe machine was not idle (1-minute load average "
            f"{' at start, '.join(f'{x:.1f}' for x in loads)} at end, on {facts['nproc']} "
            "cores): other work shared the CPU, so the figures are noisier and likely slower "
            "than on an idle machine.\n")


def machine_table(facts: dict[str, str]) -> str:
    """The machine facts as a Markdown table (load averages included)."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items() if not k.startswith("_"))
    return (f"| fact | value |\n|---|---|\n{rows}\n"
            f"| load average at start / end | {facts['_load_start']} / {facts['_load_end']} |")


BLOCK_BEGIN = "<!-- scripts/bench {name}: generated by each run, edits inside are lost -->"
BLOCK_END = "<!-- end of scripts/bench {name} -->"


def write_block(output: Path, name: str, text: str) -> None:
    """Put ``text`` between the markers of block ``name`` in ``output``, keeping the rest
    (the hand-written explanations and the other sections' results); a block not yet in
    the file is appended."""
    begin, end = BLOCK_BEGIN.format(name=name), BLOCK_END.format(name=name)
    block = f"{begin}\n{text.strip()}\n{end}\n"
    try:
        current = output.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = "# Performance\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        updated = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(updated, encoding="utf-8")


def write_report(bench: Bench, output: Path, png: Path, lines: list[TableLine],
                 seconds: float, command: str) -> None:
    """The loopback section's block: only what this run measured."""
    facts = bench.facts
    data = "\n".join(f"- {note}" for note in bench.data_notes)
    problems = [f"- failed: {f.splitlines()[0]}" for f in bench.failures
                if not f.startswith("network")]
    problems += [f"- wrong result: {m.label}, {w}" for m in bench.measures.values()
                 for w in m.wrong]
    failures = "\n".join(problems) or "- none"
    text = f"""## Loopback: dicomfs against the wire, local disk and other clients

Generated by `scripts/bench` on {facts['_date']}; the whole run took {seconds / 60:.1f} min
({bench.runs} runs per figure). Ratios are the median of the row over the median of its
reference; "n" is the number of runs (the mount time counts every fresh-cache mount).

Reproduce: `{command}`
{busy_note(facts)}
{markdown_table(lines)}

![dicomfs and references, median seconds (log scale)]({png.name})

### Failures and wrong results

{failures}

### Machine

{machine_table(facts)}

### Data

{data}
"""
    write_block(output, "loopback", text)


def plot(measures: dict[str, Measure], path: Path) -> None:
    """Horizontal bars: each compared row next to its reference (log seconds), and RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [r for r in ROWS if r.ref and measures[r.key].unit == "s"
             and (measures[r.key].values or measures[r.key].error)]
    rss = [m for m in (measures["rss_idle"], measures["rss_1g"]) if m.values]
    fig, axes = plt.subplots(
        2 if rss else 1, 1, figsize=(11, 0.62 * len(pairs) + (3.2 if rss else 1.6)),
        gridspec_kw={"height_ratios": [len(pairs), 1.6] if rss else [1]}, squeeze=False)
    ax = axes[0][0]
    labels: list[str] = []
    y = 0.0
    ticks: list[float] = []
    values = [v for row in pairs for k in (row.key, row.ref or "") for v in measures[k].values]
    for row in pairs:
        ref = measures[row.ref or ""]
        for key, colour in ((row.key, "tab:blue" if "dicomfs" in measures[row.key].label
                             else "tab:orange"), (row.ref or "", "tab:gray")):
            m = measures[key]
            if m.values:
                med = m.median or 0.0
                ax.barh(y, med, height=0.8, color=colour,
                        xerr=[[med - min(m.values)], [max(m.values) - med]], capsize=2)
                note, text_colour = f" {med:.3f} s", "black"
                if key == row.key and ref.median:
                    note += f" = {med / ref.median:.2f}x"
                    if row.target is not None:
                        met = row.target.verdict(med / ref.median if row.target.on_ratio
                                                 else med) == "met"
                        text_colour = "tab:green" if met else "tab:red"
                        note += " (met)" if met else f" (target {row.target.text.split(' (')[0]})"
                ax.text(max(m.values) * 1.08, y, note, va="center", fontsize=7,
                        color=text_colour, weight="bold" if key == row.key else "normal")
            elif key == row.key:
                ax.text(0.01, y, f" failed: {m.error}"[:80], va="center", fontsize=7,
                        transform=ax.get_yaxis_transform(), color="tab:red")
            ticks.append(y)
            labels.append(m.label if key == row.key else f"vs {m.label}")
            y += 1
        y += 0.6
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    if values:
        ax.set_xlim(min(values) / 2, max(values) * 40)
    ax.set_xlabel("seconds, median (bars: min-max), log scale")
    ax.set_title("dicomfs (blue), other clients (orange) and their references (grey)")
    ax.grid(axis="x", which="both", alpha=0.3)

    if rss:
        ax_rss = axes[1][0]
        positions = list(range(len(rss)))
        ax_rss.barh(positions, [m.median or 0.0 for m in rss], color="tab:blue", height=0.6)
        for i, m in enumerate(rss):
            ax_rss.text(m.median or 0.0, i, f" {m.median or 0.0:.0f} MB", va="center",
                        fontsize=8)
        ax_rss.axvline(200, color="tab:red", linestyle="--", label="target < 200 MB")
        ax_rss.set_yticks(positions, [m.label for m in rss], fontsize=7)
        ax_rss.invert_yaxis()
        ax_rss.set_xlabel("MB")
        ax_rss.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--skip-1g", action="store_true",
                        help="skip the ~1 GB study (cold read and peak RSS rows)")
    section = parser.add_mutually_exclusive_group()
    section.add_argument("--only", choices=["network", "latency"],
                         help="run only the network section (emulated links: readers and "
                         "latency rows; nearly full disk, CPU per GB), or only its latency "
                         "rows (first bytes by path, ls -R, a big instance)")
    section.add_argument("--skip-network", action="store_true",
                         help="skip the network section")
    parser.add_argument("--slow-link-runs", type=int, default=1,
                        help="runs at the slowest emulated link (default 1: each run takes "
                        "minutes); the other links use --runs")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md",
                        help="Markdown report (default docs/performance.md); the plot is "
                        "written next to it with the suffix .png")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.slow_link_runs < 1:
        parser.error("--runs and --slow-link-runs must be at least 1")
    return args


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("curl", "rclone", "fusermount3", "pgrep"):
        if not shutil.which(tool):
            say(f"{tool} is missing; run scripts/bench, which installs what is needed")
            return 2
    started = time.monotonic()
    bench = Bench(args)
    atexit.register(bench.cleanup)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    import bench_network  # after the module alias above: it imports this module

    network = None if args.skip_network else bench_network.NetworkBench(bench)
    loopback_seconds = 0.0
    try:
        bench.prepare()
        bench.facts = machine_facts(bench.orthanc)
        if args.only is None:
            bench.run_all()
            loopback_seconds = time.monotonic() - started
        if network is not None:
            network.run()
    finally:
        bench.cleanup()
    seconds = time.monotonic() - started
    bench.facts.update(_date=date, _load_start=load_start,
                       _load_end=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    output = args.output.absolute()
    command = shlex.join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)])
    if args.only is None:
        lines = table_lines(bench.measures)
        if args.skip_1g:
            skipped = {bench.measures[k].label
                       for k in ("wire_1g", "cold_1g", "rss_idle", "rss_1g")}
            lines = [line for line in lines if line.measurement not in skipped]
        print(text_table(lines))
        png = output.with_suffix(".png")
        write_report(bench, output, png, lines, loopback_seconds, command)
        plot(bench.measures, png)
        say(f"wrote {output} and {png}")
    if network is not None and args.only != "latency":
        print(network.text_table())
        png = output.with_name(f"{output.stem}-network.png")
        network.write_report(output, png, seconds - loopback_seconds, command)
        network.plot(png)
        say(f"wrote the network section into {output}, and {png}")
    if network is not None and network.latency.links:
        print(f"\n{network.latency.text_table()}")
        network.latency.write_report(output, command)
        say(f"wrote the latency rows into {output}")
    print(f"\nwhole benchmark: {seconds / 60:.1f} min")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        sys.exit(130)
