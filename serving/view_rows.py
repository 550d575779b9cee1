"""GET /views/{name}/rows: pages of a view's merged rows, each row once while data changes.

The merged rows are the batch view's rows not hidden by a winning speed entry plus the winning
speed entries' rows, read in one snapshot (`serving.merge.begin_snapshot`). A page ends at a
`RowKey` (the row's resource key and its position among that key's rows), which the next
page starts after.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import sql

from core.errors import InvalidRequest, Issue
from core.fhir_values import dumps, has_temporal_shape, is_temporal_type, temporal_compare_sql
from serving.engines.postgres import column_sql_types
from serving.merge import SpeedView, begin_snapshot
from serving.viewdef import ViewDefinition


@dataclass(frozen=True)
class RowKey:
    """Where a page of view rows ended: the row's resource key (its `id` column, or the row's
    own text in a view without one; None for a row whose `id` is null) and its 1-based position
    among that key's rows matching the query, in the order of their text.

    Rows of one key change only when their resource does, so a page that starts after a key
    sees each row once however the data changes around it. `token()` is the `_after` value.
    """

    key: str | None
    position: int

    def token(self) -> str:
        return (
            base64.urlsafe_b64encode(orjson.dumps([self.key, self.position])).decode().rstrip("=")
        )

    @classmethod
    def from_token(cls, token: str) -> RowKey:
        """The key a `next` link carries. Raises InvalidRequest naming `_after`."""
        try:
            decoded = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        except (ValueError, orjson.JSONDecodeError):
            decoded = None
        if (
            isinstance(decoded, list)
            and len(decoded) == 2
            and (decoded[0] is None or (isinstance(decoded[0], str) and "\x00" not in decoded[0]))
            and type(decoded[1]) is int
            and 0 <= decoded[1] < 2**62
        ):
            return cls(decoded[0], decoded[1])
        message = "_after is not a page key from a next link of this API"
        raise InvalidRequest(message, [Issue("invalid", message, "_after")])


@dataclass
class ViewRows:
    rows: list[dict[str, Any]]
    next_key: RowKey | None  # where the next page starts; None on the last page
    batch_as_of: str | None
    columns: list[str]


async def view_rows(
    conn: psycopg.AsyncConnection[Any],
    name: str,
    view: ViewDefinition,
    filters: Sequence[tuple[str, str]],
    after: RowKey | None,
    count: int,
    speed: SpeedView,
) -> ViewRows:
    """A page of at most `count` of the view's merged rows with equality filters, the first
    ones after `after` in the order (key, position): see RowKey. Call inside a transaction.
    Raises InvalidRequest (400) for an unknown column or a value that cannot be of its type.
    """
    types = column_sql_types(view)
    columns = [c for c, _ in types]
    type_of = dict(types)
    temporal = _temporal_columns(view)
    for column, _ in filters:
        if column not in type_of:
            raise InvalidRequest(
                f"unknown column {column!r} of view {name}",
                [Issue("invalid", f"unknown column {column!r} of view {name}", column)],
            )
    for column, value in filters:
        _check_filter_value(column, type_of[column], value, temporal.get(column))
    key, batch_as_of = await begin_snapshot(conn)
    if count == 0:
        return ViewRows([], None, batch_as_of, columns)
    hidden: list[str] = []
    speed_rows: list[Mapping[str, Any]] = []
    if speed.mirror is not None and "id" in type_of:
        async with speed.mirror.lock:
            await speed.mirror.sync_batch(conn, key, [view.resource])
            type_mirror = speed.mirror.types.get(view.resource)
            if type_mirror is not None:
                hidden = sorted(type_mirror.overriding)
                for resource_rows in type_mirror.winning_rows(name).values():
                    speed_rows.extend(resource_rows)
    query, params = _page_sql(name, types, filters, after, hidden, speed_rows, count + 1, temporal)
    try:
        cur = await conn.execute(query, params)
    except psycopg.errors.DataError as exc:  # a value the checks above let through
        names = ", ".join(sorted({c for c, _ in filters})) or "a filter"
        message = f"a filter value does not fit its column ({names}): {exc.diag.message_primary}"
        raise InvalidRequest(message, [Issue("invalid", message, c) for c, _ in filters]) from exc
    fetched = await cur.fetchall()
    rows: list[dict[str, Any]] = []
    last: RowKey | None = after
    for record in fetched[:count]:
        row_key = record[len(columns)]
        if last is not None and last.key == row_key:
            last = RowKey(row_key, last.position + 1)
        else:
            last = RowKey(row_key, 1)  # a key after `after` starts on this page
        rows.append(dict(zip(columns, record, strict=False)))
    return ViewRows(rows, last if len(fetched) > count else None, batch_as_of, columns)


def _page_sql(
    name: str,
    types: Sequence[tuple[str, str]],
    filters: Sequence[tuple[str, str]],
    after: RowKey | None,
    hidden: Sequence[str],
    speed_rows: Sequence[Mapping[str, Any]],
    limit: int,
    temporal: Mapping[str, str],
) -> tuple[sql.Composed, dict[str, Any]]:
    """The page query: merged rows (batch rows not hidden, plus the winning speed rows) in the
    order (key, row text), starting after `after`, and each row's key as an extra column.
    A filter on a column of `temporal` (column -> its FHIR date/time type) is FHIRPath's
    equality of dates and times, not of their text.

    Rows of `after`'s key are numbered (among the rows matching the filters) to skip the ones
    already served; rows of later keys need no numbering, so those come from a top-N sort.
    """
    columns = [c for c, _ in types]
    type_of = dict(types)
    params: dict[str, Any] = {}
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    union = sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier("sqlonfhir", name))
    # A column without a type (or of a complex type) is jsonb: its scalar's text is the id.
    id_text = "id #>> '{}'" if type_of.get("id") == "jsonb" else "id"
    if hidden:
        union += sql.SQL(f" WHERE {id_text} NOT IN (SELECT unnest(%(hidden)s::text[]))")
        params["hidden"] = list(hidden)
    if speed_rows:
        record = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in types
        )
        union += sql.SQL(
            " UNION ALL SELECT {} FROM jsonb_to_recordset(%(speed)s::jsonb) AS speed_row({})"
        ).format(cols, record)
        params["speed"] = dumps(speed_rows, plain_decimals=True).decode()
    where: list[sql.Composable] = []
    for n, (column, value) in enumerate(filters):
        if type_of[column] == "jsonb":
            # A jsonb cell equals the value as its scalar's text (?gender=male finds "male"),
            # or as JSON (?name={"family":"A"}, ?tags=["a"]).
            where.append(
                sql.SQL("(merged.{0} #>> '{{}}' = {1} OR merged.{0} = {2}::jsonb)").format(
                    sql.Identifier(column), sql.Placeholder(f"f{n}"), sql.Placeholder(f"j{n}")
                )
            )
            params[f"j{n}"] = value if _is_json(value) else None
        elif column in temporal:
            where.append(_temporal_equals(column, temporal[column] == "time", value, n, params))
        else:
            where.append(
                sql.SQL("merged.{} = {}::" + type_of[column]).format(
                    sql.Identifier(column), sql.Placeholder(f"f{n}")
                )
            )
        params[f"f{n}"] = value
    key = sql.SQL(
        ("merged.\"id\" #>> '{}'" if type_of.get("id") == "jsonb" else 'merged."id"::text')
        if "id" in type_of
        else "merged::text"
    )

    def of(alias: str) -> sql.Composed:
        return sql.SQL(", ").join(sql.Identifier(alias, c) for c in columns)

    def branch(condition: sql.Composable | None) -> sql.Composed:
        conditions = [*where, condition] if condition is not None else where
        return sql.SQL(
            'SELECT {}, {} AS _key, merged::text COLLATE "C" AS _text FROM ({}) AS merged{}'
        ).format(
            of("merged"),
            key,
            union,
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL(""),
        )

    if after is None:
        pages = branch(None)
    else:
        params["after"], params["position"] = after.key, after.position
        if after.key is None:
            same, later = sql.SQL("{} IS NULL").format(key), sql.SQL("{} IS NOT NULL").format(key)
        else:
            same = sql.SQL("{} = %(after)s").format(key)
            later = sql.SQL('{} COLLATE "C" > %(after)s').format(key)
        numbered = sql.SQL(
            "SELECT {}, numbered._key, numbered._text FROM (SELECT same_key.*,"
            " row_number() OVER (ORDER BY same_key._text) AS _position FROM ({}) AS same_key)"
            " AS numbered WHERE numbered._position > %(position)s"
        ).format(of("numbered"), branch(same))
        pages = numbered + sql.SQL(" UNION ALL ") + branch(later)
    params["limit"] = limit
    query = sql.SQL(
        "SELECT {}, page._key FROM ({}) AS page"
        ' ORDER BY page._key COLLATE "C" NULLS FIRST, page._text LIMIT %(limit)s'
    ).format(of("page"), pages)
    return query, params


_INTEGER = re.compile(r"-?[0-9]{1,18}")
_DECIMAL = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?")


def _temporal_equals(
    column: str, time: bool, value: str, n: int, params: dict[str, Any]
) -> sql.Composable:
    """FHIRPath's `=` of the column's date/time text and `value` (placeholder f<n>):
    `2024-01-01T00:00:00Z` equals `2024-01-01T00:00:00.000+00:00` and
    `2023-12-31T19:00:00-05:00`; another precision is not equal.

    A value to the day or coarser equals only the same text (a partial date is written one
    way), so that is a plain comparison. A value with a time first narrows the rows to those
    written within two days of it (UTC offsets move a date by at most one day each side)
    before the full comparison, which costs far more per row.
    """
    cell = sql.Identifier("merged", column)
    if not time and "T" not in value.rstrip("T"):
        params[f"t{n}"] = value.rstrip("T")
        return sql.SQL("{} = {}").format(cell, sql.Placeholder(f"t{n}"))
    compared = temporal_compare_sql(cell.as_string(None), f"%(f{n})s", time=time)
    condition: sql.Composable = sql.SQL(f"{compared} = 0")
    if not time:
        try:
            day = date.fromisoformat(value[:10])
            days = [(day + timedelta(days=k)).isoformat() for k in range(-2, 3)]
        except (ValueError, OverflowError):
            return condition  # a day PostgreSQL cannot name either: the comparison alone
        params[f"d{n}"] = days
        condition = (
            sql.SQL("left({}, 10) = ANY({}) AND ").format(cell, sql.Placeholder(f"d{n}"))
            + condition
        )
    return condition


def _is_json(value: str) -> bool:
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


def _temporal_columns(view: ViewDefinition) -> dict[str, str]:
    """Column -> FHIR type of the view's single-valued date, dateTime, instant and time
    columns (text in the batch layer, compared by FHIRPath's date/time rules)."""
    return {
        c.name: c.type
        for c in view.columns
        if c.type is not None and is_temporal_type(c.type) and not c.collection
    }


def _check_filter_value(
    column: str, sql_type: str, value: str, fhir_type: str | None = None
) -> None:
    """A 400 that names the column when a filter value cannot be of the column's type
    (`fhir_type`: the column's FHIR date/time type, if it has one)."""
    fits = True
    if fhir_type is not None:
        fits = has_temporal_shape(value, time=fhir_type == "time")
    elif sql_type == "boolean":
        fits = value in ("true", "false")
    elif sql_type in ("integer", "bigint"):
        fits = bool(_INTEGER.fullmatch(value)) and (
            sql_type == "bigint" or -(2**31) <= int(value) < 2**31
        )
    elif sql_type == "numeric":
        fits = bool(_DECIMAL.fullmatch(value))
    elif "\x00" in value:
        fits = False  # PostgreSQL text cannot hold NUL
    if not fits:
        message = f"{value[:40]!r} is not a valid {fhir_type or sql_type} for column {column!r}"
        raise InvalidRequest(message, [Issue("invalid", message, column)])
