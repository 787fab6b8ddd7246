"""Scale benchmark (issue 18): what a person waits for on a large archive.

``PYTHONPATH=. .venv/bin/python scripts/bench_scale.py --studies 20000 [--mount-args '...']``

Builds (or reuses) the generated archive of ``--studies`` one-instance studies
(tests/support/scale.py) in a private Orthanc whose storage is kept under ``--root``, puts a
:class:`~tests.support.netem.LinkProxy` with no delay in front of it (it counts every request,
query strings included), and runs each walk on a fresh mount with an empty cache:

* day walk: ``ls /dates``, ``ls /dates/<Y>``, ``ls /dates/<Y>/<Y-M>``, ``ls .../<Y-M-D>``, one
  after the other (one row each and a total), then the mount's RSS;
* month: ``ls /dates/<Y>/<Y-M>`` by its full path;
* patient: ``ls /patients/<patient folder>`` by its full path;
* ``ls /studies | head``: seconds to the first line, and ``ls -1U`` (unsorted, which GNU ls
  prints as it reads) to its first line; then the seconds until the whole listing.

The mount's own start-up requests are not counted (counters are reset once it is ready).
Requests are counted while the command runs ("requests"), then after it ("later": read-ahead
the step started in the background) until no request has been seen for a second; the next
step starts then.
Prints one table: requests, seconds and results per walk.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomfs import names
from tests.support.mounts import force_unmount, is_mounted
from tests.support.netem import LinkProxy
from tests.support.scale import BUSY_DAY, prepare_storage, scale_orthanc, scale_studies

DEFAULT_ROOT = Path("/tmp/scale")


@dataclass
class Row:
    """One measured step."""

    walk: str
    step: str
    seconds: float
    requests: int
    entries: int | None = None
    note: str = ""
    request_lines: list[str] = field(default_factory=list)
    later: list[str] = field(default_factory=list)  # after the command, until quiet


class Bench:
    """Fresh mounts of one proxied server, each walk timed and its requests counted."""

    def __init__(self, proxy: LinkProxy, work: Path, mount_args: Sequence[str]) -> None:
        self.proxy = proxy
        self.work = work
        self.mount_args = list(mount_args)
        self.rows: list[Row] = []
        self._mounts = 0

    @contextlib.contextmanager
    def mount(self) -> Iterator[tuple[Path, int]]:
        """A fresh mount (new mount point, empty cache): its path and the serving pid."""
        self._mounts += 1
        point = self.work / "mnt" / str(self._mounts)
        cache = self.work / "cache" / str(self._mounts)
        log = self.work / "logs" / f"mount-{self._mounts}.log"
        shutil.rmtree(cache, ignore_errors=True)
        for folder in (point, cache, log.parent):
            folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "dicomfs", "mount", self.proxy.url(), str(point),
               "--cache-dir", str(cache), "--log-file", str(log), *self.mount_args]
        subprocess.run(cmd, check=True, timeout=120)
        try:
            pid = _serving_pid(point)
            self.settle()
            self.proxy.reset()
            yield point, pid
        finally:
            subprocess.run([sys.executable, "-m", "dicomfs", "unmount", str(point)],
                           capture_output=True, timeout=60, check=False)
            if is_mounted(point):
                force_unmount(point)
            shutil.rmtree(cache, ignore_errors=True)

    def settle(self, quiet: float = 1.0, limit: float = 60.0) -> None:
        """Wait until the proxy has seen no new request for ``quiet`` seconds, so requests a
        step starts in the background (read-ahead) count for that step, not the next."""
        deadline = time.monotonic() + limit
        seen, since = self.proxy.requests, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.05)
            if self.proxy.requests != seen:
                seen, since = self.proxy.requests, time.monotonic()

    def collect(self) -> tuple[list[str], list[str]]:
        """Requests made so far, and those made after, until the mount is quiet again."""
        during = self.proxy.reset().request_lines
        self.settle()
        return during, self.proxy.reset().request_lines

    def ls(self, walk: str, step: str, path: Path, *, label: str | None = None) -> Row:
        """Time ``ls -1 path`` and count the requests it caused."""
        self.proxy.reset()
        started = time.perf_counter()
        done = subprocess.run(["ls", "-1", str(path)], capture_output=True, text=True,
                              timeout=600, check=False)
        seconds = time.perf_counter() - started
        lines, later = self.collect()
        note = "" if done.returncode == 0 else f"ls failed: {done.stderr.strip()[:80]}"
        row = Row(walk, label or step, seconds, len(lines), len(done.stdout.splitlines()),
                  note, lines, later)
        self.rows.append(row)
        return row

    def first_line(self, walk: str, step: str, cmd: list[str]) -> Row:
        """Seconds until ``cmd`` prints its first line, then until it ends; requests in all."""
        self.proxy.reset()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        first_at = time.perf_counter() - started
        rest = proc.stdout.read()
        proc.wait(600)
        total = time.perf_counter() - started
        lines, later = self.collect()
        entries = (1 if first else 0) + len(rest.splitlines())
        row = Row(walk, step, first_at, len(lines), entries, f"whole listing {total:.2f} s",
                  lines, later)
        self.rows.append(row)
        return row


def kinds(request_lines: Sequence[str]) -> str:
    """``21 studies, 16 series``: the requests by what they ask for (QIDO level or WADO)."""
    counts: Counter[str] = Counter()
    for line in request_lines:
        path = line.split(" ")[1].split("?")[0].rstrip("/").split("/")
        if path[-1] in ("studies", "series", "instances") and "?" in line:
            counts[path[-1]] += 1
        else:
            counts[path[-1] if path[-1] in ("metadata", "rendered") else "other"] += 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


def _serving_pid(point: Path, timeout: float = 10.0) -> int:
    """The pid of the ``dicomfs mount ... --foreground`` process serving ``point``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                args = (entry / "cmdline").read_bytes().split(b"\0")
                if b"--foreground" in args and os.fsencode(point) in args:
                    return int(entry.name)
        time.sleep(0.05)
    raise RuntimeError(f"no dicomfs process serves {point}")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def pick_patient(studies: int) -> tuple[str, int]:
    """Today's folder name of the first patient with three studies (or the busiest), and
    how many studies that patient has."""
    archive = scale_studies(studies)
    counts = Counter(s.patient_id for s in archive)
    pid = next((p for p, c in sorted(counts.items()) if c == 3), counts.most_common(1)[0][0])
    study = next(s for s in archive if s.patient_id == pid)
    folder = names.patient_folder({
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": study.patient_name}]},
        "00100020": {"vr": "LO", "Value": [pid]},
    })
    return folder, counts[pid]


def run(args: argparse.Namespace) -> list[Row]:
    day = dt.date.fromisoformat(args.day)
    year, month = f"{day:%Y}", f"{day:%Y-%m}"
    archive = scale_studies(args.studies)
    expect_day = sum(1 for s in archive if s.study_date == f"{day:%Y%m%d}")
    expect_month = sum(1 for s in archive if s.study_date.startswith(f"{day:%Y%m}"))
    patient, patient_studies = (args.patient, None) if args.patient else pick_patient(args.studies)
    prepared = prepare_storage(args.root, args.studies)
    print(f"archive of {args.studies} studies: build {prepared['build']:.1f} s, "
          f"load {prepared['load']:.1f} s (0: reused from {args.root})", flush=True)
    with scale_orthanc(args.root, args.studies) as orthanc, \
            LinkProxy(orthanc.dicomweb_url) as proxy:
        bench = Bench(proxy, args.work, shlex.split(args.mount_args))
        with bench.mount() as (mnt, pid):
            dates = mnt / "dates"
            steps = [("ls /dates", dates), (f"ls /dates/{year}", dates / year),
                     (f"ls .../{month}", dates / year / month),
                     (f"ls .../{day} ({expect_day} studies)", dates / year / month / str(day))]
            walk = [bench.ls("day walk", step, path) for step, path in steps]
            bench.rows.append(Row("day walk", "total", sum(r.seconds for r in walk),
                                  sum(r.requests for r in walk), walk[-1].entries,
                                  f"mount RSS {rss_mb(pid):.0f} MB",
                                  [line for r in walk for line in r.request_lines],
                                  [line for r in walk for line in r.later]))
        with bench.mount() as (mnt, _):
            bench.ls("month", f"ls /dates/{year}/{month} ({expect_month} days' studies)",
                     mnt / "dates" / year / month)
        with bench.mount() as (mnt, _):
            bench.ls("patient", f"ls /patients/{patient} ({patient_studies} studies)",
                     mnt / "patients" / patient)
        with bench.mount() as (mnt, _):
            bench.first_line("/studies", "ls /studies | head: first line",
                             ["ls", "-1", str(mnt / "studies")])
        with bench.mount() as (mnt, _):
            bench.first_line("/studies", "ls -1U /studies | head: first line",
                             ["ls", "-1U", str(mnt / "studies")])
    return bench.rows


def print_table(rows: Sequence[Row], verbose: bool) -> None:
    print(f"{'walk':<10} {'step':<50} {'requests':>8} {'later':>6} {'seconds':>8} "
          f"{'entries':>7}  requests by kind (+ later); note")
    for r in rows:
        entries = "" if r.entries is None else str(r.entries)
        later = f"+ {kinds(r.later)}" if r.later else ""
        note = "; ".join(x for x in (kinds(r.request_lines), later, r.note) if x)
        print(f"{r.walk:<10} {r.step:<50} {r.requests:>8} {len(r.later):>6} {r.seconds:>8.2f} "
              f"{entries:>7}  {note}")
        if verbose:
            for line in r.request_lines:
                print(f"{'':<12}{line}")
            for line in r.later:
                print(f"{'':<12}(later) {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="where the ZIP and the loaded Orthanc storage are kept and reused")
    parser.add_argument("--work", type=Path, default=DEFAULT_ROOT / "bench",
                        help="mount points, caches and mount logs")
    parser.add_argument("--mount-args", default="", help="extra 'dicomfs mount' arguments")
    parser.add_argument("--day", default=BUSY_DAY.isoformat(), help="the day walked to")
    parser.add_argument("--patient", help="patient folder to list (default: one with three "
                        "studies, named as today's /patients names it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every request")
    args = parser.parse_args(argv)
    print_table(run(args), args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
