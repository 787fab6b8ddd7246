"""Fixtures both suites (tests/unit, tests/e2e) use.

* ``archive`` (session): the sample archive (:func:`tests.support.build_archive`, 400 CT
  slices), cached across sessions in ``<repo>/.cache/testdata`` (``DICOMFS_TESTDATA`` moves it).
* ``link_factory`` (function): ``link_factory(url, delay=0.020, rate=25e6)`` starts a
  :class:`~tests.support.netem.LinkProxy` (an emulated network link) in front of ``url``;
  mount ``link.url()`` and read ``link.counters``. Every link is stopped after the test.

Servers and FUSE mounts are in tests/e2e/conftest.py; the scripted fake
server of the unit tests is in tests/unit/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import SampleArchive, build_archive
from tests.support.harness import TESTDATA_DIR, LinkFactory
from tests.support.netem import LinkProxy

CT_SLICES = 400


@pytest.fixture(scope="session")
def archive() -> SampleArchive:
    """The sample archive, built once and reused by later sessions."""
    return build_archive(TESTDATA_DIR, ct_slices=CT_SLICES)


@pytest.fixture
def link_factory() -> Iterator[LinkFactory]:
    """Start link-emulating proxies (one-way ``delay`` in seconds, ``rate`` in bytes/s per
    connection, None for no cap) in front of a URL or ``host:port``; all stopped after the
    test."""
    links: list[LinkProxy] = []

    def factory(target: str, *, delay: float = 0.0, rate: float | None = None) -> LinkProxy:
        link = LinkProxy(target, delay=delay, rate=rate).start()
        links.append(link)
        return link

    yield factory
    for link in links:
        link.stop()
