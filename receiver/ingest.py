"""One code path into the speed layer for the receiver and the poller: validate, derive, write."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidResource
from core.store import Derived, SpeedStore
from core.validation import NEVER_STORED, ValidResource, validate_resource

logger = logging.getLogger(__name__)

Deriver = Callable[[ValidResource], Derived]


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
        await _record_reject(store, body, path_type, path_id, exc)
        raise
    return await ingest_valid(store, resource, derive)


async def _record_reject(
    store: SpeedStore,
    body: bytes | dict[str, Any],
    path_type: str | None,
    path_id: str | None,
    exc: InvalidResource,
) -> None:
    data: Any = body
    if isinstance(body, bytes):
        import orjson

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
