"""HTTPS in front of a local Orthanc: a private CA made with ``openssl`` and Debian's nginx.

Why nginx: Debian bookworm's Orthanc 1.10.1 with ``"SslEnabled": true`` crashes on its first
TLS handshake, and many hospitals terminate TLS in a reverse proxy in front of their PACS
anyway. :class:`Pki` makes the certificates (a CA, a server certificate for 127.0.0.1, a
client certificate, and the bad ones a client must refuse: another CA, an expired certificate,
one for another host); :class:`TlsProxy` runs nginx on a free loopback port with them, optionally
demanding a client certificate (mutual TLS), and passes every request to the upstream.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.orthanc import free_port, stop_process

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class TlsError(RuntimeError):
    """openssl or nginx is missing, or did not do what was asked."""


def _openssl(*args: str | Path, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise TlsError("openssl is not installed (Debian package 'openssl')")
    result = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise TlsError(f"openssl {' '.join(map(str, args[:2]))} failed: {result.stderr}")


@dataclass(frozen=True)
class Pair:
    """A certificate and its key (PEM files)."""

    cert: Path
    key: Path


class Pki:
    """Certificates in ``folder``, made at once: see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = self._authority("ca")
        self.other_ca = self._authority("other-ca")
        self.server = self._issue("server", "IP:127.0.0.1")
        self.client = self._issue("client", None)
        self.expired = self._issue("expired", "IP:127.0.0.1", days=-1)
        self.wrong_host = self._issue("wrong-host", "DNS:pacs.elsewhere.example,IP:127.0.0.2")

    def _authority(self, name: str) -> Pair:
        pair = Pair(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        _openssl("req", "-x509", *CURVE, "-keyout", pair.key, "-out", pair.cert, "-days", "2",
                 "-subj", f"/CN=dicomfs test {name}", cwd=self.folder)
        return pair

    def _issue(self, name: str, alt_names: str | None, *, days: int = 2) -> Pair:
        """A certificate signed by the CA; ``days=-1`` makes it expired."""
        pair = Pair(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        request = self.folder / f"{name}.csr"
        _openssl("req", *CURVE, "-keyout", pair.key, "-out", request,
                 "-subj", f"/CN=dicomfs test {name}", cwd=self.folder)
        extensions = self.folder / f"{name}.ext"
        extensions.write_text(f"subjectAltName={alt_names}\n" if alt_names else
                              "extendedKeyUsage=clientAuth\n")
        _openssl("x509", "-req", "-in", request, "-CA", self.ca.cert, "-CAkey", self.ca.key,
                 "-CAcreateserial", "-days", str(days), "-extfile", extensions,
                 "-out", pair.cert, cwd=self.folder)
        return pair


class TlsProxy:
    """nginx on ``127.0.0.1:<free port>`` with ``server`` as its certificate, passing every
    request to ``upstream`` (``http://host:port``); ``client_ca`` demands a client
    certificate signed by it. Its access log (``access.log``) names each request with the
    connection it came on. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, folder: Path, upstream: str, server: Pair, *,
                 client_ca: Path | None = None, startup_timeout: float = 10.0) -> None:
        self.folder = folder
        self.upstream = upstream.rstrip("/")
        self.server = server
        self.client_ca = client_ca
        self.startup_timeout = startup_timeout
        self.port = 0
        self.access_log = folder / "access.log"
        self.error_log = folder / "error.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def config(self) -> str:
        folder = self.folder
        client = (f"ssl_client_certificate {self.client_ca}; ssl_verify_client on;"
                  if self.client_ca else "")
        # Workers run as root when we do: they keep their temporary files in our folder.
        user = "user root;" if os.geteuid() == 0 else ""
        temp = " ".join(f"{kind}_temp_path {folder}/temp-{kind};"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""{user}
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 512; }}
http {{
    log_format requests '$connection $request_method $request_uri $status';
    access_log {self.access_log} requests;
    {temp}
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.server.cert};
        ssl_certificate_key {self.server.key};
        {client}
        location / {{
            proxy_pass {self.upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""

    def start(self) -> TlsProxy:
        """Start nginx and wait until it accepts connections; retries on a lost port race."""
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(binary, os.X_OK):
            raise TlsError("nginx is not installed (Debian package 'nginx')")
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            conf = self.folder / "nginx.conf"
            conf.write_text(self.config())
            with open(self.folder / "nginx.out", "wb") as out:
                self._proc = subprocess.Popen(
                    [binary, "-p", str(self.folder), "-e", str(self.error_log), "-c", str(conf)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            if self._wait_ready():
                return self
            self.stop()
            if attempt == 2 or "Address already in use" not in self._errors():
                break
        raise TlsError(f"nginx did not start on port {self.port}:\n{self._errors()}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return True
            time.sleep(0.02)
        return False

    def _errors(self) -> str:
        texts = []
        for name in ("nginx.out", "error.log"):
            with contextlib.suppress(OSError):
                texts.append((self.folder / name).read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, timeout)

    def requests(self) -> list[tuple[int, str]]:
        """(connection number, "METHOD /path?query") of each answered request, in order."""
        with contextlib.suppress(FileNotFoundError):
            lines = self.access_log.read_text().splitlines()
            return [(int(n), f"{method} {target}") for n, method, target, _status in
                    (line.split(" ", 3) for line in lines)]
        return []
