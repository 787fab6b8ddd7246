"""A private tiny-pacs for tests: a second, independent DICOMweb server next to Orthanc.

Why a second server: Orthanc alone cannot show which behaviour of dicomfs is DICOMweb and
which is Orthanc. tiny-pacs-dicomweb (PyPI, pure Python) is written by other people, offers
no WADO-RS metadata and no ``/rendered``, ignores ``includefield``, rewrites the file meta of
what it stores, and can require a bearer token: it exercises exactly the parts where servers
differ.

Each :class:`LocalTinyPacs` runs ``tiny-pacs run -c CONFIG`` with the shared HTTP server on
``127.0.0.1`` at a port the kernel picks (read back from its log, so there is no race), the
DIMSE listener on a free port (it binds all interfaces and cannot be switched off), its
database in memory and its files in ``storage_dir`` (``TempFileStorage`` with ``TMPDIR``
pointed there; ``InMemoryStorage`` is on by default and must be switched off). Objects are
loaded over STOW-RS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.support.orthanc import LocalServer, free_port

DICOMWEB_ROOT = "/dicom-web"
# What the shared HTTP server logs once it listens (host and port it really bound).
_LISTENING = re.compile(r"Shared HTTP server listening on http://127\.0\.0\.1:(\d+)")
# One line per request, once answered: "DICOMWeb - GET '/studies' -> 200 OK (1.0 ms)", the path
# below the prefix, without the query string.
REQUEST_LINE = re.compile(r"- DICOMWeb +- ([A-Z]+) '(/[^']*)' -> ")
_DIMSE_IN_USE = "Address already in use"
STOW_BATCH = 8  # objects per STOW-RS request


class TinyPacsError(RuntimeError):
    """tiny-pacs is missing, did not start, or refused an object it should store."""


def find_tiny_pacs() -> str | None:
    """The ``tiny-pacs`` program next to this Python, or None when it is not installed."""
    candidate = Path(sys.executable).parent / "tiny-pacs"
    return str(candidate) if os.access(candidate, os.X_OK) else None


class LocalTinyPacs(LocalServer):
    """tiny-pacs + DICOMweb on ``127.0.0.1:<port>``, its files in ``storage_dir``.

    ``tokens`` switches on its bearer-token authentication (``auth: token``); this object's
    own requests then send the first token. The config is ``storage_dir/tiny-pacs.json``,
    the log ``storage_dir/tiny-pacs.log``; it logs each request once answered (paths below
    the DICOMweb root, no query strings), read by :meth:`requests_since`.
    """

    def __init__(self, storage_dir: Path, *, tokens: Sequence[str] = (),
                 startup_timeout: float = 30.0) -> None:
        self.storage_dir = Path(storage_dir).absolute()
        self.config_path = self.storage_dir / "tiny-pacs.json"
        self.log_path = self.storage_dir / "tiny-pacs.log"
        self.request_line = REQUEST_LINE
        self.tokens = list(tokens)
        self.port = 0
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{DICOMWEB_ROOT}"

    @property
    def client(self) -> httpx.Client:
        """An HTTP client on the DICOMweb root (with the first token, if any)."""
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.tokens[0]}"} if self.tokens else {}
            self._client = httpx.Client(base_url=self.dicomweb_url, headers=headers,
                                        timeout=httpx.Timeout(120.0, connect=5.0))
        return self._client

    def __enter__(self) -> LocalTinyPacs:
        return self.start()

    def config(self, dimse_port: int) -> dict[str, Any]:
        web: dict[str, Any] = {"on": True, "prefix": DICOMWEB_ROOT}
        if self.tokens:
            web.update(auth="token", tokens=self.tokens)
        return {
            "ae": {"port": dimse_port, "dump_ds": False},
            "log": {"root": {"level": "INFO", "handlers": ["console"]}},
            "components": {
                "InMemoryStorage": {"on": False},
                "TempFileStorage": {"on": True},
                "HttpServer": {"on": True, "host": "127.0.0.1", "port": 0, "threads": 8},
                "DICOMWeb": web,
            },
        }

    def start(self) -> LocalTinyPacs:
        """Start it and wait until it answers QIDO; a lost race for the DIMSE port is retried."""
        if self.running:
            return self
        program = find_tiny_pacs()
        if program is None:
            raise TinyPacsError("tiny-pacs is not installed: pip install tiny-pacs-dicomweb "
                                "'tiny_pacs[dicomweb]' (the 'test' extra of pyproject.toml)")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                self._launch(program)
                return self
            except TinyPacsError:
                self.stop()
                if attempt == 2 or _DIMSE_IN_USE not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def _launch(self, program: str) -> None:
        self.config_path.write_text(json.dumps(self.config(free_port())), encoding="utf-8")
        files = self.storage_dir / "files"
        files.mkdir(exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [program, "run", "-c", str(self.config_path)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, cwd=self.storage_dir,
                env={**os.environ, "TMPDIR": str(files)}, start_new_session=True)
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TinyPacsError(f"tiny-pacs exited with status {self._proc.returncode} "
                                    f"while starting; log {self.log_path}:\n{self._log_tail()}")
            listening = _LISTENING.search(self._log_tail())
            if listening:
                self.port = int(listening.group(1))
                if self.client.get("/studies", params={"limit": "1"}).status_code in (200, 204,
                                                                                    401):
                    return
            time.sleep(0.05)
        raise TinyPacsError(f"tiny-pacs did not answer within {self._startup_timeout:.0f} s; "
                            f"log {self.log_path}:\n{self._log_tail()}")

    # ------------------------------------------------------------------ content

    def upload(self, paths: Iterable[Path]) -> int:
        """STOW-RS every file (a few per request); returns how many it stored.

        One request at a time: its in-memory database refuses parallel stores ("database
        table is locked"). Raises :class:`TinyPacsError` with its answer when it refuses any.
        """
        files = [Path(p) for p in paths]
        return sum(self._stow(files[i:i + STOW_BATCH]) for i in range(0, len(files), STOW_BATCH))

    def _stow(self, batch: list[Path]) -> int:
        boundary = uuid.uuid4().hex
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                        + path.read_bytes() + b"\r\n" for path in batch)
        body += b"--" + boundary.encode() + b"--\r\n"
        answer = self.client.post("/studies", content=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        if answer.status_code != 200:
            names = ", ".join(path.name for path in batch)
            raise TinyPacsError(f"tiny-pacs refused some of {names}: {answer.status_code} "
                                f"{answer.text[:1000]}")
        return len(batch)

    def instance_file(self, study: str, series: str, sop: str) -> bytes:
        """The instance as this server serves it (single part, as stored): it rewrites the
        file meta on store, so this, not the uploaded file, is what a mount must give."""
        answer = self.client.get(
            f"/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": "application/dicom; transfer-syntax=*"})
        if answer.status_code != 200:
            raise TinyPacsError(f"retrieve of {sop}: {answer.status_code} {answer.text[:500]}")
        return answer.content
