"""The receiver when its Redis dies: 503 with Retry-After, then recovery once Redis is back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from core.store import SpeedStore
from receiver.app import create_app
from tests.asgi import running
from tests.procs import RedisProcess
from tests.test_receiver import HEADERS, TOKEN, no_hapi, patient


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_down_gives_503_and_a_restart_recovers(private_redis: RedisProcess) -> None:
    settings = Settings(redis_url=private_redis.url, receiver_tokens=(TOKEN,))
    app = create_app(settings, latest_version=no_hapi)
    async with running(app) as client:
        assert (
            await client.put("/fhir/Patient/p1", content=json.dumps(patient()), headers=HEADERS)
        ).status_code == 204

        private_redis.kill()
        response = await client.put(
            "/fhir/Patient/p2", content=json.dumps(patient("p2")), headers=HEADERS
        )
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert response.json()["resourceType"] == "OperationOutcome"
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["redis"] == "down"
        # A delete that cannot be written is a 503 too, never a 500.
        response = await client.delete(
            "/fhir/Patient/p1", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 503

        private_redis.start()  # same port, empty: Redis lost its data
        response = await client.put(
            "/fhir/Patient/p2", content=json.dumps(patient("p2")), headers=HEADERS
        )
        assert response.status_code == 204
        assert (await client.get("/health")).json() == {
            "status": "ok",
            "redis": "up",
            "speed_layer_complete": False,  # the epoch marker went with the data
        }

    check = aioredis.Redis.from_url(private_redis.url)
    try:
        store = SpeedStore(check)
        assert (await store.get("Patient", "p2")) is not None
        assert await store.epoch() is None
    finally:
        await check.aclose()
