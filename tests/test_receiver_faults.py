"""The receiver when its Redis dies: 503 with Retry-After, then recovery once Redis is back."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from core.http import QuietLog
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


async def test_redis_down_is_one_log_line_not_one_per_request(
    private_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(redis_url=private_redis.url, receiver_tokens=(TOKEN,))
    app = create_app(settings, latest_version=no_hapi)
    async with running(app) as client:
        private_redis.kill()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="core.http"):
            for n in range(20):  # HAPI retries each delivery for a minute
                response = await client.put(
                    f"/fhir/Patient/p{n}", content=json.dumps(patient(f"p{n}")), headers=HEADERS
                )
                assert response.status_code == 503
        lines = [r.getMessage() for r in caplog.records if r.name == "core.http"]
        assert len(lines) == 1 and "speed layer unavailable" in lines[0], lines


async def test_a_frozen_redis_gives_503_after_one_socket_timeout(
    private_redis: RedisProcess,
) -> None:
    """A Redis that takes the connection but does not answer (stopped, swapping): the write
    answers 503 after one socket timeout (5 s), not after a timeout per retry (15 s and
    more), and writes go through again once it answers."""
    settings = Settings(redis_url=private_redis.url, receiver_tokens=(TOKEN,))
    app = create_app(settings, latest_version=no_hapi)
    async with running(app) as client:
        body = json.dumps(patient())
        assert (
            await client.put("/fhir/Patient/p1", content=body, headers=HEADERS)
        ).status_code == 204
        assert private_redis.proc is not None
        os.kill(private_redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = await client.put(
                "/fhir/Patient/p2", content=json.dumps(patient("p2")), headers=HEADERS
            )
            waited = time.monotonic() - started
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert response.status_code == 503
        assert 4.5 <= waited < 10.0, waited
        response = await client.put(
            "/fhir/Patient/p2", content=json.dumps(patient("p2")), headers=HEADERS
        )
        assert response.status_code == 204


def test_quiet_log_holds_back_repeats_and_counts_them() -> None:
    now = [100.0]
    quiet = QuietLog(every=10.0, clock=lambda: now[0])
    assert quiet.admit("down") == ""
    assert [quiet.admit("down") for _ in range(3)] == [None, None, None]
    assert quiet.admit("other") == ""  # each kind on its own
    now[0] += 9.9
    assert quiet.admit("down") is None
    now[0] += 0.1
    assert quiet.admit("down") == " (4 more since the last such line)"
    assert quiet.admit("down") is None
    now[0] += 10.0
    assert quiet.admit("down") == " (1 more since the last such line)"
