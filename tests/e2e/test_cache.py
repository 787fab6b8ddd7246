"""The persistent cache on a real Orthanc and real mounts: remounts, crashes, eviction,
offline use, sharing, the ``cache`` and ``prefetch`` commands and stale metadata."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from dicomfs.store import Key, server_folder_name
from tests.support import LocalOrthanc, SampleArchive
from tests.support.fakes import Forward, Proxy, wait_until
from tests.support.mounts import is_mounted
from tests.support.sample import SampleFile

MiB = 1024**2
DICOMFS = [sys.executable, "-m", "dicomfs"]
UID_PART = r"[0-9]+(?:\.[0-9]+)*"
INSTANCE_RETRIEVE = re.compile(
    rf"GET /dicom-web/studies/{UID_PART}/series/{UID_PART}/instances/({UID_PART})")
SERIES_RETRIEVE = re.compile(rf"GET /dicom-web/studies/{UID_PART}/series/{UID_PART}")
ENTRY_NAME = re.compile(
    rf"{UID_PART}/(?:metadata\.json|{UID_PART}/(?:metadata\.json|{UID_PART}\.(?:dcm|png|jpg)))")


# --------------------------------------------------------------------------- helpers


def instance_path(root: Path, entry: SampleFile) -> Path:
    return root / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"


def series_folder(root: Path, archive: SampleArchive, label: str) -> Path:
    return root / "studies" / archive.study_uid(label) / archive.series_uid(label)


def server_folder(cache_dir: Path, url: str) -> Path:
    return cache_dir / server_folder_name(url)


def cached_files(objects: Path) -> dict[str, Path]:
    """Entry path relative to ``objects`` -> absolute path, for every cached entry."""
    found = {}
    for dirpath, _dirs, files in os.walk(objects):
        for name in files:
            path = Path(dirpath) / name
            found[path.relative_to(objects).as_posix()] = path
    return found


def objects_size(objects: Path) -> int:
    """Bytes of the entries below ``objects`` at one moment.

    Each folder is read in one readdir (atomic against renames and unlinks), then the
    entries are stat'ed; an entry evicted in between is skipped. So the sum never counts
    files that were not all present together: it cannot overstate the real size.
    """
    total = 0
    for dirpath, _dirs, files in os.walk(objects):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


def temp_files(cache_dir: Path) -> list[str]:
    return sorted(os.listdir(cache_dir)) if cache_dir.is_dir() else []


def check_files(root: Path, archive: SampleArchive, entries: Iterable[SampleFile]) -> None:
    for entry in entries:
        assert instance_path(root, entry).read_bytes() == archive.read(entry), entry.sop_uid


def instance_requests(requests: list[str]) -> list[str]:
    """SOP UIDs of the WADO-RS instance retrieves among ``requests``."""
    return [m.group(1) for r in requests if (m := INSTANCE_RETRIEVE.fullmatch(r))]


def series_requests(requests: list[str]) -> list[str]:
    return [r for r in requests if SERIES_RETRIEVE.fullmatch(r)]


def metadata_requests(requests: list[str]) -> list[str]:
    return [r for r in requests if r.endswith("/metadata")]


def count_instances(raw: bytes) -> int:
    return len({ds["00080018"]["Value"][0] for ds in json.loads(raw)})


def dicomfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DICOMFS, *args], capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- 1. the folder


def test_cache_folders_are_private_and_named_by_uids(mount_factory, archive: SampleArchive,
                                                     tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    os.chmod(cache, 0o755)  # a folder made by someone else's umask is tightened
    mount = mount_factory(cache_dir=cache)
    entry = archive.with_label("mr")[0]
    assert instance_path(mount.path, entry).read_bytes() == archive.read(entry)
    study = mount.path / "studies" / entry.study_uid
    assert (study / "metadata.json").read_bytes()
    assert (study / entry.series_uid / "metadata.json").read_bytes()
    (mount.path / "rendered" / entry.study_uid / entry.series_uid /
     f"{entry.sop_uid}.png").read_bytes()

    server = server_folder(cache, mount.url)
    assert json.loads((server / "server.json").read_text())["url"] == mount.url
    folders = [cache, server] + [Path(d) for d, _, _ in os.walk(server)]
    assert {server / "objects", server / "listings", server / "tmp"} <= set(folders)
    assert server / "objects" / entry.study_uid / entry.series_uid in folders
    entries = cached_files(server / "objects")
    assert f"{entry.study_uid}/{entry.series_uid}/{entry.sop_uid}.dcm" in entries
    assert f"{entry.study_uid}/metadata.json" in entries
    for rel, path in entries.items():
        assert ENTRY_NAME.fullmatch(rel), rel
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, rel
    loose = {str(f.relative_to(cache)): oct(stat.S_IMODE(f.stat().st_mode)) for f in folders
             if stat.S_IMODE(f.stat().st_mode) != 0o700}
    assert loose == {}, "cache folders must be 0700"


# --------------------------------------------------------------------------- 2. remount


def test_remount_reads_cached_data_without_server_requests(
        mount_factory, archive: SampleArchive, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    files = archive.series_files(archive.series_uid("mr"))
    study_meta = Path("studies") / archive.study_uid("mr") / "metadata.json"
    series_meta = Path("studies") / archive.study_uid("mr") / archive.series_uid("mr") / \
        "metadata.json"

    first = mount_factory(cache_dir=cache)
    check_files(first.path, archive, files)
    metadata = {rel: (first.path / rel).read_bytes() for rel in (study_meta, series_meta)}
    assert count_instances(metadata[study_meta]) == len(files)
    assert count_instances(metadata[series_meta]) == len(files)
    first.unmount()

    second = mount_factory(cache_dir=cache)
    mark = orthanc.mark()
    check_files(second.path, archive, files)
    for rel, data in metadata.items():
        assert (second.path / rel).read_bytes() == data
    requests = orthanc.requests_since(mark)
    assert instance_requests(requests) == []
    assert series_requests(requests) == []
    assert metadata_requests(requests) == []
    # The listings saved by the first mount are younger than the listing TTL (60 s), so
    # not even QIDO is asked; the startup probe (GET /dicom-web/studies) came before mark.
    assert requests == []


# --------------------------------------------------------------------------- 3. kill -9


def test_kill_9_during_a_transfer_leaves_a_sound_cache(mount_factory, archive: SampleArchive,
                                                       tmp_path: Path) -> None:
    files = archive.series_files(archive.series_uid("ct"))
    # A part lands in about a millisecond now, so a kill can fall between two parts or
    # after the stream: try again (fresh mount and cache) until it hits a transfer.
    for attempt in range(5):
        cache = tmp_path / f"cache{attempt}"
        mount, server, errors, killed_after = _kill_mid_transfer(mount_factory, cache, files)
        assert errors, "the reader finished before the kill: nothing was interrupted"
        mount.unmount()  # fusermount3 -u, then -u -z, of the dead mount
        assert not is_mounted(mount.path)
        leftovers = temp_files(server / "tmp")
        if leftovers:
            break
    assert leftovers, "no transfer was in progress at the kill"
    assert all(name.startswith(f"{mount.proc.pid}.") for name in leftovers), leftovers
    committed = cached_files(server / "objects")
    for rel, path in committed.items():  # whole entries or none
        if rel.endswith(".dcm"):
            assert path.read_bytes() == archive.read(Path(rel).stem), rel

    again = mount_factory(cache_dir=cache)
    assert temp_files(server / "tmp") == []  # a dead pid's files are removed at start
    check_files(again.path, archive, files)
    assert (series_folder(again.path, archive, "ct") / "metadata.json").read_bytes()
    print(f"kill -9 after {killed_after:.2f} s: {len(leftovers)} temporary files left, "
          f"{len(committed)} entries committed before the kill")


def _kill_mid_transfer(mount_factory, cache: Path, files) -> tuple:  # type: ignore[no-untyped-def]
    """Read a series through a new mount and SIGKILL it while a part is being written."""
    mount = mount_factory(cache_dir=cache)
    server = server_folder(cache, mount.url)
    errors: list[OSError] = []

    def reader() -> None:
        try:
            for entry in files:
                instance_path(mount.path, entry).read_bytes()
        except OSError as exc:  # the daemon died under us
            errors.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    started = time.monotonic()
    thread.start()
    # Kill in the middle of the series transfer: some entries are in place, one is half
    # written.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
            len(cached_files(server / "objects")) >= 10 and temp_files(server / "tmp")):
        time.sleep(0.001)
    os.kill(mount.proc.pid, signal.SIGKILL)
    killed_after = time.monotonic() - started
    assert mount.proc.wait(10) == -signal.SIGKILL  # reaped: its pid is dead, not a zombie
    thread.join(30)
    assert not thread.is_alive()
    return mount, server, errors, killed_after


# --------------------------------------------------------------------------- 4. eviction


def test_eviction_keeps_the_cache_bounded(mount_factory, archive: SampleArchive,
                                          orthanc: LocalOrthanc, tmp_path: Path) -> None:
    limit = 40 * MiB
    cache = tmp_path / "cache"
    files = archive.series_files(archive.series_uid("ct"))
    largest = max(entry.size for entry in files)
    mount = mount_factory(cache_dir=cache, args=["--cache-size", "40M"])
    objects = server_folder(cache, mount.url) / "objects"
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(objects_size(objects))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    mark = orthanc.mark()
    try:
        # A file held open is never evicted from under its reader, however much is read
        # meanwhile. It is the largest image of another series (7 MB), so that read-ahead
        # of the big CT series cannot bring it back.
        held = max((f for f in archive.files if f.label.startswith("pydicom/")),
                   key=lambda f: f.size)
        expected = archive.read(held)
        half = len(expected) // 2
        fd = os.open(instance_path(mount.path, held), os.O_RDONLY)
        try:
            head = os.pread(fd, half, 0)
            check_files(mount.path, archive, files)  # ~210 MB through a 40 MiB cache
            entry = objects / held.study_uid / held.series_uid / f"{held.sop_uid}.dcm"
            assert entry.exists(), "a file open for reading must never be evicted"
            # The kernel may hold the whole file (pushed at open): drop its pages, so that
            # the reads below reach the mount, which serves them from the held entry.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            log_mark = len(mount.log())
            tail = os.pread(fd, len(expected), half)
            head_again = os.pread(fd, half, 0)
        finally:
            os.close(fd)
        assert head + tail == expected
        assert head_again == head
        reads = [line for line in mount.log()[log_mark:].splitlines() if " READ " in line]
        assert any(line.endswith(f"/{held.sop_uid}.dcm") for line in reads), reads
        first_pass = orthanc.requests_since(mark)
        check_files(mount.path, archive, files)  # the second pass, refetched
    finally:
        stop.set()
        sampler.join(10)
    requests = orthanc.requests_since(mark)
    final = objects_size(objects)
    samples.append(final)
    bound = limit + largest + len(expected)  # the bound, one entry being committed, the held
    peak = max(samples)
    print(f"eviction: {len(samples)} samples, peak {peak / MiB:.2f} MiB, "
          f"final {final / MiB:.2f} MiB, bound {bound / MiB:.2f} MiB; requests for 2 x "
          f"{len(files)} CT reads: {len(series_requests(requests))} series retrieves "
          f"({len(series_requests(first_pass))} in pass 1), "
          f"{len(instance_requests(requests))} instance retrieves "
          f"({len(instance_requests(first_pass))} in pass 1)")
    assert final <= limit
    assert peak <= bound
    assert peak > limit - 2 * largest  # the cache was really used up to its bound


def test_reading_a_series_larger_than_the_cache_fetches_it_about_once(
        mount_factory, archive: SampleArchive, orthanc: LocalOrthanc) -> None:
    """The series prefetch must not download a series several times over because the
    cache cannot hold it: reading it once should cost about one transfer of it."""
    files = archive.series_files(archive.series_uid("mr"))  # 30 x 130 KB, in a 1 MiB cache
    mount = mount_factory(args=["--cache-size", "1M"])
    mark = orthanc.mark()
    check_files(mount.path, archive, files)
    mount.unmount()  # ends read-ahead: everything it asked for is in the log now
    requests = orthanc.requests_since(mark)
    instances = len(instance_requests(requests))
    streams = len(series_requests(requests))
    print(f"one read of {len(files)} instances through a 1 MiB cache: {streams} series "
          f"retrieves, {instances} instance retrieves")
    count = len(files)
    assert instances + streams * count <= 2 * count, "instances fetched per instance read"


# --------------------------------------------------------------------------- 5. offline


def test_offline_mount_serves_the_cache(mount_factory, orthanc_factory, archive: SampleArchive,
                                        tmp_path: Path) -> None:
    server = orthanc_factory(load=archive)
    url = server.dicomweb_url
    cache = tmp_path / "cache"
    mr = archive.series_files(archive.series_uid("mr"))
    ct = archive.series_files(archive.series_uid("ct"))
    study = Path("studies") / archive.study_uid("mr")
    metadata_paths = [study / "metadata.json", study / archive.series_uid("mr") /
                      "metadata.json"]

    def seconds_to_eio(path: Path) -> float:
        """Read an instance that is not cached: EIO (and the time it took, for the record;
        test_deadline_bounds_a_stalled_read checks the bound)."""
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            path.read_bytes()
        seconds = time.monotonic() - started
        assert raised.value.errno == errno.EIO
        return seconds

    mount = mount_factory(url, cache_dir=cache, args=["--listing-ttl", "1"])
    studies = sorted(os.listdir(mount.path / "studies"))
    assert set(studies) == set(archive.studies)
    mr_names = sorted(os.listdir(series_folder(mount.path, archive, "mr")))
    ct_names = sorted(os.listdir(series_folder(mount.path, archive, "ct")))
    check_files(mount.path, archive, mr)
    metadata = {rel: (mount.path / rel).read_bytes() for rel in metadata_paths}
    mr_folder = mount.path / study
    mr_listing = sorted(os.listdir(mr_folder))

    server.stop()
    time.sleep(1.2)  # past the listing TTL: listings must come from the saved copies
    assert sorted(os.listdir(mount.path / "studies")) == studies
    assert sorted(os.listdir(mr_folder)) == mr_listing
    assert sorted(os.listdir(series_folder(mount.path, archive, "mr"))) == mr_names
    assert sorted(os.listdir(series_folder(mount.path, archive, "ct"))) == ct_names
    for rel, data in metadata.items():
        assert (mount.path / rel).read_bytes() == data
    check_files(mount.path, archive, mr)
    eio_seconds = seconds_to_eio(instance_path(mount.path, ct[7]))
    assert "server unreachable" in mount.log()
    mount.unmount()

    started = time.monotonic()
    offline = mount_factory(url, cache_dir=cache)  # saved listings, as a quick remount finds
    mount_seconds = time.monotonic() - started
    assert offline.proc.poll() is None
    assert "server unreachable" in offline.log()  # the startup probe failed, yet it mounted
    assert sorted(os.listdir(offline.path / "studies")) == studies
    assert sorted(os.listdir(series_folder(offline.path, archive, "mr"))) == mr_names
    check_files(offline.path, archive, mr)
    for rel, data in metadata.items():
        assert (offline.path / rel).read_bytes() == data
    eio_seconds_new = seconds_to_eio(instance_path(offline.path, ct[8]))
    print(f"offline: EIO after {eio_seconds:.2f} s (running mount), "
          f"{eio_seconds_new:.2f} s (new mount); offline mount ready in {mount_seconds:.2f} s")


# --------------------------------------------------------------------------- 6. two mounts


def test_two_mounts_share_one_cache(mount_factory, archive: SampleArchive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    one = mount_factory(cache_dir=cache)
    two = mount_factory(cache_dir=cache)
    failures: list[str] = []

    def read_all(root: Path, entries: list[SampleFile]) -> None:
        for entry in entries:
            try:
                if instance_path(root, entry).read_bytes() != archive.read(entry):
                    failures.append(f"{root}: {entry.sop_uid} differs")
            except OSError as exc:
                failures.append(f"{root}: {entry.sop_uid}: {exc}")

    forward = list(archive.files)
    threads = [threading.Thread(target=read_all, args=(one.path, forward)),
               threading.Thread(target=read_all, args=(two.path, forward[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, "\n".join(failures)
    one.unmount()
    two.unmount()

    server = server_folder(cache, one.url)
    assert temp_files(server / "tmp") == []
    entries = cached_files(server / "objects")
    instances = {Path(rel).stem: path for rel, path in entries.items() if rel.endswith(".dcm")}
    assert set(instances) == set(archive.by_sop)
    for sop, path in instances.items():
        assert path.read_bytes() == archive.read(sop), sop


# --------------------------------------------------------------------------- 7. CLI


def test_cache_info_and_clear(mount_factory, archive: SampleArchive, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    mount = mount_factory(cache_dir=cache)
    check_files(mount.path, archive, archive.series_files(archive.series_uid("mr")))
    mount.unmount()
    mr_bytes = sum(f.size for f in archive.series_files(archive.series_uid("mr")))

    info = dicomfs("cache", "info", "--cache-dir", str(cache))
    assert info.returncode == 0, info.stderr
    assert mount.url in info.stdout
    assert str(server_folder(cache, mount.url)) in info.stdout
    units = {"B": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB}
    sizes = [float(number) * units[unit] for number, unit in
             re.findall(r"(\d+(?:\.\d+)?) ?(B|KiB|MiB|GiB)\b", info.stdout)]
    assert sizes, f"no size in {info.stdout!r}"
    assert max(sizes) >= mr_bytes * 0.95, info.stdout  # rounded to 0.1 MiB

    cleared = dicomfs("cache", "clear", "--cache-dir", str(cache))
    assert cleared.returncode == 0, cleared.stderr
    assert not server_folder(cache, mount.url).exists()
    info = dicomfs("cache", "info", "--cache-dir", str(cache))
    assert info.returncode == 0, info.stderr
    assert mount.url not in info.stdout
    assert "empty" in info.stdout


def test_prefetch_fills_the_cache_resumably_for_offline_use(
        mount_factory, orthanc_factory, archive: SampleArchive, tmp_path: Path) -> None:
    files = archive.series_files(archive.series_uid("mr"))
    server = orthanc_factory()
    server.upload([archive.path(f) for f in files], sop_uids=[f.sop_uid for f in files])
    url = server.dicomweb_url
    cache = tmp_path / "cache"
    study, series = archive.study_uid("mr"), archive.series_uid("mr")
    objects = server_folder(cache, url) / "objects"

    mark = server.mark()
    done = dicomfs("prefetch", url, study, series, "--cache-dir", str(cache))
    assert done.returncode == 0, done.stderr
    first_requests = server.requests_since(mark)
    # All missing, the server near: one instance (to see how near), then one series stream.
    assert len(series_requests(first_requests)) == 1, first_requests
    assert len(instance_requests(first_requests)) == 1, first_requests
    for entry in files:
        cached = objects / study / series / f"{entry.sop_uid}.dcm"
        assert cached.read_bytes() == archive.read(entry)
    assert (objects / study / "metadata.json").is_file()
    assert (objects / study / series / "metadata.json").is_file()

    deleted = {entry.sop_uid for entry in files[3:10]}  # fewer than half
    for sop in deleted:
        (objects / study / series / f"{sop}.dcm").unlink()
    mark = server.mark()
    again = dicomfs("prefetch", url, study, series, "--cache-dir", str(cache))
    assert again.returncode == 0, again.stderr
    requests = server.requests_since(mark)
    assert sorted(instance_requests(requests)) == sorted(deleted)
    assert series_requests(requests) == []
    assert requests == [r for r in requests if INSTANCE_RETRIEVE.fullmatch(r)], requests
    for entry in files:
        cached = objects / study / series / f"{entry.sop_uid}.dcm"
        assert cached.read_bytes() == archive.read(entry)

    server.stop()
    offline = mount_factory(url, cache_dir=cache)
    check_files(offline.path, archive, files)
    assert (offline.path / "studies" / study / series / "metadata.json").read_bytes() == \
        (objects / study / series / "metadata.json").read_bytes()


# --------------------------------------------------------------------------- 8. staleness


def test_metadata_of_a_growing_study_is_refetched(mount_factory, orthanc_factory,
                                                  archive: SampleArchive) -> None:
    files = archive.series_files(archive.series_uid("mr"))
    half = len(files) // 2
    server = orthanc_factory()
    server.upload([archive.path(f) for f in files[:half]],
                  sop_uids=[f.sop_uid for f in files[:half]])
    mount = mount_factory(server.dicomweb_url, args=["--listing-ttl", "1"])
    study = mount.path / "studies" / archive.study_uid("mr")
    series = study / archive.series_uid("mr")
    assert os.listdir(mount.path / "studies") == [archive.study_uid("mr")]
    assert count_instances((study / "metadata.json").read_bytes()) == half
    assert count_instances((series / "metadata.json").read_bytes()) == half

    server.upload([archive.path(f) for f in files[half:]],
                  sop_uids=[f.sop_uid for f in files[half:]])
    time.sleep(1.2)  # past the listing TTL
    assert os.listdir(mount.path / "studies") == [archive.study_uid("mr")]
    study_count = count_instances((study / "metadata.json").read_bytes())
    # Listing the study and series folders too refreshes every count the tree holds: the
    # series metadata is then known stale and fetched again (the log says so).
    assert archive.series_uid("mr") in os.listdir(study)
    assert len(os.listdir(series)) == len(files) + 1
    series_count = count_instances((series / "metadata.json").read_bytes())
    refetched = [line for line in mount.log().splitlines() if "is stale" in line]
    assert any(archive.series_uid("mr") in line for line in refetched), refetched
    assert (study_count, series_count) == (len(files), len(files))


# --------------------------------------------------------------------------- 9. promises


def test_cache_clear_of_one_server_keeps_the_others(orthanc: LocalOrthanc, archive: SampleArchive,
                                                    tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    small = archive.with_label("pydicom/MR_small.dcm")[0]
    with Proxy(orthanc.url, lambda request: Forward()) as proxy:  # another server's URL
        urls = [orthanc.dicomweb_url, proxy.url("/dicom-web")]
        for url in urls:
            done = dicomfs("prefetch", url, small.study_uid, "--cache-dir", str(cache))
            assert done.returncode == 0, done.stderr
    assert all(server_folder(cache, url).is_dir() for url in urls)
    cleared = dicomfs("cache", "clear", urls[0], "--cache-dir", str(cache))
    assert cleared.returncode == 0, cleared.stderr
    assert "removed 1 server cache" in cleared.stdout
    assert not server_folder(cache, urls[0]).exists()
    kept = server_folder(cache, urls[1]) / "objects" / small.study_uid / small.series_uid
    assert (kept / f"{small.sop_uid}.dcm").read_bytes() == archive.read(small)


def test_a_cache_folder_of_another_user_is_refused(orthanc: LocalOrthanc, tmp_path: Path
                                                   ) -> None:
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o700)
    os.chown(cache, 65534, 65534)  # nobody's (the tests run as root)
    point = tmp_path / "mnt"
    point.mkdir()
    mounted = dicomfs("mount", orthanc.dicomweb_url, str(point), "--cache-dir", str(cache),
                      "--foreground")
    assert mounted.returncode == 1
    assert "belongs to another user" in mounted.stderr, mounted.stderr
    assert not is_mounted(point)
    fetched = dicomfs("prefetch", orthanc.dicomweb_url, "1.2.3", "--cache-dir", str(cache))
    assert fetched.returncode == 1
    assert "belongs to another user" in fetched.stderr, fetched.stderr
    assert os.listdir(cache) == []


def test_logs_listings_and_server_record_are_0600(orthanc: LocalOrthanc, archive: SampleArchive,
                                                  tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    point = tmp_path / "mnt"
    point.mkdir()
    log_file = tmp_path / "own.log"
    for args in ([], ["--log-file", str(log_file)]):
        started = dicomfs("mount", orthanc.dicomweb_url, str(point), "--cache-dir", str(cache),
                          *args)
        try:
            assert started.returncode == 0, started.stderr
            assert os.listdir(series_folder(point, archive, "mr"))
        finally:
            assert dicomfs("unmount", str(point)).returncode == 0
    server = server_folder(cache, orthanc.dicomweb_url)
    files = [server / "mount.log", server / "server.json", log_file,
             *(server / "listings").rglob("*")]
    assert len(files) > 4, files  # some listings were saved
    modes = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files if f.is_file()}
    assert set(modes.values()) == {"0o600"}, modes


def test_the_cache_keeps_a_tenth_of_a_small_disk_free(tmp_path: Path) -> None:
    """The disk reserve is 1 GiB or a tenth of the cache's filesystem, whichever is
    smaller (1 GiB would leave no room at all on a small one). On a 40 MiB filesystem,
    3 MiB entries evict older ones once less than 4 MiB would be left, well under the
    cache's own bound."""
    from dicomfs.store import Store

    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={40 * MiB}", "tmpfs", str(disk)],
                   check=True)
    try:
        store = Store(disk / "server")  # the default bound, 10 GiB, is not what limits it
        assert store.reserve_bytes == 4 * MiB
        keys = [Key("1.2", "1.3", f"1.4.{n}", "dcm") for n in range(14)]
        for key in keys:
            store.put_bytes(key, b"x" * 3 * MiB)
        assert shutil.disk_usage(disk).free >= 4 * MiB
        kept = [key for key in keys if store.size(key)]
        assert keys[-1] in kept and keys[0] not in kept, kept
        assert kept == keys[len(keys) - len(kept):], kept  # the newest, in order
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_interrupted_prefetch_resumes(orthanc_factory, archive: SampleArchive, tmp_path: Path
                                         ) -> None:
    """Ctrl-C in the middle of a prefetch, then the same command: it completes, and no
    instance cached by the first run is asked for again."""
    files = archive.series_files(archive.series_uid("ct"))[:120]
    server = orthanc_factory()
    server.upload([archive.path(f) for f in files], sop_uids=[f.sop_uid for f in files])
    url = server.dicomweb_url
    cache = tmp_path / "cache"
    study, series = files[0].study_uid, files[0].series_uid
    folder = server_folder(cache, url) / "objects" / study / series
    command = [*DICOMFS, "prefetch", url, study, series, "--cache-dir", str(cache),
               "--max-connections", "1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert wait_until(lambda: first.poll() is not None or (
        folder.is_dir() and len(list(folder.glob("*.dcm"))) >= 10), 60)
    first.send_signal(signal.SIGINT)
    _out, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert "run the same command again to resume" in err
    cached = {p.stem for p in folder.glob("*.dcm")}
    assert 0 < len(cached) < len(files)
    mark = server.mark()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    asked = instance_requests(server.requests_since(mark))
    assert not set(asked) & cached, "cached instances were fetched again"
    for entry in files:
        assert (folder / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
