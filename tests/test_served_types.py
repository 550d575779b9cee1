"""The poller and the batch sync read only the served views' types; no Subscription (it holds
the receiver's token) is ever cached in either layer, and ones an older release stored go."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from core.store import SpeedStore
from serving import batch
from serving.batch_refresh import refresh
from serving.viewdef import served_types
from subscriptions import bootstrap
from subscriptions.fhir_client import FhirClient
from subscriptions.poller import poll_once
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from tests.conftest import empty_redis, redis_db

TYPES_REDIS_URL = redis_db(11)
TOKEN = "receiver-secret-token-7f3a"


async def every_redis_value(client: aioredis.Redis) -> bytes:
    """Every string, hash, list, set and sorted set member in the database, joined (a test may
    SCAN; the services never do)."""
    out: list[bytes] = []
    async for key in client.scan_iter(count=1000):
        kind = (await client.type(key)).decode()
        if kind == "string":
            out.append(await client.get(key) or b"")
        elif kind == "hash":
            out.extend(k + v for k, v in (await client.hgetall(key)).items())
        elif kind == "list":
            out.extend(await client.lrange(key, 0, -1))
        elif kind == "set":
            out.extend(await client.smembers(key))
        elif kind == "zset":
            out.extend(await client.zrange(key, 0, -1))
        out.append(key)
    return b"\n".join(out)


@pytest.fixture
async def hapi_with_subscriptions(pg_url: str) -> AsyncIterator[tuple[StandInHapi, Settings]]:
    batch.init(pg_url)
    hapi = StandInHapi()
    try:
        async with serve_standin(hapi) as fhir_base:
            settings = Settings(
                redis_url=TYPES_REDIS_URL,
                database_url=pg_url,
                fhir_base_url=fhir_base,
                receiver_url="http://127.0.0.1:9/fhir",
                receiver_tokens=(TOKEN,),
                instance="types",
                missed_grace_seconds=0,
            )
            async with FhirClient(fhir_base) as client:
                await bootstrap.bootstrap(settings, client, wait=0)
            await hapi.update({"resourceType": "Patient", "id": "p1", "gender": "male"})
            await hapi.update(
                {
                    "resourceType": "Encounter",
                    "id": "e1",
                    "status": "finished",
                    "class": {"code": "AMB"},
                }
            )
            yield hapi, settings
    finally:
        await hapi.aclose()


def batch_types(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT DISTINCT resource_type FROM rf_batch.resources").fetchall()
    return {row[0] for row in rows}


async def test_served_types_are_the_views_types_and_patient() -> None:
    assert served_types() == ("Condition", "Observation", "Patient")


@pytest.mark.parametrize("per_type", [True, False])
async def test_the_poller_never_caches_a_subscription(
    hapi_with_subscriptions: tuple[StandInHapi, Settings], per_type: bool
) -> None:
    hapi, settings = hapi_with_subscriptions
    assert sum(1 for (t, _) in hapi.resources if t == "Subscription") == 3
    async with empty_redis(TYPES_REDIS_URL) as client, FhirClient(settings.fhir_base_url) as fhir:
        store = SpeedStore(client)
        # per_type: what the commands do; None: HAPI's system-level history, still skipped.
        result = await poll_once(settings, store, fhir, types=served_types() if per_type else None)
        assert result.read == (1 if per_type else 2)
        assert await store.known_types() == (["Patient"] if per_type else ["Encounter", "Patient"])
        assert await store.get("Subscription", "1") is None
        assert TOKEN.encode() not in await every_redis_value(client)


async def test_batch_refresh_reads_only_served_types_and_never_a_subscription(
    hapi_with_subscriptions: tuple[StandInHapi, Settings],
) -> None:
    _, settings = hapi_with_subscriptions
    async with empty_redis(TYPES_REDIS_URL) as client:
        store = SpeedStore(client)
        await refresh(settings, store=store)
        assert batch_types(settings.database_url) == {"Patient"}
        await refresh(settings, full=True, store=store)
        assert batch_types(settings.database_url) == {"Patient"}
    with psycopg.connect(settings.database_url) as conn:
        text = conn.execute("SELECT string_agg(resource::text, '') FROM rf_batch.resources")
        assert TOKEN not in str(text.fetchone())


async def test_subscriptions_an_older_release_stored_are_purged_from_both_layers(
    hapi_with_subscriptions: tuple[StandInHapi, Settings],
) -> None:
    _, settings = hapi_with_subscriptions
    stored: dict[str, Any] = {
        "resourceType": "Subscription",
        "id": "old",
        "status": "active",
        "channel": {"type": "rest-hook", "header": [f"Authorization: Bearer {TOKEN}"]},
    }
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "INSERT INTO rf_batch.resources (resource_type, id, version_id, version_number,"
            " last_updated, last_updated_ms, resource) VALUES ('Subscription', 'old', '1', 1,"
            " '2026-01-01T00:00:00Z', 0, %s)",
            (psycopg.types.json.Jsonb(stored),),
        )
    async with empty_redis(TYPES_REDIS_URL) as client, FhirClient(settings.fhir_base_url) as fhir:
        store = SpeedStore(client)
        import orjson

        await store.upsert(
            "Subscription", "old", body=orjson.dumps(stored), version_id="1", last_updated=None
        )
        await store.flush_stats()
        assert "Subscription" in await store.known_types()
        await poll_once(settings, store, fhir, types=served_types())
        assert await store.get("Subscription", "old") is None
        assert "Subscription" not in await store.known_types()
        assert TOKEN.encode() not in await every_redis_value(client)
        await refresh(settings, store=store)
    assert "Subscription" not in batch_types(settings.database_url)
