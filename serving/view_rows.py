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
from typing import Any

import orjson
import psycopg
from psycopg import sql

from core.errors import InvalidRequest, Issue
from core.fhir_values import dumps
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
    for column, _ in filters:
        if column not in type_of:
            raise InvalidRequest(
                f"unknown column {column!r} of view {name}",
                [Issue("invalid", f"unknown column {column!r} of view {name}", column)],
            )
    for column, value in filters:
        _check_filter_value(column, type_of[column], value)
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
    query, params = _page_sql(name, types, filters, after, hidden, speed_rows, count + 1)
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
) -> tuple[sql.Composed, dict[str, Any]]:
    """The page query: merged rows (batch rows not hidden, plus the winning speed rows) in the
    order (key, row text), starting after `after`, and each row's key as an extra column.

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


def _is_json(value: str) -> bool:
    try:
        orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return True


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
    elif "\x00" in value:
        fits = False  # PostgreSQL text cannot hold NUL
    if not fits:
        message = f"{value[:40]!r} is not a valid {sql_type} for column {column!r}"
        raise InvalidRequest(message, [Issue("invalid", message, column)])
