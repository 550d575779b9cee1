"""The write path into the speed layer, for the receiver and the poller: validate, derive, write.

A resource (`ingest`, `ingest_valid`), a deletion (`apply_delete`, `ingest_deletion`) and a
topic-based notification Bundle (`apply_notification_bundle`). What HAPI is asked on the way
(a deletion's version, an id-only notification's resource) comes in as a `HapiLookup`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from core.errors import FhirFatalError, InvalidRequest, InvalidResource, Issue
from core.fhir_values import split_reference
from core.store import Deriver, SpeedStore
from core.validation import (
    NEVER_STORED,
    ValidResource,
    check_id,
    is_resource_type,
    validate_resource,
)

logger = logging.getLogger(__name__)

# (version_id, last_updated, deleted) of the newest version HAPI holds, or None when unknown.
VersionLookup = Callable[[str, str], Awaitable[tuple[str | None, str | None, bool] | None]]
# The current version of a resource as HAPI holds it; None when HAPI says it is deleted (410).
# Raises when HAPI cannot answer.
FetchResource = Callable[[str, str], Awaitable[dict[str, Any] | None]]


class HapiLookup(Protocol):
    """What the write path asks HAPI (`subscriptions.fhir_client.FhirClient` is one)."""

    async def latest_version(
        self, resource_type: str, resource_id: str
    ) -> tuple[str | None, str | None, bool] | None:
        """The newest version HAPI holds (version_id, last_updated, deleted), None if unknown."""
        ...

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """The current version; FhirFatalError with status 410 when HAPI says it is deleted."""
        ...


def fetch_of(hapi: HapiLookup) -> FetchResource:
    """`hapi.read` with a deleted resource (HAPI's 410) as None."""

    async def fetch(resource_type: str, resource_id: str) -> dict[str, Any] | None:
        try:
            return await hapi.read(resource_type, resource_id)
        except FhirFatalError as exc:
            if exc.status_code == 410:  # HAPI: deleted
                return None
            raise

    return fetch


@dataclass(frozen=True)
class Outcome:
    """What one ingest did: `written` is False for duplicates and late older versions."""

    resource_type: str
    resource_id: str
    version_id: str | None
    written: bool


async def ingest_valid(
    store: SpeedStore, resource: ValidResource, derive: Deriver | None = None
) -> Outcome:
    """Write an already validated resource, version-guarded, with its derived view rows.

    The receiver's path (the poller writes in batches through `SpeedStore.upsert_many`): a
    write the guard turns away confirms the delivery of a change the poller wrote first.
    A resource of a `NEVER_STORED` type (a Subscription: it carries the receiver's token) is
    taken and not written.
    """
    if resource.resource_type in NEVER_STORED:
        logger.info(
            "not stored: %s/%s (%s resources never enter the speed layer)",
            resource.resource_type,
            resource.resource_id,
            resource.resource_type,
        )
        return Outcome(resource.resource_type, resource.resource_id, resource.version_id, False)
    derived = derive(resource) if derive is not None else None
    written = await store.upsert(
        resource.resource_type,
        resource.resource_id,
        body=resource.body,
        version_id=resource.version_id,
        last_updated=resource.last_updated,
        derived=derived,
    )
    if not written:
        # The poller may have written this version first, while the notification was on its
        # way: now it has come, so that change was not missed.
        await store.confirm_delivery(
            resource.resource_type, resource.resource_id, resource.version_id, resource.last_updated
        )
    return Outcome(resource.resource_type, resource.resource_id, resource.version_id, written)


async def ingest(
    store: SpeedStore,
    body: bytes | dict[str, Any],
    *,
    path_type: str | None = None,
    path_id: str | None = None,
    derive: Deriver | None = None,
) -> Outcome:
    """Validate and write one resource.

    Raises InvalidRequest (400) or InvalidResource (422) and writes nothing but one entry in
    the bounded reject store (for 422s); SpeedLayerUnavailable when Redis cannot take it.
    """
    try:
        resource = validate_resource(body, path_type=path_type, path_id=path_id)
    except InvalidResource as exc:
        await record_reject(store, body, path_type, path_id, exc)
        raise
    return await ingest_valid(store, resource, derive)


async def record_reject(
    store: SpeedStore,
    body: bytes | dict[str, Any],
    path_type: str | None,
    path_id: str | None,
    exc: InvalidResource,
) -> None:
    """Record a resource the gate refused (422) once in the reject store, without its body."""
    data: Any = body
    if isinstance(body, bytes):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = {}
    data = data if isinstance(data, dict) else {}
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    resource_type = str(data.get("resourceType") or path_type or "?")[:64]
    resource_id = str(data.get("id") or path_id or "?")[:64]
    version = meta.get("versionId") if isinstance(meta.get("versionId"), str) else None
    if await store.record_reject(resource_type, resource_id, version, exc.issues):
        logger.warning(
            "rejected %s/%s version %s: %d validation issue(s), first at %s",
            resource_type,
            resource_id,
            version,
            len(exc.issues),
            exc.issues[0].expression if exc.issues else "-",
        )


async def ingest_deletion(
    store: SpeedStore,
    resource_type: str,
    resource_id: str,
    *,
    version_id: str | None,
    last_updated: str | None,
) -> Outcome:
    """Write a tombstone at the deletion's version (as HAPI's `_history` reports it)."""
    written = await store.upsert(
        resource_type,
        resource_id,
        body=None,
        version_id=version_id,
        last_updated=last_updated,
        deleted=True,
    )
    if not written:
        await store.confirm_delivery(resource_type, resource_id, version_id, last_updated)
    return Outcome(resource_type, resource_id, version_id, written)


def check_path(resource_type: str, resource_id: str, allowed: tuple[str, ...] = ()) -> None:
    """A TYPE/ID this receiver takes (RECEIVER_RESOURCE_TYPES, when set); InvalidRequest."""
    if allowed and resource_type not in allowed:
        message = (
            f"resource type {resource_type[:80]!r} is not taken here (RECEIVER_RESOURCE_TYPES)"
        )
        raise InvalidRequest(message, [Issue("not-supported", message, "resourceType")])
    if not is_resource_type(resource_type):
        raise InvalidRequest(
            f"unknown resource type {resource_type[:80]!r}",
            [
                Issue(
                    "not-supported", f"unknown resource type {resource_type[:80]!r}", "resourceType"
                )
            ],
        )
    check_id(resource_id)


async def apply_delete(
    store: SpeedStore,
    latest_version: VersionLookup | None,
    resource_type: str,
    resource_id: str,
) -> None:
    """Tombstone a deleted resource at the deletion's version, asking HAPI for it.

    A DELETE carries no version. When HAPI cannot say, tombstone just after the newest version
    held and ask the poller to settle it. A type that is never stored is left alone.
    """
    if resource_type in NEVER_STORED:
        return
    latest = None
    if latest_version is not None:
        try:
            latest = await latest_version(resource_type, resource_id)
        except Exception as exc:  # HAPI down or refusing: fall back, never fail the delivery
            logger.warning(
                "could not read the deletion version of %s/%s from HAPI (%s); catch-up requested",
                resource_type,
                resource_id,
                type(exc).__name__,
            )
    if latest is not None and latest[2]:
        await ingest_deletion(
            store, resource_type, resource_id, version_id=latest[0], last_updated=latest[1]
        )
        return
    if latest is not None:
        # HAPI's newest version is not a deletion: it was re-created since; that version's own
        # PUT (or the poller) brings the truth, so a tombstone now could only be wrong.
        await store.request_catchup(f"stale DELETE {resource_type}/{resource_id}")
        return
    await store.tombstone_after_held(resource_type, resource_id)
    await store.request_catchup(f"DELETE {resource_type}/{resource_id} without version")


async def apply_notification_bundle(
    store: SpeedStore,
    derive: Deriver | None,
    data: Any,
    latest_version: VersionLookup | None = None,
    allowed: tuple[str, ...] = (),
    fetch_resource: FetchResource | None = None,
) -> None:
    """A topic-based (R4 backport) notification: a history Bundle led by its status Parameters.

    `full-resource` entries are validated before anything is written, so a bad one writes
    nothing. `id-only` entries name their focus (fullUrl or request.url): each is fetched from
    HAPI and written (a deleted one is tombstoned); a catch-up poll is recorded only when HAPI
    cannot answer, or for `empty` content, which names nothing.
    """
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise InvalidRequest(
            "POST /fhir takes an empty body or a notification Bundle",
            [Issue("not-supported", "expected a Bundle of type history", "resourceType")],
        )
    entries: list[Any] = data["entry"] if isinstance(data.get("entry"), list) else []
    first = entries[0].get("resource") if entries and isinstance(entries[0], dict) else None
    if (
        data.get("type") != "history"
        or not isinstance(first, dict)
        or first.get("resourceType") not in {"Parameters", "SubscriptionStatus"}
    ):
        raise InvalidRequest(
            "not a subscription notification: expected a history Bundle whose first entry is a "
            "Parameters or SubscriptionStatus",
            [Issue("invalid", "not a subscription notification Bundle", "Bundle.entry[0]")],
        )
    valid: list[ValidResource] = []
    deletes: list[tuple[str, str]] = []
    focuses: list[tuple[str, str]] = []
    unnamed = False
    for n, entry in enumerate(entries[1:], start=1):
        if not isinstance(entry, dict):
            raise InvalidRequest(f"Bundle.entry[{n}] is not an object")
        resource = entry.get("resource")
        request_part: dict[str, Any] = (
            entry["request"] if isinstance(entry.get("request"), dict) else {}
        )
        if isinstance(resource, dict):
            if allowed and resource.get("resourceType") not in allowed:
                check_path(str(resource.get("resourceType"))[:80], "x", allowed)
            try:
                valid.append(validate_resource(resource))
            except InvalidResource as exc:
                issues = [
                    Issue(i.code, i.diagnostics, f"Bundle.entry[{n}].resource.{i.expression}")
                    if i.expression
                    else i
                    for i in exc.issues
                ]
                raise InvalidResource(exc.message, issues) from exc
        elif request_part.get("method") == "DELETE" and isinstance(request_part.get("url"), str):
            type_, _, id_ = request_part["url"].partition("/")
            check_path(type_, id_.split("/", 1)[0], allowed)
            deletes.append((type_, id_.split("/", 1)[0]))
        else:
            focus = _focus_of(entry, request_part)
            if focus is None:
                unnamed = True  # nothing to fetch: the poller finds what changed
                continue
            check_path(*focus, allowed)
            focuses.append(focus)
    for resource in valid:
        await ingest_valid(store, resource, derive)
    for type_, id_ in deletes:
        await apply_delete(store, latest_version, type_, id_)
    for type_, id_ in dict.fromkeys(focuses):
        if not await _fetch_focus(store, derive, latest_version, fetch_resource, type_, id_):
            unnamed = True
    if unnamed or len(entries) <= 1:
        await store.request_catchup("topic notification without full resources")


def _focus_of(entry: dict[str, Any], request_part: dict[str, Any]) -> tuple[str, str] | None:
    """TYPE and ID an id-only entry names (request.url `Type/id`, or its fullUrl)."""
    for url in (request_part.get("url"), entry.get("fullUrl")):
        if isinstance(url, str):
            resource_type, resource_id, _ = split_reference(url)
            if resource_type and resource_id:
                return resource_type, resource_id
    return None


async def _fetch_focus(
    store: SpeedStore,
    derive: Deriver | None,
    latest_version: VersionLookup | None,
    fetch_resource: FetchResource | None,
    resource_type: str,
    resource_id: str,
) -> bool:
    """Fetch one id-only focus from HAPI and write it; False when HAPI could not answer."""
    if fetch_resource is None:
        return False
    try:
        resource = await fetch_resource(resource_type, resource_id)
    except Exception as exc:  # HAPI down or refusing: the poller brings it
        logger.warning(
            "could not fetch %s/%s named by an id-only notification (%s); catch-up requested",
            resource_type,
            resource_id,
            type(exc).__name__,
        )
        return False
    if resource is None:
        await apply_delete(store, latest_version, resource_type, resource_id)
        return True
    try:
        await ingest(store, resource, path_type=resource_type, path_id=resource_id, derive=derive)
    except InvalidRequest as exc:
        # HAPI's own copy fails the gate: recorded as a reject (422) or refused; the
        # notification itself was fine, so it is not refused for it.
        logger.warning(
            "the %s/%s HAPI holds was refused by the gate: %s",
            resource_type,
            resource_id,
            exc.message[:200],
        )
    return True
