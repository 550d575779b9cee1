"""How current each served view is in each layer: what `GET /views` and the status page show."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from core.fhir_values import format_instant, instant_of_ms
from serving.batch import VIEW_SCHEMA, WATERMARK_SQL
from serving.merge import SpeedView
from serving.viewdef import ViewDefinition


@dataclass(frozen=True)
class ViewFreshness:
    """One served view in both layers.

    `batch_as_of`: the batch watermark (HAPI's clock) the batch table is complete to;
    `batch_rows`: rows of `sqlonfhir.<name>` (None while `batch init` has not built it).
    `speed_resources`: entries of the view's type the speed layer holds (tombstones too),
    `speed_rows`: the view's rows derived from its present entries; `speed_as_of`: what it
    means for `/cohort` (../shared/interfaces.md, "Query API"): both layers together are
    complete up to the poller's watermark (HAPI's clock) and hold every notification received
    since; `speed_newest`: the newest `meta.lastUpdated` of the type's entries (HAPI's clock),
    the last change that reached the speed layer (shown by the status page; no completeness
    claim). The speed fields are None when the speed layer was not consulted.
    """

    name: str
    resource: str
    columns: tuple[str, ...]
    batch_as_of: str | None
    batch_rows: int | None
    speed_resources: int | None
    speed_rows: int | None
    speed_as_of: str | None
    speed_newest: str | None = None

    def contract(self) -> dict[str, Any]:
        """The fields of `GET /views` (../shared/interfaces.md, "Views")."""
        return {
            "name": self.name,
            "resource": self.resource,
            "columns": list(self.columns),
            "batch_as_of": self.batch_as_of,
            "batch_rows": self.batch_rows,
            "speed_resources": self.speed_resources,
            "speed_as_of": self.speed_as_of,
        }


async def view_freshness(
    conn: psycopg.AsyncConnection[Any], views: Mapping[str, ViewDefinition], speed: SpeedView
) -> list[ViewFreshness]:
    """Every view of `views` in both layers, the batch side read on `conn` (call inside one
    transaction, after `serving.merge.read_speed` synced `speed`). Raises psycopg.Error."""
    batch_as_of: str | None = None
    if await _exists(conn, "rf_batch.watermark"):
        row = await (await conn.execute(WATERMARK_SQL)).fetchone()
        batch_as_of = row[0] if row else None
    out: list[ViewFreshness] = []
    for name, view in views.items():
        batch_rows: int | None = None
        if await _exists(conn, f'{VIEW_SCHEMA}."{name}"'):
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(VIEW_SCHEMA, name))
            counted = await (await conn.execute(query)).fetchone()
            batch_rows = int(counted[0]) if counted else 0
        speed_resources = speed_rows = None
        speed_as_of = speed_newest = None
        type_mirror = speed.mirror.types.get(view.resource) if speed.mirror else None
        if type_mirror is not None:
            held = type_mirror.entries.values()
            speed_resources = len(held)
            speed_rows = sum(len(h.rows.get(name, ())) for h in held if not h.deleted)
            speed_as_of = speed.speed_as_of
            newest_ms = max((h.last_updated_ms for h in held), default=0)
            speed_newest = format_instant(instant_of_ms(newest_ms)) if newest_ms > 0 else None
        out.append(
            ViewFreshness(
                name,
                view.resource,
                view.column_names,
                batch_as_of,
                batch_rows,
                speed_resources,
                speed_rows,
                speed_as_of,
                speed_newest,
            )
        )
    return out


async def _exists(conn: psycopg.AsyncConnection[Any], relation: str) -> bool:
    row = await (await conn.execute("SELECT to_regclass(%s)", (relation,))).fetchone()
    return row is not None and row[0] is not None
