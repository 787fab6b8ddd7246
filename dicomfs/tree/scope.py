"""The studies a mount shows: the whole server, or what one QIDO query finds
(``dicomfs mount --query``), for every view that lists studies."""

from __future__ import annotations

from collections.abc import Mapping

from dicomfs import dicomjson, names
from dicomfs.dicomjson import Dataset
from dicomfs.listings import Arriving
from dicomfs.tree.catalog import Catalog


class Scope:
    def __init__(self, archive: Catalog, query: Mapping[str, str] | None = None) -> None:
        self.archive = archive
        self.query = dict(names.check_query(query.items())) if query else {}
        self.large = False  # the last look found more studies in scope than one page

    async def studies(self, query: Mapping[str, str] | None = None) -> list[Dataset]:
        """The studies ``query`` finds within the scope.

        A key the scope also sets, to another value, cannot be sent twice: the
        server answers the query's value and the scope's listing filters.
        """
        found = await self.archive.studies(self._within(query))
        if query and self._narrower(query):
            allowed = {dicomjson.uid(ds, dicomjson.STUDY_UID) for ds in await self.studies()}
            found = [ds for ds in found if dicomjson.uid(ds, dicomjson.STUDY_UID) in allowed]
        return found

    async def follow(self, query: Mapping[str, str] | None = None) -> Arriving:
        """The same, as it arrives (see ``Listings.follow_studies``); the caller leaves it."""
        if query and self._narrower(query):
            return Arriving(await self.studies(query))
        return await self.archive.follow_studies(self._within(query))

    async def few(self, query: Mapping[str, str] | None = None) -> list[Dataset] | None:
        """The studies ``query`` finds within the scope if they fit one QIDO page, else
        None (see ``Listings.few_studies``): a folder then shows finer folders instead.
        Without ``query``, it also tells whether the scope is :attr:`large`."""
        if query and self._narrower(query):
            return await self.studies(query)
        found = await self.archive.few_studies(self._within(query))
        if not query:
            self.large = found is None
        return found

    def _within(self, query: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.query, **(query or {})}

    def _narrower(self, query: Mapping[str, str]) -> bool:
        return any(self.query.get(key, value) != value for key, value in query.items())
