"""Commands timed from outside, as a person would run them, and what /proc says about a
process (CPU seconds, peak memory)."""

from __future__ import annotations

import os
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scripts.benchmarks.common import BenchError
from scripts.benchmarks.data import SeriesRef

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


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
    return _status_mb(pid, "VmHWM")


def vm_rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` now, in MB (10^6 bytes)."""
    return _status_mb(pid, "VmRSS")


def _status_mb(pid: int, name: str) -> float:
    """A memory line (in kB) of ``/proc/PID/status``, in MB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the status of the mount process {pid}: {exc}") from None
    match = re.search(rf"^{name}:\s+(\d+) kB", status, re.MULTILINE)
    if not match:
        raise BenchError(f"no {name} in /proc/{pid}/status")
    return int(match.group(1)) * 1024 / 1e6


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

