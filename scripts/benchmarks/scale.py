"""The scale section (issue 18): what a person waits for on a hospital-sized archive.

``scripts/bench --only scale [--scale-studies N]``, or on its own
``PYTHONPATH=. .venv/bin/python -m scripts.benchmarks.scale --studies 20000[,200000]``
(``--help``; ``-v`` prints every request).

For each archive size it builds (or reuses) the generated archive of one-instance studies
(tests/support/scale.py) in a private Orthanc whose storage is kept under ``--root``, puts a
:class:`~tests.support.netem.LinkProxy` with no delay in front of it (it counts every request,
query strings included), and runs each walk on a fresh mount (``dicomfs mount``, empty cache):

* day walk: ``ls /dates``, ``ls /dates/<Y>``, ``ls /dates/<Y>/<Y-M>``, ``ls .../<Y-M-D>``,
  one after the other (a row each and a total), then the mount's RSS;
* month: ``ls /dates/<Y>/<Y-M>`` by its full path;
* patient: ``ls /patients/<Letters>/<Name (ID)>`` by its full path (``S/SM/...`` where an
  initial fills a page), ``ls /patients/<Initial>/<Name (ID)>`` (found by its ID), and
  ``ls /patients/<Letters>`` on its own mount;
* /studies: seconds to the first line of ``find /studies -mindepth 1 -maxdepth 1``
  (without ``-mindepth`` its first line is /studies itself, printed before any listing;
  GNU find prints a folder's names by batches of 100,000),
  ``ls -1U`` (unsorted: printed as read) and ``ls`` (sorted: only once the whole listing
  is in), each read as ``| head -1`` does (the pipe closed after the first line); then
  ``ls /studies`` whole, and again on a second mount of the same cache folder.

The mount's own start-up requests are not counted (counters are reset once it is quiet).
Requests are counted while the command runs ("requests"), then after it ("later": what the
step left running in the background) until no request has been seen for a second; the next
step starts then. Prints a table per size and writes them into the report's "scale" block.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomfs import names
from scripts.benchmarks.common import REPO, Target, say
from scripts.benchmarks.mounts import Mounts, unmount_stale
from scripts.benchmarks.proc import vm_hwm_mb, vm_rss_mb
from scripts.benchmarks.report import machine_facts, markdown, plain_table, write_block
from tests.support.netem import LinkProxy
from tests.support.scale import BUSY_DAY, prepare_storage, scale_orthanc, scale_studies

DEFAULT_ROOT = Path("/tmp/scale")
QUIET = 1.0  # seconds without a request before a step counts as over
DAY_REQUESTS = Target("<= 6 requests", 6.0, on_ratio=False)
DAY_SECONDS = Target("< 2 s", 2.0, on_ratio=False, strict=True)
FIRST_NAMES = Target("< 1.5 s", 1.5, on_ratio=False, strict=True)
PATIENT_REQUESTS = Target("<= 3 requests", 3.0, on_ratio=False)


@dataclass
class Row:
    """One measured step; ``targets``: the issue's goals, each on ``requests`` or
    ``seconds``."""

    walk: str
    step: str
    seconds: float
    requests: list[str]  # request lines while the command ran
    later: list[str]  # after it, until the mount was quiet
    entries: int
    note: str = ""
    targets: tuple[tuple[Target, str], ...] = ()

    def result(self) -> str:
        verdicts = [(t.verdict(getattr(self, what) if what == "seconds"
                               else len(getattr(self, what))), what)
                    for t, what in self.targets]
        return "; ".join(f"{v} ({what})" if len(verdicts) > 1 else v for v, what in verdicts)


@dataclass
class Size:
    """The rows measured on one archive size, and the mount's memory after the day walk."""

    studies: int
    prepared: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    rss_mb: float = 0.0
    hwm_mb: float = 0.0
    facts: dict[str, str] = field(default_factory=dict)


def kinds(request_lines: Sequence[str]) -> str:
    """``21 studies, 16 series``: the requests by what they ask for (QIDO level or WADO)."""
    counts: Counter[str] = Counter()
    for line in request_lines:
        target = line.split(" ")[1]
        path = target.split("?")[0].rstrip("/").split("/")
        if path[-1] in ("studies", "series", "instances") and "?" in target:
            counts[path[-1]] += 1
        else:
            counts[path[-1] if path[-1] in ("metadata", "rendered") else "other"] += 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


class Walks:
    """Fresh mounts of one proxied server, each step timed and its requests counted."""

    def __init__(self, proxy: LinkProxy, mounts: Mounts, mount_args: Sequence[str]) -> None:
        self.proxy = proxy
        self.mounts = mounts
        self.mount_args = list(mount_args)
        self.rows: list[Row] = []

    @contextlib.contextmanager
    def mount(self, cache: Path | None = None) -> Iterator[tuple[Path, int]]:
        """A mount (on a new, empty cache folder unless ``cache``): its path and pid, once
        quiet, with the proxy's counters reset."""
        mount = self.mounts.dicomfs(self.proxy.url(), cache or self.mounts.fresh_cache(),
                                    self.mount_args)
        with self.mounts.mounted(mount):
            assert mount.pid is not None  # mount_dicomfs fails when it cannot tell
            self.settle()
            self.proxy.reset()
            yield mount.path, mount.pid

    def settle(self, limit: float = 120.0) -> None:
        """Wait until the proxy has seen no new request for :data:`QUIET` seconds, so what a
        step starts in the background counts for that step, not the next."""
        deadline = time.monotonic() + limit
        seen, since = self.proxy.requests, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < QUIET:
            time.sleep(0.05)
            if self.proxy.requests != seen:
                seen, since = self.proxy.requests, time.monotonic()

    def _measure(self, walk: str, step: str, run: Callable[[], tuple[int, str]],
                 targets: tuple[tuple[Target, str], ...]) -> Row:
        self.proxy.reset()
        started = time.perf_counter()
        entries, note = run()
        seconds = time.perf_counter() - started
        during = self.proxy.reset().request_lines
        self.settle()
        row = Row(walk, step, seconds, during, self.proxy.reset().request_lines, entries,
                  note, targets)
        self.rows.append(row)
        say(f"  {step}: {seconds:.2f} s, {len(row.requests)} + {len(row.later)} requests")
        return row

    def ls(self, walk: str, step: str, path: Path,
           *targets: tuple[Target, str]) -> Row:
        """Time ``ls -1 path`` to its end."""
        def run() -> tuple[int, str]:
            done = subprocess.run(["ls", "-1", str(path)], capture_output=True, text=True,
                                  timeout=1800, check=False)
            failed = f"ls failed: {done.stderr.strip()[:80]}" if done.returncode else ""
            return len(done.stdout.splitlines()), failed

        return self._measure(walk, step, run, targets)

    def head_1(self, walk: str, step: str, cmd: list[str],
               *targets: tuple[Target, str]) -> Row:
        """Seconds until ``cmd`` prints its first line; then its stdout is closed, as
        ``cmd | head -1`` does, and it is waited for."""
        ended = 0.0

        def run() -> tuple[int, str]:
            nonlocal ended
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert proc.stdout is not None
            first = proc.stdout.readline()
            start = time.perf_counter()
            proc.stdout.close()
            proc.wait(1800)
            ended = time.perf_counter() - start
            return (1 if first else 0), ""

        row = self._measure(walk, step, run, targets)
        row.seconds -= ended
        row.note = f"ended {ended:.2f} s after its first line"
        return row


def pick_patient(studies: int, page: int = 1000) -> tuple[list[str], str, int]:
    """A large server's letter folders down to the patient folder of the first patient
    with three studies whose family name starts with A..Z (or the busiest such), that
    folder, and how many studies that patient has. Letters are added while the studies
    under them fill a QIDO ``page`` (S, then SM, ...), as /patients does."""
    archive = scale_studies(studies)
    counts = Counter(s.patient_id for s in archive)
    named = {s.patient_id: s.patient_name for s in archive
             if "A" <= s.patient_name[:1].upper() <= "Z"}
    ranked = sorted(named, key=lambda p: (counts[p] != 3, -counts[p], p))
    pid = ranked[0]
    folder = names.patient_folder({
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": named[pid]}]},
        "00100020": {"vr": "LO", "Value": [pid]},
    })
    wanted = named[pid].upper()
    letters = [wanted[:1]]
    while sum(s.patient_name.upper().startswith(letters[-1]) for s in archive) >= page:
        letters.append(wanted[:len(letters) + 1])
    return letters, folder, counts[pid]


def measure(studies: int, args: argparse.Namespace) -> Size:
    """Every walk on the archive of ``studies`` studies."""
    day = dt.date.fromisoformat(args.day)
    year, month = f"{day:%Y}", f"{day:%Y-%m}"
    archive = scale_studies(studies)
    in_day = sum(1 for s in archive if s.study_date == f"{day:%Y%m%d}")
    in_month = sum(1 for s in archive if s.study_date.startswith(f"{day:%Y%m}"))
    letters, patient, patient_studies = pick_patient(studies)
    under = "/".join(letters)
    say(f"preparing the archive of {studies} studies under {args.root}")
    size = Size(studies, prepare_storage(args.root, studies))
    work = args.work / str(studies)
    unmount_stale(work)
    mounts = Mounts(work)
    try:
        with scale_orthanc(args.root, studies) as orthanc, \
                LinkProxy(orthanc.dicomweb_url) as proxy:
            size.facts = machine_facts(orthanc)
            walks = Walks(proxy, mounts, shlex.split(args.mount_args))
            say(f"{studies} studies: walking")
            with walks.mount() as (mnt, pid):
                dates = mnt / "dates"
                steps = [("ls /dates", dates), (f"ls /dates/{year}", dates / year),
                         (f"ls /dates/{year}/{month}", dates / year / month),
                         (f"ls /dates/{year}/{month}/{day} ({in_day} studies)",
                          dates / year / month / str(day))]
                walk = [walks.ls("day walk", step, path) for step, path in steps]
                size.rss_mb, size.hwm_mb = vm_rss_mb(pid), vm_hwm_mb(pid)
                walks.rows.append(Row(
                    "day walk", "the four, one after the other", sum(r.seconds for r in walk),
                    [line for r in walk for line in r.requests],
                    [line for r in walk for line in r.later], walk[-1].entries,
                    f"mount RSS after: {size.rss_mb:.0f} MB (peak {size.hwm_mb:.0f} MB)",
                    ((DAY_REQUESTS, "requests"), (DAY_SECONDS, "seconds"))))
            with walks.mount() as (mnt, _):
                walks.ls("month", f"ls /dates/{year}/{month} ({in_month} studies)",
                         mnt / "dates" / year / month)
            with walks.mount() as (mnt, _):
                walks.ls("patient", f"ls '/patients/{under}/{patient}' ({patient_studies} "
                         "studies)", mnt / "patients" / under / patient,
                         (PATIENT_REQUESTS, "requests"))
            with walks.mount() as (mnt, _):
                walks.ls("patient", f"ls '/patients/{letters[0]}/{patient}' (by its ID)",
                         mnt / "patients" / letters[0] / patient, (PATIENT_REQUESTS, "requests"))
            with walks.mount() as (mnt, _):
                walks.ls("patient", f"ls /patients/{under}", mnt / "patients" / under)
            for step, cmd in (("find /studies -mindepth 1 -maxdepth 1 | head -1",
                               ["find", "{}", "-mindepth", "1", "-maxdepth", "1"]),
                              ("ls -1U /studies | head -1", ["ls", "-1U", "{}"]),
                              ("ls /studies | head -1 (sorted)", ["ls", "{}"])):
                with walks.mount() as (mnt, _):
                    walks.head_1("/studies", step,
                                 [str(mnt / "studies") if a == "{}" else a for a in cmd],
                                 (FIRST_NAMES, "seconds"))
            cache = mounts.fresh_cache()
            for step in ("ls /studies (whole)", "ls /studies, second mount on the same cache"):
                with walks.mount(cache) as (mnt, _):
                    walks.ls("/studies", step, mnt / "studies")
            size.rows = walks.rows
    finally:
        mounts.cleanup()
    return size


HEADERS = ("walk", "step", "requests", "later", "seconds", "entries", "requests by kind "
           "(+ later)", "note", "target", "result")


def cells(row: Row) -> tuple[str, ...]:
    later = f"+ {kinds(row.later)}" if row.later else ""
    by_kind = "; ".join(x for x in (kinds(row.requests), later) if x)
    target = "; ".join(t.text for t, _ in row.targets)
    return (row.walk, row.step, str(len(row.requests)), str(len(row.later)),
            f"{row.seconds:.2f}", str(row.entries), by_kind, row.note, target, row.result())


def day_requests(size: Size) -> int:
    return next(len(r.requests) for r in size.rows if r.walk == "day walk"
                and r.step.startswith("the four"))


def across(sizes: Sequence[Size]) -> str:
    """The day walk's requests and the mount's RSS from size to size (the issue wants the
    requests not to grow)."""
    if len(sizes) < 2:
        return ""
    counts = [day_requests(s) for s in sizes]
    verdict = "met" if len(set(counts)) == 1 else "NOT MET"
    return ("Across sizes (" + " / ".join(f"{s.studies:,}" for s in sizes) + " studies): "
            f"day walk requests {' / '.join(map(str, counts))} (target: the same): "
            f"{verdict}; mount RSS after the day walk "
            + " / ".join(f"{s.rss_mb:.0f} MB" for s in sizes) + ".")


def print_tables(sizes: Sequence[Size], verbose: bool) -> None:
    for size in sizes:
        print(f"\n{size.studies} studies (build {size.prepared['build']:.0f} s, load "
              f"{size.prepared['load']:.0f} s; 0: reused)")
        print(plain_table(HEADERS, [cells(r) for r in size.rows]))
        if verbose:
            for row in size.rows:
                print(f"\n{row.walk}: {row.step}")
                print("\n".join([f"  {line}" for line in row.requests]
                                + [f"  (later) {line}" for line in row.later]))
    if text := across(sizes):
        print(f"\n{text}")


def write_report(sizes: Sequence[Size], output: Path, command: str, date: str,
                 loads: tuple[str, str]) -> None:
    """The "scale" block of the report."""
    facts = sizes[0].facts
    machine = ", ".join(f"{k} {facts[k]}" for k in ("CPU", "nproc", "RAM", "Orthanc")
                        if k in facts)
    tables = "\n\n".join(
        f"### {s.studies:,} studies\n\n{markdown(HEADERS, [cells(r) for r in s.rows])}"
        for s in sizes)
    text = f"""## Scale: a hospital-sized archive

Generated by `scripts/benchmarks/scale.py` on {date}; load average (1, 5, 15 min) at
start {loads[0]}, at end {loads[1]} ({machine}).
Each walk on a fresh mount with an empty cache, through a counting proxy with no delay;
"requests": while the command ran, "later": after it, until no request for {QUIET:.0f} s.
The /studies first-line rows time the first line, as `| head -1` sees it; then the pipe
is closed ("ended" says how long the command took to stop).

Reproduce: `{command}`

{tables}

{across(sizes)}
"""
    write_block(output, "scale", text)


def run(args: argparse.Namespace, output: Path, command: str) -> int:
    """Measure every size, print the tables, write the block; 0, or 1 if a target is not
    met."""
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    sizes = [measure(n, args) for n in args.studies]
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print_tables(sizes, args.verbose)
    write_report(sizes, output, command, date, (load_start, load_end))
    say(f"wrote the scale block into {output}")
    missed = [r for s in sizes for r in s.rows if "NOT MET" in r.result()]
    return 1 if missed or "NOT MET" in across(sizes) else 0


def study_counts(text: str) -> list[int]:
    """``20000,200000`` -> [20000, 200000]; each above one QIDO page (the small-server
    views are not what this measures)."""
    counts = [int(part) for part in text.split(",")]
    if any(n <= 1000 for n in counts):
        raise argparse.ArgumentTypeError("each archive must hold more than 1000 studies")
    return counts


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=study_counts, default=[20000],
                        help="archive sizes, comma-separated (default 20000)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help="where the ZIPs and the loaded Orthanc storages are kept and "
                        f"reused (default {DEFAULT_ROOT})")
    parser.add_argument("--work", type=Path, default=DEFAULT_ROOT / "bench",
                        help="mount points, caches and mount logs")
    parser.add_argument("--mount-args", default="", help="extra 'dicomfs mount' arguments")
    parser.add_argument("--day", default=BUSY_DAY.isoformat(), help="the day walked to")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every request")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "performance.md",
                        help="Markdown report whose scale block is written")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "scripts.benchmarks.scale",
                          *(sys.argv[1:] if argv is None else argv)])
    return run(args, args.output.absolute(), command)


if __name__ == "__main__":
    sys.exit(main())
