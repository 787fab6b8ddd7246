"""Fixtures of the unit tests (no FUSE, no server): the scripted fake DICOMweb server."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.support.fakeserver import FakeServer


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    thread.join(5)
