"""HTTP answers in FHIR's shape: OperationOutcome responses, and the one table that maps errors
to them for every app (Starlette's `exception_handlers`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.codec import CorruptRecord
from core.errors import (
    BatchLayerUnavailable,
    DependencyUnavailable,
    InvalidRequest,
    Issue,
    NotFound,
    SpeedLayerUnavailable,
    Unauthorized,
)

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# Told each time an error is answered (the receiver counts refusals): request, error, status.
Observe = Callable[[Request, Exception, int], None]
Handler = Callable[[Request, Exception], Awaitable[Response]]


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    """An OperationOutcome for these issues."""
    out: list[dict[str, Any]] = []
    for issue in issues:
        entry: dict[str, Any] = {
            "severity": issue.severity,
            "code": issue.code,
            "diagnostics": issue.diagnostics,
        }
        if issue.expression:
            entry["expression"] = [issue.expression]
        out.append(entry)
    return {"resourceType": "OperationOutcome", "issue": out}


def outcome_response(
    status: int, issues: list[Issue], headers: dict[str, str] | None = None
) -> Response:
    """An OperationOutcome response (`application/fhir+json`)."""
    return JSONResponse(
        operation_outcome(issues), status_code=status, media_type=FHIR_JSON, headers=headers
    )


@dataclass(frozen=True)
class Answer:
    """How one kind of error is answered."""

    status: int
    issues: list[Issue]
    headers: dict[str, str] | None = None
    log: str | None = None  # logged at ERROR, with the error after it


_SPEED_LAYER = "the speed layer (Redis) cannot take the write; retry later"
_BATCH_LAYER = "the batch layer (PostgreSQL) cannot be reached; retry later"


def _unauthorized(exc: Unauthorized, request: Request, service: str) -> Answer:
    text = "missing or invalid credentials (Authorization: Bearer <token>)"
    return Answer(401, [Issue("login", text)], {"WWW-Authenticate": exc.challenge})


def _invalid(exc: InvalidRequest, request: Request, service: str) -> Answer:
    return Answer(exc.status_code, exc.issues, exc.headers or None)


def _not_found(exc: NotFound, request: Request, service: str) -> Answer:
    return Answer(404, [Issue("not-found", str(exc))])


def _http(exc: HTTPException, request: Request, service: str) -> Answer:
    # Starlette's own: no such route (404) or method (405).
    code = "not-found" if exc.status_code == 404 else "not-supported"
    text = f"{request.method} {request.url.path}: {exc.detail}"
    return Answer(exc.status_code, [Issue(code, text)], dict(exc.headers or {}) or None)


def _speed_layer(exc: Exception, request: Request, service: str) -> Answer:
    return Answer(
        503,
        [Issue("transient", _SPEED_LAYER)],
        {"Retry-After": "2"},
        "speed layer unavailable, answering 503",
    )


def _batch_layer(exc: Exception, request: Request, service: str) -> Answer:
    return Answer(
        503, [Issue("transient", _BATCH_LAYER)], {"Retry-After": "5"}, "batch layer unavailable"
    )


def _dependency(exc: Exception, request: Request, service: str) -> Answer:
    return Answer(
        503,
        [Issue("transient", "a service this one needs cannot be reached; retry later")],
        {"Retry-After": "5"},
        "a dependency is unavailable",
    )


def _not_initialised(exc: Exception, request: Request, service: str) -> Answer:
    return Answer(503, [Issue("transient", "the batch layer is not initialised (batch init)")])


def _definitions_differ(exc: Exception, request: Request, service: str) -> Answer:
    # A table of the batch layer lacks a column this process's view definitions read: it was
    # built (by `batch init`) from other definitions, typically a changed VIEWS_DIR that this
    # process read before the change.
    return Answer(
        503,
        [
            Issue(
                "transient",
                "the batch layer's tables were built from other view definitions than this "
                f"{service} read at start-up: restart it after changing VIEWS_DIR, or run "
                "`batch init` with its definitions",
            )
        ],
    )


def _corrupt_record(exc: Exception, request: Request, service: str) -> Answer:
    # A record this release cannot decode (a damaged frame, or a codec id of a newer
    # release): no answer would be exact without it, and it is the operator's to repair.
    return Answer(
        503,
        [
            Issue(
                "exception",
                f"the speed layer holds a record this release cannot read; see the {service}'s log",
            )
        ],
        None,
        "a speed-layer record does not decode",
    )


def _internal(exc: Exception, request: Request, service: str) -> Answer:
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return Answer(500, [Issue("exception", f"internal error; see the {service}'s log")])


# The one table: each error the apps answer, most specific first (Starlette picks by the
# error's class hierarchy). Statuses, texts and headers are the contract's.
TABLE: dict[type[Exception], Callable[[Any, Request, str], Answer]] = {
    Unauthorized: _unauthorized,
    InvalidRequest: _invalid,  # 400, 422, 413, 415: each carries its status and issues
    NotFound: _not_found,
    HTTPException: _http,
    SpeedLayerUnavailable: _speed_layer,
    CorruptRecord: _corrupt_record,
    BatchLayerUnavailable: _batch_layer,
    PoolTimeout: _batch_layer,
    psycopg.OperationalError: _batch_layer,
    psycopg.errors.UndefinedTable: _not_initialised,
    psycopg.errors.UndefinedColumn: _definitions_differ,
    DependencyUnavailable: _dependency,
    Exception: _internal,
}


class QuietLog:
    """At most one log line of a kind every `every` seconds (monotonic clock), the lines held
    back counted in the next one. A dependency that is down fails every request alike: one
    line says so, not one per request (HAPI retries each delivery for a minute)."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, kind: str) -> str | None:
        """None when this line of `kind` is held back; else the text to end it with (how many
        were held back since the last one, or "")."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        return f" ({held} more since the last such line)" if held else ""


def exception_handlers(
    service: str, observe: Observe | None = None
) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """Starlette `exception_handlers` answering every error of TABLE with an OperationOutcome.

    `service` names the app in a 500's text ("see the receiver's log"); `observe` is told of
    every error answered. A 500 is logged with its traceback (and Starlette re-raises it, so
    the server logs it too); a dependency down, at most once every 10 s (`QuietLog`).
    """
    quiet = QuietLog()

    def handler(map_error: Callable[[Any, Request, str], Answer]) -> Handler:
        async def answer(request: Request, exc: Exception) -> Response:
            found = map_error(exc, request, service)
            if found.log is not None and (held := quiet.admit(found.log)) is not None:
                logger.error("%s: %s%s", found.log, exc, held)
            if observe is not None:
                observe(request, exc, found.status)
            return outcome_response(found.status, found.issues, found.headers)

        return answer

    return {kind: handler(map_error) for kind, map_error in TABLE.items()}
