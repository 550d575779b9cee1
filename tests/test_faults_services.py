"""Faults of the other dependencies, with real processes: PostgreSQL down, HAPI down, and a
`batch refresh` process killed half-way."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore
from receiver.app import create_app as create_receiver
from receiver.ingest import ingest
from serving import batch
from serving.api import create_app as create_api
from serving.batch_refresh import refresh
from serving.derive import default_deriver
from subscriptions.fhir_client import FhirClient
from subscriptions.poller import run_poller
from subscriptions.standin import synthetic
from subscriptions.standin.hapi import StandInHapi
from tests.asgi import running
from tests.conftest import empty_redis, redis_db
from tests.procs import PostgresProcess, eventually, free_port

SERVE = "serve-token"
RECEIVE = "receive-token"
# Their own Redis database: these tests run whole processes against it.
FAULTS_REDIS_URL = redis_db(7)


@pytest.fixture
def private_pg() -> Iterator[PostgresProcess]:
    server = PostgresProcess().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_7() -> Any:
    async with empty_redis(FAULTS_REDIS_URL) as client:
        yield client


def patient(pid: str, version: int = 1, gender: str = "male") -> bytes:
    return json.dumps(
        {
            "resourceType": "Patient",
            "id": pid,
            "meta": {"versionId": str(version)},
            "gender": gender,
        }
    ).encode()


async def test_postgresql_down_gives_503_while_the_receiver_keeps_ingesting(
    private_pg: PostgresProcess, redis_7: aioredis.Redis
) -> None:
    settings = Settings(
        redis_url=FAULTS_REDIS_URL,
        database_url=private_pg.url,
        receiver_tokens=(RECEIVE,),
        serving_tokens=(SERVE,),
    )
    batch.init(private_pg.url)
    store = SpeedStore(redis_7)
    await store.mark_epoch()
    await ingest(store, patient("before"), derive=default_deriver())
    api_headers = {"Authorization": f"Bearer {SERVE}"}
    put_headers = {"Authorization": f"Bearer {RECEIVE}", "Content-Type": "application/fhir+json"}

    async def nobody(resource_type: str, resource_id: str) -> None:
        return None

    receiver_app = create_receiver(settings, derive=default_deriver(), latest_version=nobody)
    async with running(create_api(settings)) as api, running(receiver_app) as receiver:
        first = await api.get("/cohort", params={"gender": "male"}, headers=api_headers)
        assert first.status_code == 200 and first.json()["total_count"] == 1

        private_pg.kill()
        down = await api.get("/cohort", params={"gender": "male"}, headers=api_headers)
        assert down.status_code == 503
        assert down.json()["resourceType"] == "OperationOutcome"
        health = await api.get("/health")
        assert health.status_code == 503 and health.json()["postgresql"] != "up"
        for n in range(5):  # the receiver does not need PostgreSQL
            put = await receiver.put(
                f"/fhir/Patient/during-{n}", content=patient(f"during-{n}"), headers=put_headers
            )
            assert put.status_code == 204

        private_pg.start()

        async def answered() -> int:
            response = await api.get("/cohort", params={"gender": "male"}, headers=api_headers)
            return response.status_code

        for _ in range(100):
            if await answered() == 200:
                break
            await asyncio.sleep(0.1)
        back = await api.get("/cohort", params={"gender": "male"}, headers=api_headers)
        assert back.status_code == 200
        assert back.json()["total_count"] == 6  # nothing ingested meanwhile was lost


async def test_hapi_down_the_poller_backs_off_and_catches_up(redis_7: aioredis.Redis) -> None:
    hapi = StandInHapi()
    port = free_port()
    store = SpeedStore(redis_7)
    rnd = __import__("random").Random(4)
    async with serve_asgi(hapi.app, port=port, path="/fhir") as base:
        hapi.base_url = base
        for n in range(20):
            await hapi.update(synthetic.patient(n, rnd))
    # HAPI is down now (its port closed), and changes it made before going down were never
    # delivered: the poller must find them when HAPI is back.
    for n in range(20, 30):
        await hapi.update(synthetic.patient(n, rnd))
    await hapi.delete("Patient", "pat-3")
    settings = Settings(redis_url=FAULTS_REDIS_URL, fhir_base_url=base, poll_interval_seconds=1)
    stop = asyncio.Event()
    async with FhirClient(base, max_retries=0, backoff_initial=0.05) as client:
        poller = asyncio.create_task(run_poller(settings, store, client, stop, default_deriver()))
        await asyncio.sleep(2.0)  # failing polls, backing off
        assert await store.count("Patient") == 0
        assert await store.poller_watermark() is None
        async with serve_asgi(hapi.app, port=port, path="/fhir"):
            truth = {k[1]: (str(t.version), t.deleted) for k, t in hapi.resources.items()}

            async def caught_up() -> bool:
                held = await store.versions("Patient")
                return {i: (v.version_id, v.state == "deleted") for i, v in held.items()} == truth

            for _ in range(200):
                if await caught_up():
                    break
                await asyncio.sleep(0.05)
            assert await caught_up()
            stop.set()
            await asyncio.wait_for(poller, timeout=10)
    await hapi.aclose()


REFRESH_MAIN = """
import sys
from researchflow_cli import main
sys.exit(main(["batch", "refresh"]))
"""


def batch_snapshot(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        return {
            "watermark": conn.execute(
                "SELECT watermark, resources FROM rf_batch.watermark"
            ).fetchall(),
            "resources": conn.execute(
                "SELECT resource_type, id, version_id, deleted FROM rf_batch.resources ORDER BY 1, 2"
            ).fetchall(),
            "patients": conn.execute(
                "SELECT id, gender FROM sqlonfhir.patient_demographics ORDER BY 1"
            ).fetchall(),
        }


async def test_batch_refresh_killed_half_way_changes_nothing(
    pg_url: str, redis_7: aioredis.Redis
) -> None:
    hapi = StandInHapi(default_page_size=20, max_page_size=20)
    pages = [0]

    async def slow_history(scope: Any, receive: Any, send: Any) -> None:
        # HAPI under load: every page of _history takes a while, so the kill lands mid-way.
        if scope["type"] == "http" and (
            "_history" in scope["path"] or b"_getpages" in scope.get("query_string", b"")
        ):
            pages[0] += 1
            await asyncio.sleep(0.1)
        await hapi.app(scope, receive, send)

    rnd = __import__("random").Random(9)
    async with serve_asgi(slow_history, path="/fhir") as base:
        hapi.base_url = base
        for n in range(40):
            await hapi.update(synthetic.patient(n, rnd))
        settings = Settings(redis_url=FAULTS_REDIS_URL, database_url=pg_url, fhir_base_url=base)
        batch.init(pg_url)
        store = SpeedStore(redis_7)
        await refresh(settings, store=store)
        for n in range(40, 1_500):
            await hapi.update(synthetic.patient(n, rnd))
        await ingest(store, patient("pat-7", version=5, gender="other"), derive=default_deriver())
        before = batch_snapshot(pg_url)
        speed_before = await store.versions("Patient")
        env = {
            **os.environ,
            "DATABASE_URL": pg_url,
            "REDIS_URL": FAULTS_REDIS_URL,
            "FHIR_BASE_URL": base,
        }
        pages[0] = 0
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            REFRESH_MAIN,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await eventually(lambda: pages[0] >= 5, seconds=60)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        assert batch_snapshot(pg_url) == before
        assert await store.versions("Patient") == speed_before

        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            REFRESH_MAIN,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        after = batch_snapshot(pg_url)
        assert len(after["patients"]) == 1_500
        assert after["watermark"] != before["watermark"]
    await hapi.aclose()
