"""Reading changes straight from HAPI's own PostgreSQL tables (`HAPI_DATABASE_URL`).

HAPI's JPA server keeps the current version of each resource in `HFJ_RESOURCE` and every
version's text in `HFJ_RES_VER`; Hibernate creates both with lowercase names on PostgreSQL
(`hfj_resource.res_id`). The stored text carries neither `meta.versionId` nor
`meta.lastUpdated` (HAPI keeps those in columns), so they are put back here before the
resource goes through the gate.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from core.errors import BatchLayerUnavailable, postgres_failure
from core.fhir_values import format_instant, loads

logger = logging.getLogger(__name__)

PAGE_SIZE = 1000


class HapiDatabaseUnavailable(BatchLayerUnavailable):
    """HAPI's PostgreSQL cannot be reached or does not hold HAPI's tables."""


@dataclass(frozen=True)
class DbChange:
    """The current version of one resource as HAPI's tables hold it."""

    resource_type: str
    resource_id: str
    version_id: str
    last_updated: str  # FHIR instant from RES_UPDATED, rendered as HAPI's REST API does
    updated_at: datetime  # RES_UPDATED as read (keyset position), aware, UTC
    deleted: bool
    resource: dict[str, Any] | None  # with meta.versionId/lastUpdated put back; None if deleted
    unreadable: str | None = None  # why the content could not be read (e.g. ESR)


async def server_now(conn: psycopg.AsyncConnection[Any]) -> datetime:
    """HAPI's clock as its database reads it (`now()`), aware, UTC."""
    cur = await conn.execute("SELECT now()")
    row = await cur.fetchone()
    if row is None:
        raise HapiDatabaseUnavailable("HAPI's database did not tell its time")
    value = row[0] if isinstance(row, tuple) else next(iter(dict(row).values()))
    return as_utc(value)


def as_utc(value: datetime) -> datetime:
    """HAPI writes `timestamp without time zone` in the JVM's zone; deployments run in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def decode_text(encoding: str | None, text_vc: str | None, blob: bytes | None) -> dict[str, Any]:
    """The JSON of one HFJ_RES_VER row: RES_TEXT_VC, or RES_TEXT plain (JSON) or gzip (JSONC)."""
    if text_vc is not None:
        raw: bytes = text_vc.encode()
    elif blob is not None:
        raw = gzip.decompress(blob) if (encoding or "").upper() == "JSONC" else bytes(blob)
    else:
        raise ValueError("the version row has no text")
    data = loads(raw)
    if not isinstance(data, dict):
        raise ValueError("the stored text is not a JSON object")
    return data


def with_meta(
    data: dict[str, Any], resource_type: str, resource_id: str, version: str, last_updated: str
) -> dict[str, Any]:
    """Put back what HAPI keeps in columns instead of the text."""
    held = data.get("meta")
    meta: dict[str, Any] = held if isinstance(held, dict) else {}
    data["resourceType"] = data.get("resourceType") or resource_type
    data["id"] = resource_id
    data["meta"] = {**meta, "versionId": version, "lastUpdated": last_updated}
    return data


async def _text_column(conn: psycopg.AsyncConnection[Any]) -> tuple[bool, str]:
    """(has RES_TEXT_VC, SQL expression reading RES_TEXT as bytes).

    RES_TEXT is a large object (`oid`) on PostgreSQL with Hibernate's default LOB mapping
    and `bytea` with some dialects; RES_TEXT_VC exists since HAPI 6.x.
    """
    cur = await conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = 'hfj_res_ver' AND column_name IN ('res_text', 'res_text_vc') "
        "AND table_schema = ANY(current_schemas(false))"
    )
    columns = {str(name): str(kind) for name, kind in await cur.fetchall()}
    if not columns:
        raise HapiDatabaseUnavailable("HAPI_DATABASE_URL holds no hfj_res_ver table")
    blob = "NULL::bytea"
    if columns.get("res_text") == "oid":
        blob = "lo_get(v.res_text)"
    elif "res_text" in columns:
        blob = "v.res_text"
    return "res_text_vc" in columns, blob


async def changes_since(
    conn: psycopg.AsyncConnection[Any],
    since: datetime | None,
    *,
    types: Sequence[str] | None = None,
    page_size: int = PAGE_SIZE,
) -> AsyncIterator[list[DbChange]]:
    """Pages of the resources changed after `since` (RES_UPDATED > since), oldest first.

    Keyset pagination on (RES_UPDATED, RES_ID) so a page boundary never skips or repeats a
    row. Only the current version of each resource is read (the join on RES_VER).
    """
    await conn.execute("SET TIME ZONE 'UTC'")
    has_vc, blob = await _text_column(conn)
    text_vc = "v.res_text_vc" if has_vc else "NULL::text"
    filters = ["r.res_updated > %(since)s"]
    if types:
        filters.append("r.res_type = ANY(%(types)s)")
    base = (
        "SELECT r.res_id, r.res_type, COALESCE(r.fhir_id, r.res_id::text) AS fhir_id, r.res_ver,"
        " r.res_updated, r.res_deleted_at, v.res_encoding,"
        f" {text_vc} AS text_vc, {blob} AS blob"
        " FROM hfj_resource r"
        " LEFT JOIN hfj_res_ver v ON v.res_id = r.res_id AND v.res_ver = r.res_ver"
    )
    params: dict[str, Any] = {
        "since": as_utc(since) if since is not None else datetime(1, 1, 1, tzinfo=UTC),
        "types": list(types or []),
        "limit": page_size,
    }
    after: tuple[datetime, int] | None = None
    while True:
        where = list(filters)
        if after is not None:
            where.append("(r.res_updated, r.res_id) > (%(after_ts)s, %(after_id)s)")
            params["after_ts"], params["after_id"] = after
        sql = f"{base} WHERE {' AND '.join(where)} ORDER BY r.res_updated, r.res_id LIMIT %(limit)s"
        try:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(sql.encode(), params)
                rows = await cur.fetchall()
        except psycopg.OperationalError as exc:
            raise HapiDatabaseUnavailable(f"HAPI's database cannot be read: {exc}") from exc
        if not rows:
            return
        yield [_change(row) for row in rows]
        last = rows[-1]
        after = (last["res_updated"], int(last["res_id"]))
        if len(rows) < page_size:
            return


def _change(row: dict[str, Any]) -> DbChange:
    resource_type = str(row["res_type"])
    resource_id = str(row["fhir_id"])
    version = str(row["res_ver"])
    updated_at = as_utc(row["res_updated"])
    # As HAPI's REST API renders it for a server in UTC (+00:00, never Z), so a resource read
    # from the tables is byte for byte the one `_history` would have given.
    last_updated = format_instant(updated_at, zulu=False)
    encoding = (row["res_encoding"] or "").upper()
    deleted = row["res_deleted_at"] is not None or encoding == "DEL"
    common: dict[str, Any] = {
        "resource_type": resource_type,
        "resource_id": resource_id,
        "version_id": version,
        "last_updated": last_updated,
        "updated_at": updated_at,
    }
    if deleted:
        return DbChange(**common, deleted=True, resource=None)
    if encoding == "ESR":
        return DbChange(
            **common, deleted=False, resource=None, unreadable="stored externally (ESR)"
        )
    try:
        data = decode_text(encoding, row["text_vc"], row["blob"])
    except (ValueError, OSError, EOFError) as exc:
        return DbChange(**common, deleted=False, resource=None, unreadable=str(exc)[:200])
    return DbChange(
        **common,
        deleted=False,
        resource=with_meta(data, resource_type, resource_id, version, last_updated),
    )


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection to HAPI's database (reads only)."""
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise HapiDatabaseUnavailable(
            "HAPI's database: " + postgres_failure(exc, "HAPI_DATABASE_URL")
        ) from exc
