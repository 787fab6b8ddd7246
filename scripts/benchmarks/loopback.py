"""The loopback section: dicomfs next to the wire, the local disk, rclone and dicomweb-client,
everything on a private Orthanc on this machine."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from scripts.benchmarks.common import CACHE, REPO, WORK, BenchError, say
from scripts.benchmarks.data import (
    PARALLEL_SERIES,
    SeriesRef,
    build_parallel_series,
    series_ref,
    verify_into,
)
from scripts.benchmarks.mounts import Mounts, unmount_stale
from scripts.benchmarks.proc import (
    cat_cmd,
    check_curl,
    children_cpu_seconds,
    cpu_seconds,
    curl_cmd,
    dicomweb_client_seconds,
    run_parallel,
    run_timed,
    vm_hwm_mb,
)
from scripts.benchmarks.table import make_measures
from tests.support.mounts import Mount
from tests.support.orthanc import LocalOrthanc
from tests.support.sample import SampleArchive, build_archive, build_big_instance

CT_SLICES = 400
BIG_SLICES = 2000
ORTHANC_CONFIG = {"WebDavEnabled": True, "WebDavDeleteAllowed": False,
                  "WebDavUploadAllowed": False}


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

    def cold_mount(self, orthanc: LocalOrthanc | None = None) -> Mount:
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

    def _read(self, folder: Path, handle: Mount, pattern: str = "*.dcm") -> float:
        try:
            return run_timed(cat_cmd(folder, pattern), f"cat through {handle.path.name}")[0]
        except BenchError as exc:
            raise BenchError(f"{exc}\nlog {handle.log_path}:\n{handle.log_tail(20)}"
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
                raise BenchError(f"open+read(1) of {path}: {exc}\n{h.log_tail(20)}") from None
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
                raise BenchError(f"{exc}\nmount log {h.log_path}:\n{h.log_tail(20)}") from None
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

