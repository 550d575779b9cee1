"""The batch layer in PostgreSQL: its schema, `batch init`, and what readers ask of it.

Schema (kept exactly; the query API reads it):

    rf_batch.resources  (resource_type, id) -> the newest version synced from HAPI; a deletion
                        stays as a row with deleted = true and resource null
    rf_batch.watermark  one row: HAPI's clock up to which the views are complete
    rf_batch.views      what each materialized view was built from (definition and SQL)
    sqlonfhir.<name>    one materialized view per ViewDefinition, over rf_batch.resources

Every view has a unique index, so `REFRESH MATERIALIZED VIEW CONCURRENTLY` works (and readers
are never blocked). A view that can give several rows per resource (a forEach, forEachOrNull,
repeat or unionAll anywhere) gets an extra column `_row`: the row's rank among its resource's
rows, ordered by the row's own text. It is deterministic (the same resource version always
numbers its rows the same way, identical rows are interchangeable), so a refresh rewrites only
rows that really changed, and `(id, _row)` is unique even when a resource holds two identical
codings, where `(id, code_system, code)` would not be.

The sync from HAPI is `serving.batch_refresh`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from core.errors import (
    BatchLayerUnavailable,
    ResearchFlowError,
    StartupError,
    postgres_failure,
)
from core.fhir_values import case_map_sql, dumps, loads
from core.settings import STARTUP_TIMEOUT_SECONDS, Settings
from serving.cohort import SEARCHED_TEXT, folded_column
from serving.engines.postgres import compile_view
from serving.viewdef import Select, ViewDefinition, shipped_views

logger = logging.getLogger(__name__)

VIEW_SCHEMA = "sqlonfhir"
RESOURCES = "rf_batch.resources"
ROW_COLUMN = "_row"
# One key for every writer of the batch layer (init and refresh): they never overlap.
LOCK_KEY = 0x7266_6261_7463_68  # "rfbatch"
# Secondary indexes of a view: each made when the view has all its columns (the columns the
# query API filters on).
VIEW_INDEXES: tuple[tuple[str, ...], ...] = (
    ("id",),
    ("gender",),
    ("birth_date",),
    ("code",),
    ("code_system", "code"),
    ("patient_id",),
)

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS rf_batch;
CREATE SCHEMA IF NOT EXISTS sqlonfhir;
CREATE TABLE IF NOT EXISTS rf_batch.resources (
    resource_type text,
    id text,
    version_id text,
    version_number double precision,
    last_updated text,
    last_updated_ms double precision,
    deleted boolean NOT NULL DEFAULT false,
    resource jsonb,
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX IF NOT EXISTS resources_type_last_updated
    ON rf_batch.resources (resource_type, last_updated_ms);
CREATE TABLE IF NOT EXISTS rf_batch.watermark (
    id int PRIMARY KEY CHECK (id = 1),
    watermark text,
    refreshed_at timestamptz,
    resources bigint
);
CREATE TABLE IF NOT EXISTS rf_batch.views (
    name text PRIMARY KEY,
    definition jsonb,
    sql text,
    built_at timestamptz
);
"""

# The watermark row: HAPI's clock the views are complete to, when the last refresh committed,
# how many resources it left.
WATERMARK_SQL = "SELECT watermark, refreshed_at, resources FROM rf_batch.watermark WHERE id = 1"

Progress = Callable[[str], None]


class BatchNotInitialized(ResearchFlowError):
    """The batch schema is missing: run `researchflow batch init` first."""


@dataclasses.dataclass(frozen=True)
class ViewPlan:
    """How one ViewDefinition becomes `sqlonfhir.<name>`: its SELECT and its indexes."""

    name: str
    resource: str
    query: str  # the SELECT the materialized view is made of
    unique: tuple[str, ...]  # the unique index's columns
    indexes: tuple[tuple[str, ...], ...]  # secondary indexes
    definition: dict[str, Any]

    @property
    def sql(self) -> str:
        """Everything the view is built from, as text: a change means a rebuild."""
        index_text = "; ".join(",".join(cols) for cols in self.indexes)
        return f"{self.query}\n-- unique ({','.join(self.unique)}); indexes {index_text}"


def _iterates(selects: tuple[Select, ...]) -> bool:
    return any(
        s.iterates or bool(s.union_all) or _iterates(s.select) or _iterates(s.union_all)
        for s in selects
    )


def _resource_key_column(view: ViewDefinition) -> bool:
    """True when column `id` is the resource's own id (one value per resource)."""
    stack = list(view.select)
    while stack:
        sel = stack.pop()
        for col in sel.column:
            if col.name == "id":
                key_path = col.path in ("getResourceKey()", "id")
                return key_path and not sel.iterates and not col.collection
        stack.extend(sel.select)
    return False


def plan_view(view: ViewDefinition, name: str | None = None) -> ViewPlan:
    """The materialized view for `view`. Raises InvalidViewDefinition."""
    view_name = name or view.name
    if not view_name:
        raise ValueError("a ViewDefinition needs a name to become a materialized view")
    compiled = compile_view(view, table=RESOURCES)
    columns = set(view.column_names)
    # Searched text kept folded once, at refresh (serving.cohort.SEARCHED_TEXT).
    folded = "".join(
        f", {case_map_sql(f'_q.{sql.Identifier(c).as_string(None)}', 'fold')}"
        f" AS {sql.Identifier(folded_column(c)).as_string(None)}"
        for c in SEARCHED_TEXT.get(view_name, ())
        if c in columns
    )
    if not _iterates(view.select) and _resource_key_column(view):
        query = f"SELECT _q.*{folded} FROM ({compiled}) AS _q" if folded else compiled
        unique: tuple[str, ...] = ("id",)
    else:
        if ROW_COLUMN in columns:
            raise ValueError(f"view {view_name}: the column name {ROW_COLUMN} is reserved")
        partition = 'PARTITION BY _q."id" ' if "id" in columns else ""
        query = (
            f"SELECT _q.*, row_number() OVER ({partition}ORDER BY _q::text) AS {ROW_COLUMN}"
            f"{folded} FROM ({compiled}) AS _q"
        )
        unique = ("id", ROW_COLUMN) if "id" in columns else (ROW_COLUMN,)
    indexes = tuple(
        cols for cols in VIEW_INDEXES if set(cols) <= columns and cols != unique[: len(cols)]
    )
    definition = loads(dumps(dataclasses.asdict(view)))
    return ViewPlan(view_name, view.resource, query, unique, indexes, definition)


# JIT compiles the views' jsonb expressions for far longer than they run (condition_simple
# over 4,000 Conditions: 1.3 s with JIT, 0.4 s without; a view reading primitive extensions
# far more), as the serving transactions (serving.merge) and the engine already found.
NO_JIT = "-c jit=off"


def connect(database_url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection to the batch layer, or BatchLayerUnavailable with the reason."""
    try:
        return psycopg.connect(database_url, connect_timeout=10, options=NO_JIT, **kwargs)
    except psycopg.OperationalError as exc:
        raise BatchLayerUnavailable(postgres_failure(exc)) from exc


async def connect_async(database_url: str) -> psycopg.AsyncConnection[Any]:
    """An autocommit async connection to the batch layer, or BatchLayerUnavailable."""
    try:
        return await psycopg.AsyncConnection.connect(
            database_url, autocommit=True, connect_timeout=10, options=NO_JIT
        )
    except psycopg.OperationalError as exc:
        raise BatchLayerUnavailable(postgres_failure(exc)) from exc


def _ident(*parts: str) -> sql.Identifier:
    return sql.Identifier(*parts)


def _index_name(view: str, what: str) -> str:
    """`<view>_<what>`, shortened with a hash past 63 bytes: PostgreSQL would cut it to 63,
    which for a view name of 63 is the view's own name (a `[a-z][a-z0-9_]{0,62}` name)."""
    name = f"{view}_{what}"
    if len(name) <= 63:
        return name
    return f"{name[:52]}_{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _build_view(conn: psycopg.Connection[Any], plan: ViewPlan) -> None:
    target = _ident(VIEW_SCHEMA, plan.name)
    conn.execute(sql.SQL("DROP MATERIALIZED VIEW IF EXISTS {}").format(target))
    conn.execute(
        sql.SQL("CREATE MATERIALIZED VIEW {} AS {} WITH DATA").format(target, sql.SQL(plan.query))
    )
    conn.execute(
        sql.SQL("CREATE UNIQUE INDEX {} ON {} ({}) NULLS NOT DISTINCT").format(
            _ident(_index_name(plan.name, "unique")),
            target,
            sql.SQL(", ").join(_ident(c) for c in plan.unique),
        )
    )
    for cols in plan.indexes:
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} ({})").format(
                _ident(_index_name(plan.name, "_".join(cols))),
                target,
                sql.SQL(", ").join(_ident(c) for c in cols),
            )
        )
    conn.execute(
        "INSERT INTO rf_batch.views (name, definition, sql, built_at)"
        " VALUES (%s, %s::jsonb, %s, now())"
        " ON CONFLICT (name) DO UPDATE SET definition = EXCLUDED.definition,"
        " sql = EXCLUDED.sql, built_at = EXCLUDED.built_at",
        (plan.name, dumps(plan.definition).decode(), plan.sql),
    )


def init(
    database_url: str,
    views: Mapping[str, ViewDefinition] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Create the batch schema and one materialized view per ViewDefinition, idempotently.

    A view whose definition (or compiled SQL) changed since it was built is rebuilt from the
    resources already held; an unchanged one is left alone. `views` defaults to the shipped
    ViewDefinitions. Returns one line per thing done ("created view x", "unchanged view y").
    Each view is built in its own transaction, under the lock `refresh` takes.
    """
    say = progress or (lambda _line: None)
    plans = [plan_view(v, name) for name, v in (views or shipped_views()).items()]
    done: list[str] = []
    with connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            existed = conn.execute("SELECT to_regclass('rf_batch.resources')").fetchone()
            with conn.transaction():
                conn.execute(SCHEMA_SQL)
            if existed is None or existed[0] is None:
                done.append("created schema rf_batch (resources, watermark, views)")
            built = dict(conn.execute("SELECT name, sql FROM rf_batch.views").fetchall())
            for plan in plans:
                exists = conn.execute(
                    "SELECT to_regclass(%s)", (f'{VIEW_SCHEMA}."{plan.name}"',)
                ).fetchone()
                present = exists is not None and exists[0] is not None
                if present and built.get(plan.name) == plan.sql:
                    line = f"unchanged view {VIEW_SCHEMA}.{plan.name}"
                else:
                    with conn.transaction():
                        _build_view(conn, plan)
                    verb = "rebuilt" if present or plan.name in built else "created"
                    line = f"{verb} view {VIEW_SCHEMA}.{plan.name}"
                    logger.info("%s", line)
                done.append(line)
                say(line)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return done


def drop(database_url: str) -> None:
    """Drop the batch layer (its views and tables): for the demo's fresh start and tests."""
    with connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            with conn.transaction():
                conn.execute(f"DROP SCHEMA IF EXISTS {VIEW_SCHEMA} CASCADE")
                conn.execute("DROP SCHEMA IF EXISTS rf_batch CASCADE")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def batch_watermark(database_url: str) -> str | None:
    """The batch watermark (HAPI's clock, ISO), or None before the first refresh or init."""
    with connect(database_url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('rf_batch.watermark')").fetchone() in (None, (None,)):
            return None
        row = conn.execute(WATERMARK_SQL).fetchone()
    return None if row is None else row[0]


async def batch_watermark_async(database_url: str) -> str | None:
    """`batch_watermark` on an async connection (for the poller and the query API)."""
    async with await connect_async(database_url) as conn:
        cur = await conn.execute("SELECT to_regclass('rf_batch.watermark')")
        if (await cur.fetchone()) in (None, (None,)):
            return None
        cur = await conn.execute(WATERMARK_SQL)
        row = await cur.fetchone()
    return None if row is None else row[0]


async def batch_versions_async(
    database_url: str, resource_type: str, ids: Sequence[str]
) -> dict[str, tuple[float, float]]:
    """The versions the batch layer holds of these ids: id -> (version number, lastUpdated ms).

    For the poller's missed-notification count: a change the batch layer holds at that version
    or newer (a refresh moved it out of the speed layer) is not missed. A row a `--full`
    refresh marked deleted because HAPI no longer listed it covers only strictly older
    versions (as in the speed layer's trim). Ids it lacks are left out; an uninitialised
    batch layer holds nothing. Raises BatchLayerUnavailable when PostgreSQL cannot be reached.
    """
    if not ids:
        return {}
    out: dict[str, tuple[float, float]] = {}
    async with await connect_async(database_url) as conn:
        cur = await conn.execute("SELECT to_regclass('rf_batch.resources')")
        if (await cur.fetchone()) in (None, (None,)):
            return out
        cur = await conn.execute(
            "SELECT id, version_number, last_updated_ms, deleted AND resource IS NOT NULL"
            " FROM rf_batch.resources WHERE resource_type = %s AND id = ANY(%s)",
            (resource_type, list(ids)),
        )
        for rid, vn, lum, absent in await cur.fetchall():
            if absent:
                vn, lum = (vn - 0.5 if vn >= 0 else vn), lum - 0.001
            out[rid] = (float(vn), float(lum))
    return out


def view_stats(database_url: str) -> dict[str, tuple[int, datetime | None]]:
    """Per built view: (rows it holds, when its contents were last computed)."""
    with connect(database_url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('rf_batch.views')").fetchone() in (None, (None,)):
            return {}
        out: dict[str, tuple[int, datetime | None]] = {}
        for name, built_at in conn.execute(
            "SELECT name, built_at FROM rf_batch.views ORDER BY name"
        ).fetchall():
            exists = conn.execute("SELECT to_regclass(%s)", (f'{VIEW_SCHEMA}."{name}"',)).fetchone()
            if exists is None or exists[0] is None:
                continue
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(_ident(VIEW_SCHEMA, name))
            ).fetchone()
            out[name] = (int(row[0]) if row else 0, built_at)
    return out


async def check_postgres(settings: Settings) -> None:
    """Reach the batch layer once; StartupError naming DATABASE_URL otherwise."""
    try:
        conn = await psycopg.AsyncConnection.connect(
            settings.database_url, connect_timeout=int(STARTUP_TIMEOUT_SECONDS)
        )
    except (psycopg.Error, OSError) as exc:
        raise StartupError(postgres_failure(exc)) from None
    await conn.close()
