"""Reliability: dicomfs mounted through a proxy that breaks the network on purpose.

A seeded fault-injecting proxy (:mod:`fakes`) sits between the mount and the session
Orthanc and cuts bodies mid-transfer, resets connections, answers bursts of 503 (with and
without ``Retry-After``) and stalls longer than the mount's ``--timeout``. Whatever it does,
every read gives the archive's bytes or fails with EIO: never wrong bytes, never a short
file, never a wrong listing; and with retries nearly every read succeeds.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support import LocalOrthanc, SampleArchive, SampleFile
from tests.support.fakes import Cut, FaultPolicy, Forward, Proxy, Request

if TYPE_CHECKING:
    from tests.support.harness import Mount, MountFactory

MOUNT_ARGS = ("--timeout", "2", "--retries", "5", "--deadline", "30")
ROUNDS = 3  # each with a fresh mount and a fresh cache
READERS = 4  # threads reading at once: the mount must cope with overlapping failures
# The generated MR series (30 x 130 KB), the CT series (400 x 525 KB) and its follow-up (40 x
# 130 KB), the six pydicom MR_small files (every transfer syntax, one series) and a 7-instance
# series of the pydicom DICOMDIR set.
SERIES = ("mr", "ct", "followup-ct", "pydicom/MR_small.dcm",
          "pydicom/dicomdirtests/98892003/MR700/4467")
BIG_SERIES = {"ct"}  # read in the first round only: time

MIN_SUCCESS_RATE = 0.95


def instance_path(root: Path, entry: SampleFile) -> Path:
    return root / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"


def read_or_errno(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or -1


def error_reasons(log: str) -> Counter[str]:
    """What the FUSE handlers reported as errors, UIDs and numbers left out."""
    found = re.findall(r"ERROR dicomfs\.fs: (.*)", log)
    return Counter(re.sub(r"[\d.]{4,}|\d+", "#", line)[:120] for line in found)


def cached_instances(cache_dir: Path) -> dict[str, Path]:
    """SOP Instance UID -> committed cache file, for every instance in a cache folder."""
    return {p.name.removesuffix(".dcm"): p for p in cache_dir.rglob("objects/**/*.dcm")}


def listing_names(series: list[SampleFile]) -> set[str]:
    """What a series folder lists: its instances and metadata.json."""
    return {f"{f.sop_uid}.dcm" for f in series} | {"metadata.json"}


def test_reads_through_faults_are_whole_or_eio(orthanc: LocalOrthanc, archive: SampleArchive,
                                              mount_factory: MountFactory) -> None:
    every = {label: archive.series_files(archive.series_uid(label)) for label in SERIES}
    assert [len(every[label]) for label in SERIES] == [30, archive.ct_slices, 40, 6, 7]
    policy = FaultPolicy(seed=20240611)
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    listing_outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    round_times: list[float] = []
    started = time.monotonic()
    with Proxy(orthanc.url, policy) as proxy:
        for number in range(ROUNDS):
            labels = [label for label in SERIES if number == 0 or label not in BIG_SERIES]
            files = [f for label in labels for f in every[label]]
            round_started = time.monotonic()
            policy.enabled = False  # let the mount come up: its start-up probe is not the test
            mount = mount_factory(proxy.url("/dicom-web"), args=MOUNT_ARGS)
            policy.enabled = True
            # Listings: exactly the series' instances, or EIO, never a partial list; a
            # listing that failed is not remembered: asked again without faults, it is exact.
            failed_listings = []
            for label in labels:
                series = every[label]
                folder = instance_path(mount.path, series[0]).parent
                try:
                    names = set(os.listdir(folder))
                except OSError as exc:
                    assert exc.errno == errno.EIO, (folder, exc)
                    listing_outcomes["EIO"] += 1
                    failed_listings.append((folder, series))
                    continue
                assert names == listing_names(series)
                listing_outcomes["exact"] += 1
            policy.enabled = False
            for folder, series in failed_listings:
                assert set(os.listdir(folder)) == listing_names(series), folder
            policy.enabled = True
            with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
                results = pool.map(read_or_errno, [instance_path(mount.path, f) for f in files])
                for entry, result in zip(files, results, strict=True):
                    if isinstance(result, int):
                        outcomes[f"errno {errno.errorcode.get(result, result)}"] += 1
                    elif result == archive.read(entry):
                        outcomes["identical"] += 1
                    else:
                        wrong.append(f"{entry.label} {entry.sop_uid}: {len(result)} bytes, "
                                     f"expected {entry.size}")
            assert mount.proc.poll() is None, mount.log_tail()
            mount.unmount()
            round_times.append(time.monotonic() - round_started)
            reasons.update(error_reasons(mount.log()))
            policy.enabled = False
            # Nothing unverified reached the cache: every committed file is the real one.
            for sop, path in cached_instances(mount.cache_dir).items():
                assert path.read_bytes() == archive.read(sop), f"bad cache entry {path}"
        faults = policy.summary()
        proxy_errors = list(proxy.errors)
    reads = sum(outcomes.values()) + len(wrong)
    rate = outcomes["identical"] / reads
    print(f"\nfault injection: {reads} reads in {time.monotonic() - started:.1f} s, "
          f"{outcomes['identical']} identical ({rate:.1%}), outcomes {dict(outcomes)}, "
          f"wrong {len(wrong)}; listings {dict(listing_outcomes)}; faults {faults}; "
          f"proxy errors {len(proxy_errors)}; rounds {[round(t, 1) for t in round_times]} s; "
          f"errors the mounts logged {dict(reasons)}")
    assert not wrong, wrong
    assert set(outcomes) <= {"identical", "errno EIO"}, outcomes
    assert listing_outcomes["exact"] >= len(SERIES), listing_outcomes  # not all skipped
    # The faults really happened, of every kind.
    for kind in ("cut-mid-body", "cut-series-stream", "reset-mid-body", "reset-at-once",
                 "503-bursts", "stall-before-answer", "stall-mid-body"):
        assert faults.get(kind, 0) >= 1, (kind, faults)
    assert rate >= MIN_SUCCESS_RATE, (rate, outcomes, faults)


class StallFirstBody:
    """Stall mid-body (longer than the client's timeout) the first time each matching
    target is asked for; forward everything else whole."""

    def __init__(self, matches: str, stall: float = 3.0) -> None:
        self.matches = matches
        self.stall = stall
        self.stalled: list[str] = []
        self.seen: list[str] = []

    def __call__(self, request: Request) -> Forward | Cut:
        self.seen.append(request.target)
        if self.matches in request.target and request.target not in self.stalled:
            self.stalled.append(request.target)
            return Cut(0.5, 200, stall=self.stall)
        return Forward()


def _mount_behind(mount_factory: MountFactory, proxy: Proxy) -> Mount:
    return mount_factory(proxy.url("/dicom-web"), args=MOUNT_ARGS)


def test_instance_body_stalled_midway_is_fetched_again(
        orthanc: LocalOrthanc, archive: SampleArchive, mount_factory: MountFactory) -> None:
    """A server that stops sending mid-instance (a timeout, not a reset) is asked again,
    as a cut or reset transfer is: --retries 5 leaves plenty of room."""
    entry = archive.series_files(archive.series_uid("mr"))[0]
    policy = StallFirstBody(f"/instances/{entry.sop_uid}")
    with Proxy(orthanc.url, policy) as proxy:
        mount = _mount_behind(mount_factory, proxy)
        result = read_or_errno(instance_path(mount.path, entry))
        assert policy.stalled, policy.seen
        assert result == archive.read(entry), (
            f"errno {result}" if isinstance(result, int) else len(result), mount.log_tail(15))


def test_listing_body_stalled_midway_is_fetched_again(
        orthanc: LocalOrthanc, archive: SampleArchive, mount_factory: MountFactory) -> None:
    """The same for a QIDO answer: a JSON body that stalls is fetched again, like a cut one."""
    entry = archive.series_files(archive.series_uid("mr"))[0]
    policy = StallFirstBody(f"/series/{entry.series_uid}/instances?")
    with Proxy(orthanc.url, policy) as proxy:
        mount = _mount_behind(mount_factory, proxy)
        folder = instance_path(mount.path, entry).parent
        try:
            names: set[str] | int = set(os.listdir(folder))
        except OSError as exc:
            names = exc.errno or -1
        assert policy.stalled, policy.seen
        expected = {f"{f.sop_uid}.dcm" for f in archive.series_files(entry.series_uid)}
        assert names == expected | {"metadata.json"}, (names, mount.log_tail(15))
