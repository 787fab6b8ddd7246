"""HTTPS and mutual TLS in front of a real Orthanc: mounts and prefetch read every file
through it, a missing client certificate and untrusted certificates fail clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dicomfs.store import server_folder_name
from tests.support import LocalOrthanc, SampleArchive
from tests.support.mounts import force_unmount
from tests.support.tls import Pair, Pki, TlsProxy

if TYPE_CHECKING:
    from tests.support.harness import MountFactory


PYTHON = sys.executable


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA with good and bad server certificates and a client certificate."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def https_orthanc(orthanc: LocalOrthanc, tmp_path: Path) -> Iterator[Any]:
    """``https_orthanc(server_pair, client_ca=None)``: nginx with that certificate in front
    of the session Orthanc (demanding a client certificate signed by ``client_ca``)."""
    proxies: list[TlsProxy] = []

    def start(server: Pair, client_ca: Path | None = None) -> TlsProxy:
        proxy = TlsProxy(tmp_path / f"nginx{len(proxies)}", orthanc.url, server,
                         client_ca=client_ca)
        proxies.append(proxy)
        return proxy.start()

    yield start
    for proxy in proxies:
        proxy.stop()


def _combined_pem(pki: Pki, folder: Path) -> Path:
    """The client certificate with its key in one file (what --client-cert also takes)."""
    combined = folder / "client-combined.pem"
    combined.write_bytes(pki.client.cert.read_bytes() + pki.client.key.read_bytes())
    return combined


@pytest.mark.parametrize("mutual", [False, True], ids=["server-tls", "mutual-tls"])
def test_https_mount_reads_every_file(pki: Pki, https_orthanc: Any, archive: SampleArchive,
                                      mount_factory: MountFactory, mutual: bool) -> None:
    proxy = https_orthanc(pki.server, pki.ca.cert if mutual else None)
    args = ["--ca-bundle", str(pki.ca.cert)]
    if mutual:
        args += ["--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key)]
    mount = mount_factory(proxy.url("/dicom-web"), args=args)
    files = archive.series_files(archive.series_uid("mr"))
    folder = mount.path / "studies" / archive.study_uid("mr") / archive.series_uid("mr")
    assert sorted(os.listdir(folder)) == sorted([f"{f.sop_uid}.dcm" for f in files]
                                                + ["metadata.json"])
    for entry in files:
        assert (folder / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
    served = {target for _connection, target in proxy.requests()}
    assert any(archive.series_uid("mr") in target for target in served), served


def test_mutual_tls_without_a_client_certificate_fails_clearly(
        pki: Pki, https_orthanc: Any, tmp_path: Path) -> None:
    proxy = https_orthanc(pki.server, pki.ca.cert)
    result = _dicomfs_mount(proxy.url("/dicom-web"), tmp_path, "--ca-bundle", str(pki.ca.cert))
    assert result.returncode != 0
    assert "No required SSL certificate was sent" in result.stderr, result.stderr


def test_https_prefetch_with_a_client_certificate(pki: Pki, https_orthanc: Any,
                                                  archive: SampleArchive, tmp_path: Path) -> None:
    proxy = https_orthanc(pki.server, pki.ca.cert)
    url = proxy.url("/dicom-web")
    study, series = archive.study_uid("mr"), archive.series_uid("mr")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [PYTHON, "-m", "dicomfs", "prefetch", url, study, series, "--cache-dir", str(cache),
         "--ca-bundle", str(pki.ca.cert), "--client-cert", str(_combined_pem(pki, tmp_path))],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder = cache / server_folder_name(url) / "objects" / study / series
    for entry in archive.series_files(series):
        assert (folder / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)


def _dicomfs_mount(url: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dicomfs mount`` in the background form: returns once mounted or failed."""
    mountpoint = folder / "mnt"
    mountpoint.mkdir(exist_ok=True)
    try:
        return subprocess.run([PYTHON, "-m", "dicomfs", "mount", url, str(mountpoint),
                               "--cache-dir", str(folder / "cache"), *args],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    finally:
        assert force_unmount(mountpoint)


BAD_CERTIFICATES = {  # case -> (server certificate, CA the client trusts, reason expected)
    "wrong-ca": ("server", "other_ca", "unable to get local issuer certificate"),
    "expired": ("expired", "ca", "certificate has expired"),
    "wrong-host": ("wrong_host", "ca",
                   "IP address mismatch, certificate is not valid for '127.0.0.1'"),
}


@pytest.mark.parametrize("case", BAD_CERTIFICATES)
def test_untrusted_certificates_fail_mount_and_prefetch_clearly(
        pki: Pki, https_orthanc: Any, archive: SampleArchive, tmp_path: Path, case: str) -> None:
    server, trusted, reason = BAD_CERTIFICATES[case]
    proxy = https_orthanc(getattr(pki, server))
    url = proxy.url("/dicom-web")
    ca = ["--ca-bundle", str(getattr(pki, trusted).cert)]
    message = f"the server's TLS certificate is not trusted: {reason}"
    mounted = _dicomfs_mount(url, tmp_path, *ca)
    assert mounted.returncode == 1
    assert message in mounted.stderr, mounted.stderr
    fetched = subprocess.run([PYTHON, "-m", "dicomfs", "prefetch", url, archive.study_uid("mr"),
                              "--cache-dir", str(tmp_path / "cache"), *ca],
                             capture_output=True, text=True, timeout=60)
    assert fetched.returncode == 1
    assert f"prefetch failed: {message}" in fetched.stderr, fetched.stderr
    assert proxy.requests() == []  # no request ever went out over the untrusted connection
