"""The latency rows of ``scripts/bench`` (issue 13): what a person waits for on a remote server.

At each emulated link of the network section (network.py), through the same
:class:`~tests.support.netem.LinkProxy`, each run measures side by side:

* first bytes by path: ``head -c 132`` of one CT instance opened by its full
  ``/studies/<study>/<series>/<instance>.dcm`` path on a fresh mount (new mount, empty
  cache), next to ``curl`` of that instance (its ``time_starttransfer`` and
  ``time_total``: the ratio is given against both, the target judged against the total,
  as the issue measured it);
* ``ls -R /patients`` on a fresh mount: seconds, round trips (seconds over twice the
  one-way delay) and the requests the proxy saw;
* the first 64 KiB of the big multi-frame instance (:func:`build_big_instance`):
  ``head -c 65536`` through a fresh mount next to a plain streamed request (httpx,
  ``Accept-Encoding: identity``, closed after 64 KiB), and the bytes the server sent for
  the mount's read, counted once the transfer stopped (the cache's ``tmp`` folder empty).

The mount's own start-up requests are not counted (the proxy's counters are reset once it
is ready). Every byte read is compared (untimed) with the original file.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scripts.benchmarks.common import WORK, BenchError, Measure, Target, say
from scripts.benchmarks.loopback import Bench
from scripts.benchmarks.proc import ACCEPT, check_curl, run_timed
from scripts.benchmarks.report import busy_note, markdown, plain_table, write_block
from tests.support.mounts import Mount
from tests.support.netem import LinkProxy
from tests.support.sample import SampleFile

HEADER_BYTES = 132  # preamble and "DICM": what a header scan reads first
BIG_PREFIX = 64 * 1024
STOP_TIMEOUT = 300.0  # seconds to wait for the big transfer to stop (or finish)
FIRST_TARGET = Target("<= 1.5x curl total (hard limit 2x)", 1.5, hard=2.0)
LS_TARGET = Target("<= 10 round trips (hard limit 15)", 10.0, hard=15.0, on_ratio=False)
BIG_TARGET = Target("<= 1.2x (hard limit 1.5x)", 1.2, hard=1.5)
BIG_SENT_TARGET = Target("< 64 MB sent", 64.0, on_ratio=False, strict=True)
CURL_TIMES = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"


@dataclass
class LinkLatency:
    """One link's latency measures; ``requests`` and ``sent``: one entry per run."""

    name: str
    delay: float
    curl_start: Measure = field(default_factory=lambda: Measure(
        "curl of the instance: time_starttransfer", "curl first byte"))
    curl_total: Measure = field(default_factory=lambda: Measure(
        "curl of the instance: time_total", "curl total"))
    first: Measure = field(default_factory=lambda: Measure(
        f"dicomfs first bytes by path: head -c {HEADER_BYTES}, fresh mount", ""))
    ls: Measure = field(default_factory=lambda: Measure(
        "dicomfs ls -R /patients, fresh mount", ""))
    big_ref: Measure = field(default_factory=lambda: Measure(
        "big instance: httpx stream, first 64 KiB", "httpx stream"))
    big: Measure = field(default_factory=lambda: Measure(
        "big instance: dicomfs head -c 65536, fresh mount", ""))
    requests: dict[str, list[int]] = field(default_factory=dict)
    sent: dict[str, list[float]] = field(default_factory=dict)  # MB from the server

    def count(self, key: str, requests: int, mb: float) -> None:
        self.requests.setdefault(key, []).append(requests)
        self.sent.setdefault(key, []).append(mb)


class LatencyBench:
    """The latency rows, run by the network section at each link with its proxy."""

    def __init__(self, parent: Bench) -> None:
        self.parent = parent
        self.links: list[LinkLatency] = []
        self.instances = 0
        self.studies = 0

    def run_link(self, name: str, delay: float, proxy: LinkProxy, runs: int) -> None:
        stats = self.parent.orthanc.client.get("/statistics").json()
        self.instances, self.studies = int(stats["CountInstances"]), int(stats["CountStudies"])
        result = LinkLatency(name, delay)
        self.links.append(result)
        steps: list[tuple[list[Measure], str, Callable[[], None]]] = [
            ([result.curl_start, result.curl_total, result.first], "first bytes by path",
             lambda: self._first_bytes(result, proxy)),
            ([result.ls], "ls -R /patients", lambda: self._ls(result, proxy)),
            ([result.big_ref, result.big], "first 64 KiB of the big instance",
             lambda: self._big(result, proxy)),
        ]
        for run in range(runs):
            say(f"latency: link {name}, run {run + 1} of {runs}")
            for measures, what, body in steps:
                if any(m.error for m in measures):
                    continue  # failed in an earlier run: do not try again
                try:
                    body()
                except BenchError as exc:
                    say(f"FAILED: {exc}")
                    for m in measures:
                        m.error = str(exc).splitlines()[0]
                    self.parent.failures.append(f"latency: {name}, {what} (run {run + 1}): "
                                                f"{exc}")

    # -- measurements ------------------------------------------------------------------

    def _fresh_mount(self, proxy: LinkProxy) -> Mount:
        mounts = self.parent.mounts
        return mounts.dicomfs(proxy.url(), mounts.fresh_cache())

    def _head(self, path: Path, count: int, origin: Path, handle: Mount,
              measure: Measure) -> None:
        """Time ``head -c COUNT PATH`` (its output into a file), then check the bytes."""
        out = WORK / "latency-head.out"
        with open(out, "wb") as sink:
            started = time.perf_counter()
            done = subprocess.run(["head", "-c", str(count), "--", str(path)], stdout=sink,
                                  stderr=subprocess.PIPE, timeout=600, check=False)
            seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise BenchError(f"head -c {count} {path}: exit {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()}\n"
                             f"{handle.log_tail(20)}")
        measure.add(seconds)
        with open(origin, "rb") as f:
            expected = f.read(count)
        if out.read_bytes() != expected:
            measure.wrong.append(f"run {len(measure.values)}: head -c {count} gave other bytes")
            say(f"WRONG RESULT ({measure.label})")

    def _first_bytes(self, result: LinkLatency, proxy: LinkProxy) -> None:
        ct = self.parent.ct
        name = ct.middle
        url = (f"{proxy.url()}/studies/{ct.study}/series/{ct.series}/instances/"
               f"{name.removesuffix('.dcm')}")
        proxy.reset()
        cmd = ["curl", "-sS", "-o", "/dev/null", "-w", CURL_TIMES, "-H",
               f"Accept: {ACCEPT}", url]
        _, out = run_timed(cmd, "curl of one instance")
        status, size, start, total = out.split()
        check_curl(f"{status} {size}", ct.files[name].size, "curl of one instance")
        result.curl_start.add(float(start))
        result.curl_total.add(float(total))
        c = proxy.counters
        result.count("curl", c.requests, c.bytes_down / 1e6)
        with self.parent.mounts.mounted(self._fresh_mount(proxy)) as h:
            proxy.reset()
            self._head(h.path / "studies" / ct.study / ct.series / name, HEADER_BYTES,
                       ct.files[name].origin, h, result.first)
            c = proxy.counters
            result.count("first", c.requests, c.bytes_down / 1e6)

    def _ls(self, result: LinkLatency, proxy: LinkProxy) -> None:
        with self.parent.mounts.mounted(self._fresh_mount(proxy)) as h:
            proxy.reset()
            try:
                seconds, out = run_timed(["ls", "-R", str(h.path / "patients")],
                                               "ls -R /patients")
            except BenchError as exc:
                raise BenchError(f"{exc}\n{h.log_tail(20)}") from None
            c = proxy.counters
            result.ls.add(seconds)
            result.count("ls", c.requests, c.bytes_down / 1e6)
            shown = sum(1 for line in out.splitlines() if line.endswith(".dcm"))
            if shown != self.instances:
                result.ls.wrong.append(f"run {len(result.ls.values)}: ls -R showed {shown} "
                                       f".dcm files, the server holds {self.instances}")
                say(f"WRONG RESULT ({result.ls.label}): {result.ls.wrong[-1]}")

    def _big(self, result: LinkLatency, proxy: LinkProxy) -> None:
        big: SampleFile = self.parent.big_instance
        origin = self.parent.big_instance_path
        url = (f"{proxy.url()}/studies/{big.study_uid}/series/{big.series_uid}/instances/"
               f"{big.sop_uid}")
        proxy.reset()
        result.big_ref.add(self._stream_prefix(url, origin))
        c = proxy.counters
        result.count("big_ref", c.requests, c.bytes_down / 1e6)
        cache = self.parent.mounts.fresh_cache()
        with self.parent.mounts.mounted(self.parent.mounts.dicomfs(proxy.url(), cache)) as h:
            proxy.reset()
            path = h.path / "studies" / big.study_uid / big.series_uid / f"{big.sop_uid}.dcm"
            self._head(path, BIG_PREFIX, origin, h, result.big)
            if not wait_transfers_done(cache, STOP_TIMEOUT):
                raise BenchError(f"the big instance's transfer still ran {STOP_TIMEOUT:.0f} s "
                                 f"after head ended ({proxy.counters.bytes_down / 1e6:.0f} MB "
                                 "sent so far)")
            c = proxy.counters
            result.count("big", c.requests, c.bytes_down / 1e6)

    @staticmethod
    def _stream_prefix(url: str, origin: Path) -> float:
        """Seconds until a streamed GET has the first 64 KiB of its body; checks that its
        part starts with the file's bytes."""
        got = bytearray()
        with httpx.Client(timeout=600) as client:
            started = time.perf_counter()
            with client.stream("GET", url, headers={"Accept": ACCEPT,
                                                    "Accept-Encoding": "identity"}) as answer:
                if answer.status_code != 200:
                    raise BenchError(f"streamed GET {url}: HTTP {answer.status_code}")
                for chunk in answer.iter_raw():
                    got += chunk
                    if len(got) >= BIG_PREFIX:
                        break
                seconds = time.perf_counter() - started
        start = got.find(b"\r\n\r\n") + 4  # the part's headers end there
        with open(origin, "rb") as f:
            expected = f.read(len(got) - start)
        if start < 4 or bytes(got[start:]) != expected:
            raise BenchError(f"streamed GET {url}: the part does not start with the file")
        return seconds

    # -- report ------------------------------------------------------------------------

    HEADERS = ("link (one way, per connection)", "measurement", "median", "min-max", "runs",
               "ratio", "requests", "MB from server", "target", "result")

    def rows(self) -> list[list[str]]:
        out = []
        for r in self.links:
            def row(m: Measure, key: str, ratio: str = "", target: str = "",
                    verdict: list[str] | None = None, r: LinkLatency = r) -> list[str]:
                parts = list(verdict or [])
                if m.wrong:
                    parts.append(f"WRONG in {len(m.wrong)}/{len(m.values)} runs")
                if m.error:
                    parts.append("FAILED")
                requests, sent = r.requests.get(key), r.sent.get(key)
                return [r.name, m.label, fmt(m.median),
                        f"{min(m.values):.3f}-{max(m.values):.3f}" if m.values else "-",
                        str(len(m.values)), ratio,
                        "-" if not requests else median_text(requests, "{:.0f}"),
                        "-" if not sent else median_text(sent, "{:.2f}"),
                        target, "; ".join(parts)]

            first, start, total = r.first.median, r.curl_start.median, r.curl_total.median
            ratio, verdict = "", []
            if first is not None and start and total:
                ratio = f"{first / total:.2f}x total, {first / start:.2f}x first byte"
                verdict = [f"{FIRST_TARGET.verdict(first / total)} (vs total); "
                           f"{FIRST_TARGET.verdict(first / start)} (vs first byte)"]
            out += [row(r.curl_start, "curl"), row(r.curl_total, "curl"),
                    row(r.first, "first", ratio, FIRST_TARGET.text, verdict)]

            ls = r.ls.median
            trips = None if ls is None else ls / (2 * r.delay)
            out.append(row(r.ls, "ls", "" if trips is None else f"{trips:.1f} round trips",
                           LS_TARGET.text, [] if trips is None else [LS_TARGET.verdict(trips)]))

            big, ref = r.big.median, r.big_ref.median
            sent = statistics.median(r.sent["big"]) if r.sent.get("big") else None
            verdict = [] if big is None or not ref else [f"{BIG_TARGET.verdict(big / ref)} "
                                                         "(time)"]
            if sent is not None:
                verdict.append(f"{BIG_SENT_TARGET.verdict(sent)} (bytes)")
            out += [row(r.big_ref, "big_ref"),
                    row(r.big, "big", "" if big is None or not ref else f"{big / ref:.2f}x",
                        f"{BIG_TARGET.text}; {BIG_SENT_TARGET.text}", verdict)]
        return out

    def text_table(self) -> str:
        return plain_table(self.HEADERS, self.rows())

    def write_report(self, output: Path, command: str) -> None:
        facts = self.parent.facts
        problems = [f"- failed: {f.splitlines()[0]}" for f in self.parent.failures
                    if f.startswith("latency")]
        problems += [f"- wrong result: {r.name}, {m.label}, {w}" for r in self.links
                     for m in (r.first, r.ls, r.big) for w in m.wrong]
        runs = ", ".join(f"{r.name}: {len(r.first.values)}" for r in self.links)
        big = self.parent.big_instance
        text = f"""## Latency on emulated links: first bytes, ls -R, a big instance

Generated by `scripts/bench` on {facts['_date']}, at the links of the network section,
each through the same link proxy. Runs per link ({runs}); a run is every row once, in
turn, each dicomfs row on a fresh mount (new mount, empty cache). Requests and MB from
server: median per run, from the end of the mount to the end of the read (for the big
instance, until its transfer stopped: the cache's `tmp` folder empty); for the streamed
request, until it was closed.

- First bytes by path: `head -c {HEADER_BYTES}` of the CT instance
  `/studies/<study>/<series>/<instance>.dcm`; ratio to curl's `time_total` (the target)
  and to its `time_starttransfer`.
- `ls -R /patients`: round trips = median seconds / (2 x one-way delay). The server holds
  {self.studies} studies and {self.instances} instances (the issue's target is for 18
  studies).
- Big instance: {big.size / 1e6:.0f} MB, {big.number_of_frames} frames of 512x512 16-bit; the
  reference is a streamed GET (httpx, `Accept-Encoding: identity`) closed after 64 KiB.

Reproduce: `{command}`
{busy_note(facts)}
{markdown(self.HEADERS, self.rows())}

### Failures and wrong results

{chr(10).join(problems) or "- none"}
"""
        write_block(output, "latency", text)


def wait_transfers_done(cache: Path, timeout: float) -> bool:
    """Whether every ``tmp`` folder below ``cache`` emptied (a transfer writes its partial
    file there until it is cached or dropped) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not any(any(t.iterdir()) for t in cache.rglob("tmp") if t.is_dir()):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def median_text(values: list[int] | list[float], pattern: str) -> str:
    return pattern.format(statistics.median(values))
