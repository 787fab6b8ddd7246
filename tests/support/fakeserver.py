"""A scripted DICOMweb server on 127.0.0.1 for unit tests, and the bodies it answers.

:class:`FakeServer` writes raw bytes (a :class:`Reply`) for each request it receives (a
:class:`Seen`), so that bodies can be cut, lengths can lie and connections can be reset.
:func:`serving` runs it in a thread; :func:`one_series_app` and :func:`qido_pager` script it
as a server of one series or as a QIDO server with one of the paging habits real servers
have.
"""

from __future__ import annotations

import contextlib
import http
import json
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicomfs import dicomjson
from dicomfs.client import ClientConfig, DicomwebClient
from tests.support.sample import demo_uid


@dataclass
class Seen:
    """One request the fake server received."""

    method: str
    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""  # of a request with a Content-Length (a STOW-RS POST)

    def param(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[0] if values else None


@dataclass
class Reply:
    """What the fake server writes back, byte for byte."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""
    length: int | str | None = "auto"  # Content-Length: "auto", a number (may lie), None
    cut: int | None = None  # send only this many body bytes
    reset: bool = False  # then abort the connection (RST) instead of closing it


App = Callable[[Seen], Reply]


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(65537)
        if not line.strip():
            return
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            raw = self.rfile.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        url = urllib.parse.urlsplit(target)
        body = self.rfile.read(int(headers.get("content-length", "0")))
        seen = Seen(method, url.path, urllib.parse.parse_qs(url.query, keep_blank_values=True),
                    headers, body)
        with self.server.lock:
            self.server.seen.append(seen)
        reply = self.server.app(seen)
        try:
            reason = http.HTTPStatus(reply.status).phrase
        except ValueError:
            reason = "Whatever"
        lines = [f"HTTP/1.1 {reply.status} {reason}"]
        lines += [f"{name}: {value}" for name, value in reply.headers]
        if reply.length == "auto":
            lines.append(f"Content-Length: {len(reply.body)}")
        elif reply.length is not None:
            lines.append(f"Content-Length: {reply.length}")
        lines.append("Connection: close")
        body = reply.body if reply.cut is None else reply.body[: reply.cut]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.wfile.flush()
        if reply.reset:
            time.sleep(0.05)  # let the client start reading the body before the RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64  # the default 5 drops SYNs of parallel clients (1 s retransmit)

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.app: App = lambda seen: Reply(500, body=b"no app")


@dataclass
class FakeServer:
    """A scripted DICOMweb server: set ``app``, read ``seen``."""

    server: _Server = field(default_factory=_Server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    @property
    def seen(self) -> list[Seen]:
        with self.server.lock:
            return list(self.server.seen)

    @property
    def app(self) -> App:
        return self.server.app

    @app.setter
    def app(self, app: App) -> None:
        self.server.app = app

    def replies(self, *replies: Reply) -> None:
        """Answer the n-th request with the n-th reply (the last one repeats)."""
        script = list(replies)

        def app(seen: Seen) -> Reply:
            return script.pop(0) if len(script) > 1 else script[0]

        self.app = app

    def client(self, **options: Any) -> DicomwebClient:
        options.setdefault("retries", 0)
        return DicomwebClient(ClientConfig(base_url=self.url, **options))



DICOM_JSON = [("Content-Type", "application/dicom+json")]
BOUNDARY = "dicomfs-test-boundary-42"
MULTIPART_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
STUDY, SERIES, INSTANCE = "1.2.3", "1.2.3.4", "1.2.3.4.5"
PAYLOAD_A = bytes(range(256)) * 80  # 20480 bytes, holds CR, LF and dashes
PAYLOAD_B = b"DICM" + bytes(reversed(range(256))) * 50


def study_item(uid: str) -> dict[str, Any]:
    return {"0020000D": {"vr": "UI", "Value": [uid]}}


def json_reply(items: Any, **kwargs: Any) -> Reply:
    return Reply(200, [*DICOM_JSON, *kwargs.pop("headers", [])],
                 json.dumps(items).encode(), **kwargs)


def multipart_body(parts: Sequence[bytes], *, lengths: bool = True) -> bytes:
    out = b""
    for part in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n".encode()
        if lengths:
            out += f"Content-Length: {len(part)}\r\n".encode()
        out += b"\r\n" + part + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def qido_pager(items: list[dict[str, Any]], *, cap: int | None = None,
               warn: str | None = None, warn_always: bool = False,
               ignore_offset: bool = False, ignore_limit: bool = False) -> App:
    """A QIDO server over ``items`` with one of the paging habits real servers have."""

    def app(seen: Seen) -> Reply:
        limit = int(seen.param("limit") or len(items))
        offset = 0 if ignore_offset else int(seen.param("offset") or 0)
        size = len(items) if ignore_limit else limit
        capped = cap is not None and size > cap
        if cap is not None:
            size = min(size, cap)
        headers = [("Warning", warn)] if warn and (capped or warn_always) else []
        return json_reply(items[offset: offset + size], headers=headers)

    return app


WARNING_299 = ('299 example.org "The number of results exceeded the maximum supported by '
               'the server. Additional results can be requested."')


@contextlib.contextmanager
def serving(server: FakeServer | None = None) -> Iterator[FakeServer]:
    """Run a scripted FakeServer in a thread for the block's duration."""
    server = server or FakeServer()
    thread = threading.Thread(target=server.server.serve_forever,
                              kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        thread.join(5)


def element(tag: str, value: Any, vr: str = "UI") -> dict[str, Any]:
    """One DICOM JSON attribute with a single value."""
    return {tag: {"vr": vr, "Value": [value]}}


def one_series_app(study: str, series: str, instances: Sequence[str] | bytes,
                   retrieve: Callable[[str], Reply | None] = lambda path: None) -> App:
    """A FakeServer app holding one study with one series.

    QIDO lists ``study``, its ``series`` and the series' ``instances`` (SOP Instance UIDs,
    or the JSON body to answer as it is). Any other path, ``/dicom-web`` taken off, is
    ``retrieve``'s to answer; where it gives None, the answer is 404.
    """
    json_type = [("Content-Type", "application/dicom+json")]
    listing = instances if isinstance(instances, bytes) else json.dumps(
        [element(dicomjson.SOP_UID, sop) for sop in instances]).encode()

    def app(seen: Seen) -> Reply:
        path = seen.path.removeprefix("/dicom-web")
        if path == "/studies":
            return Reply(200, json_type, json.dumps([element(dicomjson.STUDY_UID, study)])
                         .encode())
        if path == f"/studies/{study}/series":
            return Reply(200, json_type, json.dumps([element(dicomjson.SERIES_UID, series)])
                         .encode())
        if path == f"/studies/{study}/series/{series}/instances":
            return Reply(200, json_type, listing)
        reply = retrieve(path)
        return Reply(404) if reply is None else reply

    return app


def stow_refusing(status: int, reason_code: int) -> tuple[FakeServer, list[Seen]]:
    """A fake server with no studies that refuses every STOW-RS request."""
    posts: list[Seen] = []

    def app(seen: Seen) -> Reply:
        if seen.method == "POST":
            posts.append(seen)
            sop = demo_uid("upload/conflict/1/1")
            failed = {"00081198": {"vr": "SQ", "Value": [{
                "00081155": {"vr": "UI", "Value": [sop]},
                "00081197": {"vr": "US", "Value": [reason_code]}}]}}
            return Reply(status, DICOM_JSON, json.dumps(failed).encode())
        return Reply(200, DICOM_JSON, b"[]")

    fake = FakeServer()
    fake.app = app
    return fake, posts
