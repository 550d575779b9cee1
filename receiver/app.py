"""The webhook receiver: the Starlette app HAPI's rest-hook Subscriptions call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypedDict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from core import auth
from core.errors import InvalidRequest, InvalidResource, Issue, SpeedLayerUnavailable
from core.metrics import Metrics, metrics_response
from core.settings import Settings
from core.store import Deriver, SpeedStore, connect
from core.validation import NEVER_STORED, operation_outcome, parse_json
from receiver.body import (
    ACCEPT_ENCODING,
    BodyTooLarge,
    UnsupportedEncoding,
    content_codings,
    decode_body,
    read_body,
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

FHIR_JSON = "application/fhir+json"
RETRY_AFTER_SECONDS = "2"


class State(TypedDict):
    store: SpeedStore
    latest_version: VersionLookup | None
    fetch_resource: FetchResource | None


def outcome_response(
    status: int, issues: list[Issue], headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(
        operation_outcome(issues), status_code=status, media_type=FHIR_JSON, headers=headers
    )


class _Unauthorized(Exception):
    """`reason` says what was wrong with the credentials, never what they were."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
        raise _Unauthorized(
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


def _is_json(content_type: str | None) -> bool:
    if content_type is None:
        return True  # no content type at all: judge the body itself
    media = content_type.split(";", 1)[0].strip().lower()
    return media in {"application/fhir+json", "application/json", "application/json+fhir"}


async def _guarded(request: Request, handler: Callable[[bytes], Awaitable[Response]]) -> Response:
    """Authenticate, read the body within the limit, run the handler, map errors."""
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics

    def refuse(status: int, reason: str, detail: str) -> None:
        metrics.refused.labels(str(status), reason).inc()
        request.app.state.refusals.refused(request, status, detail)

    try:
        bearer_ok = request.app.state.insecure or (
            auth.bearer_position(request.headers.get("authorization"), settings.receiver_tokens)
            is not None
        )
        if not bearer_ok and not settings.receiver_hmac_secret:
            raise _Unauthorized(_credential_problem(request.headers.get("authorization")))
        # An HMAC signature covers the body as sent, so read it (bounded) before checking,
        # and decode only what an authenticated sender sent.
        limit = settings.receiver_max_body_bytes
        body = await read_body(request, limit)
        if not bearer_ok:
            _verify_hmac(request, settings, body)
        codings = content_codings(request.headers.getlist("content-encoding"))
        response = await handler(decode_body(body, codings, limit))
        if response.status_code == 415:
            refuse(415, "unsupported-media-type", "not a FHIR JSON content type")
        return response
    except _Unauthorized as exc:
        refuse(401, "unauthorized", exc.reason)
        return outcome_response(
            401,
            [Issue("login", "missing or invalid credentials (Authorization: Bearer <token>)")],
            {"WWW-Authenticate": "Bearer"},
        )
    except BodyTooLarge as exc:
        refuse(413, "too-large", str(exc))
        return outcome_response(413, [Issue("too-costly", str(exc))])
    except UnsupportedEncoding as exc:
        refuse(415, "unsupported-encoding", str(exc))
        return outcome_response(
            415, [Issue("not-supported", str(exc))], {"Accept-Encoding": ACCEPT_ENCODING}
        )
    except InvalidRequest as exc:
        kind = "rejected" if isinstance(exc, InvalidResource) else "invalid"
        metrics.notifications.labels(request.path_params.get("type", "-"), kind).inc()
        if isinstance(exc, InvalidResource):
            metrics.rejects.labels(request.path_params.get("type", "-")).inc()
        first = exc.issues[0] if exc.issues else None
        where = f" at {first.expression}" if first is not None and first.expression else ""
        refuse(exc.status_code, kind, f"{len(exc.issues)} issue(s), the first{where}")
        return outcome_response(exc.status_code, exc.issues)
    except SpeedLayerUnavailable as exc:
        logger.error("speed layer unavailable, answering 503: %s", exc)
        metrics.notifications.labels(request.path_params.get("type", "-"), "unavailable").inc()
        return outcome_response(
            503,
            [Issue("transient", "the speed layer (Redis) cannot take the write; retry later")],
            {"Retry-After": RETRY_AFTER_SECONDS},
        )


async def put_resource(request: Request) -> Response:
    resource_type = request.path_params["type"]
    resource_id = request.path_params["id"]
    store: SpeedStore = request.state.store
    derive: Deriver | None = request.app.state.derive
    metrics: Metrics = request.app.state.metrics

    async def handle(body: bytes) -> Response:
        started = time.perf_counter()
        check_path(resource_type, resource_id, request.app.state.settings.receiver_resource_types)
        if not _is_json(request.headers.get("content-type")):
            return outcome_response(
                415,
                [Issue("not-supported", "the content type must be application/fhir+json")],
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
        if not _is_json(request.headers.get("content-type")):
            return outcome_response(
                415, [Issue("not-supported", "a notification Bundle must be FHIR JSON")]
            )
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


async def not_allowed(request: Request, exc: HTTPException) -> Response:
    code = "not-found" if exc.status_code == 404 else "not-supported"
    return outcome_response(
        exc.status_code, [Issue(code, f"{request.method} {request.url.path}: {exc.detail}")]
    )


async def server_error(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return outcome_response(500, [Issue("exception", "internal error; see the receiver's log")])


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
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_response, methods=["GET"]),
            Route("/fhir", post_root, methods=["POST"]),
            Route("/fhir/", post_root, methods=["POST"]),
            Route("/fhir/{type}/{id}", put_resource, methods=["PUT"]),
            Route("/fhir/{type}/{id}", delete_resource, methods=["DELETE"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: not_allowed, Exception: server_error},  # type: ignore[dict-item]
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
