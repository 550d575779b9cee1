"""The webhook receiver: the Starlette app HAPI's rest-hook Subscriptions call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypedDict

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core import auth
from core.errors import InvalidRequest, InvalidResource, SpeedLayerUnavailable, Unauthorized
from core.http import exception_handlers
from core.metrics import Metrics, metrics_response
from core.settings import Settings
from core.store import Deriver, SpeedStore, connect
from core.validation import NEVER_STORED, parse_json
from receiver.body import (
    BodyTooLarge,
    UnsupportedEncoding,
    UnsupportedMediaType,
    content_codings,
    decode_body,
    read_body,
    require_json,
)
from receiver.ingest import (
    FetchResource,
    HapiLookup,
    VersionLookup,
    apply_delete,
    apply_notification_bundle,
    check_path,
    fetch_of,
    ingest,
)

logger = logging.getLogger(__name__)


class State(TypedDict):
    store: SpeedStore
    latest_version: VersionLookup | None
    fetch_resource: FetchResource | None


def _credential_problem(authorization: str | None) -> str:
    if not authorization:
        return "no Authorization header"
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return "an Authorization header that is not a bearer token"
    return "a bearer token that is not one of RECEIVER_TOKEN"


def _verify_hmac(request: Request, settings: Settings, body: bytes) -> None:
    secret = settings.receiver_hmac_secret
    if not secret or not auth.verify_signature(
        secret, request.headers.get(auth.SIGNATURE_HEADER), body
    ):
        raise Unauthorized(
            _credential_problem(request.headers.get("authorization"))
            + (" and no valid HMAC signature" if request.headers.get(auth.SIGNATURE_HEADER) else "")
        )


class RefusalLog:
    """One log line per refused request, at most one per status every `every` seconds (a
    misconfigured token makes HAPI retry every delivery for a minute); the metric counts all.
    """

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[int, float] = {}
        self._quiet: dict[int, int] = {}

    def refused(self, request: Request, status: int, reason: str) -> None:
        now = time.monotonic()
        if now - self._last.get(status, -self.every) < self.every:
            self._quiet[status] = self._quiet.get(status, 0) + 1
            return
        quiet = self._quiet.pop(status, 0)
        self._last[status] = now
        client = request.client.host if request.client else "?"
        logger.warning(
            "refused %s %s from %s: %d, %s%s",
            request.method,
            request.url.path[:200],
            client,
            status,
            reason,
            f" ({quiet} more refused with {status} since the last such line)" if quiet else "",
        )


async def _guarded(request: Request, handler: Callable[[bytes], Awaitable[Response]]) -> Response:
    """Authenticate, read the body within the limit, decode it, run the handler. Errors are
    answered by the app's exception handlers (and counted by `_observe`)."""
    settings: Settings = request.app.state.settings
    bearer_ok = request.app.state.insecure or (
        auth.bearer_position(request.headers.get("authorization"), settings.receiver_tokens)
        is not None
    )
    if not bearer_ok and not settings.receiver_hmac_secret:
        raise Unauthorized(_credential_problem(request.headers.get("authorization")))
    # An HMAC signature covers the body as sent, so read it (bounded) before checking, and
    # decode only what an authenticated sender sent.
    limit = settings.receiver_max_body_bytes
    body = await read_body(request, limit)
    if not bearer_ok:
        _verify_hmac(request, settings, body)
    codings = content_codings(request.headers.getlist("content-encoding"))
    return await handler(decode_body(body, codings, limit))


def _observe(request: Request, exc: Exception, status: int) -> None:
    """Count and log a refused request (never its credentials or body)."""
    metrics: Metrics = request.app.state.metrics
    resource_type = request.path_params.get("type", "-")

    def refuse(reason: str, detail: str) -> None:
        metrics.refused.labels(str(status), reason).inc()
        request.app.state.refusals.refused(request, status, detail)

    if isinstance(exc, Unauthorized):
        refuse("unauthorized", exc.reason)
    elif isinstance(exc, BodyTooLarge):
        refuse("too-large", exc.message)
    elif isinstance(exc, UnsupportedEncoding):
        refuse("unsupported-encoding", exc.message)
    elif isinstance(exc, UnsupportedMediaType):
        refuse("unsupported-media-type", "not a FHIR JSON content type")
    elif isinstance(exc, InvalidRequest):
        kind = "rejected" if isinstance(exc, InvalidResource) else "invalid"
        metrics.notifications.labels(resource_type, kind).inc()
        if isinstance(exc, InvalidResource):
            metrics.rejects.labels(resource_type).inc()
        first = exc.issues[0] if exc.issues else None
        where = f" at {first.expression}" if first is not None and first.expression else ""
        refuse(kind, f"{len(exc.issues)} issue(s), the first{where}")
    elif isinstance(exc, SpeedLayerUnavailable):
        metrics.notifications.labels(resource_type, "unavailable").inc()


async def put_resource(request: Request) -> Response:
    resource_type = request.path_params["type"]
    resource_id = request.path_params["id"]
    store: SpeedStore = request.state.store
    derive: Deriver | None = request.app.state.derive
    metrics: Metrics = request.app.state.metrics

    async def handle(body: bytes) -> Response:
        started = time.perf_counter()
        check_path(resource_type, resource_id, request.app.state.settings.receiver_resource_types)
        require_json(
            request.headers.get("content-type"), "the content type must be application/fhir+json"
        )
        # HAPI sends creates as PUT too, with If-Match: "N"; the version guard does its job.
        outcome = await ingest(
            store, body, path_type=resource_type, path_id=resource_id, derive=derive
        )
        metrics.write_latency.observe(time.perf_counter() - started)
        kind = "written" if outcome.written else "duplicate"
        metrics.notifications.labels(
            resource_type, "not-stored" if resource_type in NEVER_STORED else kind
        ).inc()
        return Response(status_code=204)

    return await _guarded(request, handle)


async def delete_resource(request: Request) -> Response:
    resource_type = request.path_params["type"]
    resource_id = request.path_params["id"]
    store: SpeedStore = request.state.store
    latest_version: VersionLookup | None = request.state.latest_version
    metrics: Metrics = request.app.state.metrics

    async def handle(_: bytes) -> Response:
        check_path(resource_type, resource_id, request.app.state.settings.receiver_resource_types)
        await apply_delete(store, latest_version, resource_type, resource_id)
        metrics.notifications.labels(resource_type, "deleted").inc()
        return Response(status_code=204)

    return await _guarded(request, handle)


async def post_root(request: Request) -> Response:
    store: SpeedStore = request.state.store
    derive: Deriver | None = request.app.state.derive

    async def handle(body: bytes) -> Response:
        if not body.strip():
            # An empty-payload notification: something matching changed; the poller fetches it.
            await store.request_catchup("empty-payload notification")
            return Response(status_code=204)
        require_json(request.headers.get("content-type"), "a notification Bundle must be FHIR JSON")
        data = parse_json(body)
        await apply_notification_bundle(
            store,
            derive,
            data,
            request.state.latest_version,
            request.app.state.settings.receiver_resource_types,
            request.state.fetch_resource,
        )
        return Response(status_code=204)

    return await _guarded(request, handle)


async def health(request: Request) -> Response:
    store: SpeedStore = request.state.store
    try:
        await store.client.ping()
        epoch = await store.epoch()
        redis_state = "up"
    except Exception:
        epoch, redis_state = None, "down"
    ok = redis_state == "up"
    body = {
        "status": "ok" if ok else "unavailable",
        "redis": redis_state,
        "speed_layer_complete": epoch is not None,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


def create_app(
    settings: Settings,
    *,
    derive: Deriver | None = None,
    latest_version: VersionLookup | None = None,
    fetch_resource: FetchResource | None = None,
    hapi: Callable[[], contextlib.AbstractAsyncContextManager[HapiLookup]] | None = None,
    insecure: bool = False,
    metrics: Metrics | None = None,
) -> Starlette:
    """The receiver app. Its lifespan opens Redis, and `hapi()` (e.g. the FHIR client of
    `subscriptions.fhir_client`) for a deletion's version and an id-only notification's
    resource unless `latest_version` and `fetch_resource` are given. Without either, a
    DELETE is tombstoned after the version held and the poller settles it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        client = connect(settings)
        store = SpeedStore(client, max_age_hours=settings.speed_max_age_hours)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(client.aclose)
            stack.push_async_callback(_flush_quietly, store)
            flusher = asyncio.create_task(_flush_every_second(store), name="stats-flush")
            stack.push_async_callback(_stop_task, flusher)
            try:
                await store.warn_about_config()
            except Exception as exc:
                logger.error(
                    "Redis at start-up: %s (the receiver answers 503 until it is back)", exc
                )
            lookup, fetch = latest_version, fetch_resource
            if hapi is not None and (lookup is None or fetch is None):
                fhir = await stack.enter_async_context(hapi())
                lookup = lookup or fhir.latest_version
                fetch = fetch or fetch_of(fhir)
            yield {"store": store, "latest_version": lookup, "fetch_resource": fetch}

    app = Starlette(
        # The router tries routes in order (a regex match each); a path of the PUT and DELETE
        # pattern matches none of the others, so the hot PUT goes first.
        routes=[
            Route("/fhir/{type}/{id}", put_resource, methods=["PUT"]),
            Route("/fhir/{type}/{id}", delete_resource, methods=["DELETE"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_response, methods=["GET"]),
            Route("/fhir", post_root, methods=["POST"]),
            Route("/fhir/", post_root, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers=exception_handlers("receiver", _observe),
    )
    # No 307 to the slash-less path: it would answer a PUT with an empty redirect (not an
    # OperationOutcome) whose Location echoes the client's Host header.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.derive = derive
    app.state.insecure = insecure
    app.state.metrics = metrics or Metrics.create()
    app.state.refusals = RefusalLog()
    return app


async def _stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _flush_every_second(store: SpeedStore) -> None:
    """Statistics are batched off the write path; after a burst, write them within a second."""
    while True:
        await asyncio.sleep(1.0)
        await _flush_quietly(store)


async def _flush_quietly(store: SpeedStore) -> None:
    try:
        await store.flush_stats()
    except Exception as exc:  # shutting down: statistics only
        logger.info("statistics not flushed at shutdown: %s", exc)
