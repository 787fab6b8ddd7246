"""The filesystem as users meet it: a real Orthanc, a real mount, real tools."""

from __future__ import annotations

import concurrent.futures
import datetime
import errno
import json
import mmap
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pydicom
import pytest

from dicomfs import capabilities
from dicomfs.store import server_folder_name
from tests.support import LocalOrthanc, SampleArchive
from tests.support.fakes import Forward, Proxy, Request, Stall
from tests.support.harness import check_listings_equal_qido
from tests.support.mounts import is_mounted
from tests.support.sample import part10_dataset

INSTANCE_REQUEST = "/instances/"  # a WADO-RS instance path, as opposed to a QIDO search


def series_dir(root: Path, archive: SampleArchive, label: str) -> Path:
    return root / "studies" / archive.study_uid(label) / archive.series_uid(label)


def test_listings_equal_qido(mnt, orthanc: LocalOrthanc) -> None:
    check_listings_equal_qido(mnt.path, orthanc.dicomweb_url, metadata=True)
    assert sorted(os.listdir(mnt.path)) == ["dates", "patients", "query", "rendered", "studies"]
    # Orthanc offers both optional resources, and the mount learned so.
    note = mnt.cache_dir / server_folder_name(orthanc.dicomweb_url) / capabilities.FILE_NAME
    assert json.loads(note.read_text()) == {"metadata": True, "rendered": True}


def test_every_instance_is_byte_identical(mnt, archive: SampleArchive,
                                          orthanc: LocalOrthanc) -> None:
    for entry in archive.files:
        path = mnt.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
        assert path.read_bytes() == archive.read(entry), entry.label
    # The archive files are what Orthanc stored: check a few against its own copy too.
    for entry in archive.files[:: max(len(archive.files) // 10, 1)]:
        path = mnt.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
        assert path.read_bytes() == orthanc.instance_file(entry.sop_uid)


def test_stat_then_mmap_gives_whole_files(mnt, archive: SampleArchive) -> None:
    folder = series_dir(mnt.path, archive, "mr")
    for entry in archive.series_files(archive.series_uid("mr")):
        path = folder / f"{entry.sop_uid}.dcm"
        os.stat(path)  # the estimate a listing gives
        with open(path, "rb") as f:
            assert os.fstat(f.fileno()).st_size == entry.size
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
                assert mapped[:] == archive.read(entry)
        assert path.stat().st_size == entry.size  # and now exact for everyone


def test_pages_dropped_after_an_open_without_descriptor(mnt, archive: SampleArchive,
                                                        orthanc: LocalOrthanc) -> None:
    """A second open of a file the kernel holds whole opens nothing on our side; if the
    kernel then drops the pages, its READs must still get the right bytes."""
    entries = archive.series_files(archive.series_uid("mr"))[:3]
    folder = series_dir(mnt.path, archive, "mr")
    for entry in entries:
        (folder / f"{entry.sop_uid}.dcm").read_bytes()  # first open: pushed whole
    mark = orthanc.mark()
    log_mark = len(mnt.log())
    for entry in entries:
        with open(folder / f"{entry.sop_uid}.dcm", "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == archive.read(entry)
            f.seek(entry.size // 2)
            assert f.read(100) == archive.read(entry)[entry.size // 2:][:100]
    assert not [r for r in orthanc.requests_since(mark) if INSTANCE_REQUEST in r]
    # The pages were really gone: the kernel asked the mount (its debug log names each READ).
    reads = [line for line in mnt.log()[log_mark:].splitlines() if " READ " in line]
    for entry in entries:
        assert any(line.endswith(f"/{entry.sop_uid}.dcm") for line in reads), reads


def test_cp_r_of_a_series(mnt, archive: SampleArchive, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(series_dir(mnt.path, archive, "ct")), str(copy)],
                   check=True)
    files = archive.series_files(archive.series_uid("ct"))
    assert len(files) == archive.ct_slices
    for entry in files:
        assert (copy / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
    assert (copy / "metadata.json").stat().st_size > 0


def test_dcmdump_reads_every_file(mnt, archive: SampleArchive) -> None:
    """dcmdump finds and parses every instance: each file, then its SOP Instance UID."""
    result = subprocess.run(["dcmdump", "-q", "+sd", "+r", "+sp", "*.dcm", "+F",
                             "+P", "SOPInstanceUID", str(mnt.path / "studies")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    dumped = re.findall(r"^# dcmdump \(\d+/\d+\): .*/([0-9.]+)\.dcm\n"
                        r"\(0008,0018\) UI \[([0-9.]+)\]", result.stdout, re.MULTILINE)
    assert sorted(dumped) == sorted((sop, sop) for sop in archive.by_sop)


def test_simpleitk_reads_the_ct_volume(mnt, archive: SampleArchive) -> None:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(series_dir(mnt.path, archive, "ct")))
    assert len(names) == archive.ct_slices
    reader.SetFileNames(names)
    image = reader.Execute()
    assert image.GetSize() == (512, 512, archive.ct_slices)


def test_dcm2niix_converts_the_ct_series(mnt, archive: SampleArchive, tmp_path: Path) -> None:
    out = tmp_path / "nifti"
    out.mkdir()
    dcm2niix = Path(sys.executable).parent / "dcm2niix"
    result = subprocess.run([str(dcm2niix), "-z", "n", "-o", str(out),
                             str(series_dir(mnt.path, archive, "ct"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    niftis = list(out.glob("*.nii"))
    assert len(niftis) == 1
    # 512 x 512 x slices of int16, plus the 352-byte header.
    assert niftis[0].stat().st_size >= 512 * 512 * 2 * archive.ct_slices


def test_listing_makes_no_instance_request(mnt, archive: SampleArchive, orthanc: LocalOrthanc
                                           ) -> None:
    mark = orthanc.mark()
    result = subprocess.run(["ls", "-l", str(series_dir(mnt.path, archive, "ct"))],
                            capture_output=True, text=True, check=True)
    assert len(result.stdout.splitlines()) == archive.ct_slices + 2  # total, metadata.json
    requests = orthanc.requests_since(mark)
    assert requests, "the listing should have asked QIDO"
    assert not [r for r in requests if INSTANCE_REQUEST in r and "/instances?" not in r
                and not r.rstrip().endswith("/instances")]
    assert not [r for r in requests if "metadata" in r]


def test_attributes(mnt, archive: SampleArchive, orthanc: LocalOrthanc) -> None:
    study = mnt.path / "studies" / archive.study_uid("ct")
    assert stat.S_IMODE(study.stat().st_mode) == 0o555
    folder = series_dir(mnt.path, archive, "ct")
    first = next(folder.glob("*.dcm"))
    info = first.stat()
    assert stat.S_IMODE(info.st_mode) == 0o444
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert first.stat().st_ino == info.st_ino  # stable within the mount
    # Times are the study's and the series' (no instance creation date in these files).
    ds = pydicom.dcmread(archive.path(archive.with_label("ct")[0]), stop_before_pixels=True)
    assert "InstanceCreationDate" not in ds

    def local(date: str, clock: str) -> float:
        return datetime.datetime.strptime(date + clock[:6], "%Y%m%d%H%M%S").timestamp()

    # The series' date and time as the server tells them (Orthanc keeps those of the first
    # instance it stored, and the generated slices' SeriesTime differ by seconds).
    answer = orthanc.client.get(
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series",
        params=[("SeriesInstanceUID", ds.SeriesInstanceUID), ("includefield", "00080021"),
                ("includefield", "00080031")]).json()[0]
    series_time = local(answer["00080021"]["Value"][0], answer["00080031"]["Value"][0])
    assert study.stat().st_mtime == local(ds.StudyDate, ds.StudyTime)
    assert folder.stat().st_mtime == series_time
    assert info.st_mtime == series_time


def test_uid_and_gid_options(mount_factory) -> None:
    mount = mount_factory(args=["--uid", "1234", "--gid", "4321"])
    info = (mount.path / "studies").stat()
    assert (info.st_uid, info.st_gid) == (1234, 4321)


def test_writes_fail_with_erofs(mnt, archive: SampleArchive) -> None:
    folder = series_dir(mnt.path, archive, "mr")
    existing = next(folder.glob("*.dcm"))
    attempts = [
        lambda: os.open(folder / "new.dcm", os.O_WRONLY | os.O_CREAT),
        lambda: os.open(existing, os.O_RDWR),
        lambda: os.mkdir(folder / "sub"),
        lambda: os.unlink(existing),
        lambda: os.rename(existing, folder / "x.dcm"),
        lambda: os.chmod(existing, 0o644),
        lambda: os.truncate(existing, 0),
        lambda: os.setxattr(existing, "user.x", b"1"),
        lambda: os.symlink("x", folder / "link"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as raised:
            attempt()
        assert raised.value.errno == errno.EROFS


def test_missing_and_junk_names(mnt, orthanc: LocalOrthanc) -> None:
    studies = mnt.path / "studies"
    mark = orthanc.mark()
    for junk in (".Trash", ".Trash-0", ".DS_Store", "desktop.ini", "autorun.inf", "a/../b"):
        assert not os.path.exists(studies / junk)
    assert orthanc.requests_since(mark) == []
    assert not (studies / "1.2.3.4.5.6.7").exists()
    with pytest.raises(FileNotFoundError):
        os.stat(studies / "1.2.3.4.5.6.7")


def test_study_missing_from_the_listing_is_reachable(mount_factory, orthanc_factory,
                                                      archive: SampleArchive) -> None:
    """A study the listing does not show (a server's cap, or newer than the cached
    listing, as here) is still reachable by its UID."""
    server = orthanc_factory()
    first = archive.with_label("mr")[0]
    later = next(f for f in archive.files if f.label.startswith("pydicom/"))
    server.upload([archive.path(first)])
    mount = mount_factory(server.dicomweb_url)
    assert os.listdir(mount.path / "studies") == [first.study_uid]
    server.upload([archive.path(later)])
    assert os.listdir(mount.path / "studies") == [first.study_uid]  # listing TTL: cached
    path = mount.path / "studies" / later.study_uid / later.series_uid / f"{later.sop_uid}.dcm"
    assert path.read_bytes() == archive.read(later)


def test_many_readers_at_once(mnt, archive: SampleArchive) -> None:
    entries = [f for f in archive.files if f.label != "ct"]

    def read(entry) -> bool:  # type: ignore[no-untyped-def]
        path = mnt.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
        return path.read_bytes() == archive.read(entry)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, entries))


def test_metadata_json_is_the_servers_answer(mnt, archive: SampleArchive, orthanc: LocalOrthanc
                                             ) -> None:
    study = archive.study_uid("mr")
    served = (mnt.path / "studies" / study / "metadata.json").read_bytes()
    direct = httpx.get(f"{orthanc.dicomweb_url}/studies/{study}/metadata",
                       headers={"Accept": "application/dicom+json"}).content
    assert served == direct


def test_rendered_mirror(mnt, archive: SampleArchive) -> None:
    entry = archive.series_files(archive.series_uid("mr"))[0]
    folder = mnt.path / "rendered" / entry.study_uid / entry.series_uid
    assert f"{entry.sop_uid}.png" in os.listdir(folder)
    assert (folder / f"{entry.sop_uid}.png").read_bytes().startswith(b"\x89PNG")
    assert (folder / f"{entry.sop_uid}.jpg").read_bytes().startswith(b"\xff\xd8")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=["SIGTERM", "SIGHUP", "Ctrl-C"])
def test_signals_unmount(mount_factory, signum: int) -> None:
    mount = mount_factory()
    os.kill(mount.proc.pid, signum)
    assert mount.proc.wait(10) == 0
    assert not is_mounted(mount.path)


def test_dicomfs_unmount_and_background_mount(orthanc: LocalOrthanc, tmp_path: Path) -> None:
    point = tmp_path / "mnt"
    point.mkdir()
    dicomfs = [sys.executable, "-m", "dicomfs"]
    started = subprocess.run([*dicomfs, "mount", orthanc.dicomweb_url, str(point),
                              "--cache-dir", str(tmp_path / "cache")],
                             capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        assert is_mounted(point)
        assert os.listdir(point / "studies")
    finally:
        stopped = subprocess.run([*dicomfs, "unmount", str(point)], capture_output=True,
                                 text=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not is_mounted(point)


def test_bad_options_fail_clearly(orthanc: LocalOrthanc, tmp_path: Path) -> None:
    dicomfs = [sys.executable, "-m", "dicomfs", "mount"]
    cases = [
        ([orthanc.dicomweb_url, str(tmp_path / "absent")], "is not a folder"),
        (["not-a-url", str(tmp_path)], "not an http(s) URL"),
        ([orthanc.dicomweb_url, str(tmp_path), "--cache-size", "lots"], "not a size"),
        ([orthanc.dicomweb_url, str(tmp_path), "--max-connections", "0"], "must be positive"),
    ]
    for args, message in cases:
        result = subprocess.run([*dicomfs, *args], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_fstab_style_mount(orthanc: LocalOrthanc, tmp_path: Path) -> None:
    """``mount -t fuse 'dicomfs#URL' DIR -o ...``: what an /etc/fstab line runs."""
    point = tmp_path / "mnt"
    point.mkdir()
    program = Path(sys.executable).parent / "dicomfs"
    options = f"cache_dir={tmp_path / 'cache'},listing_ttl=30,allow_other"
    result = subprocess.run(["mount", "-t", "fuse", f"{program}#{orthanc.dicomweb_url}",
                             str(point), "-o", options], capture_output=True, text=True,
                            timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert os.listdir(point / "studies")
        assert (tmp_path / "cache").is_dir()
    finally:
        subprocess.run(["fusermount3", "-u", str(point)], capture_output=True)


def test_cache_folder_is_private(mnt, archive: SampleArchive) -> None:
    entry = archive.with_label("mr")[0]
    assert (series_dir(mnt.path, archive, "mr") / f"{entry.sop_uid}.dcm").read_bytes()
    folders = [Path(folder) for folder, _dirs, _files in os.walk(mnt.cache_dir)]
    server = mnt.cache_dir / server_folder_name(mnt.url)
    assert {mnt.cache_dir, server, server / "objects" / entry.study_uid / entry.series_uid
            } <= set(folders)
    loose = [str(f) for f in folders if stat.S_IMODE(f.stat().st_mode) != 0o700]
    assert loose == []


def test_removing_a_mount_point_copy_leaves_the_server_alone(
        mnt, archive: SampleArchive, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    """rm -r of a copy is harmless, and rm -r of the mount itself is refused; neither
    sends the server anything but GET requests."""
    files = archive.series_files(archive.series_uid("mr"))
    folder = series_dir(mnt.path, archive, "mr")
    mark = orthanc.mark()
    result = subprocess.run(["rm", "-rf", str(folder)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    assert len(list(folder.glob("*.dcm"))) == len(files)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    subprocess.run(["rm", "-r", str(copy)], check=True)
    assert not copy.exists()
    for entry in files:
        assert (folder / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
    requests = orthanc.requests_since(mark)
    assert requests and all(r.startswith("GET ") for r in requests), requests
    assert {f.sop_uid for f in files} <= orthanc.stored_sop_uids()


# --------------------------------------------------------------------------- options in effect


@pytest.mark.parametrize("limit", [1, 3])
def test_max_connections_bounds_parallel_connections(
        mount_factory, orthanc: LocalOrthanc, archive: SampleArchive, limit: int) -> None:
    files = [f for f in archive.files if f.label != "ct"]
    with Proxy(orthanc.url, lambda request: Forward()) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"), args=["--max-connections", str(limit)])
        read_threads(mount.path, archive, files)
        peak = proxy.peak_connections
    assert peak == limit, (peak, limit)  # reached, never passed
    assert {r.method for r in proxy.seen} == {"GET"}  # the promise: nothing but GET


def read_threads(root: Path, archive: SampleArchive, entries: list, workers: int = 8  # type: ignore[type-arg]
                 ) -> None:
    """Read ``entries`` through the mount with ``workers`` threads, all byte-identical."""
    def read(entry) -> bool:  # type: ignore[no-untyped-def]
        path = root / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
        return path.read_bytes() == archive.read(entry)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        assert all(pool.map(read, entries))


def test_qido_and_wado_urls_split_the_requests(mount_factory, orthanc: LocalOrthanc,
                                               archive: SampleArchive) -> None:
    """Searches go to --qido-url, retrieves and metadata to --wado-url; URL itself is not
    used for either (here it does not even answer)."""
    files = archive.series_files(archive.series_uid("mr"))[:3]
    with Proxy(orthanc.url, lambda r: Forward()) as qido_proxy, \
            Proxy(orthanc.url, lambda r: Forward()) as wado_proxy:
        mount = mount_factory("http://127.0.0.1:9/dicom-web", args=[
            "--qido-url", qido_proxy.url("/dicom-web"), "--wado-url", wado_proxy.url("/dicom-web")])
        read_threads(mount.path, archive, files, workers=1)
        folder = series_dir(mount.path, archive, "mr")
        assert (folder / "metadata.json").read_bytes()
        searches = [r.target for r in qido_proxy.seen]
        retrieves = [r.target for r in wado_proxy.seen]
    search = re.compile(r"/dicom-web(/studies(/[0-9.]+/series(/[0-9.]+/instances)?)?)(\?.*)?")
    assert searches and all(search.fullmatch(t) for t in searches), searches
    assert retrieves and not any(search.fullmatch(t) for t in retrieves), retrieves
    assert any(t.endswith("/metadata") for t in retrieves), retrieves


def test_transfer_syntax_option_asks_for_another_encoding(mount_factory,
                                                          archive: SampleArchive) -> None:
    implicit = next(f for f in archive.files if f.transfer_syntax == "1.2.840.10008.1.2")
    explicit = "1.2.840.10008.1.2.1"
    mount = mount_factory(args=["--transfer-syntax", explicit])
    path = (mount.path / "studies" / implicit.study_uid / implicit.series_uid
            / f"{implicit.sop_uid}.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == explicit
    assert ds.SOPInstanceUID == implicit.sop_uid
    stored = pydicom.dcmread(archive.path(implicit))
    assert stored.file_meta.TransferSyntaxUID != explicit
    assert ds.PixelData == stored.PixelData


def test_single_part_option_asks_for_single_part(mount_factory, orthanc: LocalOrthanc,
                                                 archive: SampleArchive) -> None:
    """Orthanc's plugin refuses single-part, so the mount asks again in multipart form:
    the bytes are right, and the first ask was single-part."""
    entry = archive.with_label("mr")[0]
    with Proxy(orthanc.url, lambda r: Forward()) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"), args=["--single-part"])
        path = series_dir(mount.path, archive, "mr") / f"{entry.sop_uid}.dcm"
        assert path.read_bytes() == archive.read(entry)
        asked = [r.headers.get("accept", "") for r in proxy.seen
                 if r.target.endswith(f"/instances/{entry.sop_uid}")]
    assert asked[0].startswith("application/dicom;"), asked


def test_deadline_bounds_a_stalled_read(mount_factory, orthanc: LocalOrthanc,
                                        archive: SampleArchive) -> None:
    """A server that accepts and then says nothing: with --timeout 60 the read would wait a
    minute per try; --deadline 2 makes it an EIO long before (the thread join bound)."""
    entry = archive.with_label("mr")[0]

    def stall_retrieves(request: Request) -> Forward | Stall:
        return Stall(60) if "/series/" in request.target and "instances?" not in \
            request.target and not request.target.endswith("/instances") else Forward()

    with Proxy(orthanc.url, stall_retrieves) as proxy:
        mount = mount_factory(proxy.url("/dicom-web"),
                              args=["--timeout", "60", "--deadline", "2", "--retries", "5"])
        path = series_dir(mount.path, archive, "mr") / f"{entry.sop_uid}.dcm"
        outcome: list[bytes | int] = []
        reader = threading.Thread(target=lambda: outcome.append(read_or_errno(path)),
                                  daemon=True)
        reader.start()
        reader.join(30)
        assert outcome == [errno.EIO]
        assert "no complete answer within 2 s" in mount.log(), mount.log_tail(20)


def read_or_errno(path: Path) -> bytes | int:
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or -1


def test_study_outside_the_query_opens_by_uid(mount_factory, archive: SampleArchive) -> None:
    inside = archive.with_label("ct")[0]
    outside = archive.with_label("mr")[0]
    assert inside.patient_id != outside.patient_id
    mount = mount_factory(args=["--query", f"PatientID={inside.patient_id}"])
    listed = set(os.listdir(mount.path / "studies"))
    assert inside.study_uid in listed and outside.study_uid not in listed
    path = series_dir(mount.path, archive, "mr") / f"{outside.sop_uid}.dcm"
    assert path.read_bytes() == archive.read(outside)


def test_concurrent_opens_of_one_file_make_one_request(mnt, orthanc: LocalOrthanc,
                                                       archive: SampleArchive) -> None:
    entry = archive.with_label("followup-ct")[3]
    path = mnt.path / "studies" / entry.study_uid / entry.series_uid / f"{entry.sop_uid}.dcm"
    mark = orthanc.mark()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(data == archive.read(entry) for data in
                   pool.map(lambda _: path.read_bytes(), range(8)))
    requests = orthanc.requests_since(mark)
    transfers = [r for r in requests if r.endswith(f"/instances/{entry.sop_uid}")
                 or r.endswith(f"/series/{entry.series_uid}")]
    assert len(transfers) == 1, requests


def test_files_over_8_mib_are_read_through_read_requests(mount_factory, orthanc_factory,
                                                         tmp_path: Path) -> None:
    server = orthanc_factory()
    sop = "1.2.826.0.1.3680043.10.4243.1.1.1"
    ds = part10_dataset("1.2.840.10008.5.1.4.1.1.7", sop)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = sop + ".9", sop + ".8"
    ds.PatientID, ds.Modality = "BIG-1", "OT"
    ds.Rows = ds.Columns = 2400
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = os.urandom(2400 * 2400 * 2)
    big = tmp_path / "big.dcm"
    pydicom.dcmwrite(big, ds, enforce_file_format=True)
    assert big.stat().st_size > 8 * 1024 * 1024
    server.upload([big])
    mount = mount_factory(server.dicomweb_url)
    path = mount.path / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{sop}.dcm"
    assert path.read_bytes() == big.read_bytes()
    reads = [line for line in mount.log().splitlines()  # from the transfer, then the cache
             if " READ " in line]
    assert len(reads) >= big.stat().st_size // (1024 * 1024), len(reads)  # 1 MiB at most each
