"""Which optional DICOMweb resources a server offers: WADO-RS metadata and rendered images.

Retrieving instances and QIDO searches are what every DICOMweb server does; metadata and
``/rendered`` are not (tiny-pacs, some gateways and archives answer 404, 400 or 501). A
``metadata.json`` or ``.png`` that is listed and then cannot be opened breaks every tool that
copies a folder (``cp -r``, ``tar``, ``rsync`` exit 1), so the tree shows them only where
the server offers them.

How it is learned: once per server, at mount (or prefetch) time, by asking for the metadata
and a rendered PNG of one instance found with three one-entry QIDO pages (the first study,
its first series, its first instance): a handful of small requests, where a study's or
series' metadata could be megabytes. The verdict is kept in the server's cache folder
(``capabilities.json``), so later mounts ask nothing; ``dicomfs cache clear URL`` forgets it.

What counts as "not offered": 404, 405 and 501 for either resource, and 400 for metadata. A
400 for a rendered image is not: Orthanc answers 400 to render JPEG 2000 or RT dose images
while rendering others, so one such instance says nothing of the rest. Anything else (the
server unreachable, 5xx, no study to ask about) leaves the question open: both are assumed
offered, as before, and nothing is remembered, so the next mount asks again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable
from dataclasses import asdict, dataclass

import trio

from dicomfs.client import DicomwebClient
from dicomfs.errors import BadRequest, DicomfsError, DicomwebError, ProtocolError
from dicomfs.store import Store

log = logging.getLogger(__name__)

FILE_NAME = "capabilities.json"
ABSENT = {404, 405, 501}  # the resource is not there, whatever was asked
ABSENT_METADATA = ABSENT | {400}
PROBE_SECONDS = 5.0  # the whole probe, at mount time: unknown (both shown) when slower


@dataclass(frozen=True)
class Capabilities:
    """What the tree may show besides instances."""

    metadata: bool = True
    rendered: bool = True


async def learn(client: DicomwebClient, store: Store) -> Capabilities:
    """The server's capabilities: as remembered in ``store``, else probed (and remembered)."""
    known = remembered(store)
    if known is not None:
        return known
    try:
        with trio.fail_after(PROBE_SECONDS):  # a mount must not wait on a slow server
            sample = await client.sample_instance()
            if sample is None:
                log.info("no instance to probe optional resources with; assuming both "
                         "offered")
                return Capabilities()
            metadata = await _offered(client.instance_metadata(*sample), ABSENT_METADATA)
            rendered = await _offered(client.rendered(*sample), ABSENT)
    except (DicomfsError, trio.TooSlowError) as exc:
        log.warning("could not learn whether metadata and rendered images are offered (%s); "
                    "assuming they are", exc or f"no answer within {PROBE_SECONDS:g} s")
        return Capabilities()
    found = Capabilities(metadata=metadata, rendered=rendered)
    store.save_note(FILE_NAME, json.dumps(asdict(found)).encode())
    _report(found)
    return found


def remembered(store: Store) -> Capabilities | None:
    """What an earlier mount learned of this server, or None."""
    raw = store.load_note(FILE_NAME)
    if raw is None:
        return None
    try:
        saved = json.loads(raw)
        return Capabilities(metadata=saved["metadata"] is True, rendered=saved["rendered"] is True)
    except (ValueError, KeyError, TypeError):
        log.warning("%s in the cache folder is unreadable; probing again", FILE_NAME)
        return None


async def _offered(request: Awaitable[object], absent: set[int]) -> bool:
    """Whether the probe ``request`` found the resource there."""
    try:
        await request
    except (BadRequest, ProtocolError) as exc:
        return exc.status not in absent  # else it answered, about this one instance
    except DicomwebError as exc:
        if exc.status in absent:
            return False
        raise  # unreachable, 5xx, 401: the question stays open
    return True


def _report(found: Capabilities) -> None:
    missing = [name for name, offered in (("WADO-RS metadata (metadata.json)", found.metadata),
                                          ("rendered images (/rendered)", found.rendered))
               if not offered]
    if missing:
        log.warning("the server offers no %s: not shown", " and no ".join(missing))
