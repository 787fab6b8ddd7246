"""Observability: the Prometheus endpoint, ``dicomfs status`` and JSON logs.

The truth the counters are held to: Orthanc's own request log for requests (each one it
logged, by kind from its path), and a counting proxy in front of it for bytes: the proxy
takes the status lines, headers and any chunked framing off what the server sent
(``Counters.body_bytes_down``), which leaves exactly the bodies httpx hands on.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicomfs.metrics import KINDS, request_kind
from tests.support import LocalOrthanc, SampleArchive
from tests.support.fakes import wait_until
from tests.support.harness import REPO_ROOT
from tests.support.netem import LinkProxy
from tests.support.orthanc import free_port

SETTLE = 30.0  # seconds for background requests (read-ahead, listing ahead) to end
DICOMWEB = "/dicom-web"


# --------------------------------------------------------------------------- helpers


def scrape(address: str) -> list[Any]:
    """Every sample the endpoint serves now."""
    answer = httpx.get(address, timeout=10)
    answer.raise_for_status()
    assert answer.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(answer.text) for s in family.samples]


def value(samples: list[Any], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


def by_kind(samples: list[Any]) -> dict[str, int]:
    counts = {kind: int(value(samples, "dicomfs_requests_total", kind=kind)) for kind in KINDS}
    return {kind: count for kind, count in counts.items() if count}


def read_mr_series(root: Path, archive: SampleArchive) -> None:
    """Every file of the 30-slice MR series, checked, and the series' metadata.json."""
    folder = root / "studies" / archive.study_uid("mr") / archive.series_uid("mr")
    files = archive.series_files(archive.series_uid("mr"))
    assert len(files) == 30
    for entry in files:
        assert (folder / f"{entry.sop_uid}.dcm").read_bytes() == archive.read(entry)
    assert json.loads((folder / "metadata.json").read_bytes())


def settled(address: str, orthanc: LocalOrthanc, mark: int, link: LinkProxy
            ) -> tuple[list[Any], list[str]]:
    """The samples and the server's log once every request has ended and been counted.

    Counters only grow, and each request is logged by Orthanc before it is answered and
    its bytes cross the proxy before dicomfs reads them: a counter that counts too few
    never catches up, one that counts too many never comes back down.
    """
    state: dict[str, Any] = {}

    def caught_up() -> bool:
        samples = scrape(address)
        logged = orthanc.requests_since(mark, prefix=DICOMWEB + "/")
        state.update(samples=samples, logged=logged)
        return (value(samples, "dicomfs_requests_total") == len(logged)
                and value(samples, "dicomfs_response_bytes_total")
                == link.counters.body_bytes_down
                and value(samples, "dicomfs_transfers_in_flight") == 0
                and value(samples, "dicomfs_transfers_queued") == 0)

    if not wait_until(caught_up, SETTLE):
        samples, logged = state["samples"], state["logged"]
        assert value(samples, "dicomfs_requests_total") == len(logged), logged
        assert value(samples, "dicomfs_response_bytes_total") == link.counters.body_bytes_down
    return state["samples"], state["logged"]


def dicomfs_status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomfs", "status", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


# --------------------------------------------------------------------------- end to end


def test_counters_equal_what_the_server_logged_and_sent(
        orthanc: LocalOrthanc, archive: SampleArchive, link_factory, mount_factory,
        tmp_path: Path) -> None:
    link = link_factory(orthanc.dicomweb_url)  # no delay, no cap: it only counts
    cache = tmp_path / "cache"
    address = f"http://127.0.0.1:{free_port()}/metrics"
    mark = orthanc.mark()
    mnt = mount_factory(link.url(), cache_dir=cache,
                        args=["--metrics-address", address.split("/")[2]])
    read_mr_series(mnt.path, archive)
    # One failure the user sees: Orthanc renders no JPEG 2000 (400), so the open fails.
    j2k = next(f for f in archive.files if f.label == "pydicom/JPEG2000.dcm")
    with pytest.raises(OSError):
        (mnt.path / "rendered" / j2k.study_uid / j2k.series_uid / f"{j2k.sop_uid}.png"
         ).read_bytes()

    samples, logged = settled(address, orthanc, mark, link)
    assert by_kind(samples) == dict(collections.Counter(
        request_kind(line.split(" ", 1)[1]) for line in logged))
    assert value(samples, "dicomfs_requests_total", kind="rendered", status="400") >= 1
    assert value(samples, "dicomfs_response_bytes_total") > sum(
        f.size for f in archive.series_files(archive.series_uid("mr")))
    # Every open of the series went through the cache, as a miss or a read-ahead hit.
    assert value(samples, "dicomfs_cache_hits_total", kind="instance") + value(
        samples, "dicomfs_cache_misses_total", kind="instance") == 30
    assert value(samples, "dicomfs_cache_misses_total", kind="metadata") == 1
    assert value(samples, "dicomfs_cache_misses_total", kind="rendered") == 1
    assert value(samples, "dicomfs_cache_bytes") >= sum(
        f.size for f in archive.series_files(archive.series_uid("mr")))
    assert value(samples, "dicomfs_fuse_operations_total", op="open") >= 32
    assert value(samples, "dicomfs_fuse_operations_total", op="lookup") >= 32
    assert value(samples, "dicomfs_fuse_errors_total", op="open", errno="EIO") == 1
    assert value(samples, "dicomfs_request_duration_seconds_count") == len(logged)

    # dicomfs status, as a person and a script see it (the file is at most a second old).
    mountpoint = str(mnt.path.resolve())
    shown: dict[str, Any] = {}

    def status_caught_up() -> bool:
        result = dicomfs_status("--cache-dir", str(cache), "--json")
        assert result.returncode == 0, result.stderr
        mounts = [m for m in json.loads(result.stdout) if m["mountpoint"] == mountpoint]
        shown.update(mounts[0] if mounts else {})
        return bool(mounts) and mounts[0]["requests"] == len(logged)

    assert wait_until(status_caught_up, 10), shown
    assert shown["url"] == link.url()
    assert shown["metrics"] == address
    assert shown["received_bytes"] == link.counters.body_bytes_down
    assert Path(shown["cache_folder"]).parent == cache.resolve()
    assert shown["cache"]["hits"] + shown["cache"]["misses"] == 30 + 1 + 1
    assert shown["transfers"]["in_flight"] == 0
    assert shown["fuse"]["errors"] == 1
    assert any("open" in e["message"] and e["level"] == "ERROR" for e in shown["last_errors"])
    person = dicomfs_status(mountpoint, "--cache-dir", str(cache))
    assert person.returncode == 0, person.stderr
    for expected in (mountpoint, link.url(), "cache hits", f"{len(logged)} (", address):
        assert expected in person.stdout
    elsewhere = dicomfs_status(str(tmp_path), "--cache-dir", str(cache))
    assert elsewhere.returncode == 1

    # A remount on the same cache: every open is a hit, and no instance is asked for.
    mnt.unmount()
    assert not list(cache.glob("*/status-*.json"))  # the mount took its file with it
    link.reset()
    mark = orthanc.mark()
    address = f"http://127.0.0.1:{free_port()}/metrics"
    mnt = mount_factory(link.url(), cache_dir=cache,
                        args=["--metrics-address", address.split("/")[2]])
    read_mr_series(mnt.path, archive)
    samples, logged = settled(address, orthanc, mark, link)
    assert value(samples, "dicomfs_cache_hits_total", kind="instance") == 30
    assert value(samples, "dicomfs_cache_hits_total", kind="metadata") == 1
    assert value(samples, "dicomfs_cache_misses_total") == 0
    assert set(by_kind(samples)) == {"qido"}, logged


def test_metrics_endpoint_answers_only_metrics(mount_factory) -> None:
    address = f"127.0.0.1:{free_port()}"
    mount_factory(args=["--metrics-address", address])
    assert httpx.get(f"http://{address}/other").status_code == 404
    assert httpx.head(f"http://{address}/metrics").status_code == 200
    assert "dicomfs_requests_total" in httpx.get(f"http://{address}/metrics").text


def test_a_taken_metrics_port_fails_the_mount(mount_factory, orthanc: LocalOrthanc,
                                              tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    mount_factory(args=["--metrics-address", address])
    result = subprocess.run(
        [sys.executable, "-m", "dicomfs", "mount", orthanc.dicomweb_url, str(tmp_path),
         "--foreground", "--cache-dir", str(tmp_path / "cache"), "--metrics-address", address],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 1
    assert f"cannot serve metrics at {address}" in result.stderr


def test_json_log_lines_parse_and_name_no_patient(mount_factory, archive: SampleArchive) -> None:
    mnt = mount_factory(args=["--log-format", "json", "--log-level", "info"])
    for patient in os.listdir(mnt.path / "patients"):
        for study in os.listdir(mnt.path / "patients" / patient):
            os.listdir(mnt.path / "patients" / patient / study)
    generated = {pid: name for pid, name in archive.patients.items() if pid.startswith("DFS-0")}
    for pid in generated:
        os.listdir(mnt.path / "query" / f"PatientID={pid}")
    mnt.unmount()
    lines = mnt.log().splitlines()[1:]  # the first line is the command, written by the test
    entries = [json.loads(line) for line in lines]
    assert {"mounted", "unmounted"} <= {e["message"].split()[0] for e in entries}
    for entry in entries:
        assert set(entry) >= {"time", "level", "logger", "message"}
    text = "\n".join(lines)
    for pid, name in generated.items():
        assert pid not in text
        assert not name or name.split("^")[0] not in text
