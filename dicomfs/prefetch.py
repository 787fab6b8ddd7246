"""``dicomfs prefetch``: fill the cache with a study or series ahead of time.

Through the fetch engine like every transfer, at background priority, so a
prefetch that runs next to a mount of the same cache fills it in parallel.
"""

from __future__ import annotations

import logging

from dicomfs import dicomjson
from dicomfs.archive import Archive
from dicomfs.errors import NotFound
from dicomfs.progress import Progress

log = logging.getLogger(__name__)


async def prefetch(archive: Archive, study: str, series: str | None = None, *,
                   metadata: bool = True) -> int:
    """Fill the cache with a study (or one series) ahead of time; returns failures.

    Resumable: what is cached already is skipped, so a second run after an
    interruption fetches only the rest. Metadata comes along, for offline use,
    when the server offers it (``metadata``).
    """
    if await archive.find_study(study) is None:
        raise NotFound(f"no study {study} on the server")
    if series is None:
        found = await archive.series(study)
        all_series = [uid for ds in found if (uid := dicomjson.uid(ds, dicomjson.SERIES_UID))]
    elif await archive.find_series(study, series) is None:
        raise NotFound(f"no series {series} in study {study}")
    else:
        all_series = [series]
    for one in all_series:  # saved, so that a mount can look them up offline
        await archive.find_series(study, one)
    total = cached = 0
    for one in all_series:
        uids = await archive.instance_uids(study, one)
        total += len(uids)
        cached += sum(archive.is_cached(study, one, uid) for uid in uids)
    progress = Progress(total, done=cached)
    failed: list[str] = []
    for one in all_series:
        failed += await archive.prefetch_series(study, one, on_stored=progress.add)
        if metadata:
            (await archive.metadata(study, one)).close()
    if metadata:
        (await archive.metadata(study)).close()
    progress.finish()
    return len(failed)
