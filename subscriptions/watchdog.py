"""The subscription watchdog: keeps this deployment's Subscriptions on HAPI requested/active.

HAPI never reactivates a Subscription by itself: one set to `error` or `off` (or deleted by
someone) stays that way, and every change after it reaches us only through the poller.
The watchdog re-requests such Subscriptions. It deliberately leaves an active one alone even
when its endpoint or token differs from ours: during a token rotation an older process
must not undo what a newer `subscriptions bootstrap` registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from core.errors import FhirError
from core.settings import Settings
from subscriptions.bootstrap import (
    DEFAULT_TYPES,
    desired_subscription,
    find_ours,
    subscribed_type,
)
from subscriptions.fhir_client import FhirClient

logger = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 10.0


async def check_once(
    settings: Settings, client: FhirClient, types: Sequence[str] = DEFAULT_TYPES
) -> list[str]:
    """One check: create our missing Subscriptions and re-request those in `error` or `off`.

    Returns what it did, one line per action (empty when all was well).
    """
    ours: dict[str, list[dict[str, Any]]] = {}
    for subscription in await find_ours(settings, client):
        ours.setdefault(subscribed_type(subscription), []).append(subscription)
    actions: list[str] = []
    for resource_type in types:
        found = ours.get(resource_type, [])
        if not found:
            if not settings.receiver_tokens:
                # Without the token its deliveries would all be refused: say so, create none.
                actions.append(
                    f"cannot create the missing {resource_type} Subscription: "
                    "RECEIVER_TOKEN is not set"
                )
                continue
            created = await client.create(desired_subscription(settings, resource_type))
            actions.append(f"created missing {resource_type} Subscription/{created.get('id')}")
            continue
        if any(s.get("status") in ("active", "requested") for s in found):
            continue
        subscription = found[0]
        was = str(subscription.get("status") or "no status")
        reason = subscription.get("error")
        # Re-request it as it is (same endpoint and header), without the stale error.
        renewed = {k: v for k, v in subscription.items() if k != "error"}
        renewed["status"] = "requested"
        await client.update(renewed)
        actions.append(
            f"re-requested {resource_type} Subscription/{subscription['id']} (was {was}"
            + (f": {reason}" if reason else "")
            + ")"
        )
    for action in actions:
        # Creating a missing one is what a first start does (README: run, then bootstrap);
        # re-requesting one in error/off, or being unable to create one, needs a look.
        level = logging.INFO if action.startswith("created ") else logging.WARNING
        logger.log(level, "subscription watchdog %s", action)
    return actions


async def run_watchdog(
    settings: Settings,
    client: FhirClient,
    stop: asyncio.Event,
    types: Sequence[str] = DEFAULT_TYPES,
    interval: float | None = None,
) -> None:
    """Run `check_once` every `interval` (default settings.watchdog_interval_seconds)
    until `stop` is set. HAPI being away is logged and tried again next round."""
    period = float(settings.watchdog_interval_seconds if interval is None else interval)
    while not stop.is_set():
        try:
            await check_once(settings, client, types)
        except FhirError as exc:
            logger.warning("subscription watchdog could not check HAPI: %s", exc)
        except Exception:  # a bug must not end the loop of a long-running service
            logger.exception("subscription watchdog check failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=period)


@contextlib.asynccontextmanager
async def watchdog_running(
    settings: Settings,
    client: FhirClient,
    types: Sequence[str] = DEFAULT_TYPES,
    interval: float | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """Run the watchdog as a background task for the life of the block (for a lifespan):
    on exit it is told to stop, waited for, and cancelled if it does not stop in time."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_watchdog(settings, client, stop, types, interval), name="subscription-watchdog"
    )
    try:
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
