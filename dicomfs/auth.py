"""Credentials: bearer tokens (fixed, from a file, from a command), basic auth, headers.

Cloud DICOM stores hand out tokens that expire within the hour, so a token that
comes from a file or a command is fetched again when the server answers 401 or
when it is older than its lifetime, and the request is sent once more.

Secrets travel between dicomfs processes through a pipe (:func:`send_secrets`,
:func:`receive_secrets`), never through a command line, where any user of the
machine could read them with ``ps``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import trio

log = logging.getLogger(__name__)

TOKEN_COMMAND_TIMEOUT = 60.0


class CredentialError(Exception):
    """A credential could not be obtained: unreadable file, failing command, bad header."""


@dataclass
class Secrets:
    """What must never appear on a command line."""

    bearer_token: str | None = None
    password: str | None = None
    headers: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.bearer_token or self.password or self.headers)


def send_secrets(secrets: Secrets) -> int:
    """A readable pipe end holding ``secrets``, to be inherited by a dicomfs process."""
    read_end, write_end = os.pipe()
    payload = json.dumps(asdict(secrets)).encode()
    if len(payload) > 60_000:  # must fit the pipe buffer: nobody reads until exec
        raise CredentialError("secrets too large to hand over")
    os.write(write_end, payload)
    os.close(write_end)
    os.set_inheritable(read_end, True)
    return read_end


def receive_secrets(fd: int) -> Secrets:
    with os.fdopen(fd, "rb") as pipe:
        return Secrets(**json.loads(pipe.read() or b"{}"))


def parse_header(line: str) -> tuple[str, str]:
    """'Name: value' -> (name, value); CredentialError on anything else."""
    name, sep, value = line.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value:
        raise CredentialError("a header must look like 'Name: value'")
    return name, value.strip()


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise CredentialError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise CredentialError(f"the token file {path} is empty")
    return token


def run_token_command(command: str) -> str:
    """Run ``command`` (split like a shell would, not run by one) and return its output."""
    try:
        done = subprocess.run(shlex.split(command), capture_output=True, text=True,
                              timeout=TOKEN_COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        raise CredentialError(f"the token command failed: {exc}") from None
    token = done.stdout.strip()
    if done.returncode != 0 or not token:
        raise CredentialError(f"the token command exited {done.returncode} "
                              f"without a token: {done.stderr.strip()[:200]}")
    return token


class RefreshingToken(httpx.Auth):
    """Bearer auth whose token is fetched again on 401 and when older than ``lifetime``."""

    def __init__(self, fetch: Callable[[], str], lifetime: float) -> None:
        self._fetch = fetch
        self._lifetime = lifetime
        self._token: str | None = None
        self._fetched = 0.0
        self._lock = trio.Lock()

    async def _current(self, *, stale: str | None = None) -> str:
        """The token; a new one if it is missing, old, or the ``stale`` one just refused."""
        async with self._lock:
            expired = time.monotonic() - self._fetched > self._lifetime
            if self._token is None or expired or self._token == stale:
                self._token = await trio.to_thread.run_sync(self._fetch)
                self._fetched = time.monotonic()
                log.info("obtained a new access token")
            return self._token

    async def async_auth_flow(self, request: httpx.Request
                              ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._current()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            token = await self._current(stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


def build_auth(*, secrets: Secrets, user: str | None, token_file: Path | None,
               token_command: str | None, token_lifetime: float) -> httpx.Auth | None:
    """The one authentication scheme the options ask for (the CLI forbids mixing them)."""
    if token_command:
        return RefreshingToken(lambda: run_token_command(token_command), token_lifetime)
    if token_file:
        read_token_file(token_file)  # fail now, at mount time, if it is unreadable
        return RefreshingToken(lambda: read_token_file(token_file), token_lifetime)
    if secrets.bearer_token:
        token = secrets.bearer_token
        return RefreshingToken(lambda: token, float("inf"))
    if user:
        return httpx.BasicAuth(user, secrets.password or "")
    return None
