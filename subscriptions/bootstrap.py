"""This deployment's rest-hook Subscriptions on HAPI: bootstrap, status and remove.

Ours carry the tag `urn:researchflow:instance|<settings.instance>`, so re-running bootstrap
updates them in place (never duplicates) and `remove` deletes only them. Lookups send
`Cache-Control: no-cache` (the FhirClient does on every search): HAPI reuses an identical
search's results for 60 s and would hide the Subscription created a moment ago.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import FhirFatalError, ResearchFlowError
from core.settings import Settings
from subscriptions.fhir_client import FhirClient

logger = logging.getLogger(__name__)

DEFAULT_TYPES: tuple[str, ...] = ("Patient", "Condition", "Observation")
OWNER_TAG_SYSTEM = "urn:researchflow:instance"
SEND_DELETE_MESSAGES = (
    "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages"
)
PAYLOAD = "application/fhir+json"
# HAPI re-reads active Subscriptions every 60 s, so activation can take about a minute.
DEFAULT_WAIT_SECONDS = 90.0
_POLL_FIRST = 0.5
_POLL_MAX = 5.0

Progress = Callable[[str], None]


class SubscriptionError(ResearchFlowError):
    """HAPI refused a Subscription (422) or set it to `error`, or it never became active."""

    def __init__(self, message: str, results: Sequence[SubscriptionInfo] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.results = list(results)


@dataclass(frozen=True)
class SubscriptionInfo:
    """One of our Subscriptions as HAPI holds it (a row of `subscriptions status`)."""

    id: str
    resource_type: str
    criteria: str
    status: str
    endpoint: str
    error: str | None = None
    # What bootstrap or the watchdog did: created, updated, unchanged, re-requested.
    action: str | None = None


def owner_tag(settings: Settings) -> dict[str, str]:
    return {"system": OWNER_TAG_SYSTEM, "code": settings.instance}


def criteria_for(resource_type: str) -> str:
    # Unfiltered per type: a filtered R4 criteria never reports a resource that stops matching.
    return f"{resource_type}?"


def subscribed_type(subscription: Mapping[str, Any]) -> str:
    criteria = str(subscription.get("criteria") or "")
    return criteria.split("?", 1)[0].strip()


def auth_header(settings: Settings) -> str | None:
    if not settings.receiver_tokens:
        return None
    return f"Authorization: Bearer {settings.receiver_tokens[0]}"


def desired_subscription(settings: Settings, resource_type: str) -> dict[str, Any]:
    """The Subscription bootstrap registers for one type (without id)."""
    channel: dict[str, Any] = {
        "extension": [{"url": SEND_DELETE_MESSAGES, "valueBoolean": True}],
        "type": "rest-hook",
        "endpoint": settings.receiver_url,
        "payload": PAYLOAD,
    }
    header = auth_header(settings)
    if header:
        channel["header"] = [header]
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [owner_tag(settings)]},
        "status": "requested",
        "reason": f"ResearchFlow speed layer ({settings.instance}): every {resource_type} change",
        "criteria": criteria_for(resource_type),
        "channel": channel,
    }


def _sends_deletes(channel: Mapping[str, Any]) -> bool:
    return any(
        isinstance(ext, dict)
        and ext.get("url") == SEND_DELETE_MESSAGES
        and ext.get("valueBoolean") is True
        for ext in channel.get("extension") or []
    )


def _headers(channel: Mapping[str, Any]) -> list[str]:
    return [str(h).strip() for h in channel.get("header") or []]


def matches(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether an existing Subscription already delivers as `desired` asks."""
    have = existing.get("channel") or {}
    want = desired["channel"]
    return (
        existing.get("criteria") == desired["criteria"]
        and have.get("type") == want["type"]
        and str(have.get("endpoint") or "").rstrip("/") == want["endpoint"].rstrip("/")
        and have.get("payload") == want["payload"]
        and _headers(have) == _headers(want)
        and _sends_deletes(have)
    )


def info_of(subscription: Mapping[str, Any], action: str | None = None) -> SubscriptionInfo:
    channel = subscription.get("channel") or {}
    return SubscriptionInfo(
        id=str(subscription.get("id") or ""),
        resource_type=subscribed_type(subscription),
        criteria=str(subscription.get("criteria") or ""),
        status=str(subscription.get("status") or ""),
        endpoint=str(channel.get("endpoint") or ""),
        error=subscription.get("error") or None,
        action=action,
    )


async def find_ours(settings: Settings, client: FhirClient) -> list[dict[str, Any]]:
    """Every Subscription tagged as this deployment's (uncached search by `_tag`)."""
    tag = owner_tag(settings)
    params: dict[str, str | int] = {"_tag": f"{tag['system']}|{tag['code']}", "_count": 100}
    found = [s async for s in client.search("Subscription", params)]
    # The server filtered by tag already; check again so a server ignoring `_tag` (or a
    # stand-in) can never make `remove` touch someone else's Subscription.
    return [s for s in found if _is_ours(s, settings)]


def _is_ours(subscription: Mapping[str, Any], settings: Settings) -> bool:
    tags = (subscription.get("meta") or {}).get("tag") or []
    return any(
        isinstance(t, dict)
        and t.get("system") == OWNER_TAG_SYSTEM
        and t.get("code") == settings.instance
        for t in tags
    )


def _by_type(subscriptions: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for subscription in subscriptions:
        grouped.setdefault(subscribed_type(subscription), []).append(subscription)
    return grouped


def _refusal(resource_type: str, exc: FhirFatalError) -> str:
    return f"HAPI refused the {resource_type} Subscription ({exc.status_code}): {exc.message}"


async def _ensure(
    settings: Settings,
    client: FhirClient,
    resource_type: str,
    existing: list[dict[str, Any]],
) -> SubscriptionInfo:
    """Create or update our Subscription for one type; delete duplicates of it."""
    desired = desired_subscription(settings, resource_type)
    # Keep the one already active if any, else the oldest; the rest are duplicates.
    existing = sorted(existing, key=lambda s: (s.get("status") != "active", _id_key(s)))
    keep, duplicates = (existing[0], existing[1:]) if existing else (None, [])
    for duplicate in duplicates:
        logger.warning("deleting duplicate %s Subscription/%s", resource_type, duplicate.get("id"))
        await client.delete("Subscription", str(duplicate["id"]))
    if keep is None:
        created = await client.create(desired)
        logger.info("created %s Subscription/%s", resource_type, created.get("id"))
        return info_of(created, "created")
    if matches(keep, desired) and keep.get("status") in ("active", "requested"):
        return info_of(keep, "unchanged")
    updated = await client.update({**desired, "id": keep["id"]})
    logger.info("updated %s Subscription/%s", resource_type, keep["id"])
    return info_of(updated, "updated")


def _id_key(subscription: Mapping[str, Any]) -> tuple[int, str]:
    sid = str(subscription.get("id") or "")
    return (int(sid), "") if sid.isdigit() else (1 << 62, sid)


async def bootstrap(
    settings: Settings,
    client: FhirClient,
    types: Sequence[str] = DEFAULT_TYPES,
    wait: float = DEFAULT_WAIT_SECONDS,
    progress: Progress | None = None,
) -> list[SubscriptionInfo]:
    """Create or update (idempotently) one rest-hook Subscription per type, then wait up to
    `wait` seconds until HAPI reports each `active` (0: do not wait).

    Raises SubscriptionError, changing nothing, without a receiver token (settings.
    receiver_tokens); with HAPI's text when one is refused (a 422 OperationOutcome),
    ends in `error` (Subscription.error) or is still not active after `wait`; its `results`
    hold what was done. FhirTemporaryError when HAPI cannot be reached.
    """
    say = progress or (lambda _message: None)
    if not settings.receiver_tokens:
        # Registering without it would strip the header from live Subscriptions: every
        # delivery after that would be refused.
        raise SubscriptionError("RECEIVER_TOKEN is not set: nothing was registered or changed")
    grouped = _by_type(await find_ours(settings, client))
    results: list[SubscriptionInfo] = []
    problems: list[str] = []
    for resource_type in types:
        try:
            info = await _ensure(settings, client, resource_type, grouped.get(resource_type, []))
        except FhirFatalError as exc:
            problems.append(_refusal(resource_type, exc))
            say(problems[-1])
            continue
        say(f"{resource_type}: Subscription/{info.id} {info.action} ({info.status})")
        results.append(info)
    results = await _wait_active(client, results, wait, say, problems)
    if problems:
        raise SubscriptionError("; ".join(problems), results)
    return results


async def _wait_active(
    client: FhirClient,
    results: list[SubscriptionInfo],
    wait: float,
    say: Progress,
    problems: list[str],
) -> list[SubscriptionInfo]:
    deadline = time.monotonic() + max(0.0, wait)
    delay = _POLL_FIRST
    current = {info.id: info for info in results}
    while True:
        for sid, info in list(current.items()):
            if info.status == "error":
                problems.append(
                    f"HAPI set the {info.resource_type} Subscription/{sid} to error: "
                    f"{info.error or 'no reason given'}"
                )
                say(problems[-1])
        pending = [i for i in current.values() if i.status not in ("active", "error")]
        if not pending or wait <= 0:  # `--wait 0`: register, do not wait for activation
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for info in pending:
                problems.append(
                    f"the {info.resource_type} Subscription/{info.id} is still "
                    f"'{info.status}' after {wait:g} s (HAPI activates within about a minute)"
                )
                say(problems[-1])
            break
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 1.5, _POLL_MAX)
        for info in pending:
            fresh = info_of(await client.read("Subscription", info.id), info.action)
            if fresh.status != info.status:
                say(f"{fresh.resource_type}: Subscription/{fresh.id} is {fresh.status}")
            current[info.id] = fresh
    return [current[info.id] for info in results]


async def status(settings: Settings, client: FhirClient) -> list[SubscriptionInfo]:
    """This deployment's Subscriptions as HAPI holds them, sorted by type then id."""
    rows = [info_of(s) for s in await find_ours(settings, client)]
    return sorted(rows, key=lambda r: (r.resource_type, _id_key({"id": r.id})))


async def remove(settings: Settings, client: FhirClient) -> int:
    """Delete this deployment's Subscriptions (and only those); the number deleted."""
    deleted = 0
    for subscription in await find_ours(settings, client):
        if await client.delete("Subscription", str(subscription["id"])):
            logger.info("deleted Subscription/%s", subscription["id"])
            deleted += 1
    return deleted


def format_table(rows: Sequence[SubscriptionInfo]) -> str:
    """A plain-text table: id, criteria, status, endpoint, error."""
    header = ("id", "criteria", "status", "endpoint", "error")
    lines = [header] + [
        (r.id, r.criteria, r.status, r.endpoint, (r.error or "").replace("\n", " ")) for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * width for width in widths))
    if not rows:
        text.append("(no Subscriptions of this deployment)")
    return "\n".join(text)
