"""The listing benchmark: ``ls`` of /studies and /patients on a 10,000-study server.

A private Orthanc (storage kept in ``.cache/bench-10k/orthanc``, so the upload happens
once) holds ``--studies`` tiny generated studies (one 8x8 instance each, deterministic
UIDs; the files are kept in ``.cache/bench-10k/files``). For each ``--page-size`` it
times, with ``ls`` as a person would run it:

* cold: a fresh mount with a fresh cache folder, first ``ls`` of the folder;
* warm: the same ``ls`` again on that mount (listing in memory, names made);
* restart: a fresh mount on the same cache folder (the listing saved on disk is young);

and, for comparison, the QIDO walk alone through dicomfs' client (no FUSE), one page
at a time ("walk 1", what a mount does by default) and four speculative pages at once
("walk 4", ``ClientConfig.page_concurrency``). Every figure is the median of ``--runs``
runs. Run it as ``PYTHONPATH=. .venv/bin/python -m scripts.benchmarks.listing`` from the
checkout's root (``--help`` for options);
``--mount-args`` passes options to the mounts.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import trio

from dicomfs.client import ClientConfig, DicomwebClient
from scripts.benchmarks.common import REPO
from tests.support.mounts import force_unmount, mount_dicomfs
from tests.support.orthanc import LocalOrthanc
from tests.support.sample import demo_uid
from tests.support.tiny import tiny_instance

HOME = REPO / ".cache" / "bench-10k"
FAMILIES = ("Doe", "Smith", "Müller", "García", "Nguyen", "Иванов", "Παπαδόπουλος", "山田",
            "김", "Cohen", "O'Brien", "Rossi", "Kowalski", "Dubois", "Silva", "Yılmaz")  # noqa: RUF001
GIVENS = ("Jane", "John", "Zoë", "José", "Anh", "Иван", "Νίκος", "太郎", "민준", "Noa",
          "Seán", "Giulia", "Piotr", "Camille", "Ana", "Elif")
DESCRIPTIONS = ("CT CHEST", "MR BRAIN", "CR THORAX", "US ABDOMEN", "CT HEAD", "MR KNEE",
                "XA CORONARY", "PET-CT WHOLE BODY")
STUDIES_PER_PATIENT = 4
MOUNT_TIMEOUT = 60.0


def say(message: str) -> None:
    print(f"listing: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def study_file(i: int) -> tuple[str, bytes]:
    """Study ``i``: one instance; patients of four studies each, dates over ten years."""
    patient = i // STUDIES_PER_PATIENT
    family, given = FAMILIES[patient % len(FAMILIES)], GIVENS[patient // len(FAMILIES) % 16]
    day = 1 + i % 28
    month = 1 + (i // 28) % 12
    year = 2015 + (i // 336) % 10
    sop = demo_uid(f"bench-10k/instance/{i}")
    return sop, tiny_instance(
        study_uid=demo_uid(f"bench-10k/study/{i}"), series_uid=demo_uid(f"bench-10k/series/{i}"),
        sop_uid=sop, patient_name=f"{family}^{given}", patient_id=f"B{patient:05d}",
        study_date=f"{year}{month:02d}{day:02d}", study_description=DESCRIPTIONS[i % 8],
        series_number=1, modality="OT", series_description="Tiny", instance_number=1)


def write_chunk(start: int, stop: int, folder: Path) -> list[str]:
    """Write studies ``start..stop-1`` (in a worker process); their SOP Instance UIDs."""
    uids = []
    for i in range(start, stop):
        sop, data = study_file(i)
        path = folder / f"{i:06d}.dcm"
        if not path.exists():
            path.write_bytes(data)
        uids.append(sop)
    return uids


def generate(count: int) -> tuple[list[Path], list[str]]:
    """The study files, made once (in parallel) and reused from .cache/bench-10k/files."""
    folder = HOME / "files"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    step = 500
    with ProcessPoolExecutor() as pool:
        chunks = pool.map(write_chunk, range(0, count, step),
                          [min(s + step, count) for s in range(0, count, step)],
                          [folder] * len(range(0, count, step)))
        uids = [uid for chunk in chunks for uid in chunk]
    say(f"{count} study files ready in {time.monotonic() - started:.1f} s ({folder})")
    return [folder / f"{i:06d}.dcm" for i in range(count)], uids


# --------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def mounted(url: str, point: Path, cache: Path, page_size: int,
            extra: list[str]) -> Iterator[Path]:
    """``dicomfs mount`` in the foreground, unmounted (and the process ended) afterwards."""
    force_unmount(point)  # left by a run that was killed
    mount = mount_dicomfs(url, point, cache_dir=cache, log_path=point.parent / "mount.log",
                          args=["--page-size", str(page_size), "--log-level", "warning", *extra],
                          timeout=MOUNT_TIMEOUT)
    try:
        yield point
    finally:
        mount.unmount()


def ls(folder: Path) -> tuple[float, int]:
    """Seconds for ``ls`` of a folder (sorted, as people run it), and how many names."""
    started = time.monotonic()
    result = subprocess.run(["ls", str(folder)], capture_output=True, check=True)
    return time.monotonic() - started, len(result.stdout.splitlines())


def client_walk(url: str, page_size: int, concurrency: int) -> float:
    """Seconds for the QIDO walk of a cold listing, by dicomfs' client alone (no FUSE)."""
    async def walk() -> float:
        config = ClientConfig(base_url=url, page_size=page_size, page_concurrency=concurrency,
                              timeout=300)
        async with DicomwebClient(config) as client:
            started = time.monotonic()
            await client.search_studies()
            return time.monotonic() - started

    return trio.run(walk)


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def bench(url: str, page_size: int, runs: int, count: int, mount_args: list[str]
          ) -> dict[str, float]:
    """The figures of one page size."""
    work = HOME / "work"
    figures = {f"walk {n}": median_of(runs, lambda n=n: client_walk(url, page_size, n))
               for n in (1, 4)}
    for folder in ("studies", "patients"):
        cold, warm, restart = [], [], []
        for run in range(runs):
            cache = work / f"cache-{folder}-{page_size}-{run}"
            shutil.rmtree(cache, ignore_errors=True)
            with mounted(url, work / "mnt", cache, page_size, mount_args) as point:
                seconds, names = ls(point / folder)
                cold.append(seconds)
                if folder == "studies" and names != count:
                    raise RuntimeError(f"/studies lists {names} studies, not {count}")
                warm.append(ls(point / folder)[0])
            with mounted(url, work / "mnt", cache, page_size, mount_args) as point:
                restart.append(ls(point / folder)[0])
            shutil.rmtree(cache, ignore_errors=True)
        figures[f"{folder} cold"] = statistics.median(cold)
        figures[f"{folder} warm"] = statistics.median(warm)
        figures[f"{folder} restart"] = statistics.median(restart)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--page-sizes", default="1000,200",
                        help="comma-separated --page-size values to try (default 1000,200)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mount-args", default="",
                        help="more dicomfs mount arguments, e.g. '--page-concurrency 4'")
    args = parser.parse_args(argv)
    paths, uids = generate(args.studies)
    server = LocalOrthanc(HOME / "orthanc", config={"StableAge": 3600})
    server.start()
    try:
        report = server.upload(paths, sop_uids=uids, workers=8)
        say(f"upload: {report.uploaded} new, {report.skipped} already stored, "
            f"{report.seconds:.1f} s")
        stored = server.statistics()["CountStudies"]
        if stored < args.studies:
            raise RuntimeError(f"Orthanc holds {stored} studies, expected {args.studies}")
        print(f"{stored} studies in Orthanc, {stored // STUDIES_PER_PATIENT} patients; "
              f"median of {args.runs} runs, seconds")
        print(f"{'page size':>9} {'walk 1':>6} {'walk 4':>6} {'/studies cold':>13} "
              f"{'warm':>6} {'restart':>7} {'/patients cold':>14} {'warm':>6} {'restart':>7}")
        for page_size in (int(p) for p in args.page_sizes.split(",")):
            f = bench(server.dicomweb_url, page_size, args.runs, stored, args.mount_args.split())
            print(f"{page_size:>9} {f['walk 1']:>6.2f} {f['walk 4']:>6.2f} "
                  f"{f['studies cold']:>13.2f} "
                  f"{f['studies warm']:>6.2f} {f['studies restart']:>7.2f} "
                  f"{f['patients cold']:>14.2f} {f['patients warm']:>6.2f} "
                  f"{f['patients restart']:>7.2f}", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
