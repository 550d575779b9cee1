"""`batch refresh`: sync the batch layer from HAPI, update its views, trim the speed layer.

How a refresh stays all-or-nothing:

1. Read from HAPI through `subscriptions.changes` (`_history` since the watermark, or with
   `full` a search of every type; HAPI's tables with `HAPI_DATABASE_URL`), through the one
   gate (`core.validation.validate_resource`), into a session-local temporary table.
   Nothing shared is touched: a failure here (HAPI breaks on page 2, the process is killed)
   leaves the batch layer, its watermark and the speed layer as they were.
2. One transaction: upsert the staged rows by version (only newer versions replace; deletes
   stay as rows), with `full` mark rows HAPI no longer has as deleted; in each view's table
   of a changed type, delete the rows of the resources that changed and insert their new
   rows (the view's SQL over those resources alone; `full`: every view recomputed into a fresh
   table, swapped in just before the commit); move the counts by what changed and advance the
   watermark. Readers (MVCC) see either the old resources, views and watermark or all the new
   ones; they are never blocked by the recompute, only (`full`) from the swap to the commit.
3. After the commit, record the gate's rejects and trim the speed layer: only entries the
   batch now holds at the same or a newer version go (`SpeedStore.trim_covered`). When
   Redis fails here the batch has advanced and the error is raised; what was not trimmed
   stays in the speed layer, which is harmless (the newer layer wins a merge).

The watermark is HAPI's clock: the `Date` of the traversal's first answer minus
`poll_overlap_seconds` (late commits), never this machine's, and never moves backwards.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from core.errors import (
    BatchLayerUnavailable,
    InvalidRequest,
    Issue,
    ResearchFlowError,
)
from core.fhir_values import format_instant, instant_of_ms, parse_instant
from core.settings import Settings
from core.store import SpeedStore, is_newer, version_number
from core.validation import NEVER_STORED, check_id, is_resource_type, validate_resource
from serving.batch import (
    CHANGED_RESOURCES,
    GRANTS_SQL,
    INDEXES_SQL,
    LOCK_KEY,
    LOCK_OUT_READERS,
    VIEW_SCHEMA,
    WATERMARK_SQL,
    BatchNotInitialized,
    FreshTable,
    changes_setup_sql,
    connect_async,
    existing_indexes,
    has_trigram_index,
    regclass_text,
    replace_changed_sql,
    text_index_sql,
    text_indexed_views_sql,
)
from serving.registry import served_views
from serving.viewdef import served_types
from subscriptions.changes import Change, reader_for
from subscriptions.fhir_client import FhirClient

logger = logging.getLogger(__name__)

FLUSH_ROWS = 2000  # staged rows per COPY
TRIM_CHUNK = 10_000  # ids per batch look-up while trimming
# Subscriptions carry the receiver's token in channel.header: never copied into the batch.
NOT_SYNCED = NEVER_STORED

Progress = Callable[[int], None]

_STAGING_COLUMNS = (
    "resource_type, id, version_id, version_number, last_updated, last_updated_ms,"
    " deleted, resource, rejected"
)

_APPLY_SQL = """
INSERT INTO rf_batch.resources AS r
    (resource_type, id, version_id, version_number, last_updated, last_updated_ms, deleted,
     resource)
SELECT DISTINCT ON (resource_type, id)
    resource_type, id, version_id, version_number, last_updated, last_updated_ms, deleted,
    resource
FROM rf_staging WHERE NOT rejected
ORDER BY resource_type, id, version_number DESC, last_updated_ms DESC
ON CONFLICT (resource_type, id) DO UPDATE SET
    version_id = EXCLUDED.version_id, version_number = EXCLUDED.version_number,
    last_updated = EXCLUDED.last_updated, last_updated_ms = EXCLUDED.last_updated_ms,
    deleted = EXCLUDED.deleted, resource = EXCLUDED.resource
WHERE CASE WHEN EXCLUDED.version_number >= 0 AND r.version_number >= 0
    THEN EXCLUDED.version_number > r.version_number
        -- a row a --full refresh marked deleted (absent from HAPI) comes back at its version
        OR (EXCLUDED.version_number = r.version_number AND r.deleted AND NOT EXCLUDED.deleted)
    ELSE EXCLUDED.last_updated_ms > r.last_updated_ms
        OR (EXCLUDED.last_updated_ms = r.last_updated_ms AND r.deleted AND NOT EXCLUDED.deleted)
    END
"""

# --full: current rows of the searched types that HAPI no longer lists become deletions.
# They keep their last content (a deletion HAPI reported has resource null): the trim then
# knows the batch never saw this version deleted, and keeps a speed entry at the same version.
_MARK_ABSENT_SQL = """
UPDATE rf_batch.resources AS r SET deleted = true
WHERE r.resource_type = ANY(%s) AND NOT r.deleted AND r.last_updated_ms < %s
  AND NOT EXISTS (SELECT 1 FROM rf_staging s WHERE s.resource_type = r.resource_type
                  AND s.id = r.id)
"""


class RefreshFailed(ResearchFlowError):
    """PostgreSQL refused part of the refresh (e.g. a view's SQL raised); nothing changed."""


@dataclass
class RefreshResult:
    """What one refresh did.

    `read`: entries read from HAPI (versions, deletions, search matches); `staged`: the
    newest of each resource that passed the gate; `changed`: rows inserted or replaced in
    rf_batch.resources (`deletes` of the staged are deletions); `marked_deleted`: with
    `full`, rows HAPI no longer has; `rejected`: refused by the gate (recorded in the speed
    layer's reject store); `trimmed`: speed-layer entries the batch now covers;
    `views`: rows per view after the refresh; `watermark`: the batch watermark after it;
    `seconds` the whole refresh, `apply_seconds` its one transaction.
    """

    full: bool
    since: str | None
    watermark: str | None = None
    read: int = 0
    staged: int = 0
    deletes: int = 0
    changed: int = 0
    marked_deleted: int = 0
    rejected: int = 0
    trimmed: int = 0
    views: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    apply_seconds: float = 0.0  # of `seconds`: the one transaction (upsert, views, watermark)


@dataclass(frozen=True)
class _Reject:
    resource_type: str
    resource_id: str
    version_id: str | None
    issues: list[Issue]


class _Stager:
    """Passes what HAPI lists through the gate into the session's temporary table."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], progress: Progress | None) -> None:
        self.conn = conn
        self.progress = progress
        self.read = 0
        self.staged = 0
        self.deletes = 0
        self.newest_ms = 0.0
        self.types: set[str] = set()
        self.rejects: list[_Reject] = []
        self._held: dict[tuple[str, str], tuple[float, float]] = {}
        self._rows: list[tuple[Any, ...]] = []

    def _is_new(self, key: tuple[str, str], vn: float, lum: float) -> bool:
        held = self._held.get(key)
        return held is None or is_newer(vn, lum, *held)

    def offer(self, change: Change) -> None:
        """Stage one change HAPI lists (a row that cannot be read is skipped, with a warning)."""
        if change.unreadable is not None:
            logger.warning(
                "skipped %s/%s: %s", change.resource_type, change.resource_id, change.unreadable
            )
        elif change.deleted or change.resource is None:
            self.offer_deletion(change)
        else:
            self.offer_resource(change.resource, change.resource_type, change.resource_id)

    def offer_deletion(self, change: Change) -> None:
        self.read += 1
        key = (change.resource_type, change.resource_id)
        vn, lum = version_number(change.version_id), parse_instant(change.last_updated)
        self.newest_ms = max(self.newest_ms, lum)
        if change.resource_type in NOT_SYNCED or not self._is_new(key, vn, lum):
            return
        if not is_resource_type(change.resource_type):
            return
        try:
            check_id(change.resource_id)
        except InvalidRequest:
            return
        self._held[key] = (vn, lum)
        self._add(key, change.version_id, vn, change.last_updated, lum, True, None, False)

    def offer_resource(self, resource: dict[str, Any], rtype: str, rid: str) -> None:
        self.read += 1
        raw_meta = resource.get("meta")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        vid = meta.get("versionId") if isinstance(meta.get("versionId"), str) else None
        lu = meta.get("lastUpdated") if isinstance(meta.get("lastUpdated"), str) else None
        key = (rtype, rid)
        vn, lum = version_number(vid), parse_instant(lu)
        self.newest_ms = max(self.newest_ms, lum)
        if rtype in NOT_SYNCED or not self._is_new(key, vn, lum):
            return
        self._held[key] = (vn, lum)
        try:
            valid = validate_resource(resource, path_type=rtype, path_id=rid)
        except InvalidRequest as exc:  # InvalidResource (422) included
            self.rejects.append(_Reject(rtype[:64], rid[:64], vid, exc.issues))
            # Staged as seen (a --full refresh must not take it for gone), never applied.
            self._add(key, vid, vn, lu, lum, False, None, True)
            return
        vn = version_number(valid.version_id)
        lum = parse_instant(valid.last_updated)
        self._add(
            key, valid.version_id, vn, valid.last_updated, lum, False, valid.body.decode(), False
        )

    def _add(
        self,
        key: tuple[str, str],
        vid: str | None,
        vn: float,
        lu: str | None,
        lum: float,
        deleted: bool,
        body: str | None,
        rejected: bool,
    ) -> None:
        self._rows.append((key[0], key[1], vid, vn, lu, lum, deleted, body, rejected))
        self.types.add(key[0])
        if not rejected:
            self.staged += 1
            self.deletes += deleted

    async def flush(self, force: bool = False) -> None:
        if self._rows and (force or len(self._rows) >= FLUSH_ROWS):
            async with self.conn.cursor() as cur:
                async with cur.copy(f"COPY rf_staging ({_STAGING_COLUMNS}) FROM STDIN") as copy:
                    for row in self._rows:
                        await copy.write_row(row)
            self._rows.clear()
        if self.progress is not None:
            self.progress(self.read)


async def _scalar(
    conn: psycopg.AsyncConnection[Any], query: str | sql.Composed, params: Any = None
) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return None if row is None else row[0]


async def _stage(pages: AsyncGenerator[list[Change], None], stager: _Stager) -> None:
    """Stage every page of changes, flushing to the staging table page by page."""
    async with contextlib.aclosing(pages) as changes:
        async for page in changes:
            for change in page:
                stager.offer(change)
            await stager.flush()


async def _full_types(conn: psycopg.AsyncConnection[Any], types: Sequence[str]) -> list[str]:
    """The types a full refresh reads: the served views' (`types`) and those of the views
    the batch layer was built with."""
    cur = await conn.execute("SELECT definition->>'resource' FROM rf_batch.views")
    wanted = {row[0] for row in await cur.fetchall() if row[0]} | set(types)
    return sorted(t for t in wanted if t not in NOT_SYNCED and is_resource_type(t))


def _recorded(statement: str, keep: bool) -> str:
    """`statement` (an INSERT or UPDATE of rf_batch.resources AS r) giving, per type, the rows
    it left and how it moved the count of live (not deleted) resources; with `keep`, the rows
    it left go to CHANGED_RESOURCES too.

    The look-up of each row as it was reads the statement's own snapshot, from before it ran
    (every part of a WITH query sees the same snapshot): one primary-key probe per changed row,
    not one per staged key before and after.
    """
    kept = f", kept AS (INSERT INTO {CHANGED_RESOURCES} SELECT * FROM done)" if keep else ""
    returning = "r.*" if keep else "r.resource_type, r.id, r.deleted"
    was_live = (
        "COALESCE((SELECT NOT o.deleted FROM rf_batch.resources AS o"
        " WHERE o.resource_type = d.resource_type AND o.id = d.id), false)"
    )
    return (
        f"WITH done AS ({statement.rstrip()} RETURNING {returning}){kept}"
        f" SELECT d.resource_type, count(*), sum((NOT d.deleted)::int - {was_live}::int)"
        " FROM done AS d GROUP BY d.resource_type"
    )


async def _apply(
    conn: psycopg.AsyncConnection[Any],
    *,
    full_types: list[str] | None,
    clock_ms: float,
    watermark: str | None,
) -> tuple[int, int, dict[str, int]]:
    """Staging -> resources, views, watermark: one transaction. (changed, marked, view rows).

    Incremental: the rows inserted, replaced or marked deleted are copied to the session's
    CHANGED_RESOURCES table; each view of a changed type replaces exactly those resources'
    rows, its SQL reading that small table alone.
    With `full_types` (`--full`) every view is recomputed whole. Every count it keeps
    (resources, rows per view) moves by what changed: its cost follows the changes.
    """
    # Each view with its table's kind and whether condition-text's text index is built
    # beside it: the catalog asked once a refresh.
    cur = await conn.execute(
        "SELECT v.name, v.definition->>'resource', v.changes_sql, v.rows, c.relkind,"
        f" v.name IN ({text_indexed_views_sql()})"
        " FROM rf_batch.views AS v LEFT JOIN pg_class AS c ON c.oid = to_regclass("
        "quote_ident(%s) || '.' || quote_ident(v.name)) ORDER BY v.name",
        (VIEW_SCHEMA,),
    )
    views = await cur.fetchall()
    view_rows: dict[str, int] = {}
    fresh: list[FreshTable] = []
    async with conn.transaction():
        # An older release copied Subscriptions (with the receiver's token) into the batch.
        live_delta = -int(
            await _scalar(
                conn,
                "WITH gone AS (DELETE FROM rf_batch.resources WHERE resource_type = ANY(%s)"
                " RETURNING deleted) SELECT count(*) FILTER (WHERE NOT deleted) FROM gone",
                (sorted(NOT_SYNCED),),
            )
        )
        await conn.execute(f"TRUNCATE {CHANGED_RESOURCES}")
        changed_types: dict[str, int] = {}
        cur = await conn.execute(_recorded(_APPLY_SQL, full_types is None))
        for t, n, moved in await cur.fetchall():
            changed_types[t] = int(n)
            live_delta += int(moved)
        changed = sum(changed_types.values())
        marked = 0
        if full_types is not None:
            cur = await conn.execute(_recorded(_MARK_ABSENT_SQL, False), (full_types, clock_ms))
            for t, n, _moved in await cur.fetchall():
                marked += int(n)
                changed_types[t] = changed_types.get(t, 0) + int(n)
            live_delta -= marked
        # The columns the views' change SQL filters and joins on (statistics of the
        # resources' jsonb would cost more than the rest of it).
        await conn.execute(f"ANALYZE {CHANGED_RESOURCES} (resource_type, id, deleted)")
        for name, resource_type, changes_query, rows, kind, text_indexed in views:
            target = sql.Identifier(VIEW_SCHEMA, name)
            if kind is None:
                continue
            if kind == "m" or changes_query is None:
                # Still the materialized view of an older release, until `batch init`.
                if resource_type is None or resource_type in changed_types:
                    await conn.execute(
                        sql.SQL("REFRESH MATERIALIZED VIEW CONCURRENTLY {}").format(target)
                    )
                rows = await _scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(target))
            elif full_types is not None or resource_type is None or rows is None:
                # --full (or a view the counts do not cover): every row recomputed, into a
                # fresh table swapped in below, just before the commit.
                table = await _fresh_table(conn, name, kind, text_indexed)
                build = table.build_sql()
                rows = (await conn.execute(build[0])).rowcount
                for statement in build[1:]:
                    await conn.execute(statement)
                fresh.append(table)
            elif resource_type in changed_types:
                delete, insert = replace_changed_sql(name, resource_type, changes_query)
                removed = (await conn.execute(delete)).rowcount
                added = (await conn.execute(insert)).rowcount
                rows = int(rows) - removed + added
                # condition-text's text index beside the view kept current with it.
                for text_statement in text_index_sql(resource_type) if text_indexed else []:
                    await conn.execute(text_statement)
            else:
                view_rows[name] = int(rows)
                continue  # a view reads only rows of its own type: untouched, it is current
            await conn.execute(
                "UPDATE rf_batch.views SET rows = %s, built_at = now() WHERE name = %s",
                (int(rows or 0), name),
            )
            view_rows[name] = int(rows or 0)
        if fresh:
            await conn.execute(LOCK_OUT_READERS)
            for table in fresh:
                for statement in table.swap_sql():
                    await conn.execute(statement)
        held = await _scalar(conn, "SELECT resources FROM rf_batch.watermark WHERE id = 1")
        if held is None or full_types is not None:
            count = "(SELECT count(*) FROM rf_batch.resources WHERE NOT deleted)"
            resources: Any = None
        else:
            count, resources = "%s", int(held) + live_delta
        await conn.execute(
            "INSERT INTO rf_batch.watermark (id, watermark, refreshed_at, resources)"
            f" VALUES (1, %s, now(), {count})"
            " ON CONFLICT (id) DO UPDATE SET watermark = EXCLUDED.watermark,"
            " refreshed_at = EXCLUDED.refreshed_at, resources = EXCLUDED.resources",
            (watermark,) if resources is None else (watermark, resources),
        )
    return changed, marked, view_rows


async def _fresh_table(
    conn: psycopg.AsyncConnection[Any], name: str, kind: str, text_index: bool
) -> FreshTable:
    """How view `name` is rebuilt whole: its recorded SQL, its table's indexes and grants
    (and, with `text_index`, condition-text's text index built fresh beside it)."""
    cur = await conn.execute("SELECT rebuild_sql FROM rf_batch.views WHERE name = %s", (name,))
    query = str((await cur.fetchone() or ("",))[0])
    cur = await conn.execute(INDEXES_SQL, (regclass_text(name),))
    indexes = existing_indexes(await cur.fetchall())
    cur = await conn.execute(GRANTS_SQL, (regclass_text(name),))
    grants = tuple((str(p), bool(g), r) for p, g, r in await cur.fetchall())
    return FreshTable(
        name,
        query,
        indexes,
        grants,
        kind,
        text_index=text_index,
        trigram=has_trigram_index(indexes),
    )


async def trim_speed_layer(
    conn: psycopg.AsyncConnection[Any], store: SpeedStore, extra_types: Iterable[str] = ()
) -> int:
    """Drop the speed-layer entries the batch layer holds at the same or a newer version."""
    # The types the batch holds, by skipping along the primary key (not a scan of every row).
    cur = await conn.execute(
        "WITH RECURSIVE held(t) AS ((SELECT resource_type FROM rf_batch.resources"
        " ORDER BY resource_type LIMIT 1) UNION ALL SELECT (SELECT resource_type FROM"
        " rf_batch.resources WHERE resource_type > held.t ORDER BY resource_type LIMIT 1)"
        " FROM held WHERE held.t IS NOT NULL) SELECT t FROM held WHERE t IS NOT NULL"
    )
    types = {row[0] for row in await cur.fetchall()}
    types.update(await store.known_types())
    types.update(extra_types)
    trimmed = 0
    for resource_type in sorted(types):
        held = await store.versions(resource_type)
        ids = list(held)
        for start in range(0, len(ids), TRIM_CHUNK):
            cur = await conn.execute(
                "SELECT id, version_number, last_updated_ms, deleted AND resource IS NOT NULL"
                " FROM rf_batch.resources WHERE resource_type = %s AND id = ANY(%s)",
                (resource_type, ids[start : start + TRIM_CHUNK]),
            )
            covered: list[tuple[str, float, float]] = []
            for rid, vn, lum, absent in await cur.fetchall():
                if absent:
                    # Marked deleted because HAPI no longer listed it, not a deletion HAPI
                    # reported at this version: it covers only strictly older entries.
                    vn, lum = (vn - 0.5 if vn >= 0 else vn), lum - 0.001
                covered.append((rid, float(vn), float(lum)))
            if covered:
                trimmed += await store.trim_covered(resource_type, covered)
    return trimmed


async def refresh(
    settings: Settings,
    *,
    full: bool = False,
    store: SpeedStore | None = None,
    client: FhirClient | None = None,
    progress: Progress | None = None,
    types: Sequence[str] | None = None,
) -> RefreshResult:
    """Sync rf_batch.resources from HAPI, refresh every view, advance the watermark, trim.

    Only the resource types the served views read are read from HAPI (`types`, default
    those of `serving.registry.served_views`); a Subscription never enters the batch layer,
    and any an older release stored is purged from both layers. Incremental: each type's `_history`
    since the batch watermark (from the beginning before the first refresh). `full`: every
    current resource of those types (and of the views the batch layer was built with), by
    search, plus `_history` since the watermark for the deletions' versions; rows of those
    types that HAPI no longer lists at all become deletions (keeping their last content and
    version). Every resource passes the one gate; rejects are recorded in `store`'s reject
    store (after the commit) and never enter the batch.

    Raises (and changes nothing) when HAPI or PostgreSQL fails before the commit:
    FhirTemporaryError/FhirFatalError, BatchLayerUnavailable, RefreshFailed,
    BatchNotInitialized. A SpeedLayerUnavailable raised while trimming comes after the
    commit (the batch layer has advanced). `progress` gets the count of entries read.
    """
    started = time.perf_counter()
    own_client = client is None
    fhir = client or FhirClient(settings.fhir_base_url)
    conn = await connect_async(settings.database_url)
    try:
        async with conn:
            if await _scalar(conn, "SELECT to_regclass('rf_batch.views')") is None:
                raise BatchNotInitialized(
                    "the batch layer has no schema: run `researchflow batch init` first"
                )
            # One refresh (or init) at a time; the session lock goes with the connection.
            await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            saved = await _scalar(conn, WATERMARK_SQL)
            result = RefreshResult(full=full, since=None if full else saved)
            await conn.execute(
                "CREATE TEMP TABLE rf_staging (resource_type text, id text, version_id text,"
                " version_number double precision, last_updated text,"
                " last_updated_ms double precision, deleted boolean, resource jsonb,"
                " rejected boolean)"
            )
            for statement in changes_setup_sql():
                await conn.execute(statement)
            stager = _Stager(conn, progress)
            types = types or served_types(served_views(settings.views_dir))
            read_types = [t for t in types if t not in NOT_SYNCED]
            full_types = await _full_types(conn, read_types) if full else None
            if full_types is not None:
                read_types = full_types
            async with reader_for(settings, fhir) as reader:
                if full_types is not None:
                    # Every current resource: what HAPI no longer lists is then marked absent.
                    await _stage(reader.current(full_types), stager)
                    clock = reader.clock
                    if saved is not None and not settings.hapi_database_url:
                        # Deletions since the last refresh, at HAPI's versions: only what
                        # vanished without a trace is then marked absent.
                        await _stage(reader.pages(saved, read_types), stager)
                else:
                    await _stage(reader.pages(saved, read_types), stager)
                    clock = reader.clock
            await stager.flush(force=True)
            if clock is None and stager.newest_ms:
                clock = instant_of_ms(stager.newest_ms)
            watermark = saved
            clock_ms = float("inf")
            if clock is not None:
                # HTTP's Date has whole seconds: a row written in that second is not "after".
                clock_ms = clock.timestamp() * 1000.0 + 1000.0
                candidate = clock - timedelta(seconds=settings.poll_overlap_seconds)
                if saved is None or candidate.timestamp() * 1000.0 > parse_instant(saved):
                    watermark = format_instant(candidate)
            if full_types is not None and clock is None:
                # Without HAPI's clock nothing proves a row absent: mark none.
                full_types = []
            await conn.execute("ANALYZE rf_staging (resource_type, id, rejected)")
            applying = time.perf_counter()
            try:
                changed, marked, view_rows = await _apply(
                    conn, full_types=full_types, clock_ms=clock_ms, watermark=watermark
                )
            except psycopg.OperationalError as exc:
                raise BatchLayerUnavailable(f"PostgreSQL failed the refresh: {exc}") from exc
            except psycopg.Error as exc:
                message = exc.diag.message_primary or str(exc)
                raise RefreshFailed(f"the batch refresh was rolled back: {message}") from exc
            result.apply_seconds = time.perf_counter() - applying
            result.read, result.staged, result.deletes = stager.read, stager.staged, stager.deletes
            result.changed, result.marked_deleted, result.views = changed, marked, view_rows
            result.rejected, result.watermark = len(stager.rejects), watermark
            logger.info(
                "batch refresh committed: %d read, %d changed, %d marked deleted, %d rejected;"
                " watermark %s",
                result.read,
                changed,
                marked,
                result.rejected,
                watermark,
            )
            if store is not None:
                for never in sorted(NOT_SYNCED):
                    if await store.holds_type(never):
                        purged = await store.purge_type(never)
                        logger.warning("purged %d %s entries from the speed layer", purged, never)
                for reject in stager.rejects:
                    await store.record_reject(
                        reject.resource_type, reject.resource_id, reject.version_id, reject.issues
                    )
                result.trimmed = await trim_speed_layer(conn, store, stager.types)
    except psycopg.OperationalError as exc:
        raise BatchLayerUnavailable(f"PostgreSQL failed during the refresh: {exc}") from exc
    finally:
        if own_client:
            await fhir.aclose()
    result.seconds = time.perf_counter() - started
    return result
