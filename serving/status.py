"""The operator's status page (`GET /status`) and the gauges it shares with `/metrics`.

Each section is read on its own and a failing dependency shows as a message in its section,
never as a 500: the page is what an operator opens when something is wrong.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import jinja2
import psycopg
from markupsafe import Markup
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
from serving.freshness import ViewFreshness, view_freshness
from serving.merge import read_speed
from serving.mirror import SpeedMirror
from serving.viewdef import ViewDefinition
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
    # Per served view: batch_as_of, speed_as_of and the rows each layer holds.
    views: tuple[ViewFreshness, ...] = ()
    views_error: str | None = None


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
    views: Mapping[str, ViewDefinition] | None = None,
    mirror: SpeedMirror | None = None,
) -> StatusData:
    """Read every section of the status page; a dependency that fails becomes a message.

    `store` is None when the speed layer is off (USE_SPEED_LAYER=false).
    `database` is a libpq URL or a psycopg pool. With `cache`, HAPI is asked at most once
    per its TTL; without `fhir_client` only the cache's last answer (if any) is shown.
    With `views` (the served views) and `mirror` (the query API's speed mirror), each view's
    freshness in both layers is read too (`serving.freshness`).
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

    async def freshness() -> dict[str, Any]:
        if not views or mirror is None:
            return {}
        try:
            return {"views": tuple(await read_freshness(settings, store, database, views, mirror))}
        except TimeoutError:
            return {"views_error": "PostgreSQL unreachable: no answer in time"}
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return {"views_error": f"PostgreSQL unreachable: {reason}"}

    speed_values, batch, subs, view_values = await asyncio.gather(
        speed(), read_batch_watermark(database, now), subscriptions(), freshness()
    )
    return StatusData(
        generated_at=now, batch=batch, subscriptions=subs, **speed_values, **view_values
    )


async def read_freshness(
    settings: Settings,
    store: SpeedStore | None,
    database: Database,
    views: Mapping[str, ViewDefinition],
    mirror: SpeedMirror,
) -> list[ViewFreshness]:
    """Each view in both layers, as `GET /views` lists them (the speed layer read first).
    Raises psycopg.Error or TimeoutError when PostgreSQL cannot answer."""
    speed = await read_speed(store, mirror, settings.use_speed_layer)
    async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS + 1):
        if isinstance(database, str):
            async with await psycopg.AsyncConnection.connect(
                database, connect_timeout=int(DATABASE_TIMEOUT_SECONDS)
            ) as conn:
                return await view_freshness(conn, views, speed)
        async with (
            database.connection(timeout=DATABASE_TIMEOUT_SECONDS) as conn,
            conn.transaction(),
        ):
            return await view_freshness(conn, views, speed)


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


def _escape(value: object) -> Markup:
    """Every value the template prints, escaped by the standard library's `html.escape`
    (quotes too), so the page reads as it did before templates (`'` is `&#x27;`, where
    markupsafe writes `&#39;`); what the template built itself is Markup and stays."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("serving", "templates"),
    autoescape=True,
    finalize=_escape,
    undefined=jinja2.StrictUndefined,
)


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


def chart_geometry(hourly: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """The inline SVG bar chart's geometry (px): one bar per hour, `h` scaled to the peak
    (at least 2 px for a non-zero count), an axis label every 6 hours and on the last."""
    bar_w, gap, height, top, bottom, left = 28, 4, 140, 16, 22, 40
    peak = max((c for _, c in hourly), default=0) or 1
    hours = []
    for i, (hour, count) in enumerate(hourly):
        h = round(height * count / peak)
        x = left + i * (bar_w + gap)
        hours.append(
            {
                "hour": hour,
                "count": count,
                "x": x,
                "h": 2 if count and h < 2 else h,
                "label": f"{hour}:00Z: {count} change{'s' if count != 1 else ''}",
                "axis": i % 6 == 0 or i == len(hourly) - 1,
                "axis_x": f"{x + bar_w / 2:g}",
            }
        )
    return {
        "bar_w": bar_w,
        "height": height,
        "top": top,
        "left": left,
        "width": left + len(hourly) * (bar_w + gap),
        "full_height": top + height + bottom,
        "peak": peak,
        "hours": hours,
    }


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
    """The status page as one self-contained HTML document (no scripts, no outside assets),
    from `serving/templates/status.html`."""
    return _TEMPLATES.get_template("status.html").render(
        data=data,
        bars=chart_geometry(data.hourly),
        changes_total=sum(c for _, c in data.hourly),
        format_age=format_age,
        rejects_shown=REJECTS_SHOWN,
        style=Markup(_STYLE),
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
        views = getattr(request.app.state, "views", None)
        mirror: SpeedMirror | None = getattr(request.state, "mirror", None)
        if cache.fresh() is not None:
            data = await gather_status(
                settings, store, database, None, cache=cache, views=views, mirror=mirror
            )
        else:
            async with factory() as fhir:
                data = await gather_status(
                    settings, store, database, fhir, cache=cache, views=views, mirror=mirror
                )
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
