"""The operator's status page (`GET /status`) and the gauges it shares with `/metrics`.

Each section is read on its own and a failing dependency shows as a message in its section,
never as a 500: the page is what an operator opens when something is wrong.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from core import auth
from core.errors import ResearchFlowError
from core.fhir_values import parse_instant
from core.metrics import Metrics
from core.settings import Settings
from core.store import SpeedStore
from serving.batch import WATERMARK_SQL
from subscriptions.bootstrap import SubscriptionInfo
from subscriptions.bootstrap import status as subscription_status
from subscriptions.fhir_client import FhirClient

logger = logging.getLogger(__name__)

HOURS = 24
REJECTS_SHOWN = 50
# HAPI is asked at most this often; the page may be reloaded by many people.
SUBSCRIPTIONS_TTL_SECONDS = 30.0
SUBSCRIPTIONS_TIMEOUT_SECONDS = 5.0
DATABASE_TIMEOUT_SECONDS = 3.0

Database = str | AsyncConnectionPool[Any]


@dataclass(frozen=True)
class BatchStatus:
    """The batch layer's watermark row; `watermark` None with no error: never refreshed."""

    watermark: str | None = None
    refreshed_at: datetime | None = None
    resources: int | None = None
    age_seconds: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class SubscriptionsStatus:
    """This deployment's Subscriptions on HAPI, or why they could not be read."""

    rows: tuple[SubscriptionInfo, ...] = ()
    error: str | None = None
    checked_at: datetime | None = None
    checked: bool = True


@dataclass(frozen=True)
class RejectRow:
    """What the page shows of a reject: never any resource content."""

    resource_type: str
    resource_id: str
    issues: tuple[str, ...]
    at: str | None


@dataclass(frozen=True)
class StatusData:
    """Everything the status page shows, gathered once per request."""

    generated_at: datetime
    speed_error: str | None = None
    speed_disabled: bool = False
    epoch: str | None = None
    hourly: tuple[tuple[str, int], ...] = ()
    type_counts: tuple[tuple[str, int], ...] = ()
    poller_watermark: str | None = None
    poller_lag_seconds: float | None = None
    missed: int | None = None
    reject_total: int | None = None
    rejects: tuple[RejectRow, ...] = ()
    batch: BatchStatus = field(default_factory=BatchStatus)
    subscriptions: SubscriptionsStatus = field(default_factory=SubscriptionsStatus)


class SubscriptionCache:
    """The last answer about Subscriptions (or the error), reused for `ttl` seconds."""

    def __init__(self, ttl: float = SUBSCRIPTIONS_TTL_SECONDS) -> None:
        self.ttl = ttl
        self._value: SubscriptionsStatus | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def last(self) -> SubscriptionsStatus | None:
        """The last answer, however old."""
        return self._value

    def fresh(self) -> SubscriptionsStatus | None:
        if self._value is not None and time.monotonic() - self._at < self.ttl:
            return self._value
        return None

    async def get(self, settings: Settings, client: FhirClient) -> SubscriptionsStatus:
        # One request to HAPI at a time: concurrent page loads wait for it and share it.
        async with self._lock:
            cached = self.fresh()
            if cached is not None:
                return cached
            self._value = await read_subscriptions(settings, client)
            self._at = time.monotonic()
            return self._value


async def read_subscriptions(
    settings: Settings, client: FhirClient, wait: float = SUBSCRIPTIONS_TIMEOUT_SECONDS
) -> SubscriptionsStatus:
    """This deployment's Subscriptions, or "HAPI unreachable: <reason>" within `wait` seconds."""
    now = datetime.now(UTC)
    try:
        async with asyncio.timeout(wait):
            rows = await subscription_status(settings, client)
    except TimeoutError:
        reason = f"no answer within {wait:g} s"
    except (ResearchFlowError, httpx.HTTPError, OSError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
    else:
        return SubscriptionsStatus(rows=tuple(rows), checked_at=now)
    logger.info("status page: HAPI unreachable: %s", reason)
    return SubscriptionsStatus(error=f"HAPI unreachable: {reason}", checked_at=now)


async def _watermark_row(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...] | None:
    # Look before reading, so a never-initialised batch layer leaves no ERROR in the server log.
    exists = await (await conn.execute("SELECT to_regclass('rf_batch.watermark')")).fetchone()
    if exists is None or exists[0] is None:
        return None
    return await (await conn.execute(WATERMARK_SQL)).fetchone()


async def read_batch_watermark(database: Database, now: datetime | None = None) -> BatchStatus:
    """The row of `rf_batch.watermark`; a missing table means the batch was never refreshed."""
    now = now or datetime.now(UTC)
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS + 1):
            if isinstance(database, str):
                async with await psycopg.AsyncConnection.connect(
                    database, connect_timeout=int(DATABASE_TIMEOUT_SECONDS), autocommit=True
                ) as conn:
                    row = await _watermark_row(conn)
            else:
                async with database.connection(timeout=DATABASE_TIMEOUT_SECONDS) as conn:
                    row = await _watermark_row(conn)
    except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
        return BatchStatus()
    except TimeoutError:
        return BatchStatus(error="PostgreSQL unreachable: no answer in time")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BatchStatus(error=f"PostgreSQL unreachable: {reason}")
    if row is None or row[0] is None:
        return BatchStatus()
    watermark = str(row[0])
    refreshed_at: datetime | None = row[1]
    resources = int(row[2]) if row[2] is not None else None
    return BatchStatus(
        watermark=watermark,
        refreshed_at=refreshed_at,
        resources=resources,
        age_seconds=_age(watermark, now),
    )


def _age(instant: str | None, now: datetime) -> float | None:
    millis = parse_instant(instant)
    if not millis:
        return None
    return max(0.0, now.timestamp() - millis / 1000.0)


def _reject_row(raw: Any) -> RejectRow:
    # Pick the few fields shown: whatever else a reject record holds never reaches the page.
    data = raw if isinstance(raw, dict) else {}
    issues: list[str] = []
    for issue in data.get("issues") or []:
        if not isinstance(issue, dict):
            continue
        where = issue.get("expression")
        text = str(issue.get("diagnostics") or "")
        issues.append(f"{where}: {text}" if where else text)
    at = data.get("at")
    return RejectRow(
        resource_type=str(data.get("type") or "?"),
        resource_id=str(data.get("id") or "?"),
        issues=tuple(issues),
        at=str(at) if at else None,
    )


async def _read_speed(store: SpeedStore, now: datetime) -> dict[str, Any]:
    types = await store.known_types()
    counts = [(t, await store.count(t)) for t in types]
    watermark = await store.poller_watermark()
    return {
        "epoch": await store.epoch(),
        "hourly": tuple(await store.hourly_changes(HOURS)),
        "type_counts": tuple(counts),
        "poller_watermark": watermark,
        "poller_lag_seconds": _age(watermark, now),
        "missed": await store.missed_count(),
        "reject_total": await store.reject_count(),
        "rejects": tuple(_reject_row(r) for r in await store.recent_rejects(REJECTS_SHOWN)),
    }


async def gather_status(
    settings: Settings,
    store: SpeedStore | None,
    database: Database,
    fhir_client: FhirClient | None,
    *,
    cache: SubscriptionCache | None = None,
    now: datetime | None = None,
) -> StatusData:
    """Read every section of the status page; a dependency that fails becomes a message.

    `store` is None when the speed layer is off (USE_SPEED_LAYER=false).
    `database` is a libpq URL or a psycopg pool. With `cache`, HAPI is asked at most once
    per its TTL; without `fhir_client` only the cache's last answer (if any) is shown.
    """
    now = now or datetime.now(UTC)

    async def subscriptions() -> SubscriptionsStatus:
        if fhir_client is None:
            last = cache.last() if cache is not None else None
            return last or SubscriptionsStatus(checked=False)
        if cache is not None:
            return await cache.get(settings, fhir_client)
        return await read_subscriptions(settings, fhir_client)

    async def speed() -> dict[str, Any]:
        if store is None:
            return {"speed_disabled": True}
        try:
            return await _read_speed(store, now)
        except Exception as exc:  # redis-py raises more than RedisError on a dead socket
            logger.info("status page: speed layer unreadable: %s", exc)
            return {"speed_error": f"Redis unreachable: {exc}"}

    speed_values, batch, subs = await asyncio.gather(
        speed(), read_batch_watermark(database, now), subscriptions()
    )
    return StatusData(generated_at=now, batch=batch, subscriptions=subs, **speed_values)


async def update_gauges(metrics: Metrics, store: SpeedStore | None, database: Database) -> None:
    """Set `speed_size` per type, `batch_watermark_age`, `poller_lag` and `missed_recorded`
    from the stores.

    Call it before rendering `/metrics` (or periodically); `database` is a libpq URL or a
    psycopg pool, `store` None when the speed layer is off. A gauge whose source cannot be
    read keeps its last value; the failure is logged, never raised.
    """
    now = datetime.now(UTC)
    try:
        if store is None:
            raise LookupError("speed layer disabled")
        for resource_type in await store.known_types():
            metrics.speed_size.labels(resource_type=resource_type).set(
                await store.count(resource_type)
            )
        lag = _age(await store.poller_watermark(), now)
        if lag is not None:
            metrics.poller_lag.set(lag)
        metrics.missed_recorded.set(await store.missed_count())
    except Exception as exc:  # redis-py raises more than RedisError on a dead socket
        logger.info("metrics: speed layer unreadable: %s", exc)
    batch = await read_batch_watermark(database, now)
    if batch.age_seconds is not None:
        metrics.batch_watermark_age.set(batch.age_seconds)
    elif batch.error:
        logger.info("metrics: %s", batch.error)


# -- HTML ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def format_age(seconds: float | None) -> str:
    """A short human duration: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`."""
    if seconds is None:
        return "unknown"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def render_chart(hourly: Sequence[tuple[str, int]]) -> str:
    """An inline SVG bar chart: one `rect.bar` per hour with `data-hour`/`data-count`."""
    bar_w, gap, height, top, bottom, left = 28, 4, 140, 16, 22, 40
    width = left + len(hourly) * (bar_w + gap)
    peak = max((c for _, c in hourly), default=0) or 1
    parts = [
        f'<svg id="hourly-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{top + height + bottom}" viewBox="0 0 {width} {top + height + bottom}" '
        f'role="img" aria-label="changes per hour, last {len(hourly)} hours (UTC)">',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" class="axis">{peak}</text>',
        f'<text x="{left - 6}" y="{top + height}" text-anchor="end" class="axis">0</text>',
        f'<line x1="{left}" y1="{top + height}" x2="{width}" y2="{top + height}" class="base"/>',
    ]
    for i, (hour, count) in enumerate(hourly):
        h = round(height * count / peak)
        if count and h < 2:
            h = 2
        x = left + i * (bar_w + gap)
        label = f"{hour}:00Z: {count} change{'s' if count != 1 else ''}"
        parts.append(
            f'<rect class="bar" data-hour="{_e(hour)}" data-count="{count}" x="{x}" '
            f'y="{top + height - h}" width="{bar_w}" height="{h}"><title>{_e(label)}</title>'
            "</rect>"
        )
        if i % 6 == 0 or i == len(hourly) - 1:
            parts.append(
                f'<text x="{x + bar_w / 2:g}" y="{top + height + 16}" text-anchor="middle" '
                f'class="axis">{_e(hour[-2:])}h</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(title: str, section_id: str, content: str) -> str:
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{content}</section>'


def _error(text: str) -> str:
    return f'<p class="error">{_e(text)}</p>'


def _speed_sections(data: StatusData) -> dict[str, str]:
    if data.speed_disabled:
        return {
            "coverage": _section(
                "Speed layer",
                "speed",
                "<p>Disabled (USE_SPEED_LAYER=false): answers come from the batch layer.</p>",
            )
        }
    if data.speed_error:
        return {"coverage": _section("Speed layer", "speed", _error(data.speed_error))}
    total = sum(c for _, c in data.hourly)
    state = (
        "complete (epoch marker since " + _e(data.epoch) + ")"
        if data.epoch
        else '<span class="warn">degraded: no epoch marker (Redis lost its data or was '
        "never caught up); answers come from the batch layer until the poller re-reads</span>"
    )
    coverage = (
        f"<p>State: {state}</p>"
        f"<p>Changes received in the last {len(data.hourly)} hours: "
        f'<strong id="changes-total">{total}</strong> (UTC hours, oldest first)</p>'
        + render_chart(data.hourly)
    )
    types = (
        _table(
            ["resource type", "entries"],
            [[_e(t), f'<span class="num">{c}</span>'] for t, c in data.type_counts],
            "types",
        )
        if data.type_counts
        else "<p>The speed layer holds no entries.</p>"
    )
    poller = (
        "<dl>"
        f'<dt>Poller watermark (HAPI clock)</dt><dd id="poller-watermark">'
        f"{_e(data.poller_watermark or 'never polled')}</dd>"
        f'<dt>Poller lag</dt><dd id="poller-lag">{_e(format_age(data.poller_lag_seconds))}'
        "</dd>"
        f'<dt>Missed notifications (found by the poller)</dt><dd id="missed">{data.missed}</dd>'
        f'<dt>Rejected resources (all time)</dt><dd id="reject-total">{data.reject_total}</dd>'
        "</dl>"
    )
    reject_rows = [
        [
            _e(r.resource_type),
            _e(r.resource_id),
            "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in r.issues) + "</ul>",
            _e(r.at or ""),
        ]
        for r in data.rejects
    ]
    rejects = (
        _table(["type", "id", "issues", "rejected at"], reject_rows, "rejects")
        if reject_rows
        else "<p>No rejects.</p>"
    )
    return {
        "coverage": _section("Speed-layer coverage", "coverage", coverage),
        "entries": _section("Entries per resource type", "entries", types),
        "poller": _section("Poller", "poller", poller),
        "rejects": _section(f"Recent rejects (newest {REJECTS_SHOWN})", "recent-rejects", rejects),
    }


def _batch_section(batch: BatchStatus) -> str:
    if batch.error:
        return _section("Batch layer", "batch", _error(batch.error))
    if batch.watermark is None:
        return _section("Batch layer", "batch", '<p id="batch-watermark">never refreshed</p>')
    refreshed = batch.refreshed_at.isoformat() if batch.refreshed_at else "unknown"
    return _section(
        "Batch layer",
        "batch",
        "<dl>"
        f'<dt>Watermark</dt><dd id="batch-watermark">{_e(batch.watermark)}</dd>'
        f'<dt>Age</dt><dd id="batch-age">{_e(format_age(batch.age_seconds))}</dd>'
        f'<dt>Last refresh</dt><dd id="batch-refreshed">{_e(refreshed)}</dd>'
        f'<dt>Resources</dt><dd id="batch-resources">{_e(batch.resources)}</dd>'
        "</dl>",
    )


def _subscriptions_section(subs: SubscriptionsStatus) -> str:
    if not subs.checked:
        return _section("Subscriptions", "subscriptions", "<p>Not checked.</p>")
    checked = (
        f'<p class="small">checked {_e(subs.checked_at.isoformat(timespec="seconds"))}</p>'
        if subs.checked_at
        else ""
    )
    if subs.error:
        return _section("Subscriptions", "subscriptions", _error(subs.error) + checked)
    if not subs.rows:
        return _section(
            "Subscriptions",
            "subscriptions",
            '<p class="warn">No Subscriptions of this deployment on HAPI '
            "(run <code>researchflow subscriptions bootstrap</code>).</p>" + checked,
        )
    rows = [
        [
            _e(s.id),
            _e(s.criteria),
            f'<span class="{"ok" if s.status == "active" else "warn"}">{_e(s.status)}</span>',
            _e(s.endpoint),
            _e(s.error or ""),
        ]
        for s in subs.rows
    ]
    return _section(
        "Subscriptions",
        "subscriptions",
        _table(["id", "criteria", "status", "endpoint", "error"], rows, "subscription-table")
        + checked,
    )


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1100px}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;
text-align:left;vertical-align:top}th{background:#f3f3f3}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}dd{margin:0}
.error{color:#a00;font-weight:bold}.warn{color:#a60}.ok{color:#070}.small{color:#666;
font-size:.85rem}ul{margin:0;padding-left:1.1rem}
svg .bar{fill:#3b73b9}svg .bar:hover{fill:#1d4f8f}svg .axis{font-size:11px;fill:#555}
svg .base{stroke:#999}
"""


def render_status(data: StatusData) -> str:
    """The status page as one self-contained HTML document (no scripts, no outside assets)."""
    generated = data.generated_at.isoformat(timespec="seconds")
    speed = _speed_sections(data)
    # What an operator checks first (is data flowing, how far behind) above the details.
    body = "".join(
        [
            speed["coverage"],
            speed.get("poller", ""),
            _batch_section(data.batch),
            _subscriptions_section(data.subscriptions),
            speed.get("entries", ""),
            speed.get("rejects", ""),
        ]
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="refresh" content="60">'
        f"<title>ResearchFlow status</title><style>{_STYLE}</style></head><body>"
        f'<h1>ResearchFlow status</h1><p class="small">as of <span id="generated">'
        f"{_e(generated)}</span>; reloads every minute</p>{body}</body></html>"
    )


# -- the route -----------------------------------------------------------------------------


def status_route(
    settings: Settings,
    *,
    path: str = "/status",
    fhir_client_factory: Callable[[], FhirClient] | None = None,
) -> Route:
    """`GET /status`, for `serving.api.create_app(settings, extra_routes=[status_route(settings)])`.

    Authenticates with SERVING_TOKEN (Bearer, or HTTP Basic with a token as the password;
    none needed when the app is `insecure`); a 401 carries `WWW-Authenticate: Basic
    realm="ResearchFlow"` so a browser asks for it. Reads
    `request.state.store` (SpeedStore, None when the speed layer is off) and
    `request.state.pool` (psycopg pool) from the app's lifespan. HAPI is asked through a
    short-lived client of the route's own (`fhir_client_factory`; default: no retries, 5 s
    timeout) at most every 30 s.
    """
    cache = SubscriptionCache()

    def default_factory() -> FhirClient:
        return FhirClient(
            settings.fhir_base_url,
            timeout=httpx.Timeout(SUBSCRIPTIONS_TIMEOUT_SECONDS),
            max_retries=0,
        )

    factory = fhir_client_factory or default_factory

    async def status_page(request: Request) -> Response:
        started = time.perf_counter()
        auth.authenticate(
            request.headers.get("authorization"),
            settings.serving_tokens,
            insecure=getattr(request.app.state, "insecure", False),
            allow_basic=True,
        )
        store: SpeedStore | None = getattr(request.state, "store", None)
        database: Database = getattr(request.state, "pool", None) or settings.database_url
        if cache.fresh() is not None:
            data = await gather_status(settings, store, database, None, cache=cache)
        else:
            async with factory() as fhir:
                data = await gather_status(settings, store, database, fhir, cache=cache)
        metrics: Metrics | None = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.query_latency.labels("status").observe(time.perf_counter() - started)
        return HTMLResponse(
            render_status(data),
            headers={
                "Cache-Control": "no-store",
                # No script runs on this page, whatever a reject's text may hold.
                "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return Route(path, status_page, methods=["GET"], name="status")
