"""The one reader of what changed on HAPI: its REST `_history`, or its own tables.

Both the poller (into the speed layer) and `batch refresh` (into the batch layer) read HAPI's
changes here, as pages of `Change`, and keep their own policies (the poller counts what was
missed, the batch stager keeps the newest of each resource):

- `RestChanges`: per-type (or system-level) `_history` since an instant, newest first,
  fetching the next page while one is processed; `current` is a search of every type.
- `DatabaseChanges` (`HAPI_DATABASE_URL`): the changed rows of HAPI's tables, oldest first,
  through `subscriptions.hapi_db`; `current` is every current row.

A reader tells HAPI's clock: `started_at` (when the reading began: the first answer's `Date`,
or the database's `now()`) and `clock` (what a watermark may follow: the same `Date` for REST;
for the tables the newest RES_UPDATED read, since rows committed later may carry an earlier one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, TypeVar

import psycopg

from core.fhir_values import instant_of_ms, parse_instant
from core.settings import Settings
from subscriptions import hapi_db
from subscriptions.fhir_client import FhirClient, HistoryEntry

logger = logging.getLogger(__name__)

HISTORY_COUNT = 500  # `_count` per `_history` page
SEARCH_COUNT = 500  # `_count` per search page (`current`)
PREFETCH_PAGES = 2  # pages fetched ahead while one is processed

T = TypeVar("T")


@dataclass(frozen=True)
class Change:
    """One version of a resource HAPI holds, or its deletion.

    `resource` is None for a deletion, and for a row whose content cannot be read
    (`unreadable` says why, e.g. stored externally).
    """

    resource_type: str
    resource_id: str
    version_id: str | None
    last_updated: str | None
    deleted: bool
    resource: dict[str, Any] | None = field(repr=False)
    unreadable: str | None = None


class ChangeReader(Protocol):
    """What the poller and the batch refresh read HAPI's changes through."""

    started_at: datetime | None

    @property
    def clock(self) -> datetime | None:
        """HAPI's clock that a watermark may follow after a traversal (None: nothing read)."""
        ...

    def pages(
        self, since: str | None, types: Sequence[str] | None
    ) -> AsyncGenerator[list[Change], None]:
        """Pages of changes after `since` (None: all), of `types` (None: every type)."""
        ...

    def current(self, types: Sequence[str]) -> AsyncGenerator[list[Change], None]:
        """Pages of every current resource of `types` (deletions left out)."""
        ...


class RestChanges:
    """Changes through HAPI's REST API (`FhirClient`; `pages` needs only its `history`)."""

    def __init__(self, client: FhirClient) -> None:
        self.client = client
        self.started_at: datetime | None = None

    @property
    def clock(self) -> datetime | None:
        return self.started_at

    async def __aenter__(self) -> RestChanges:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def pages(
        self, since: str | None, types: Sequence[str] | None
    ) -> AsyncGenerator[list[Change], None]:
        for resource_type in list(types) if types else [None]:
            history = self.client.history(resource_type, since, HISTORY_COUNT)
            async with contextlib.aclosing(prefetched(history)) as pages:
                async for page in pages:
                    if self.started_at is None and page.server_date is not None:
                        self.started_at = page.server_date
                    yield [_of_entry(entry) for entry in page.entries]

    async def current(self, types: Sequence[str]) -> AsyncGenerator[list[Change], None]:
        for resource_type in types:
            page: list[Change] = []
            async for resource in self.client.search(resource_type, [("_count", SEARCH_COUNT)]):
                if self.started_at is None:
                    self.started_at = self.client.server_date()
                page.append(_of_resource(resource_type, resource))
                if len(page) >= SEARCH_COUNT:
                    yield page
                    page = []
            if self.started_at is None:
                self.started_at = self.client.server_date()
            yield page


class DatabaseChanges:
    """Changes read from HAPI's own PostgreSQL tables; use as `async with`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started_at: datetime | None = None
        self.newest: datetime | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @property
    def clock(self) -> datetime | None:
        return self.newest

    async def __aenter__(self) -> DatabaseChanges:
        self._conn = await hapi_db.connect(self.url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def pages(
        self, since: str | None, types: Sequence[str] | None
    ) -> AsyncGenerator[list[Change], None]:
        if self._conn is None:
            raise RuntimeError("use DatabaseChanges as `async with`")
        if self.started_at is None:
            self.started_at = await hapi_db.server_now(self._conn)
        since_at = instant_of_ms(parse_instant(since)) if since else None
        async for rows in hapi_db.changes_since(self._conn, since_at, types=types):
            self.newest = rows[-1].updated_at
            yield [
                Change(
                    row.resource_type,
                    row.resource_id,
                    row.version_id,
                    row.last_updated,
                    row.deleted,
                    row.resource,
                    row.unreadable,
                )
                for row in rows
            ]

    def current(self, types: Sequence[str]) -> AsyncGenerator[list[Change], None]:
        # The current version of every row is what the tables hold; deletions come too, which
        # a full refresh keeps (they carry HAPI's deletion version).
        return self.pages(None, types)


_said_table_mode: list[bool] = []  # once per process


def reader_for(settings: Settings, client: FhirClient | None) -> RestChanges | DatabaseChanges:
    """HAPI's tables when `HAPI_DATABASE_URL` is set, else its REST API through `client`.

    Raises ValueError when REST is needed and there is no client.
    """
    if settings.hapi_database_url:
        if not _said_table_mode:
            # HAPI_DATABASE_URL is also hapi.sh's variable: an operator who exported it for
            # that may not expect table mode here (README.md, "Connect your own HAPI").
            logger.info(
                "reading HAPI's changes from its database (HAPI_DATABASE_URL is set), "
                "not its REST API"
            )
            _said_table_mode.append(True)
        return DatabaseChanges(settings.hapi_database_url)
    if client is None:
        raise ValueError("reading HAPI's changes over REST needs a FhirClient")
    return RestChanges(client)


async def prefetched(
    items: AsyncIterator[T], depth: int = PREFETCH_PAGES
) -> AsyncGenerator[T, None]:
    """Iterate `items` while fetching up to `depth` ahead (HAPI answers the next page while
    this one is validated and written)."""
    queue: asyncio.Queue[tuple[Any, BaseException | None, bool]] = asyncio.Queue(depth)

    async def fetch() -> None:
        try:
            async for item in items:
                await queue.put((item, None, False))
        except Exception as exc:
            await queue.put((None, exc, True))
        else:
            await queue.put((None, None, True))

    task = asyncio.create_task(fetch())
    try:
        while True:
            item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                return
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _of_entry(entry: HistoryEntry) -> Change:
    return Change(
        entry.resource_type,
        entry.id,
        entry.version_id,
        entry.last_updated,
        entry.deleted or entry.resource is None,
        entry.resource,
    )


def _of_resource(resource_type: str, resource: dict[str, Any]) -> Change:
    """A search match: named by the searched type and its own id; the version from its meta."""
    rid = resource.get("id")
    raw_meta = resource.get("meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    vid = meta.get("versionId")
    lu = meta.get("lastUpdated")
    return Change(
        resource_type,
        rid if isinstance(rid, str) else "",
        vid if isinstance(vid, str) else None,
        lu if isinstance(lu, str) else None,
        False,
        resource,
    )
