"""The merged answer: the speed layer's part (from the mirror) applied to batch SQL in one snapshot.

Per query, members = patients meeting every parameter on the merged rows, where merged rows are
the batch rows not hidden by a winning speed entry plus the winning speed rows. Only what the
speed layer changes is shipped to PostgreSQL: patient ids it adds per parameter, and the ids of
hidden batch resources whose rows would have matched. PostgreSQL does the counting.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg import sql

from receiver.errors import InvalidRequest, Issue, SpeedLayerUnavailable
from receiver.store import SpeedStore
from serving.cohort import (
    PD,
    CohortQuery,
    criterion_sql,
    patient_sql,
    view_of,
)
from serving.speed_index import BatchKey, Plan, SpeedMirror
from serving.sqlcompiler import column_sql_types
from serving.viewdef import ViewDefinition

logger = logging.getLogger(__name__)

BATCH_COUNT_CACHE_MAX = 4096


@dataclass
class SpeedView:
    """The speed layer as one request sees it (None fields when it was not consulted)."""

    mirror: SpeedMirror | None
    speed_as_of: str | None
    degraded: bool

    @property
    def consulted(self) -> bool:
        return self.mirror is not None


@dataclass
class CohortAnswer:
    total_count: int
    patient_ids: list[str]
    has_more: bool
    batch_count: int
    added_count: int
    removed_count: int
    sources: list[str]
    batch_as_of: str | None
    speed_as_of: str | None
    degraded: bool


async def read_speed(
    store: SpeedStore | None, mirror: SpeedMirror, use_speed_layer: bool
) -> SpeedView:
    """Read the speed layer first: sync the mirror; degraded when Redis or its epoch is gone."""
    if not use_speed_layer or store is None:
        return SpeedView(None, None, False)
    try:
        async with mirror.lock:
            complete = await mirror.sync(store)
        if not complete:
            logger.warning("speed layer has no epoch marker: answering from the batch layer")
            return SpeedView(None, None, True)
        return SpeedView(mirror, await store.poller_watermark(), False)
    except SpeedLayerUnavailable as exc:
        logger.warning("speed layer unavailable, answering from the batch layer: %s", exc)
        return SpeedView(None, None, True)


async def begin_snapshot(conn: psycopg.AsyncConnection[Any]) -> tuple[BatchKey, str | None]:
    """First statement of the transaction: one snapshot; the batch layer's identity in it."""
    await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    cur = await conn.execute(
        "SELECT xmin::text, watermark, refreshed_at, resources FROM rf_batch.watermark WHERE id = 1"
    )
    row = await cur.fetchone()
    if row is None:
        return (None,), None
    return tuple(row), row[1]


def _array(values: Sequence[str], params: list[Any]) -> str:
    params.append(list(values))
    return "%s::text[]"


def members_sql(query: CohortQuery, plan: Plan | None, params: list[Any]) -> str:
    """SELECT of the member patient ids (merged with `plan`, batch alone without)."""
    patients = f"SELECT id FROM {PD} WHERE {patient_sql(query, params)}"
    if plan is not None and plan.hidden_patients:
        patients += f" AND id NOT IN (SELECT unnest({_array(plan.hidden_patients, params)}))"
    if plan is not None and plan.speed_patients:
        patients += f" UNION ALL SELECT unnest({_array(plan.speed_patients, params)})"
    conditions: list[str] = []
    for n, criterion in enumerate(query.criteria):
        sub = (
            f"SELECT patient_id FROM {view_of(criterion)} WHERE {criterion_sql(criterion, params)}"
        )
        if plan is not None:
            speed_ids, hidden = plan.criteria[n]
            if hidden:
                sub += f" AND id NOT IN (SELECT unnest({_array(hidden, params)}))"
            if speed_ids:
                sub += f" UNION ALL SELECT unnest({_array(speed_ids, params)})"
        conditions.append(f"d.id IN ({sub})")
    where = (" WHERE " + " AND ".join(conditions)) if conditions else ""
    return f"SELECT d.id FROM ({patients}) AS d(id){where}"


def batch_member_exists_sql(query: CohortQuery, column: str, params: list[Any]) -> str:
    """Conditions true when the patient `column` is a member by the batch layer alone."""
    parts = [
        f"EXISTS (SELECT 1 FROM {PD} WHERE {PD}.id = {column} AND {patient_sql(query, params)})"
    ]
    for criterion in query.criteria:
        view = view_of(criterion)
        parts.append(
            f"EXISTS (SELECT 1 FROM {view} WHERE {view}.patient_id = {column}"
            f" AND {criterion_sql(criterion, params)})"
        )
    return " AND ".join(parts)


class BatchCounts:
    """Batch-only counts per (batch snapshot, query): the batch layer changes only at refresh."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], int] = {}

    async def get(
        self, conn: psycopg.AsyncConnection[Any], key: BatchKey, query: CohortQuery
    ) -> int:
        cache_key = (key, query.signature())
        if cache_key in self._cache:
            return self._cache[cache_key]
        params: list[Any] = []
        text = f"SELECT count(*) FROM ({members_sql(query, None, params)}) AS b"
        cur = await conn.execute(text.encode(), params)
        row = await cur.fetchone()
        value = int(row[0]) if row else 0
        if len(self._cache) >= BATCH_COUNT_CACHE_MAX:
            self._cache.clear()
        self._cache[cache_key] = value
        return value


async def cohort(
    conn: psycopg.AsyncConnection[Any],
    query: CohortQuery,
    speed: SpeedView,
    batch_counts: BatchCounts,
) -> CohortAnswer:
    """The merged cohort answer; call inside a transaction on `conn` (one snapshot)."""
    key, batch_as_of = await begin_snapshot(conn)
    plan: Plan | None = None
    if speed.mirror is not None:
        async with speed.mirror.lock:
            await speed.mirror.sync_batch(conn, key)
            plan = speed.mirror.plan(query)
    params: list[Any] = []
    members = members_sql(query, plan, params)
    page = query.count if query.ids else 0
    params.extend([query.after, query.after, page + 1])
    text = (
        f"WITH m AS MATERIALIZED ({members}) SELECT (SELECT count(*) FROM m),"
        " (SELECT coalesce(array_agg(id ORDER BY id COLLATE \"C\"), '{}') FROM"
        ' (SELECT id FROM m WHERE (%s::text IS NULL OR id COLLATE "C" > %s)'
        ' ORDER BY id COLLATE "C" LIMIT %s) AS p)'
    )
    if plan is not None and plan.removal_candidates:
        candidates = _array(plan.removal_candidates, params)
        exists = batch_member_exists_sql(query, "r.id", params)
        text += (
            f", (SELECT count(*) FROM unnest({candidates}) AS r(id)"
            f" WHERE r.id NOT IN (SELECT id FROM m) AND {exists})"
        )
    else:
        text += ", 0"
    cur = await conn.execute(text.encode(), params)
    row = await cur.fetchone()
    assert row is not None
    total, ids, removed = int(row[0]), list(row[1]), int(row[2])
    has_more = len(ids) > page
    ids = ids[:page]
    if plan is None:
        batch_count, removed = total, 0
    else:
        batch_count = await batch_counts.get(conn, key, query)
    return CohortAnswer(
        total_count=total,
        patient_ids=ids,
        has_more=has_more,
        batch_count=batch_count,
        added_count=total - batch_count + removed,
        removed_count=removed,
        sources=["batch_layer", "speed_layer"] if speed.consulted else ["batch_layer"],
        batch_as_of=batch_as_of,
        speed_as_of=speed.speed_as_of,
        degraded=speed.degraded,
    )


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- view rows


def jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


@dataclass
class ViewRows:
    rows: list[dict[str, Any]]
    has_more: bool
    batch_as_of: str | None
    columns: list[str]


async def view_rows(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    view: ViewDefinition,
    filters: Sequence[tuple[str, str]],
    offset: int,
    count: int,
    speed: SpeedView,
) -> ViewRows:
    """A page of the view's merged rows with equality filters (call inside a transaction)."""
    types = column_sql_types(view)
    columns = [c for c, _ in types]
    type_of = dict(types)
    for column, _ in filters:
        if column not in type_of:
            raise InvalidRequest(
                f"unknown column {column!r} of view {name}",
                [Issue("invalid", f"unknown column {column!r} of view {name}", column)],
            )
    for column, value in filters:
        _check_filter_value(column, type_of[column], value)
    key, batch_as_of = await begin_snapshot(conn)
    hidden: list[str] = []
    speed_rows: list[Mapping[str, Any]] = []
    if speed.mirror is not None and "id" in type_of:
        async with speed.mirror.lock:
            await speed.mirror.sync_batch(conn, key)
            tm = speed.mirror.types.get(view.resource)
            if tm is not None:
                hidden = sorted(tm.overriding)
                for rows in tm.winning_rows(name).values():
                    speed_rows.extend(rows)
    params: list[Any] = []
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    batch = sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier("sqlonfhir", name))
    if hidden:
        batch += sql.SQL(" WHERE id NOT IN (SELECT unnest(%s::text[]))")
        params.append(hidden)
    union = batch
    if speed_rows:
        record = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in types
        )
        union = batch + sql.SQL(
            " UNION ALL SELECT {} FROM jsonb_to_recordset(%s::jsonb) AS t({})"
        ).format(cols, record)
        params.append(orjson.dumps(speed_rows).decode())
    where = [sql.SQL("{} = %s::" + type_of[c]).format(sql.Identifier(c)) for c, _ in filters]
    params.extend(v for _, v in filters)
    order = 'u.id COLLATE "C", u::text' if "id" in type_of else "u::text"
    query = sql.SQL("SELECT {} FROM ({}) AS u{} ORDER BY " + order + " LIMIT %s OFFSET %s").format(
        cols,
        union,
        sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
    )
    params.extend([count + 1, offset])
    try:
        cur = await conn.execute(query, params)
    except psycopg.errors.DataError as exc:  # a value the checks above let through
        names = ", ".join(sorted({c for c, _ in filters})) or "a filter"
        message = f"a filter value does not fit its column ({names}): {exc.diag.message_primary}"
        raise InvalidRequest(message, [Issue("invalid", message, c) for c, _ in filters]) from exc
    fetched = await cur.fetchall()
    rows = [{c: jsonable(v) for c, v in zip(columns, r, strict=True)} for r in fetched[:count]]
    return ViewRows(rows, len(fetched) > count, batch_as_of, columns)


_INTEGER = re.compile(r"-?[0-9]{1,18}")
_DECIMAL = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")


def _check_filter_value(column: str, sql_type: str, value: str) -> None:
    """A 400 that names the column when a filter value cannot be of the column's type."""
    fits = True
    if sql_type == "boolean":
        fits = value in ("true", "false")
    elif sql_type in ("integer", "bigint"):
        fits = bool(_INTEGER.fullmatch(value)) and (
            sql_type == "bigint" or -(2**31) <= int(value) < 2**31
        )
    elif sql_type == "numeric":
        fits = bool(_DECIMAL.fullmatch(value))
    elif sql_type == "jsonb":
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            fits = False
    elif "\x00" in value:
        fits = False  # PostgreSQL text cannot hold NUL
    if not fits:
        message = f"{value[:40]!r} is not a valid {sql_type} for column {column!r}"
        raise InvalidRequest(message, [Issue("invalid", message, column)])
