"""What counting costs: a cold read of the 400-slice CT series with and without metrics.

    PYTHONPATH=. .venv/bin/python -m scripts.benchmarks.metrics --baseline DIR [--runs 3]

Side by side in one run, each once per round, in turn: the dicomfs checkout at DIR (e.g.
``git worktree add DIR main``: no counting at all), this one without ``--metrics-address``
(counting on, as always), and this one with it, scraped every half second during the read.
Each read: a fresh mount of a private Orthanc holding the CT series, with an empty cache,
then ``cat`` of every file to /dev/null. Prints the median seconds of each, and the median
CPU seconds the mount process spent during the read (less noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from scripts.benchmarks.common import REPO as ROOT
from scripts.benchmarks.proc import cpu_seconds
from tests.support.mounts import mount_dicomfs
from tests.support.orthanc import LocalOrthanc, free_port
from tests.support.sample import build_archive

TESTDATA = Path(os.environ.get("DICOMFS_TESTDATA") or ROOT / ".cache" / "testdata")


def cold_read(code: Path, url: str, folder: str, work: Path,
              metrics: str | None) -> tuple[float, float]:
    """Seconds to ``cat`` the series through a fresh mount of the dicomfs at ``code``, and
    the CPU seconds the mount process spent meanwhile."""
    mountpoint, cache = Path(tempfile.mkdtemp(dir=work)), Path(tempfile.mkdtemp(dir=work))
    mount = mount_dicomfs(url, mountpoint, cache_dir=cache,
                          log_path=work / f"{mountpoint.name}.log", args=["--log-level", "warning",
                                *(["--metrics-address", metrics] if metrics else [])],
                          code=code)
    done = threading.Event()
    scrapes = 0

    def scrape() -> None:
        nonlocal scrapes
        while not done.wait(0.5):
            httpx.get(f"http://{metrics}/metrics").raise_for_status()
            scrapes += 1

    scraper = threading.Thread(target=scrape)
    pid = mount.pid
    assert pid is not None
    try:
        if metrics:
            scraper.start()
        cpu = cpu_seconds(pid)
        started = time.perf_counter()
        subprocess.run(f"cat {mountpoint}/{folder}/*.dcm > /dev/null", shell=True, check=True)
        return time.perf_counter() - started, cpu_seconds(pid) - cpu
    finally:
        done.set()
        if scraper.is_alive():
            scraper.join()
            assert scrapes, "the read ended before the first scrape"
        mount.unmount()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True,
                        help="a dicomfs checkout without metrics")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    archive = build_archive(TESTDATA)
    ct = archive.with_label("ct")
    folder = f"studies/{ct[0].study_uid}/{ct[0].series_uid}"
    with tempfile.TemporaryDirectory() as tmp, \
            LocalOrthanc(Path(tmp) / "orthanc") as orthanc:
        orthanc.upload(archive.path(f) for f in ct)
        variants = {"baseline (no counting)": (args.baseline, None),
                    "counting, no endpoint": (ROOT, None),
                    "counting + endpoint scraped every 0.5 s": (ROOT, "endpoint")}
        cold_read(ROOT, orthanc.dicomweb_url, folder, Path(tmp), None)  # server's disk warm
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.runs):
            for name, (code, endpoint) in variants.items():
                address = f"127.0.0.1:{free_port()}" if endpoint else None
                wall, used = cold_read(code, orthanc.dicomweb_url, folder, Path(tmp), address)
                seconds[name].append(wall)
                cpu[name].append(used)
        size = sum(f.size for f in ct) / 1e6
        for name, runs in seconds.items():
            median = statistics.median(runs)
            print(f"{name:40} {median:.2f} s ({size / median:.0f} MB/s), mount CPU "
                  f"{statistics.median(cpu[name]):.2f} s; runs "
                  + " ".join(f"{s:.2f}" for s in runs))

if __name__ == "__main__":
    main()
