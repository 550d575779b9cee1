"""Faults survived with real processes: Redis killed or wiped mid-burst, the receiver SIGKILLed.

Each test starts what it kills (a private redis-server, a receiver process) on loopback and
stops it by PID. HAPI is the stand-in, delivering exactly as the facts file says.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore, connect
from receiver.app import create_app
from serving.derive import default_deriver
from subscriptions import bootstrap
from subscriptions.fhir_client import FhirClient, hapi_lookup
from subscriptions.poller import poll_once
from subscriptions.standin import synthetic
from subscriptions.standin.hapi import StandInHapi
from subscriptions.standin.run import serve_standin
from tests.procs import RedisProcess, eventually, free_port, wait_port

TOKEN = "fault-token"


@pytest.fixture
def durable_redis() -> Iterator[RedisProcess]:
    # appendfsync always: every acknowledged write survives a SIGKILL (the contract's note).
    server = RedisProcess(None, "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def volatile_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    try:
        yield server
    finally:
        server.stop()


async def speed_state(url: str) -> dict[tuple[str, str], tuple[str | None, bool]]:
    client = aioredis.Redis.from_url(url)
    try:
        store = SpeedStore(client)
        state: dict[tuple[str, str], tuple[str | None, bool]] = {}
        for resource_type in ("Patient", "Condition", "Observation"):
            for resource_id, version in (await store.versions(resource_type)).items():
                state[(resource_type, resource_id)] = (
                    version.version_id,
                    version.state == "deleted",
                )
        return state
    finally:
        await client.aclose()


def truth_of(hapi: StandInHapi) -> dict[tuple[str, str], tuple[str | None, bool]]:
    return {
        key: (str(t.version), t.deleted)
        for key, t in hapi.resources.items()
        if key[0] in {"Patient", "Condition", "Observation"}
    }


async def seed_changes(hapi: StandInHapi, patients: int, seed: int = 3) -> None:
    resources = synthetic.population(patients, seed=seed)
    for resource in resources:
        await hapi.update(resource)
    for resource in resources[::7]:  # some updates and deletes on top
        if resource["resourceType"] == "Patient":
            await hapi.update({**resource, "gender": "other"})
        else:
            await hapi.delete(resource["resourceType"], resource["id"])


async def test_redis_killed_during_a_burst_loses_no_acknowledged_notification(
    durable_redis: RedisProcess,
) -> None:
    hapi = StandInHapi(retry_initial=0.2, retry_factor=1.5, retry_total=40.0)
    async with serve_standin(hapi) as fhir_base:
        settings = Settings(
            redis_url=durable_redis.url,
            fhir_base_url=fhir_base,
            receiver_tokens=(TOKEN,),
            instance="faults",
        )
        app = create_app(settings, derive=default_deriver(), hapi=hapi_lookup(fhir_base))
        async with serve_asgi(app, path="/fhir") as receiver_url:
            settings = Settings(**{**settings.__dict__, "receiver_url": receiver_url})
            async with FhirClient(fhir_base) as client:
                await bootstrap.bootstrap(settings, client, wait=10)
            burst = asyncio.create_task(seed_changes(hapi, 150))
            await eventually(lambda: hapi.delivered >= 80)
            durable_redis.kill()
            await asyncio.sleep(1.0)
            failed_meanwhile = [a for a in hapi.attempts if a.status == 503]
            durable_redis.start()  # same port and data directory: the append-only file
            await burst
            await hapi.wait_idle(timeout=90)
    acknowledged = {
        (a.resource_type, a.resource_id, a.version)
        for a in hapi.attempts
        if a.status is not None and 200 <= a.status < 300 and a.method == "PUT"
    }
    state = await speed_state(durable_redis.url)
    assert failed_meanwhile, "the receiver answered 503 while Redis was down"
    assert hapi.dropped == 0, "HAPI-style retries got through once Redis was back"
    for resource_type, resource_id, version in acknowledged:
        held = state.get((resource_type, resource_id))
        assert held is not None, (resource_type, resource_id)
        assert int(held[0] or 0) >= int(version or 0)
    assert state == truth_of(hapi)


async def test_redis_restarted_empty_is_restored_by_poll(volatile_redis: RedisProcess) -> None:
    hapi = StandInHapi()
    async with serve_standin(hapi) as fhir_base:
        await seed_changes(hapi, 60)
        settings = Settings(redis_url=volatile_redis.url, fhir_base_url=fhir_base)
        client_redis = connect(settings)
        store = SpeedStore(client_redis)
        try:
            async with FhirClient(fhir_base) as client:
                first = await poll_once(settings, store, client, derive=default_deriver())
                assert first.restored and await store.epoch() is not None
                volatile_redis.kill()
                volatile_redis.start()  # back, but empty: the epoch marker is gone
                assert await store.epoch() is None
                await hapi.update({**synthetic.patient(10_000, __import__("random").Random(1))})
                second = await poll_once(settings, store, client, derive=default_deriver())
                assert second.restored
                assert await store.epoch() is not None
        finally:
            await client_redis.aclose()
    assert await speed_state(volatile_redis.url) == truth_of(hapi)


RECEIVER_MAIN = """
import sys
from researchflow_cli import main
sys.exit(main(["receiver", "--port", sys.argv[1]]))
"""


def start_receiver(port: int, redis_url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "RECEIVER_TOKEN": TOKEN,
        "FHIR_BASE_URL": f"http://127.0.0.1:{free_port()}/fhir",  # nobody: deletes fall back
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", RECEIVER_MAIN, str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, timeout=30)
    return proc


async def test_receiver_sigkilled_mid_load_keeps_every_acknowledged_write(
    durable_redis: RedisProcess,
) -> None:
    port = free_port()
    proc = start_receiver(port, durable_redis.url)
    acknowledged: list[tuple[str, int]] = []
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
    stop = asyncio.Event()

    async def sender(worker: int) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            n = 0
            while not stop.is_set():
                n += 1
                pid = f"w{worker}-{n % 40}"
                body: dict[str, Any] = {
                    "resourceType": "Patient",
                    "id": pid,
                    "meta": {"versionId": str(n)},
                    "gender": "female",
                }
                try:
                    response = await http.put(
                        f"/fhir/Patient/{pid}", content=json.dumps(body), headers=headers
                    )
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
                    continue
                if response.status_code == 204:
                    acknowledged.append((pid, n))

    senders = [asyncio.create_task(sender(w)) for w in range(8)]
    try:
        await eventually(lambda: len(acknowledged) >= 300)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = len(acknowledged)
        await asyncio.sleep(0.3)
        proc = start_receiver(port, durable_redis.url)
        await eventually(lambda: len(acknowledged) >= killed_at + 200)
    finally:
        stop.set()
        await asyncio.gather(*senders)
        proc.kill()
        proc.wait(timeout=10)
    client = aioredis.Redis.from_url(durable_redis.url)
    try:
        store = SpeedStore(client)
        newest: dict[str, int] = {}
        for pid, version in acknowledged:
            newest[pid] = max(newest.get(pid, 0), version)
        for pid, version in newest.items():
            entry = await store.get("Patient", pid)
            assert entry is not None, pid
            assert int(entry.version_id or 0) >= version, (pid, entry.version_id, version)
    finally:
        await client.aclose()


async def test_after_redis_restarts_empty_speed_stats_lists_what_the_receiver_goes_on_writing(
    volatile_redis: RedisProcess,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What a process knows of Redis (here: the types it registered) is re-read when Redis
    comes back empty, so `speed stats` goes on listing a type that is still written."""
    import researchflow_cli

    settings = Settings(redis_url=volatile_redis.url, receiver_tokens=(TOKEN,))

    async def lookup(resource_type: str, resource_id: str) -> None:
        return None

    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
    app = create_app(settings, derive=default_deriver(), latest_version=lookup)
    from tests.asgi import running

    async with running(app) as http:
        for n, pid in enumerate(("a", "b")):
            body = {"resourceType": "Patient", "id": pid, "meta": {"versionId": str(n + 1)}}
            response = await http.put(f"/fhir/Patient/{pid}", json=body, headers=headers)
            assert response.status_code == 204
            if n == 0:
                await asyncio.sleep(1.2)  # the statistics are flushed once a second
                volatile_redis.kill()
                volatile_redis.start()  # back, but empty
        await asyncio.sleep(1.2)

    monkeypatch.setenv("REDIS_URL", volatile_redis.url)
    capsys.readouterr()
    # The command runs its own event loop: in a thread of its own here.
    assert await asyncio.to_thread(researchflow_cli.main, ["speed", "stats"]) == 0
    listed = json.loads(capsys.readouterr().out)["types"]
    assert "Patient" in listed and listed["Patient"]["entries"] == 1


async def test_the_query_mirror_rereads_a_type_whose_write_counter_went_back(
    volatile_redis: RedisProcess,
) -> None:
    """Redis restarted from an older snapshot keeps its epoch marker but loses writes: the
    query API's mirror must not keep serving entries Redis no longer holds."""
    from core.store import EPOCH_KEY
    from receiver.ingest import ingest
    from serving.mirror import SpeedMirror

    settings = Settings(redis_url=volatile_redis.url)
    client = connect(settings)
    try:
        store = SpeedStore(client)
        for pid in ("a", "b", "c"):
            await ingest(store, {"resourceType": "Patient", "id": pid, "gender": "male"})
        epoch = await store.mark_epoch()
        mirror = SpeedMirror()
        assert await mirror.sync(store)
        assert set(mirror.types["Patient"].entries) == {"a", "b", "c"}
        volatile_redis.kill()
        volatile_redis.start()
        await client.set(EPOCH_KEY, epoch)  # as an older snapshot would hold it
        await ingest(store, {"resourceType": "Patient", "id": "d", "gender": "male"})
        assert await mirror.sync(store)
        assert set(mirror.types["Patient"].entries) == {"d"}
    finally:
        await client.aclose()
