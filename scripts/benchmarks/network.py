"""The network section of ``scripts/bench``: readers of the CT series over emulated links.

At three links (one-way delay, rate per connection and direction), each through a
:class:`~tests.support.netem.LinkProxy` in front of the benchmark's Orthanc, and each reader
side by side in the same run (one run = every reader once, in turn):

* one ``curl`` series stream (the reference of every ratio);
* 8 parallel ``curl`` processes, each fetching 1/8 of the instances (several URLs per curl:
  it keeps the connection when the server does);
* dicomweb-client ``iter_series``;
* rclone mounting Orthanc's WebDAV (``/webdav/``) through the link;
* dicomfs cold series read: a fresh mount of the link's URL with an empty cache, ``cat``.

Then, with the proxy only counting (no delay, no cap): the bytes the server sends per byte
read with the cache folder on a 60 MB tmpfs (``cat`` of 100 CT files); and on loopback, the
mount process's CPU seconds per GB for a cold series read next to ``curl -o file``.
Every file read through a mount is checked (untimed) against the archive's SHA-256.
At each link, after the readers, the latency rows of latency.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scripts.benchmarks.common import WORK, BenchError, Measure, Target, say
from scripts.benchmarks.data import verify_into
from scripts.benchmarks.latency import LatencyBench
from scripts.benchmarks.loopback import Bench
from scripts.benchmarks.proc import (
    ACCEPT,
    check_curl,
    cpu_seconds,
    curl_cmd,
    dicomweb_client_seconds,
    run_parallel,
    run_timed,
)
from scripts.benchmarks.report import busy_note, machine_table, markdown, plain_table, write_block
from tests.support.netem import Counters, LinkProxy


@dataclass(frozen=True)
class Link:
    delay: float  # one way, seconds
    rate: float  # bytes per second, per connection and direction
    slow: bool = False  # runs: --slow-link-runs instead of --runs

    @property
    def name(self) -> str:
        return f"{self.delay * 1000:g} ms, {self.rate / 1e6:g} MB/s"


LINKS = (Link(0.005, 100e6), Link(0.020, 25e6), Link(0.050, 10e6, slow=True))
READERS = {
    "curl": "curl: one series stream",
    "curl8": "8 parallel curl of the instances",
    "dwc": "dicomweb-client iter_series",
    "rclone": "rclone mount of WebDAV: cat",
    "dicomfs": "dicomfs cold series read: cat",
}
PARALLEL_CURLS = 8
LONG_LINK = LINKS[1]
LONG_LINK_TARGET = Target("<= 0.25x (hard limit 0.5x)", 0.25, hard=0.5)
DISK_MB = 60
DISK_FILES = 100
DISK_TARGET = Target("<= 1.2x (hard limit 1.5x)", 1.2, hard=1.5)
CPU_TARGET = Target("<= 3 CPU-s per GB", 3.0, on_ratio=False)


@dataclass
class Traffic:
    """What the proxy saw during the last run of a reader."""

    requests: int = 0
    connections: int = 0
    bytes_down: int = 0


@dataclass
class LinkResult:
    link: Link
    measures: dict[str, Measure]
    traffic: dict[str, Traffic] = field(default_factory=dict)
    proxy_cpu: list[float] = field(default_factory=list)  # CPU-s per GB forwarded (curl)
    proxy_load: list[float] = field(default_factory=list)  # CPU-s per second (curl)


class NetworkBench:
    """The network section, run on the Orthanc and archive the loopback :class:`Bench` prepared."""

    def __init__(self, parent: Bench) -> None:
        self.parent = parent
        self.links = [LinkResult(link, {key: Measure(label, label)
                                        for key, label in READERS.items()})
                      for link in LINKS]
        self.disk = Measure("server bytes per byte read, cache on a 60 MB tmpfs", "", "x")
        self.disk_traffic = Traffic()
        self.disk_read = 0
        self.cpu_per_gb = Measure("dicomfs mount process, cold series read", "", "CPU-s/GB")
        self.cold = Measure("dicomfs cold series read: cat 400 files", "")
        self.wire_file = Measure("curl -o file of the series", "curl -o file")
        self.latency = LatencyBench(parent)
        self.seconds = 0.0

    # -- running -----------------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        self.ct = self.parent.ct
        self.orthanc = self.parent.orthanc
        readers = self.parent.args.only != "latency"
        for result in self.links:
            runs = self.parent.args.slow_link_runs if result.link.slow else self.parent.runs
            say(f"network: link {result.link.name}, {runs} run(s)")
            with LinkProxy(self.orthanc.dicomweb_url, delay=result.link.delay,
                           rate=result.link.rate) as proxy:
                for run in range(runs if readers else 0):
                    for key in READERS:
                        self._attempt(result, key, run, proxy)
                self.latency.run_link(result.link.name, result.link.delay, proxy, runs)
        if not readers:
            self.seconds = time.monotonic() - started
            return
        say("network: cache folder on a 60 MB tmpfs")
        self._guard([self.disk], "nearly full disk", self._nearly_full_disk)
        say("network: CPU per GB of the mount process, on loopback")
        for _ in range(self.parent.runs):
            if not self._guard([self.cpu_per_gb, self.cold, self.wire_file], "CPU per GB",
                               self._cpu_per_gb)[0]:
                break
        self.seconds = time.monotonic() - started

    def _guard(self, measures: list[Measure], what: str, body: Callable[[], object]
               ) -> tuple[bool, object]:
        """Run ``body``; a BenchError marks ``measures`` failed and is kept for the report.
        Whether it succeeded, and what it returned."""
        try:
            return True, body()
        except BenchError as exc:
            say(f"FAILED: {exc}")
            for m in measures:
                m.error = str(exc).splitlines()[0]
            self.parent.failures.append(f"network: {what}: {exc}")
            return False, None

    def _attempt(self, result: LinkResult, key: str, run: int, proxy: LinkProxy) -> None:
        m = result.measures[key]
        if m.error:  # failed in an earlier run: do not try again
            return
        readers = {"curl": self._curl, "curl8": self._curl8, "dwc": self._dwc,
                   "rclone": self._rclone, "dicomfs": self._dicomfs}
        proxy.reset()
        cpu = proxy.cpu_seconds()
        started = time.perf_counter()
        ok, counted = self._guard([m], f"{result.link.name}, {m.label} (run {run + 1})",
                                  lambda: readers[key](m, proxy))
        if not ok:
            return
        c = counted if isinstance(counted, Counters) else proxy.counters
        result.traffic[key] = Traffic(c.requests, c.connections, c.bytes_down)
        if key == "curl":
            used = proxy.cpu_seconds() - cpu
            result.proxy_cpu.append(used / (c.bytes_down / 1e9))
            result.proxy_load.append(used / (time.perf_counter() - started))

    def _series_url(self, proxy: LinkProxy) -> str:
        return f"{proxy.url()}/studies/{self.ct.study}/series/{self.ct.series}"

    def _curl(self, m: Measure, proxy: LinkProxy) -> None:
        seconds, out = run_timed(curl_cmd(self._series_url(proxy)), "curl series")
        check_curl(out, self.ct.size, "curl series")
        m.add(seconds)

    def _curl8(self, m: Measure, proxy: LinkProxy) -> None:
        names = sorted(self.ct.files)
        shares = [names[i::PARALLEL_CURLS] for i in range(PARALLEL_CURLS)]
        cmds = []
        for share in shares:
            cmd = ["curl", "-sS", "-w", "%{http_code} %{size_download}\\n", "-H",
                   f"Accept: {ACCEPT}"]
            for name in share:
                cmd += ["-o", "/dev/null",
                        f"{self._series_url(proxy)}/instances/{name.removesuffix('.dcm')}"]
            cmds.append(cmd)
        seconds, outs = run_parallel(cmds, "parallel curl of instances")
        for share, out in zip(shares, outs, strict=True):
            answers = out.split()
            codes, sizes = answers[0::2], [float(x) for x in answers[1::2]]
            expected = sum(self.ct.files[n].size for n in share)
            if codes != ["200"] * len(share) or sum(sizes) < expected:
                raise BenchError(f"parallel curl: {len(codes)} answers, statuses "
                                 f"{sorted(set(codes))}, {sum(sizes):.0f} bytes "
                                 f"(expected {len(share)} x 200, >= {expected})")
        m.add(seconds)

    def _dwc(self, m: Measure, proxy: LinkProxy) -> None:
        m.add(dicomweb_client_seconds(proxy.url(), self.ct))

    def _rclone(self, m: Measure, proxy: LinkProxy) -> None:
        mounts = self.parent.mounts
        with mounts.mounted(mounts.rclone(proxy.url("/webdav/"))) as h:
            folder = h.path / "by-uids" / self.ct.study / self.ct.series
            m.add(self.parent._read(folder, h))
            verify_into([m], folder, self.ct)

    def _dicomfs(self, m: Measure, proxy: LinkProxy) -> Counters:
        """The read's traffic: from the end of the mount to the end of the ``cat`` (not the
        mount's start, not the verification's reads)."""
        mounts = self.parent.mounts
        with mounts.mounted(mounts.dicomfs(proxy.url(), mounts.fresh_cache())) as h:
            folder = h.path / "studies" / self.ct.study / self.ct.series
            proxy.reset()
            m.add(self.parent._read(folder, h))
            counted = proxy.reset()
            verify_into([m], folder, self.ct)
            return counted

    def _nearly_full_disk(self) -> None:
        """``cat`` of 100 CT files with the cache folder on a 60 MB tmpfs (default mount
        options); the server's bytes counted by a proxy that only counts."""
        tmpfs = WORK / "tmpfs-cache"
        tmpfs.mkdir(parents=True, exist_ok=True)
        run_timed(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs",
                         str(tmpfs)], "mount a tmpfs")
        try:
            with LinkProxy(self.orthanc.dicomweb_url) as proxy:
                mounts = self.parent.mounts
                with mounts.mounted(mounts.dicomfs(proxy.url(), tmpfs / "cache")) as h:
                    folder = h.path / "studies" / self.ct.study / self.ct.series
                    names = sorted(self.ct.files)[:DISK_FILES]
                    proxy.reset()
                    cmd = ["bash", "-c", 'cd -- "$1" && shift && cat -- "$@" > /dev/null',
                           "bash", str(folder), *names]
                    try:
                        run_timed(cmd, "cat of 100 files")
                    except BenchError as exc:
                        raise BenchError(f"{exc}\n{h.log_tail(20)}") from None
                    c = proxy.counters
                    self.disk_traffic = Traffic(c.requests, c.connections, c.bytes_down)
                    self.disk_read = sum(self.ct.files[n].size for n in names)
                    self.disk.add(c.bytes_down / self.disk_read)
                    verify_into([self.disk], folder, self.ct, names)
        finally:
            run_timed(["umount", str(tmpfs)], "unmount the tmpfs")

    def _cpu_per_gb(self) -> None:
        run = len(self.wire_file.values)
        url = f"{self.orthanc.dicomweb_url}/studies/{self.ct.study}/series/{self.ct.series}"
        target = WORK / f"network-wire-{run}.multipart"
        seconds, out = run_timed(curl_cmd(url, target), "curl -o file")
        check_curl(out, self.ct.size, "curl -o file")
        self.wire_file.add(seconds)
        mounts = self.parent.mounts
        with mounts.mounted(mounts.dicomfs(self.orthanc.dicomweb_url,
                                           mounts.fresh_cache())) as h:
            assert h.pid is not None
            folder = h.path / "studies" / self.ct.study / self.ct.series
            before = cpu_seconds(h.pid)
            self.cold.add(self.parent._read(folder, h))
            self.cpu_per_gb.add((cpu_seconds(h.pid) - before) / (self.ct.size / 1e9))
            verify_into([self.cold, self.cpu_per_gb], folder, self.ct)

    # -- report ------------------------------------------------------------------------

    def rows(self) -> list[list[str]]:
        """The link table: one line per link and reader."""
        out = []
        for result in self.links:
            ref = result.measures["curl"].median
            for key, m in result.measures.items():
                median = m.median
                ratio = median / ref if median is not None and ref else None
                target = LONG_LINK_TARGET if key == "dicomfs" and result.link == LONG_LINK \
                    else None
                verdict = [] if target is None or ratio is None else [target.verdict(ratio)]
                if m.wrong:
                    verdict.append(f"WRONG BYTES in {len(m.wrong)}/{len(m.values)} runs")
                if m.error:
                    verdict.append("FAILED")
                t = result.traffic.get(key)
                out.append([
                    result.link.name, m.label,
                    "-" if median is None else f"{median:.2f} s",
                    "-" if not m.values else f"{min(m.values):.2f}-{max(m.values):.2f}",
                    str(len(m.values)),
                    "-" if ratio is None else f"{ratio:.2f}x",
                    "-" if t is None else str(t.requests),
                    "-" if t is None else str(t.connections),
                    "-" if t is None else f"{t.bytes_down / 1e6:.0f}",
                    target.text if target else "", "; ".join(verdict)])
        return out

    HEADERS = ("link (one way, per connection)", "reader", "median", "min-max", "runs",
               "ratio to curl stream", "requests", "connections", "MB from server",
               "target", "result")

    def other_rows(self) -> list[list[str]]:
        """The nearly-full-disk and CPU figures."""
        def cell(m: Measure, unit: str, digits: int = 2) -> str:
            if m.median is None:
                return "failed" if m.error else "-"
            return f"{m.median:.{digits}f}{unit}"

        def spread(m: Measure) -> str:
            return f"{min(m.values):.2f}-{max(m.values):.2f}" if m.values else "-"

        def result(m: Measure, target: Target | None) -> str:
            parts = [target.verdict(m.median)] if target and m.median is not None else []
            parts += [f"WRONG BYTES in {len(m.wrong)}/{len(m.values)} runs"] if m.wrong else []
            parts += ["FAILED"] if m.error else []
            return "; ".join(parts)

        t = self.disk_traffic
        cold, wire = self.cold.median, self.wire_file.median
        rows = [
            [f"{self.disk.label}: `cat` of {DISK_FILES} CT files "
             f"({self.disk_read / 1e6:.1f} MB); server sent {t.bytes_down / 1e6:.0f} MB in "
             f"{t.requests} requests", cell(self.disk, "x"), spread(self.disk),
             str(len(self.disk.values)), DISK_TARGET.text, result(self.disk, DISK_TARGET)],
            [f"CPU of the {self.cpu_per_gb.label}, per GB read (loopback)",
             cell(self.cpu_per_gb, " CPU-s/GB"), spread(self.cpu_per_gb),
             str(len(self.cpu_per_gb.values)), CPU_TARGET.text,
             result(self.cpu_per_gb, CPU_TARGET)],
            [f"{self.cold.label} (same runs)", cell(self.cold, " s", 3), spread(self.cold),
             str(len(self.cold.values)), "", result(self.cold, None)],
            [f"{self.wire_file.label} (same runs)", cell(self.wire_file, " s", 3),
             spread(self.wire_file), str(len(self.wire_file.values)), "", ""],
            ["cold series read / curl -o file",
             "-" if cold is None or not wire else f"{cold / wire:.2f}x", "", "", "", ""],
        ]
        for r in self.links:
            if r.proxy_cpu:
                rows.append([f"link proxy (netem) during the curl stream at {r.link.name}",
                             f"{statistics.median(r.proxy_cpu):.2f} CPU-s/GB",
                             f"{statistics.median(r.proxy_load) * 100:.0f}% of a core", "",
                             "", ""])
        return rows

    OTHER_HEADERS = ("measurement", "median", "min-max", "runs", "target", "result")

    def text_table(self) -> str:
        return (f"{plain_table(self.HEADERS, self.rows())}\n\n"
                f"{plain_table(self.OTHER_HEADERS, self.other_rows())}")

    def write_report(self, output: Path, png: Path, seconds: float, command: str) -> None:
        facts = self.parent.facts
        problems = [f"- failed: {f.splitlines()[0]}" for f in self.parent.failures
                    if f.startswith("network")]
        problems += [f"- wrong result: {r.link.name}, {m.label}, {w}" for r in self.links
                     for m in r.measures.values() for w in m.wrong]
        problems += [f"- wrong result: {m.label}, {w}"
                     for m in (self.disk, self.cold, self.cpu_per_gb) for w in m.wrong]
        runs = ", ".join(f"{r.link.name}: {len(r.measures['curl'].values)}"
                         for r in self.links)
        text = f"""## Emulated network links

Generated by `scripts/bench` on {facts['_date']}; the network section took
{seconds / 60:.1f} min. Runs per link ({runs}); a run is every reader once, in turn.
Ratios are the median of the row over the median of the single curl stream at the same
link. Requests, connections and MB from server: what the link proxy saw in the last run
(for dicomfs, from the end of the mount to the end of the `cat`).

Reproduce: `{command}`
{busy_note(facts)}
{markdown(self.HEADERS, self.rows())}

![readers of the CT series over three emulated links]({png.name})

### Nearly full disk, CPU

{markdown(self.OTHER_HEADERS, self.other_rows())}

### Failures and wrong results

{chr(10).join(problems) or "- none"}

### Machine

{machine_table(facts)}

### Data

{chr(10).join(f"- {note}" for note in self.parent.data_notes)}
"""
        write_block(output, "network", text)
