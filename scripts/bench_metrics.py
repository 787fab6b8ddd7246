"""What counting costs: a cold read of the 400-slice CT series with and without metrics.

    .venv/bin/python scripts/bench_metrics.py --baseline DIR [--runs 3]

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
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.orthanc import LocalOrthanc, free_port  # noqa: E402
from tests.support.sample import build_archive  # noqa: E402

TESTDATA = Path(os.environ.get("DICOMFS_TESTDATA") or ROOT / ".cache" / "testdata")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_read(code: Path, url: str, folder: str, work: Path,
              metrics: str | None) -> tuple[float, float]:
    """Seconds to ``cat`` the series through a fresh mount of the dicomfs at ``code``, and
    the CPU seconds the mount process spent meanwhile."""
    mountpoint, cache = Path(tempfile.mkdtemp(dir=work)), Path(tempfile.mkdtemp(dir=work))
    command = [sys.executable, "-m", "dicomfs", "mount", url, str(mountpoint), "--foreground",
               "--cache-dir", str(cache), "--log-level", "warning"]
    mount = subprocess.Popen(command + (["--metrics-address", metrics] if metrics else []),
                             env={**os.environ, "PYTHONPATH": str(code)})
    done = threading.Event()
    scrapes = 0

    def scrape() -> None:
        nonlocal scrapes
        while not done.wait(0.5):
            httpx.get(f"http://{metrics}/metrics").raise_for_status()
            scrapes += 1

    scraper = threading.Thread(target=scrape)
    try:
        while not os.path.ismount(mountpoint):
            if mount.poll() is not None:
                raise SystemExit(f"the mount ended with status {mount.returncode}")
            time.sleep(0.05)
        if metrics:
            scraper.start()
        cpu = cpu_seconds(mount.pid)
        started = time.perf_counter()
        subprocess.run(f"cat {mountpoint}/{folder}/*.dcm > /dev/null", shell=True, check=True)
        return time.perf_counter() - started, cpu_seconds(mount.pid) - cpu
    finally:
        done.set()
        if scraper.is_alive():
            scraper.join()
            assert scrapes, "the read ended before the first scrape"
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        mount.wait(30)


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
