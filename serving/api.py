"""The query API: GET /cohort, /views, /views/{name}/rows, /health and /metrics (Starlette)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict
from urllib.parse import urlencode

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core import auth
from core.errors import InvalidRequest, Issue, NotFound
from core.fhir_values import dumps, exact_json
from core.http import exception_handlers
from core.metrics import Metrics, metrics_response
from core.settings import Settings
from core.store import SpeedStore, connect
from serving.cohort import DEFAULT_COUNT, MAX_COUNT, parse_query, whole_number
from serving.exports import CSV_MEDIA_TYPE, csv_text
from serving.freshness import view_freshness
from serving.merge import (
    BatchCounts,
    SpeedView,
    cohort,
    read_speed,
)
from serving.mirror import SpeedMirror
from serving.registry import served_views
from serving.status import update_gauges
from serving.view_rows import RowKey, view_rows
from serving.viewdef import ViewDefinition

logger = logging.getLogger(__name__)
audit = logging.getLogger("serving.audit")

PG_TIMEOUT_SECONDS = 3.0
FORMATS = {"json": "application/json", "ndjson": "application/x-ndjson", "csv": CSV_MEDIA_TYPE}


class State(TypedDict):
    store: SpeedStore | None
    pool: AsyncConnectionPool[Any]
    mirror: SpeedMirror
    batch_counts: BatchCounts


def require_token(request: Request, allow_basic: bool = False) -> int:
    """Position of the SERVING_TOKEN the request carries (Bearer, or Basic password when
    `allow_basic`); -1 in insecure mode without one. Raises Unauthorized (401)."""
    settings: Settings = request.app.state.settings
    return auth.authenticate(
        request.headers.get("authorization"),
        settings.serving_tokens,
        insecure=request.app.state.insecure,
        allow_basic=allow_basic,
    )


Handler = Callable[[Request, int], Awaitable[Response]]


def endpoint(name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate and time one route (a latency metric per endpoint); errors are answered
    by the app's exception handlers."""

    async def run(request: Request) -> Response:
        metrics: Metrics = request.app.state.metrics
        started = time.perf_counter()
        try:
            return await handler(request, require_token(request))
        finally:
            metrics.query_latency.labels(name).observe(time.perf_counter() - started)

    return run


def _audit(request: Request, token: int, count: int | None) -> None:
    audit.info(
        "%s",
        json.dumps(
            {
                "time": now_iso(),
                "token": token,
                "path": request.url.path,
                "parameters": list(request.query_params.multi_items()),
                "count": count,
            }
        ),
    )


def _next_url(request: Request, drop: str, value: str) -> str:
    pairs = [(k, v) for k, v in request.query_params.multi_items() if k != drop]
    pairs.append((drop, value))
    return str(request.url.replace(query=urlencode(pairs)))


async def _speed(request: Request, resource_types: Collection[str] | None = None) -> SpeedView:
    """The speed layer as this request sees it, synced for `resource_types` (default: all)."""
    settings: Settings = request.app.state.settings
    return await read_speed(
        request.state.store, request.state.mirror, settings.use_speed_layer, resource_types
    )


async def get_cohort(request: Request, token: int) -> Response:
    settings: Settings = request.app.state.settings
    query = parse_query(request.query_params.multi_items())
    # The speed layer first, then one batch snapshot.
    speed = await _speed(request, query.resource_types)
    pool: AsyncConnectionPool[Any] = request.state.pool
    async with pool.connection(timeout=PG_TIMEOUT_SECONDS) as conn, conn.transaction():
        answer = await cohort(conn, query, speed, request.state.batch_counts)
    body: dict[str, Any] = {"total_count": answer.total_count}
    if query.ids:
        body["patient_ids"] = answer.patient_ids
    body["next"] = (
        _next_url(request, "_after", answer.patient_ids[-1])
        if query.ids and answer.has_more and answer.patient_ids
        else None
    )
    body.update(
        batch_count=answer.batch_count,
        added_count=answer.added_count,
        removed_count=answer.removed_count,
        sources=answer.sources,
        batch_as_of=answer.batch_as_of,
        speed_as_of=answer.speed_as_of,
        degraded=answer.degraded,
        query_timestamp=now_iso(),
        suppressed=False,
    )
    minimum = settings.min_cell_count
    if minimum:
        small = [k for k in ("total_count", "batch_count") if 0 < (body[k] or 0) < minimum]
        if small:
            for k in small:
                body[k] = None
            body["added_count"] = body["removed_count"] = None
        if "total_count" in small:
            body["suppressed"] = True
            body["next"] = None
            if query.ids:
                body["patient_ids"] = []
    _audit(request, token, body["total_count"])
    return Response(orjson.dumps(body), media_type="application/json")


async def list_views(request: Request, token: int) -> Response:
    views: dict[str, ViewDefinition] = request.app.state.views
    speed = await _speed(request)
    pool: AsyncConnectionPool[Any] = request.state.pool
    async with pool.connection(timeout=PG_TIMEOUT_SECONDS) as conn, conn.transaction():
        listed = await view_freshness(conn, views, speed)
    out = [view.contract() for view in listed]
    _audit(request, token, len(out))
    return Response(orjson.dumps({"views": out}), media_type="application/json")


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = whole_number(raw, maximum)
    if value is None:
        message = f"{name} must be a whole number from 0 to {maximum}"
        raise InvalidRequest(message, [Issue("invalid", message, name)])
    return value


async def get_view_rows(request: Request, token: int) -> Response:
    views: dict[str, ViewDefinition] = request.app.state.views
    name = request.path_params["name"]
    view = views.get(name)
    if view is None:
        raise NotFound(f"unknown view {name!r}")
    params = request.query_params
    fmt = params.get("_format", "json")
    if fmt not in FORMATS:
        raise _bad_parameter("_format", "_format must be json, ndjson or csv")
    count = _int_param(request, "_count", DEFAULT_COUNT, MAX_COUNT)
    if "_offset" in params:
        raise _bad_parameter("_offset", "_offset is not taken: pages follow a key (the next link)")
    if params.get("_csv", "safe") not in ("safe", "raw"):
        raise _bad_parameter("_csv", "_csv must be raw (cells as they are) or safe (the default)")
    after = RowKey.from_token(params["_after"]) if "_after" in params else None
    filters = [(k, v) for k, v in params.multi_items() if not k.startswith("_")]
    speed = await _speed(request, [view.resource])
    pool: AsyncConnectionPool[Any] = request.state.pool
    async with pool.connection(timeout=PG_TIMEOUT_SECONDS) as conn, conn.transaction():
        page = await view_rows(conn, name, view, filters, after, count, speed)
    next_url = _next_url(request, "_after", page.next_key.token()) if page.next_key else None
    headers = {"Link": f'<{next_url}>; rel="next"'} if next_url else {}
    _audit(request, token, len(page.rows))
    if fmt == "ndjson":
        text = b"".join(dumps(r, plain_decimals=True) + b"\n" for r in page.rows)
        return Response(text, media_type=FORMATS[fmt], headers=headers)
    if fmt == "csv":
        raw = params.get("_csv") == "raw"
        text_csv = csv_text(page.columns, page.rows, raw=raw)
        return Response(text_csv, media_type=FORMATS[fmt], headers=headers)
    body = {
        "name": name,
        "rows": page.rows,
        "next": next_url,
        "sources": ["batch_layer", "speed_layer"] if speed.consulted else ["batch_layer"],
        "batch_as_of": page.batch_as_of,
        "speed_as_of": speed.speed_as_of,
        "degraded": speed.degraded,
    }
    return Response(
        dumps(body, plain_decimals=True), media_type="application/json", headers=headers
    )


def _bad_parameter(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, [Issue("invalid", message, name)])


async def health(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    pool: AsyncConnectionPool[Any] = request.state.pool
    store: SpeedStore | None = request.state.store
    try:
        async with pool.connection(timeout=PG_TIMEOUT_SECONDS) as conn:
            await conn.execute("SELECT 1")
        postgresql = "up"
    except Exception:
        postgresql = "down"
    redis_state, complete = "disabled", None
    if settings.use_speed_layer and store is not None:
        try:
            await store.client.ping()
            complete = await store.epoch() is not None
            redis_state = "up"
        except Exception:
            redis_state = "down"
    if postgresql == "down":
        status = "unavailable"
    elif redis_state == "down" or complete is False:
        status = "degraded"
    else:
        status = "ok"
    body = {
        "status": status,
        "postgresql": postgresql,
        "redis": redis_state,
        "speed_layer_complete": complete,
    }
    return JSONResponse(body, status_code=503 if postgresql == "down" else 200)


async def metrics_with_gauges(request: Request) -> Response:
    """GET /metrics (no auth): gauges read from the stores first, then the registry."""
    await update_gauges(request.app.state.metrics, request.state.store, request.state.pool)
    return metrics_response(request)


async def _exact_numbers(conn: psycopg.AsyncConnection[Any]) -> None:
    # Resources and view rows are read with exact decimals, never doubles.
    exact_json(conn)


def create_app(
    settings: Settings,
    *,
    insecure: bool = False,
    metrics: Metrics | None = None,
    extra_routes: Sequence[BaseRoute] | None = None,
) -> Starlette:
    """The query API. Its lifespan owns the Redis client, the PostgreSQL pool and the mirror.

    Handlers of `extra_routes` find `request.state.store` (SpeedStore or None),
    `request.state.pool` (psycopg AsyncConnectionPool) and authenticate with `require_token`.
    """
    if not settings.serving_tokens and not insecure:
        raise ValueError("SERVING_TOKEN is required (or run with --insecure)")
    views = served_views(settings.views_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=16,
            open=False,
            kwargs={"connect_timeout": 5},
            name="serving",
            configure=_exact_numbers,
        )
        await pool.open(wait=False)
        store: SpeedStore | None = None
        client = connect(settings) if settings.use_speed_layer else None
        try:
            if client is not None:
                store = SpeedStore(client)
            yield {
                "store": store,
                "pool": pool,
                "mirror": SpeedMirror(views),
                "batch_counts": BatchCounts(),
            }
        finally:
            await pool.close()
            if client is not None:
                await client.aclose()

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_with_gauges, methods=["GET"]),
        Route("/cohort", endpoint("cohort", get_cohort), methods=["GET"]),
        Route("/views", endpoint("views", list_views), methods=["GET"]),
        Route("/views/{name}/rows", endpoint("view_rows", get_view_rows), methods=["GET"]),
        *(extra_routes or ()),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=exception_handlers("query API"),
    )
    app.state.settings = settings
    app.state.insecure = insecure
    app.state.metrics = metrics or Metrics.create()
    app.state.views = views
    return app


def now_iso() -> str:
    """This machine's clock, UTC, to the second (an answer's `query_timestamp`)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
