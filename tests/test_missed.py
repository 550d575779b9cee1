"""The missed-notification count is exact: 0 on a clean day with a refresh, N when HAPI drops N.

A whole day on the stand-in HAPI, which pushes every change through real rest-hook
Subscriptions to the real receiver: polls while deliveries are still on their way, a
`batch refresh` that moves changes from the speed layer to the batch layer, and polls after
it that read those changes again (the overlap). The reference for "missed" is the stand-in's
own count of notifications it threw away (`drop_next`), not the poller's code.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.metrics import Metrics
from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore
from receiver.app import create_app as create_receiver
from serving import batch
from serving.batch_refresh import refresh
from serving.derive import default_deriver
from serving.viewdef import served_types
from subscriptions import bootstrap
from subscriptions.fhir_client import FhirClient, hapi_lookup
from subscriptions.poller import PollResult, poll_once
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from tests.conftest import empty_redis, redis_db

MISSED_REDIS_URL = redis_db(12)
GRACE_SECONDS = 1  # HAPI's retry window, shortened: the stand-in gives up at once when told


@dataclass
class Day:
    hapi: StandInHapi
    settings: Settings
    store: SpeedStore
    client: FhirClient
    metrics: Metrics

    async def poll(self) -> PollResult:
        return await poll_once(
            self.settings,
            self.store,
            self.client,
            derive=default_deriver(),
            batch_watermark=lambda: batch.batch_watermark_async(self.settings.database_url),
            batch_versions=lambda t, ids: batch.batch_versions_async(
                self.settings.database_url, t, ids
            ),
            metrics=self.metrics,
            types=served_types(),
        )

    async def patients(self, first: int, n: int, gender: str = "male") -> None:
        for i in range(first, first + n):
            await self.hapi.update({"resourceType": "Patient", "id": f"p{i}", "gender": gender})

    async def past_grace(self) -> None:
        # HAPI's clock (the Date header) has whole seconds: wait the window and one more.
        await asyncio.sleep(GRACE_SECONDS + 1.2)


@pytest.fixture
async def day(pg_url: str) -> AsyncIterator[Day]:
    batch.init(pg_url)
    hapi = StandInHapi(retry_initial=0.05, retry_total=5.0)
    try:
        async with (
            empty_redis(MISSED_REDIS_URL) as redis_client,
            serve_standin(hapi) as fhir_base,
        ):
            base = Settings(
                redis_url=MISSED_REDIS_URL,
                database_url=pg_url,
                fhir_base_url=fhir_base,
                receiver_tokens=("hook",),
                instance="missed",
                missed_grace_seconds=GRACE_SECONDS,
            )
            receiver = create_receiver(
                base, derive=default_deriver(), hapi=hapi_lookup(base.fhir_base_url)
            )
            async with (
                serve_asgi(receiver, path="/fhir") as receiver_url,
                FhirClient(fhir_base) as client,
            ):
                settings = dataclasses.replace(base, receiver_url=receiver_url)
                store = SpeedStore(redis_client)
                today = Day(hapi, settings, store, client, Metrics.create())
                # Last night: data, a refresh, the first catch-up (restored, never missed).
                await today.patients(0, 5)
                await refresh(settings, store=store)
                assert (await today.poll()).restored
                await bootstrap.bootstrap(settings, client, wait=10)
                yield today
    finally:
        await hapi.aclose()


def missed_metric(metrics: Metrics) -> float:
    return sum(
        sample.value
        for family in metrics.missed.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def test_a_clean_day_with_a_refresh_counts_no_missed_notification(day: Day) -> None:
    # Changes whose notifications are still on their way when the poller finds them.
    day.hapi.pause_delivery()
    await day.patients(100, 4)
    await day.hapi.update({"resourceType": "Patient", "id": "p0", "gender": "female"})
    during = await day.poll()
    assert during.written == 5 and during.missed == 0 and during.pending == 5
    day.hapi.resume_delivery()
    await day.hapi.wait_idle(timeout=30)
    # The nightly refresh moves today's changes from the speed layer to the batch layer ...
    refreshed = await refresh(day.settings, store=day.store)
    assert refreshed.trimmed >= 5
    # ... and the next polls read them again (the overlap): they are not missed.
    await day.patients(200, 3)
    await day.hapi.wait_idle(timeout=30)
    after = await day.poll()
    assert after.written >= 5, "the trimmed changes were written again"
    await day.past_grace()
    judged = await day.poll()
    assert day.hapi.dropped == 0 and day.hapi.lost == 0
    assert (after.missed, judged.missed, judged.pending) == (0, 0, 0)
    assert await day.store.missed_count() == 0
    assert missed_metric(day.metrics) == 0


@pytest.mark.parametrize("dropped", [1, 3])
async def test_exactly_the_notifications_hapi_dropped_are_counted(day: Day, dropped: int) -> None:
    await day.patients(100, 2)
    await day.hapi.wait_idle(timeout=30)
    await refresh(day.settings, store=day.store)  # a refresh in the middle of the day
    day.hapi.drop_next(dropped)
    await day.patients(300, 6)
    await day.hapi.wait_idle(timeout=30)
    assert day.hapi.lost == dropped  # the reference: what HAPI threw away
    early = await day.poll()  # within HAPI's retry window: not judged yet
    assert early.missed == 0 and early.pending == dropped
    await day.past_grace()
    late = await day.poll()
    assert late.missed == dropped and late.pending == 0
    again = await day.poll()
    assert again.missed == 0, "each missed change is counted once"
    assert await day.store.missed_count() == dropped
    assert missed_metric(day.metrics) == dropped
    held: dict[str, Any] = {}
    for i in range(300, 306):
        entry = await day.store.get("Patient", f"p{i}")
        held[f"p{i}"] = entry.version_id if entry else None
    assert all(held.values()), "the poller brought what HAPI dropped"


async def test_a_change_the_batch_layer_holds_is_not_missed_when_the_poller_finds_it(
    day: Day,
) -> None:
    # Deliveries stop (HAPI drops them); a refresh takes the changes into the batch layer
    # before any poll: the poller then finds changes neither it nor the receiver wrote, which
    # the batch layer already holds.
    day.hapi.drop_next(4)
    await day.patients(400, 4)
    await day.hapi.wait_idle(timeout=30)
    await refresh(day.settings, store=day.store)
    await day.past_grace()
    result = await day.poll()
    assert result.written >= 4 and result.missed == 0 and result.pending == 0
    assert await day.store.missed_count() == 0


async def test_the_count_survives_a_batch_layer_it_cannot_ask(day: Day) -> None:
    day.hapi.drop_next(2)
    await day.patients(500, 2)
    await day.hapi.wait_idle(timeout=30)
    await day.past_grace()
    down = dataclasses.replace(day.settings, database_url="postgresql://127.0.0.1:1/nothing")
    unreachable = Day(day.hapi, down, day.store, day.client, day.metrics)
    blind = await unreachable.poll()
    assert blind.missed == 0 and blind.pending == 2, "judged later, not guessed"
    judged = await day.poll()
    assert judged.missed == 2 and judged.pending == 0


async def test_the_receiver_confirms_only_versions_the_poller_wrote_first(
    redis_client: aioredis.Redis,
) -> None:
    from receiver.ingest import ingest

    store = SpeedStore(redis_client)
    body = b'{"resourceType":"Patient","id":"x","meta":{"versionId":"2"}}'
    await store.hold_pending({"Patient/x/2": 1.0, "Patient/x/1": 1.0})
    await ingest(store, body)  # written: the receiver was first, nothing to confirm
    assert set(await store.pending()) == {"Patient/x/2", "Patient/x/1"}
    await ingest(store, body)  # turned away: this version's notification came
    assert set(await store.pending()) == {"Patient/x/1"}
