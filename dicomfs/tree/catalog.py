"""What the tree needs from the archive (:class:`dicomfs.archive.Archive`), and no more.

The tree asks for listings, single studies, series and instances found by UID, and
open files; it never reaches the store or the client behind them. Tests hand the
tree a fake that implements just this.
"""

from __future__ import annotations

from typing import Protocol

from dicomfs.client import Query
from dicomfs.dicomjson import Dataset
from dicomfs.listings import Arriving
from dicomfs.store import Key, OpenFile


class Catalog(Protocol):
    async def studies(self, query: Query = ()) -> list[Dataset]:
        """The studies a QIDO query finds (the whole server for none)."""
        ...

    async def few_studies(self, query: Query = ()) -> list[Dataset] | None:
        """All the studies ``query`` finds if they fit one QIDO page, else None."""
        ...

    async def follow_studies(self, query: Query = ()) -> Arriving:
        """The same as it arrives, page by page; the caller leaves it when done."""
        ...

    async def series(self, study: str) -> list[Dataset]: ...

    async def instances(self, study: str, series: str) -> list[Dataset]: ...

    async def find_study(self, study: str) -> Dataset | None: ...

    async def find_series(self, study: str, series: str) -> Dataset | None: ...

    async def find_instance(self, study: str, series: str, instance: str
                            ) -> Dataset | None: ...

    def list_ahead(self, study: str, series: str | None = None) -> None:
        """Fetch a folder's listings in the background: a walker opens it next."""
        ...

    def expect(self, study: str, series: str, instance: str) -> None:
        """Start fetching an instance that is about to be opened."""
        ...

    def cached_size(self, key: Key) -> int | None: ...

    async def instance(self, study: str, series: str, instance: str) -> OpenFile: ...

    async def rendered(self, study: str, series: str, instance: str, fmt: str
                       ) -> OpenFile: ...

    async def metadata(self, study: str, series: str | None = None) -> OpenFile: ...
