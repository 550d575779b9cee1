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
import copy
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlencode

from core.fhir_values import format_instant, instant_bounds, instant_of_ms
from core.validation import check_id, check_resource, is_resource_type
from subscriptions.standin.delivery import (
    CONTROL_PARAMS,
    EXT_DELIVER_LATEST,
    EXT_SEND_DELETES,
    EXT_STRIP_VERSIONS,
    Deliverer,
    DeliveryAttempt,
    Notification,
    Operation,
    RestHook,
    channel_headers,
    parse_criteria,
    resource_matches,
)
from subscriptions.standin.http import StandInError, build_app

logger = logging.getLogger(__name__)

# A host that never answers (tests point Subscriptions at it; HAPI still activates them).
UNREACHABLE_HOST = "unreachable.invalid"
PAYLOAD_TYPES = frozenset({"application/fhir+json", "application/json", "json"})


class Truth(NamedTuple):
    """HAPI's truth about one resource: its newest version (a deletion has no resource)."""

    version: int
    deleted: bool
    resource: dict[str, Any] | None


@dataclass(frozen=True)
class VersionRecord:
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
    items: list[Any]  # (type, id) keys for searches, VersionRecord for history
    created: float


def _strip_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = dict(out.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    out["meta"] = meta
    return out


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
        self._versions: dict[tuple[str, str], list[VersionRecord]] = {}
        self._log: list[VersionRecord] = []
        self._seq = 0
        self._next_id = 1
        self._last_ms = 0
        self._pages: dict[str, _Pages] = {}
        self._search_cache: dict[str, tuple[float, str]] = {}
        self._activation_failure: str | None = None
        self._activations: set[asyncio.Task[None]] = set()
        self.app = build_app(self)

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
        return _hapi_instant(int((time.time() + self.clock_skew) * 1000))

    # -- the store ----------------------------------------------------------------------------
    def _tick(self) -> int:
        ms = int((time.time() + self.clock_skew) * 1000)
        self._last_ms = max(ms, self._last_ms + 1)
        return self._last_ms

    def _current(self, resource_type: str, resource_id: str) -> VersionRecord | None:
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
    ) -> VersionRecord:
        previous = self._current(resource_type, resource_id)
        ms = self._tick()
        version = 1 if previous is None else previous.version + 1
        stored: dict[str, Any] | None = None
        if resource is not None:
            stored = copy.deepcopy(resource)
            stored["id"] = resource_id
            meta = dict(stored.get("meta") or {})
            meta["versionId"] = str(version)
            meta["lastUpdated"] = _hapi_instant(ms)
            stored["meta"] = meta
        method = "DELETE" if resource is None else "POST" if previous is None else "PUT"
        self._seq += 1
        record = VersionRecord(
            self._seq, resource_type, resource_id, version, _hapi_instant(ms), ms, method, stored
        )
        self._versions.setdefault((resource_type, resource_id), []).append(record)
        self._log.append(record)
        self._after_change(record, previous)
        return record

    async def _create(self, resource: Any, resource_type: str | None = None) -> VersionRecord:
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
    ) -> tuple[VersionRecord, bool]:
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

    async def _delete(self, resource_type: str, resource_id: str) -> VersionRecord | None:
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

    def _read(self, resource_type: str, resource_id: str, vid: str | None = None) -> VersionRecord:
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
        targets: list[VersionRecord] = []
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

    def _subscription_changed(self, record: VersionRecord) -> None:
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

    def _after_change(self, record: VersionRecord, previous: VersionRecord | None) -> None:
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

    def _notify(self, hook: RestHook, operation: Operation, record: VersionRecord) -> None:
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
            source: list[VersionRecord] = versions
        else:
            source = self._log
        try:
            since_ms = instant_bounds(since)[0] if since else None
        except ValueError as exc:
            raise StandInError(400, f"Invalid _since value: {since}") from exc
        items: list[VersionRecord] = []
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
    def _history_entry(v: VersionRecord, base: str) -> dict[str, Any]:
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


def _hapi_instant(ms: int) -> str:
    # As HAPI renders meta.lastUpdated and its clock: +00:00, never Z (docs/hapi.md).
    return format_instant(instant_of_ms(ms), zulu=False)
