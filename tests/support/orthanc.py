"""A private Orthanc for tests, the demo and benchmarks.

Why a private one: the Debian package's own service (port 8042/4242, /var/lib/orthanc) may be
absent, stopped or full of other data, and there is no systemd here. Each :class:`LocalOrthanc`
runs ``Orthanc`` on a free loopback port with its own config, storage and log, and with the
DICOMweb plugin at ``/dicom-web/``.

Request log: Orthanc runs with ``--verbose-http``, which makes its HTTP server log one line per
request *before* handling it, e.g.::

    I1125 00:56:59.749970 HttpServer.cpp:1244] (http) GET /dicom-web/studies

:meth:`LocalOrthanc.mark` and :meth:`LocalOrthanc.requests_since` turn that into "which requests
did the server serve since this point" (``["GET /dicom-web/studies", ...]``). Limitations:

* the query string is not logged (``GET /dicom-web/studies?limit=10`` appears as
  ``GET /dicom-web/studies``), nor the status or the headers (``trace_http=True`` adds the
  headers as separate lines, which are not parsed);
* requests refused for bad or missing credentials (401) are not logged at all;
* the line is written when Orthanc starts a request, so once a client has its answer the line
  is in the log; a request still in flight may or may not be listed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.support.sample import SampleArchive

DEFAULT_BINARY = "/usr/sbin/Orthanc"
DEFAULT_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web"

REQUEST_LINE = re.compile(r"\] \(http\) ([A-Z]+) (/\S*)\s*$")


class OrthancError(RuntimeError):
    """Orthanc is missing, did not start, or refused something it should accept."""


@dataclass(frozen=True)
class UploadReport:
    """What :meth:`LocalOrthanc.upload` did, for logs and timings."""

    uploaded: int  # files sent and stored
    already_stored: int  # files sent that Orthanc already had
    skipped: int  # files not sent because their SOPInstanceUID was already stored
    bytes_sent: int
    seconds: float


def find_orthanc() -> str | None:
    """Path of the Orthanc binary, or None when it is not installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return DEFAULT_BINARY if os.access(DEFAULT_BINARY, os.X_OK) else None


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always waits, so files and ports are free."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LocalServer:
    """What the private test servers share: a process, an HTTP client, and a log that tells
    which requests it served since some point: lines of ``log_path`` that ``request_line``
    matches, with the method and the path as groups 1 and 2."""

    log_path: Path
    request_line: re.Pattern[str]
    _proc: subprocess.Popen[bytes] | None = None
    _client: httpx.Client | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; always waits, so storage and ports are
        free when it returns."""
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def mark(self) -> int:
        """A point in the request log; pass it to :meth:`requests_since`."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests_since(self, mark: int, *, prefix: str = "") -> list[str]:
        """``"METHOD /path"`` of every request the server logged after ``mark``, oldest first.

        ``prefix`` keeps only paths starting with it (e.g. ``"/dicom-web/"``). No query
        strings; see the module docstring for what is not logged.
        """
        with open(self.log_path, "rb") as fh:
            fh.seek(mark)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1].decode("utf-8", errors="replace")
        out = []
        for line in complete.splitlines():
            match = self.request_line.search(line)
            if match and match.group(2).startswith(prefix):
                out.append(f"{match.group(1)} {match.group(2)}")
        return out


class LocalOrthanc(LocalServer):
    """Orthanc + DICOMweb on ``127.0.0.1:<free port>`` with storage in ``storage_dir``.

    ``users`` turns HTTP basic authentication on (``RegisteredUsers``); this object's own
    requests then use the first user. ``config`` entries override the generated configuration.
    The config is written to ``storage_dir/orthanc.json`` and the log to ``log_path`` (default
    ``storage_dir/orthanc.log``, truncated at each start).
    """

    def __init__(
        self,
        storage_dir: Path,
        *,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        log_path: Path | None = None,
        binary: str | None = None,
        plugin: str = DEFAULT_PLUGIN,
        trace_http: bool = False,
        startup_timeout: float = 30.0,
    ) -> None:
        self.storage_dir = Path(storage_dir).absolute()
        self.log_path = Path(log_path).absolute() if log_path else self.storage_dir / "orthanc.log"
        self.request_line = REQUEST_LINE
        self.config_path = self.storage_dir / "orthanc.json"
        self.users = dict(users or {})
        self.port = port or 0
        self._fixed_port = port is not None
        self._config_overrides = dict(config or {})
        self._binary = binary
        self._plugin = plugin
        self._trace_http = trace_http
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """REST root, e.g. ``http://127.0.0.1:41234``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root, e.g. ``http://127.0.0.1:41234/dicom-web``."""
        return self.url + DICOMWEB_ROOT

    @property
    def auth(self) -> tuple[str, str] | None:
        """Credentials of the first registered user, or None without authentication."""
        return next(iter(self.users.items()), None)

    @property
    def client(self) -> httpx.Client:
        """An HTTP client on the REST root (authenticated when users are configured)."""
        if self._client is None:
            self._client = httpx.Client(
                base_url=self.url, auth=self.auth, timeout=httpx.Timeout(120.0, connect=5.0)
            )
        return self._client

    # ------------------------------------------------------------------ life cycle

    def __enter__(self) -> LocalOrthanc:
        self.start()
        return self

    def config(self) -> dict[str, Any]:
        """The configuration this instance runs with (see the class docstring)."""
        storage = str(self.storage_dir)
        cfg: dict[str, Any] = {
            "Name": "dicomfs-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "HttpCompressionEnabled": False,
            "HttpDescribeErrors": True,
            "KeepAlive": True,
            # The DICOM (DIMSE) server is off; the port is still set away from 4242 so that
            # nothing can clash with the system's Orthanc if a later version ignores the flag.
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "DefaultEncoding": "Utf8",
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "Plugins": [self._plugin],
            "DicomWeb": {
                "Enable": True,
                "Root": DICOMWEB_ROOT + "/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "SaveJobs": False,
            "ExecuteLuaEnabled": False,
            "LuaScripts": [],
            "OverwriteInstances": False,
            "StableAge": 3600,  # no "stable" events while tests run
        }
        cfg.update(self._config_overrides)
        return cfg

    def start(self) -> LocalOrthanc:
        """Start Orthanc and wait until its REST API answers; retries on a lost port race."""
        if self.running:
            return self
        binary = self._binary or find_orthanc()
        if not binary:
            raise OrthancError(
                "Orthanc is not installed (no 'Orthanc' on PATH nor /usr/sbin/Orthanc); "
                "install the Debian packages 'orthanc orthanc-dicomweb' (scripts/test does)"
            )
        if not Path(self._plugin).is_file():
            raise OrthancError(
                f"DICOMweb plugin {self._plugin} is missing; install 'orthanc-dicomweb'"
            )
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = free_port()
            try:
                self._launch(binary)
                return self
            except OrthancError:
                self.stop()
                if attempt == attempts - 1 or "already in use" not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def _launch(self, binary: str) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        flag = "--trace-http" if self._trace_http else "--verbose-http"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [binary, flag, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal is for the demo, not for Orthanc
            )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with status {self._proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/system", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.05)
        raise OrthancError(
            f"Orthanc did not answer on {self.url} within {self._startup_timeout:.0f} s; "
            f"log {self.log_path}:\n{self._log_tail()}"
        )

    # ------------------------------------------------------------------ content

    def statistics(self) -> dict[str, Any]:
        """Orthanc's ``/statistics`` (CountPatients, CountStudies, CountInstances, ...)."""
        return self._json("GET", "/statistics")

    def stored_sop_uids(self) -> set[str]:
        """SOPInstanceUIDs of every stored instance (one request)."""
        found = self._json(
            "POST", "/tools/find", json={"Level": "Instance", "Query": {}, "Expand": True}
        )
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}

    def orthanc_id(self, sop_uid: str) -> str:
        """Orthanc's identifier of the instance with this SOPInstanceUID (KeyError if none)."""
        for item in self._json("POST", "/tools/lookup", content=sop_uid.encode()):
            if item.get("Type") == "Instance":
                return str(item["ID"])
        raise KeyError(f"no instance {sop_uid} in Orthanc")

    def instance_file(self, sop_uid: str) -> bytes:
        """The file Orthanc stored for this instance, as stored (for byte-identity tests)."""
        answer = self.client.get(f"/instances/{self.orthanc_id(sop_uid)}/file")
        self._check(answer)
        return answer.content

    def upload(
        self,
        paths: Iterable[Path],
        *,
        sop_uids: Sequence[str] | None = None,
        workers: int = 4,
    ) -> UploadReport:
        """POST each file to ``/instances``; files whose SOPInstanceUID is stored are skipped.

        ``sop_uids`` (parallel to ``paths``) saves reading each file's header to learn it.
        Raises :class:`OrthancError` naming the file when Orthanc refuses one.
        """
        started = time.monotonic()
        files = [Path(p) for p in paths]
        uids = list(sop_uids) if sop_uids is not None else [_sop_uid_of(p) for p in files]
        if len(uids) != len(files):
            raise ValueError("sop_uids must be parallel to paths")
        stored = self.stored_sop_uids()
        todo = [p for p, uid in zip(files, uids, strict=True) if uid not in stored]

        def send(path: Path) -> tuple[str, int]:
            data = path.read_bytes()
            answer = self.client.post(
                "/instances", content=data, headers={"Content-Type": "application/dicom"}
            )
            if answer.status_code != 200:
                raise OrthancError(f"Orthanc refused {path}: {answer.status_code} {answer.text}")
            status = answer.json().get("Status")
            if status not in ("Success", "AlreadyStored"):
                raise OrthancError(f"Orthanc refused {path}: {answer.text}")
            return status, len(data)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(send, todo))
        return UploadReport(
            uploaded=sum(1 for status, _ in results if status == "Success"),
            already_stored=sum(1 for status, _ in results if status == "AlreadyStored"),
            skipped=len(files) - len(todo),
            bytes_sent=sum(size for _, size in results),
            seconds=time.monotonic() - started,
        )

    def load_archive(self, archive: SampleArchive) -> UploadReport:
        """Upload a whole sample archive and check that every instance is then stored."""
        report = self.upload(
            [archive.path(f) for f in archive.files], sop_uids=[f.sop_uid for f in archive.files]
        )
        missing = set(archive.by_sop) - self.stored_sop_uids()
        if missing:
            raise OrthancError(f"{len(missing)} archive instances missing after upload")
        return report

    # ------------------------------------------------------------------ helpers

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.client.request(method, path, **kwargs)
        self._check(answer)
        return answer.json()

    @staticmethod
    def _check(answer: httpx.Response) -> None:
        if answer.status_code >= 400:
            raise OrthancError(
                f"{answer.request.method} {answer.request.url.path}: "
                f"{answer.status_code} {answer.text[:500]}"
            )


def _sop_uid_of(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)
