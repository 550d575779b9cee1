"""A stand-in HAPI FHIR R4 JPA server (8.x behaviour) for tests, benchmarks and the demo.

What it does like HAPI (`../shared/hapi-rest-hook.md`): versioned resources with integer
`meta.versionId` and a strictly increasing server-clock `meta.lastUpdated`; deletes as new
versions; `_history` newest first with deletes, paged by `_offset` on its own URL (re-read
for each page, as HAPI 8.8 does); searches paged through `next` links
(`?_getpages=<token>&_getpagesoffset=N`); a 60 s search cache that `Cache-Control: no-cache`
bypasses; no-op updates create no version; purely numeric client ids are refused; R4
rest-hook Subscriptions validated at create (422), activated after a delay (or set to
`error`), delivered through per-subscription queues with 2 racing deliverers, retried with
back-off and dropped; `$trigger-subscription`.

Test knobs (all on `StandInHapi`): `pause_delivery()`/`resume_delivery()`, `drop_next(n)`,
`drop_when(predicate)`, `delivery_jitter`, `fail_activation(reason)` (HAPI 8.8 itself activates
any endpoint, reachable or not: docs/hapi.md), `clock_skew`, `await wait_idle()`, direct
`await create/update/delete/read`, and `resources`, the truth view.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import FhirFatalError
from core.fhir_values import JsonError, dumps, loads
from core.validation import check_id, check_resource, is_resource_type
from subscriptions.standin_delivery import (
    CONTROL_PARAMS,
    EXT_DELIVER_LATEST,
    EXT_SEND_DELETES,
    EXT_STRIP_VERSIONS,
    DeliveryAttempt,
    Notification,
    Operation,
    RestHook,
    channel_headers,
    instant_ms,
    parse_criteria,
    resource_matches,
)

__all__ = [
    "UNREACHABLE_HOST",
    "DeliveryAttempt",
    "Notification",
    "StandInError",
    "StandInHapi",
    "ThreadedStandIn",
    "Truth",
    "serve_asgi",
    "serve_standin",
    "serve_standin_in_thread",
]

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json;charset=utf-8"
# A host that never answers (tests point Subscriptions at it; HAPI still activates them).
UNREACHABLE_HOST = "unreachable.invalid"
PAYLOAD_TYPES = frozenset({"application/fhir+json", "application/json", "json"})
T = TypeVar("T")


class StandInError(FhirFatalError):
    """What the stand-in answers with an OperationOutcome (status_code is the HTTP status)."""

    def __init__(self, status_code: int, message: str, code: str = "processing") -> None:
        super().__init__(message, status_code)
        self.code = code

    def outcome(self) -> dict[str, Any]:
        return {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": self.code, "diagnostics": self.message}],
        }


class Truth(NamedTuple):
    """HAPI's truth about one resource: its newest version (a deletion has no resource)."""

    version: int
    deleted: bool
    resource: dict[str, Any] | None


@dataclass(frozen=True)
class _Version:
    seq: int
    resource_type: str
    resource_id: str
    version: int
    last_updated: str
    last_updated_ms: int
    method: str  # POST (created), PUT (updated / re-created) or DELETE
    resource: dict[str, Any] | None  # None for a deletion


@dataclass
class _Pages:
    kind: str  # "searchset" or "history"
    items: list[Any]  # (type, id) keys for searches, _Version for history
    created: float


def _strip_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = dict(out.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    out["meta"] = meta
    return out


def _http_date(ms: int) -> str:
    return formatdate(ms / 1000, usegmt=True)


class StandInHapi:
    """An in-memory HAPI FHIR R4 server. Use from one event loop; `.app` is its ASGI app.

    activation_delay: seconds before a `requested` Subscription becomes `active` (or `error`).
    retry_initial / retry_factor / retry_total: delivery back-off (HAPI: 1 s, x1.1, ~60 s).
    deliverers / queue_depth: concurrent workers and queue size per subscription (HAPI: 2, 1000).
    search_cache_seconds: identical searches reuse results this long (HAPI: 60 s).
    default_page_size / max_page_size: `_count` default and cap (the starter's 20 / 200).
    delivery_timeout: HTTP timeout of one delivery attempt.
    validate_resources: 422 for resources the project's validation gate rejects.
    clock_skew: seconds HAPI's clock runs ahead of this machine's (meta.lastUpdated, Date).
    """

    def __init__(
        self,
        *,
        activation_delay: float = 0.05,
        retry_initial: float = 1.0,
        retry_factor: float = 1.1,
        retry_total: float = 60.0,
        deliverers: int = 2,
        queue_depth: int = 1000,
        search_cache_seconds: float = 60.0,
        default_page_size: int = 20,
        max_page_size: int = 200,
        delivery_timeout: float = 10.0,
        validate_resources: bool = False,
        clock_skew: float = 0.0,
    ) -> None:
        from subscriptions.standin_delivery import Deliverer

        self.activation_delay = activation_delay
        self.search_cache_seconds = search_cache_seconds
        self.default_page_size = default_page_size
        self.max_page_size = max_page_size
        self.validate_resources = validate_resources
        self.clock_skew = clock_skew  # seconds HAPI's clock is ahead of this machine's
        self.base_url = "http://127.0.0.1/fhir"  # set by serve_standin
        self.delivery = Deliverer(
            read_current=self._read_current,
            deliverers=deliverers,
            queue_depth=queue_depth,
            retry_initial=retry_initial,
            retry_factor=retry_factor,
            retry_total=retry_total,
            timeout=delivery_timeout,
        )
        self._versions: dict[tuple[str, str], list[_Version]] = {}
        self._log: list[_Version] = []
        self._seq = 0
        self._next_id = 1
        self._last_ms = 0
        self._pages: dict[str, _Pages] = {}
        self._search_cache: dict[str, tuple[float, str]] = {}
        self._activation_failure: str | None = None
        self._activations: set[asyncio.Task[None]] = set()
        self.app = self._build_app()

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> StandInHapi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop activations and delivery workers, close the delivery HTTP client."""
        for task in list(self._activations):
            task.cancel()
        await asyncio.gather(*self._activations, return_exceptions=True)
        await self.delivery.aclose()

    # -- knobs --------------------------------------------------------------------------------
    def pause_delivery(self) -> None:
        self.delivery.pause()

    def resume_delivery(self) -> None:
        self.delivery.resume()

    def drop_next(self, n: int = 1) -> None:
        """Lose the next n notifications without trying (as HAPI does on a restart)."""
        self.delivery.drop_next(n)

    def drop_when(self, predicate: Callable[[Notification], bool] | None) -> None:
        """Lose every notification the predicate accepts (None: stop dropping)."""
        self.delivery.drop_when(predicate)

    @property
    def delivery_jitter(self) -> float:
        return self.delivery.jitter

    @delivery_jitter.setter
    def delivery_jitter(self, seconds: float) -> None:
        self.delivery.jitter = seconds

    def fail_activation(self, reason: str | None = "Failed to activate subscription") -> None:
        """Make the next activations end in `error` with this reason (None: activate again)."""
        self._activation_failure = reason

    @property
    def attempts(self) -> list[DeliveryAttempt]:
        return self.delivery.attempts

    @property
    def delivered(self) -> int:
        return self.delivery.delivered

    @property
    def dropped(self) -> int:
        return self.delivery.dropped

    @property
    def lost(self) -> int:
        return self.delivery.lost

    async def wait_idle(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until activations are done and every delivery queue is drained."""
        deadline = time.monotonic() + timeout
        while self._activations:
            if time.monotonic() > deadline:
                raise TimeoutError("subscription activations still pending")
            await asyncio.sleep(0.005)
        await self.delivery.wait_idle(max(0.0, deadline - time.monotonic()))

    @property
    def resources(self) -> dict[tuple[str, str], Truth]:
        """(type, id) -> Truth(version, deleted, resource) of every resource. Do not mutate."""
        return {
            key: Truth(v[-1].version, v[-1].resource is None, v[-1].resource)
            for key, v in dict(self._versions).items()
        }

    def now(self) -> str:
        """HAPI's clock, as in its `Date` header (ISO, ms)."""
        return self._iso(int((time.time() + self.clock_skew) * 1000))

    # -- the store ----------------------------------------------------------------------------
    @staticmethod
    def _iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")

    def _tick(self) -> int:
        ms = int((time.time() + self.clock_skew) * 1000)
        self._last_ms = max(ms, self._last_ms + 1)
        return self._last_ms

    def _current(self, resource_type: str, resource_id: str) -> _Version | None:
        versions = self._versions.get((resource_type, resource_id))
        return versions[-1] if versions else None

    def _read_current(self, resource_type: str, resource_id: str) -> tuple[int, Any] | None:
        current = self._current(resource_type, resource_id)
        return None if current is None else (current.version, current.resource)

    def _check_type(self, resource_type: str) -> None:
        if not is_resource_type(resource_type):
            raise StandInError(404, f"Unknown resource type '{resource_type[:80]}'", "not-found")

    def _check_body(self, resource: Any, resource_type: str | None) -> dict[str, Any]:
        if not isinstance(resource, dict):
            raise StandInError(400, "The body is not a FHIR resource", "structure")
        body_type = resource.get("resourceType")
        if not isinstance(body_type, str):
            raise StandInError(400, "The resource has no resourceType", "structure")
        self._check_type(body_type)
        if resource_type is not None and body_type != resource_type:
            raise StandInError(
                400, f"Resource type '{body_type}' does not match the URL '{resource_type}'"
            )
        if self.validate_resources:
            issues = check_resource(resource)
            if issues:
                raise StandInError(422, "; ".join(i.diagnostics for i in issues[:5]), "invalid")
        if body_type == "Subscription":
            self._validate_subscription(resource)
        return resource

    def _save(
        self, resource_type: str, resource_id: str, resource: dict[str, Any] | None
    ) -> _Version:
        previous = self._current(resource_type, resource_id)
        ms = self._tick()
        version = 1 if previous is None else previous.version + 1
        stored: dict[str, Any] | None = None
        if resource is not None:
            stored = copy.deepcopy(resource)
            stored["id"] = resource_id
            meta = dict(stored.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = self._iso(ms)
            stored["meta"] = meta
        method = "DELETE" if resource is None else "POST" if previous is None else "PUT"
        self._seq += 1
        record = _Version(
            self._seq, resource_type, resource_id, version, self._iso(ms), ms, method, stored
        )
        self._versions.setdefault((resource_type, resource_id), []).append(record)
        self._log.append(record)
        self._after_change(record, previous)
        return record

    async def _create(self, resource: Any, resource_type: str | None = None) -> _Version:
        resource = self._check_body(resource, resource_type)
        rtype = resource["resourceType"]
        while (rtype, str(self._next_id)) in self._versions:
            self._next_id += 1
        resource_id = str(self._next_id)  # HAPI's default SEQUENTIAL_NUMERIC server ids
        self._next_id += 1
        return self._save(rtype, resource_id, resource)

    async def _update(
        self,
        resource: Any,
        resource_type: str | None = None,
        resource_id: str | None = None,
        if_match: str | None = None,
    ) -> tuple[_Version, bool]:
        """PUT semantics; returns the version and whether it was created."""
        resource = self._check_body(resource, resource_type)
        rtype = resource["resourceType"]
        body_id = resource.get("id")
        if not isinstance(body_id, str) or not body_id:
            raise StandInError(
                400,
                "Can not update resource, resource body must contain an ID element for "
                "update (PUT) operation",
            )
        if resource_id is not None and body_id != resource_id:
            raise StandInError(
                400, f"Resource body ID '{body_id}' does not match the URL ID '{resource_id}'"
            )
        try:
            check_id(body_id)
        except Exception as exc:
            raise StandInError(400, f"Invalid resource ID '{body_id[:80]}'") from exc
        current = self._current(rtype, body_id)
        if if_match is not None:
            wanted = if_match.strip().removeprefix("W/").strip('"')
            if current is None or str(current.version) != wanted:
                raise StandInError(
                    412,
                    f"Trying to update {rtype}/{body_id}/_history/{wanted} "
                    "but this is not the current version",
                    "conflict",
                )
        if current is None and body_id.isdigit():
            # HAPI's default client_id_strategy ALPHANUMERIC.
            raise StandInError(
                400,
                f"Can not create resource with ID[{body_id}], no resource with this ID exists "
                "and clients may only assign IDs which contain at least one non-numeric "
                "character",
            )
        if (
            current is not None
            and current.resource is not None
            and _strip_meta(current.resource) == _strip_meta(resource)
        ):
            return current, False  # HAPI creates no version for a no-op update
        record = self._save(rtype, body_id, resource)
        return record, current is None or current.resource is None

    async def _delete(self, resource_type: str, resource_id: str) -> _Version | None:
        """A new deleted version; None when it was deleted already."""
        self._check_type(resource_type)
        current = self._current(resource_type, resource_id)
        if current is None:
            raise StandInError(
                404, f"Resource {resource_type}/{resource_id} is not known", "not-found"
            )
        if current.resource is None:
            return None
        return self._save(resource_type, resource_id, None)

    def _read(self, resource_type: str, resource_id: str, vid: str | None = None) -> _Version:
        self._check_type(resource_type)
        versions = self._versions.get((resource_type, resource_id))
        if not versions:
            raise StandInError(
                404, f"Resource {resource_type}/{resource_id} is not known", "not-found"
            )
        record = versions[-1]
        if vid is not None:
            if not vid.isdigit() or not 1 <= int(vid) <= len(versions):
                raise StandInError(
                    404,
                    f'Version "{vid}" is not valid for resource {resource_type}/{resource_id}',
                    "not-found",
                )
            record = versions[int(vid) - 1]
        if record.resource is None:
            raise StandInError(
                410,
                f"Resource was deleted at {record.last_updated}: "
                f"{resource_type}/{resource_id}/_history/{record.version}",
                "deleted",
            )
        return record

    # -- direct methods (what a REST client would do, without HTTP) ---------------------------
    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        """POST when the resource has no id (server id), else PUT (create-on-update)."""
        if resource.get("id"):
            return await self.update(resource)
        return copy.deepcopy((await self._create(resource)).resource or {})

    async def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        """PUT the resource; returns the stored copy with meta.versionId/lastUpdated."""
        record, _ = await self._update(resource)
        return copy.deepcopy(record.resource or {})

    async def delete(
        self, resource_or_type: dict[str, Any] | str, resource_id: str | None = None
    ) -> int | None:
        """DELETE; returns the deletion's version (None when it was deleted already)."""
        if isinstance(resource_or_type, dict):
            resource_type, resource_id = resource_or_type["resourceType"], resource_or_type["id"]
        else:
            resource_type = resource_or_type
        if resource_id is None:
            raise ValueError("delete needs a resource id")
        record = await self._delete(resource_type, resource_id)
        return None if record is None else record.version

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """The current version; StandInError 404 when unknown, 410 when deleted."""
        return copy.deepcopy(self._read(resource_type, resource_id).resource or {})

    async def trigger(
        self,
        subscription_id: str,
        resource_ids: Sequence[str] = (),
        search_urls: Sequence[str] = (),
    ) -> int:
        """`$trigger-subscription`: re-deliver matching resources (as PUT). Returns the count."""
        current = self._current("Subscription", subscription_id)
        if current is None or current.resource is None:
            raise StandInError(404, f"Subscription/{subscription_id} is not known", "not-found")
        hook = next((h for h in self.delivery.active() if h.id == subscription_id), None)
        if hook is None:
            raise StandInError(
                422, f"Subscription/{subscription_id} is not active", "business-rule"
            )
        targets: list[_Version] = []
        for ref in resource_ids:
            rtype, _, rid = ref.partition("/")
            record = self._read(rtype, rid.split("/_history")[0])
            targets.append(record)
        for url in search_urls:
            rtype, params = parse_criteria(url)
            self._check_type(rtype)
            targets.extend(
                versions[-1]
                for (t, _), versions in self._versions.items()
                if t == rtype
                and versions[-1].resource is not None
                and resource_matches(versions[-1].resource, params)
            )
        sent = 0
        for record in targets:
            if hook.matches(record.resource_type, record.resource):
                self._notify(hook, "trigger", record)
                sent += 1
        return sent

    # -- subscriptions ------------------------------------------------------------------------
    def _validate_subscription(self, sub: dict[str, Any]) -> None:
        def refuse(message: str) -> StandInError:
            return StandInError(422, message, "processing")

        status = sub.get("status")
        if not status:
            raise refuse(
                "Can not process submitted Subscription - Subscription.status must be "
                "populated on this server"
            )
        if status not in ("requested", "active"):
            raise refuse(
                f"Subscription.status must be 'requested' or 'active' on this server, "
                f"not '{status}'"
            )
        criteria = sub.get("criteria")
        if not isinstance(criteria, str) or not criteria.strip():
            raise refuse("Subscription.criteria must be populated")
        rtype, sep, _ = criteria.partition("?")
        if not sep or not rtype:
            raise refuse('Subscription.criteria must be in the form "{Resource Type}?[params]"')
        if not is_resource_type(rtype):
            raise refuse(
                f"Subscription.criteria contains invalid/unsupported resource type: {rtype}"
            )
        channel = sub.get("channel")
        if not isinstance(channel, dict) or not channel.get("type"):
            raise refuse("Subscription.channel.type must be populated")
        if channel["type"] != "rest-hook":
            raise refuse(
                f"Subscription.channel.type '{channel['type']}' is not supported on this server"
            )
        if not channel.get("endpoint"):
            raise refuse("Rest-hook subscriptions must have Subscription.channel.endpoint defined")
        payload = channel.get("payload")
        if payload is not None and str(payload).split(";")[0].strip() not in PAYLOAD_TYPES:
            raise refuse(f"Invalid value for Subscription.channel.payload: {payload}")

    @staticmethod
    def _hook(sub: dict[str, Any]) -> RestHook:
        channel = sub.get("channel") or {}
        flags = {
            ext.get("url"): ext.get("valueBoolean") is True
            for ext in channel.get("extension") or []
            if isinstance(ext, dict)
        }
        rtype, params = parse_criteria(sub["criteria"])
        payload = channel.get("payload")
        return RestHook(
            id=sub["id"],
            resource_type=rtype,
            params=tuple(params),
            endpoint=channel["endpoint"],
            payload=str(payload) if payload else None,
            headers=channel_headers(channel.get("header") or []),
            send_delete=flags.get(EXT_SEND_DELETES, False),
            strip_version_ids=flags.get(EXT_STRIP_VERSIONS, False),
            deliver_latest=flags.get(EXT_DELIVER_LATEST, False),
        )

    def _subscription_changed(self, record: _Version) -> None:
        sub = record.resource
        if sub is not None and sub.get("status") == "active":
            self.delivery.register(self._hook(sub))
            return
        task = asyncio.create_task(self.delivery.unregister(record.resource_id))
        self._track(task)
        if sub is not None and sub.get("status") == "requested":
            self._track(asyncio.create_task(self._activate(record.resource_id, record.version)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._activations.add(task)
        task.add_done_callback(self._activations.discard)

    async def _activate(self, subscription_id: str, version: int) -> None:
        await asyncio.sleep(self.activation_delay)
        current = self._current("Subscription", subscription_id)
        if current is None or current.version != version or current.resource is None:
            return  # changed meanwhile; the newer version decides
        sub = copy.deepcopy(current.resource)
        # HAPI 8.8 activates a rest-hook Subscription without contacting its endpoint (an
        # unreachable one ends `active` too); `fail_activation` models the `error` outcome.
        reason = self._activation_failure
        if reason is not None:
            sub["status"] = "error"
            sub["error"] = reason
        else:
            sub["status"] = "active"
        logger.info("stand-in Subscription/%s is now %s", subscription_id, sub["status"])
        self._save("Subscription", subscription_id, sub)

    def _after_change(self, record: _Version, previous: _Version | None) -> None:
        if record.resource_type == "Subscription":
            self._subscription_changed(record)
        operation: Operation
        if record.resource is None:
            operation, content = "delete", previous.resource if previous else None
        else:
            operation = "create" if record.method == "POST" else "update"
            content = record.resource
        for hook in self.delivery.active():
            if operation == "delete" and not hook.send_delete:
                continue  # without send-delete-messages HAPI never delivers deletes
            if hook.matches(record.resource_type, content):
                self._notify(hook, operation, record)

    def _notify(self, hook: RestHook, operation: Operation, record: _Version) -> None:
        self.delivery.enqueue(
            hook,
            Notification(
                hook,
                operation,
                record.resource_type,
                record.resource_id,
                record.version,
                record.resource,
            ),
        )

    # -- search and history -------------------------------------------------------------------
    def _page_size(self, params: dict[str, str]) -> int:
        raw = params.get("_count")
        if raw is None:
            return self.default_page_size
        if not raw.isdigit():
            raise StandInError(400, f"Invalid _count value: {raw[:40]}")
        return max(0, min(int(raw), self.max_page_size))

    def _store_pages(self, kind: str, items: list[Any]) -> str:
        token = str(uuid.uuid4())
        self._pages[token] = _Pages(kind, items, time.monotonic())
        while len(self._pages) > 2000:
            self._pages.pop(next(iter(self._pages)))
        return token

    def search(
        self, resource_type: str, query: list[tuple[str, str]], *, no_cache: bool = False
    ) -> tuple[str, bool]:
        """Run (or reuse) a search; returns its page token and whether it came from the cache."""
        self._check_type(resource_type)
        key = resource_type + "?" + urlencode(sorted(query))
        now = time.monotonic()
        cached = self._search_cache.get(key)
        if (
            not no_cache
            and cached is not None
            and now - cached[0] < self.search_cache_seconds
            and cached[1] in self._pages
        ):
            return cached[1], True
        params = [(n, v) for n, v in query if n not in CONTROL_PARAMS]
        try:
            matched = [
                versions[-1]
                for (rtype, _), versions in self._versions.items()
                if rtype == resource_type
                and versions[-1].resource is not None
                and resource_matches(versions[-1].resource, params)
            ]
        except ValueError as exc:
            raise StandInError(400, f"Invalid search parameter value: {exc}") from exc
        sort = dict(query).get("_sort", "")
        for field_ in reversed([s for s in sort.split(",") if s]):
            descending = field_.startswith("-")
            name = field_.lstrip("-")
            if name == "_lastUpdated":
                matched.sort(key=lambda v: v.seq, reverse=descending)
            elif name == "_id":
                matched.sort(key=lambda v: v.resource_id, reverse=descending)
            else:
                raise StandInError(400, f"Unsupported _sort parameter: {name}")
        token = self._store_pages("searchset", [(v.resource_type, v.resource_id) for v in matched])
        self._search_cache[key] = (now, token)
        return token, False

    def history(
        self,
        resource_type: str | None = None,
        resource_id: str | None = None,
        since: str | None = None,
    ) -> str:
        """A history traversal (newest first, deletes included); returns its page token."""
        if resource_type is not None:
            self._check_type(resource_type)
        if resource_id is not None and resource_type is not None:
            versions = self._versions.get((resource_type, resource_id))
            if not versions:
                raise StandInError(
                    404, f"Resource {resource_type}/{resource_id} is not known", "not-found"
                )
            source: list[_Version] = versions
        else:
            source = self._log
        try:
            since_ms = instant_ms(since) if since else None
        except ValueError as exc:
            raise StandInError(400, f"Invalid _since value: {since}") from exc
        items: list[_Version] = []
        for v in reversed(source):  # the log is in time order: stop at the first older one
            if since_ms is not None and v.last_updated_ms < since_ms:
                break
            if resource_type is None or v.resource_type == resource_type:
                items.append(v)
        return self._store_pages("history", items)

    def _bundle(
        self, token: str, offset: int, count: int, base: str, self_url: str
    ) -> dict[str, Any]:
        pages = self._pages.get(token)
        if pages is None:
            raise StandInError(410, f"Search ID '{token}' does not exist and may have expired")
        chunk = pages.items[offset : offset + count]
        entries: list[dict[str, Any]] = []
        if pages.kind == "searchset":
            for rtype, rid in chunk:
                current = self._current(rtype, rid)
                if current is not None and current.resource is not None:
                    entries.append(
                        {
                            "fullUrl": f"{base}/{rtype}/{rid}",
                            "resource": current.resource,
                            "search": {"mode": "match"},
                        }
                    )
        else:
            for v in chunk:
                entries.append(self._history_entry(v, base))
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": token,
            "meta": {"lastUpdated": self.now()},
            "type": pages.kind,
        }
        if pages.kind == "searchset":
            bundle["total"] = len(pages.items)
        links = [{"relation": "self", "url": self_url}]
        if offset + count < len(pages.items) and count > 0:
            query = urlencode(
                {
                    "_getpages": token,
                    "_getpagesoffset": offset + count,
                    "_count": count,
                    "_bundletype": pages.kind,
                }
            )
            links.append({"relation": "next", "url": f"{base}?{query}"})
        if offset > 0:
            query = urlencode(
                {
                    "_getpages": token,
                    "_getpagesoffset": max(0, offset - count),
                    "_count": count,
                    "_bundletype": pages.kind,
                }
            )
            links.append({"relation": "previous", "url": f"{base}?{query}"})
        bundle["link"] = links
        if entries:
            bundle["entry"] = entries
        return bundle

    @staticmethod
    def _history_entry(v: _Version, base: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"fullUrl": f"{base}/{v.resource_type}/{v.resource_id}"}
        if v.resource is not None:
            entry["resource"] = v.resource
        if v.method == "POST":
            request = {"method": "POST", "url": v.resource_type}
            status = "201 Created"
        else:
            request = {"method": v.method, "url": f"{v.resource_type}/{v.resource_id}"}
            status = "200 OK" if v.method == "PUT" else "204 No Content"
        entry["request"] = request
        entry["response"] = {
            "status": status,
            "etag": f'W/"{v.version}"',
            "lastModified": v.last_updated,
        }
        return entry

    # -- HTTP ---------------------------------------------------------------------------------
    def _build_app(self) -> Starlette:
        return Starlette(routes=_Http(self).routes())


_ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_Handler = Callable[[Request], Awaitable[Response]]


class _Http:
    """The FHIR REST routes: parse, call the stand-in, build the response."""

    def __init__(self, hapi: StandInHapi) -> None:
        self.hapi = hapi

    def routes(self) -> list[Route]:
        def route(
            path: str, endpoint: Callable[[Request], Awaitable[Response]], *methods: str
        ) -> Route:
            return Route(path, self._wrap(endpoint), methods=list(methods))

        return [
            route("/fhir/metadata", self.metadata, "GET"),
            route("/fhir/_history", self.history, "GET"),
            route("/fhir", self.pages, "GET"),
            route("/fhir/{type}/_history", self.history, "GET"),
            route("/fhir/{type}/{id}/_history/{vid}", self.vread, "GET"),
            route("/fhir/{type}/{id}/_history", self.history, "GET"),
            route("/fhir/{type}/{id}/{operation}", self.operation, "POST"),
            route("/fhir/{type}/{id}", self.read, "GET"),
            route("/fhir/{type}/{id}", self.update, "PUT"),
            route("/fhir/{type}/{id}", self.delete, "DELETE"),
            route("/fhir/{type}", self.search, "GET"),
            route("/fhir/{type}", self.create, "POST"),
            route("/{path:path}", self.unknown, *_ALL_METHODS),
        ]

    def _wrap(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                response = await endpoint(request)
            except StandInError as exc:
                response = self._json(exc.outcome(), exc.status_code or 500)
            response.headers["Date"] = _http_date(int((time.time() + self.hapi.clock_skew) * 1000))
            return response

        return handle

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(dumps(data), status, headers=headers, media_type=FHIR_JSON)

    @staticmethod
    def _base(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}/fhir"

    def _resource_response(self, request: Request, record: _Version, status: int) -> Response:
        base = self._base(request)
        location = f"{base}/{record.resource_type}/{record.resource_id}/_history/{record.version}"
        headers = {
            "ETag": f'W/"{record.version}"',
            "Last-Modified": _http_date(record.last_updated_ms),
            "Content-Location": location,
        }
        if status == 201:
            headers["Location"] = location
        return self._json(record.resource, status, headers)

    @staticmethod
    async def _body(request: Request) -> Any:
        try:
            return loads(await request.body())
        except JsonError as exc:
            raise StandInError(
                400, f"Failed to parse request body as JSON resource: {exc}"
            ) from exc

    async def unknown(self, request: Request) -> Response:
        raise StandInError(
            400,
            "Invalid request: The FHIR endpoint on this server does not know how to handle "
            f"{request.method} operation[{request.url.path.removeprefix('/fhir/')}]",
            "not-supported",
        )

    async def metadata(self, request: Request) -> Response:
        return self._json(
            {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "date": self.hapi.now(),
                "kind": "instance",
                "software": {"name": "HAPI FHIR Server (ResearchFlow stand-in)", "version": "8.x"},
                "fhirVersion": "4.0.1",
                "format": ["application/fhir+json"],
            }
        )

    async def read(self, request: Request) -> Response:
        p = request.path_params
        return self._resource_response(request, self.hapi._read(p["type"], p["id"]), 200)

    async def vread(self, request: Request) -> Response:
        p = request.path_params
        return self._resource_response(request, self.hapi._read(p["type"], p["id"], p["vid"]), 200)

    async def create(self, request: Request) -> Response:
        record = await self.hapi._create(await self._body(request), request.path_params["type"])
        return self._resource_response(request, record, 201)

    async def update(self, request: Request) -> Response:
        p = request.path_params
        record, created = await self.hapi._update(
            await self._body(request), p["type"], p["id"], request.headers.get("if-match")
        )
        return self._resource_response(request, record, 201 if created else 200)

    async def delete(self, request: Request) -> Response:
        p = request.path_params
        record = await self.hapi._delete(p["type"], p["id"])
        if record is None:
            message = f"Resource {p['type']}/{p['id']} was already deleted; nothing to do"
        else:
            message = (
                f"Successfully deleted 1 resource(s). "
                f"{p['type']}/{p['id']}/_history/{record.version}"
            )
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": message}],
        }
        headers = {"ETag": f'W/"{record.version}"'} if record is not None else None
        return self._json(outcome, 200, headers)

    async def search(self, request: Request) -> Response:
        query = list(request.query_params.multi_items())
        no_cache = "no-cache" in request.headers.get("cache-control", "").lower()
        token, _ = self.hapi.search(request.path_params["type"], query, no_cache=no_cache)
        count = self.hapi._page_size(dict(query))
        if dict(query).get("_summary") == "count":
            bundle = self.hapi._bundle(token, 0, 0, self._base(request), str(request.url))
            bundle.pop("entry", None)
            return self._json(bundle)
        return self._json(self.hapi._bundle(token, 0, count, self._base(request), str(request.url)))

    async def history(self, request: Request) -> Response:
        params = dict(request.query_params)
        p = request.path_params
        offset = params.get("_offset", "0")
        if not offset.isdigit():
            raise StandInError(400, f"Invalid _offset value: {offset[:40]}")
        token = self.hapi.history(p.get("type"), p.get("id"), params.get("_since"))
        count = self.hapi._page_size(params)
        bundle = self.hapi._bundle(token, int(offset), count, self._base(request), str(request.url))
        total = len(self.hapi._pages.pop(token).items)
        # HAPI 8.8 pages `_history` by `_offset` on the same URL, running it again for each
        # page (no snapshot): a change made meanwhile shifts later pages, so an entry can come
        # twice (newest first), never not at all.
        links = [link for link in bundle["link"] if link["relation"] == "self"]
        if count > 0 and int(offset) + count < total:
            query = [(k, v) for k, v in request.query_params.multi_items() if k != "_offset"]
            query.append(("_offset", str(int(offset) + count)))
            links.append(
                {
                    "relation": "next",
                    "url": str(request.url.replace(query=urlencode(query))),
                }
            )
        bundle["link"] = links
        return self._json(bundle)

    async def pages(self, request: Request) -> Response:
        params = dict(request.query_params)
        token = params.get("_getpages")
        if not token:
            raise StandInError(400, "This server does not accept searches at the base URL")
        offset = params.get("_getpagesoffset", "0")
        if not offset.isdigit():
            raise StandInError(400, f"Invalid _getpagesoffset: {offset[:40]}")
        count = self.hapi._page_size(params)
        return self._json(
            self.hapi._bundle(token, int(offset), count, self._base(request), str(request.url))
        )

    async def operation(self, request: Request) -> Response:
        p = request.path_params
        if p["type"] != "Subscription" or p["operation"] != "$trigger-subscription":
            raise StandInError(400, f"Unknown operation {p['operation'][:80]}", "not-supported")
        body = await self._body(request)
        resource_ids: list[str] = []
        search_urls: list[str] = []
        for param in (body or {}).get("parameter") or []:
            kind, value = next(
                ((k, v) for k, v in param.items() if k.startswith("value")), ("", None)
            )
            if param.get("name") == "resourceId" and kind != "valueUri":
                # HAPI 8.8's operation declares resourceId a uri (docs/hapi.md).
                found = kind.removeprefix("value") + "Type"
                raise StandInError(
                    400,
                    f"HAPI-0362: Request has parameter resourceId of type {found} but method "
                    "expects type UriType",
                )
            if param.get("name") == "resourceId" and isinstance(value, str):
                resource_ids.append(value)
            elif param.get("name") == "searchUrl" and isinstance(value, str):
                search_urls.append(value)
        if not resource_ids and not search_urls:
            raise StandInError(400, "No resourceId or searchUrl parameters were provided")
        sent = await self.hapi.trigger(p["id"], resource_ids, search_urls)
        job = uuid.uuid4()
        return self._json(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {
                        "name": "information",
                        "valueString": f"Subscription triggering job submitted as JOB ID: {job}"
                        f" ({sent} resource(s) queued)",
                    }
                ],
            }
        )


# -- serving ------------------------------------------------------------------------------------


def _bound_socket(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP,
    # and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, path: str = ""
) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn in this event loop; yields `http://host:port{path}`."""
    sock = _bound_socket(host, port)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="auto",
        ws="none",
        date_header=False,  # the stand-in sets Date itself, from HAPI's clock
        server_header=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.005)
        yield f"http://{host}:{sock.getsockname()[1]}{path}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=5)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock.close()


@contextlib.asynccontextmanager
async def serve_standin(
    hapi: StandInHapi, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the stand-in on loopback; yields its FHIR base (`http://127.0.0.1:PORT/fhir`).

    On exit the server stops and the stand-in's delivery workers are closed.
    """
    try:
        async with serve_asgi(hapi.app, host=host, port=port, path="/fhir") as base_url:
            hapi.base_url = base_url
            yield base_url
    finally:
        await hapi.aclose()


class ThreadedStandIn:
    """A stand-in served from a background thread's event loop (for benchmarks and the CLI)."""

    def __init__(self, hapi: StandInHapi, base_url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.hapi = hapi
        self.base_url = base_url
        self.loop = loop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine (e.g. `hapi.create(...)`) in the stand-in's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextlib.contextmanager
def serve_standin_in_thread(
    hapi: StandInHapi, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[ThreadedStandIn]:
    """Serve the stand-in from a daemon thread; yields a handle with `base_url` and `call`."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        box["stop"] = stop
        box["loop"] = asyncio.get_running_loop()
        try:
            async with serve_standin(hapi, host=host, port=port) as base_url:
                box["url"] = base_url
                ready.set()
                await stop.wait()
        except BaseException as exc:
            box["error"] = exc
            ready.set()
            raise

    def run() -> None:
        with contextlib.suppress(BaseException):
            asyncio.run(main())

    thread = threading.Thread(target=run, name="standin-hapi", daemon=True)
    thread.start()
    ready.wait(30)
    if "url" not in box:
        raise RuntimeError(f"the stand-in HAPI did not start: {box.get('error')!r}")
    loop: asyncio.AbstractEventLoop = box["loop"]
    try:
        yield ThreadedStandIn(hapi, box["url"], loop)
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(10)
