"""The speed layer on a three-node Redis Cluster: one slot per resource write, fan-out reads."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import LockError, ResponseError

from core.settings import Settings
from core.store import (
    _TRIM_LUA,
    _UPSERT_LUA,
    BUCKETS,
    META,
    Derived,
    SpeedStore,
    UpsertItem,
    bucket_of,
    connect,
    entries_key,
    log_key,
    tag,
)
from core.validation import NEVER_STORED
from receiver.app import create_app
from serving.derive import compiled_views, default_deriver
from subscriptions.fhir_client import hapi_lookup
from tests.asgi import running
from tests.cluster import RedisClusterProcesses, cluster_url, redis_cluster  # noqa: F401
from tests.examples import official_examples
from tests.procs import free_port, wait_port

TOKEN = "cluster-token"
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "Content-Type": "application/fhir+json; charset=UTF-8",
}
ROOT = Path(__file__).resolve().parents[1]


def patient(pid: str, version: int) -> dict[str, Any]:
    # Every version changes the indexed columns, so a stale index entry would show.
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {
            "versionId": str(version),
            "lastUpdated": f"2026-11-25T10:00:{version:02d}.000+00:00",
        },
        "gender": "male" if version % 2 else "female",
        "birthDate": f"19{50 + version}-03-04",
    }


def cluster_settings(url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": url,
        "redis_cluster": True,
        "receiver_tokens": (TOKEN,),
        "fhir_base_url": "http://127.0.0.1:1/fhir",
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
async def client(
    redis_cluster: RedisClusterProcesses,  # noqa: F811
) -> AsyncIterator[RedisCluster]:
    redis_cluster.flush()
    cluster = connect(cluster_settings(redis_cluster.url))
    assert isinstance(cluster, RedisCluster)
    # As the receiver's lifespan does (warn_about_config): a burst of commands on a client
    # that has not yet read the topology can lose replies and re-send writes (redis-py).
    await cluster.initialize()
    try:
        yield cluster
    finally:
        await cluster.aclose()


@pytest.fixture
def store(client: RedisCluster) -> SpeedStore:
    return SpeedStore(client)


def node_of(client: RedisCluster, key: str) -> str:
    node = client.get_node_from_key(key)
    assert node is not None
    return str(node.name)


# -- the key schema on a cluster -------------------------------------------------------------


async def test_a_resource_write_touches_one_slot_and_buckets_spread_over_the_nodes(
    client: RedisCluster, store: SpeedStore
) -> None:
    written = await store.upsert(
        "Patient",
        "p1",
        body=b"{}",
        version_id="1",
        last_updated=None,
        derived=Derived(rows={"patient_demographics": b"[{}]"}),
    )
    assert written
    prefix = tag("Patient", bucket_of("p1"))
    keys = [
        entries_key("Patient", "p1"),
        prefix + "chg",
        log_key(prefix, 1),  # the bucket's first write
        prefix + "seq",
    ]
    slots = {key_slot(k.encode()) for k in keys}
    assert len(slots) == 1
    (slot,) = slots
    assert int(await client.execute_command("CLUSTER KEYSLOT", keys[0])) == slot
    # Every one of those keys exists, on the node that owns the slot, and nowhere else.
    owner = node_of(client, keys[0])
    for node in client.get_nodes():
        held = set(await client.keys("rf:{Patient.*", target_nodes=node))
        expected = {k.encode() for k in keys} if node.name == owner else set()
        assert held == expected, node.name
    # The 16 buckets of a type spread over all three nodes; {meta} sits on one of them.
    nodes = {node_of(client, tag("Patient", b)) for b in range(BUCKETS)}
    assert len(nodes) == 3


async def test_scripts_touch_only_the_slot_of_their_first_key(
    client: RedisCluster, store: SpeedStore
) -> None:
    """With a `#!lua` line Redis 7 enforces what legacy scripts merely promise: every key a
    script touches hashes to the slot of its declared keys. The store's scripts pass."""
    strict_upsert = client.register_script("#!lua\n" + _UPSERT_LUA)
    strict_trim = client.register_script("#!lua\n" + _TRIM_LUA)
    for n in range(40):
        item = UpsertItem(
            "Patient",
            f"s{n}",
            b"{}",
            "2",
            None,
            derived=Derived(rows={"v": b"[1]", "w": b"[2]"}),
        )
        keys, args = store._upsert_call(item, 1.0)
        assert await strict_upsert(keys=keys, args=args) == 1
        # Overwriting drops the old derived keys: those accesses are checked too.
        args[2] = "3.0"
        assert await strict_upsert(keys=keys, args=args) == 1
        prefix = args[0]
        assert await strict_trim(keys=keys, args=[prefix, f"s{n}", "3.0", "0.0"]) == 1
    # The check is real: a strict script reaching into another bucket is refused...
    other = client.register_script("#!lua\nreturn redis.call('GET', ARGV[1])")
    with pytest.raises(ResponseError, match="same slot"):
        await other(keys=[tag("Patient", 0) + "x"], args=[tag("Patient", 1) + "x"])
    # ...and even a legacy script cannot reach a key on another node.
    legacy = client.register_script("return redis.call('GET', ARGV[1])")
    far = next(
        b
        for b in range(BUCKETS)
        if node_of(client, tag("Patient", b)) != node_of(client, tag("Patient", 0))
    )
    with pytest.raises(ResponseError, match="non local key"):
        await legacy(keys=[tag("Patient", 0) + "x"], args=[tag("Patient", far) + "x"])


# -- store operations -------------------------------------------------------------------------


async def test_upsert_many_and_trim_covered_are_version_guarded_across_nodes(
    client: RedisCluster, store: SpeedStore
) -> None:
    ids = [f"m{n}" for n in range(300)]
    derived = Derived(rows={"v": b"[1]"})
    first = [UpsertItem("Patient", i, b'{"v":3}', "3", None, derived=derived) for i in ids]
    # A node that lost its script cache (restart, SCRIPT FLUSH) answers NOSCRIPT: reloaded.
    await client.script_flush()
    assert await store.upsert_many(first) == [True] * len(ids)
    # Duplicates and older versions in one batch are no-ops; newer ones win.
    second = dict(zip(ids, itertools.cycle([2, 3, 4]), strict=False))
    mixed = [
        UpsertItem("Patient", i, f'{{"v":{v}}}'.encode(), str(v), None, derived=derived)
        for i, v in second.items()
    ]
    assert await store.upsert_many(mixed) == [v == 4 for v in second.values()]
    versions = await store.versions("Patient")
    assert {i: v.version_id for i, v in versions.items()} == {
        i: str(max(3, v)) for i, v in second.items()
    }
    assert await store.count("Patient") == 300
    assert set(await store.rows("Patient", "v")) == set(ids)

    # The batch layer holds version 3 of all: only the entries still at 3 go.
    await client.script_flush()
    generation = await store.generation()
    removed = await store.trim_covered("Patient", [(i, 3.0, 0.0) for i in ids])
    stays = {i for i, v in versions.items() if v.version_id == "4"}
    assert removed == len(ids) - len(stays)
    assert set(await store.versions("Patient")) == stays
    assert set(await store.rows("Patient", "v")) == stays
    assert await store.generation() == generation + 1
    log = await store.log_since("Patient", [0] * BUCKETS)
    assert {i for _, bucket_ids in log for i in bucket_ids} == stays


async def test_a_burst_of_concurrent_writes_waits_for_connections(store: SpeedStore) -> None:
    # The cluster client fails at once past its per-node connection limit; none may fail.
    results = await asyncio.gather(
        *(
            store.upsert("Patient", f"b{n}", body=b"{}", version_id="1", last_updated=None)
            for n in range(600)
        )
    )
    assert all(results)
    assert await store.count("Patient") == 600


async def test_global_keys_lease_watermark_catchup_rejects_and_stats(
    client: RedisCluster, store: SpeedStore
) -> None:
    a, b = store.poller_lock(5000), store.poller_lock(5000)
    assert await a.acquire(blocking=False)
    assert not await b.acquire(blocking=False)
    await a.reacquire()
    with pytest.raises(LockError):
        await b.reacquire()
    with pytest.raises(LockError):
        await b.release()
    await a.release()
    assert await b.acquire(blocking=False)

    assert await store.poller_watermark() is None
    await store.set_poller_watermark("2026-11-25T10:00:00Z")
    assert await store.poller_watermark() == "2026-11-25T10:00:00Z"

    await store.request_catchup("test")
    assert (await store.take_catchup() or "").endswith(" test")
    assert await store.take_catchup() is None

    assert await store.epoch() is None
    marker = await store.mark_epoch()
    assert await store.mark_epoch() == marker == await store.epoch()

    assert await store.record_reject("Patient", "x", "1", [])
    assert not await store.record_reject("Patient", "x", "1", [])
    assert await store.is_rejected("Patient", "x", "1")
    assert await store.reject_count() == 1
    await store.count_missed(2)
    assert await store.missed_count() == 2

    await store.upsert("Patient", "p1", body=b"{}", version_id="1", last_updated=None)
    await store.upsert("Observation", "o1", body=b"{}", version_id="1", last_updated=None)
    await store.flush_stats()
    assert await store.known_types() == ["Observation", "Patient"]
    assert sum(n for _, n in await store.hourly_changes()) == 2
    # All of these live under {meta}: one slot.
    assert len({key_slot((META + k).encode()) for k in ("epoch", "rejects", "poller:lease")}) == 1


async def test_server_config_reports_every_node(
    client: RedisCluster, store: SpeedStore, caplog: pytest.LogCaptureFixture
) -> None:
    info = await store.server_config()
    assert info["maxmemory-policy"] == "noeviction"
    assert info["appendonly"] == "no"
    node = client.get_nodes()[-1]
    await client.config_set("maxmemory-policy", "allkeys-lru", target_nodes=node)
    try:
        with caplog.at_level(logging.WARNING, logger="core.store"):
            info = await store.warn_about_config()
        assert info["maxmemory-policy"] == "allkeys-lru,noeviction"
        assert "EVICT" in caplog.text
    finally:
        await client.config_set("maxmemory-policy", "noeviction", target_nodes=node)


# -- the receiver on a cluster ----------------------------------------------------------------


async def test_receiver_on_a_cluster_ends_at_the_newest_versions(
    cluster_url: str,  # noqa: F811
    store: SpeedStore,
) -> None:
    deleted = {f"p{n}": 6 for n in range(0, 60, 7)}

    async def hapi(resource_type: str, resource_id: str) -> tuple[str, str, bool]:
        version = deleted[resource_id]
        return (str(version), f"2026-11-25T10:00:{version:02d}.000+00:00", True)

    ids = [f"p{n}" for n in range(60)]
    deliveries: list[tuple[str, int]] = [(i, v) for i in ids for v in (1, 2, 3, 4, 5)]
    deliveries += [(i, 0) for i in deleted]  # 0: the DELETE notification
    deliveries += random.Random(1).sample(deliveries, 60)  # duplicates
    random.Random(2).shuffle(deliveries)
    app = create_app(cluster_settings(cluster_url), derive=default_deriver(), latest_version=hapi)
    async with running(app) as http:

        async def send(pid: str, version: int) -> int:
            if version == 0:
                response = await http.delete(f"/fhir/Patient/{pid}", headers=HEADERS)
            else:
                body = json.dumps(patient(pid, version))
                response = await http.put(f"/fhir/Patient/{pid}", content=body, headers=HEADERS)
            return response.status_code

        statuses = await asyncio.gather(*(send(i, v) for i, v in deliveries))
        assert set(statuses) == {204}

    await check_final_state(store, ids, deleted, newest=5)


async def check_final_state(
    store: SpeedStore, ids: list[str], deleted: dict[str, int], newest: int
) -> None:
    """Every fan-out read sees every entry, at its newest version, with fresh derived data."""
    versions = await store.versions("Patient")
    assert set(versions) == set(ids)
    for pid in ids:
        entry = await store.get("Patient", pid)
        assert entry is not None
        if pid in deleted:
            assert (entry.state, entry.version_id) == ("deleted", str(deleted[pid]))
        else:
            assert (entry.state, entry.version_id) == ("present", str(newest))
            assert json.loads(entry.body or b"") == patient(pid, newest)
    present = [i for i in ids if i not in deleted]
    assert await store.count("Patient") == len(ids)
    views = [name for name, _ in compiled_views()["Patient"]]
    for view in views:
        assert set(await store.rows("Patient", view)) == set(present)
    log = await store.log_since("Patient", [0] * BUCKETS)
    for bucket, (_, bucket_ids) in enumerate(log):
        assert all(bucket_of(i) == bucket for i in bucket_ids)
    assert {i for _, bucket_ids in log for i in bucket_ids} == set(ids)


async def test_official_examples_are_taken_on_a_cluster(
    cluster_url: str,  # noqa: F811
    store: SpeedStore,
    shared_dir: Path,
) -> None:
    settings = cluster_settings(cluster_url)
    app = create_app(settings, derive=default_deriver(), hapi=hapi_lookup(settings.fhir_base_url))
    taken, refused = [], []
    async with running(app) as http:
        for example in official_examples(shared_dir):
            response = await http.put(
                f"/fhir/{example.resource_type}/{example.resource_id}",
                content=example.raw,
                headers=HEADERS,
            )
            if response.status_code == 204:
                if example.resource_type not in NEVER_STORED:
                    taken.append((example.resource_type, example.resource_id, example.raw))
            else:
                refused.append((example.name, response.status_code))
    assert len(taken) == 70, "71 taken; the Subscription one is never cached"
    assert refused == [("bundle-questionnaire.json", 422)]
    for resource_type, rid, raw in taken:
        entry = await store.get(resource_type, rid)
        assert entry is not None and entry.body == raw
    assert sum([await store.count(t) for t in {t for t, _, _ in taken}]) == len(
        {(t, i) for t, i, _ in taken}
    )


# -- two receiver processes behind one address -------------------------------------------------


class _DeletionHistory(BaseHTTPRequestHandler):
    """`GET /fhir/Patient/<id>/_history`: the deletion as HAPI's newest history entry."""

    deleted: dict[str, int] = {}

    def do_GET(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        version = self.deleted.get(parts[2]) if len(parts) == 4 else None
        if version is None:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(
            {
                "resourceType": "Bundle",
                "type": "history",
                "entry": [
                    {
                        "request": {
                            "method": "DELETE",
                            "url": f"Patient/{parts[2]}/_history/{version}",
                        },
                        "response": {
                            "status": "204",
                            "etag": f'W/"{version}"',
                            "lastModified": f"2026-11-25T10:00:{version:02d}.000+00:00",
                        },
                    }
                ],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def deletion_history(deleted: dict[str, int]) -> Iterator[str]:
    handler = type("Handler", (_DeletionHistory,), {"deleted": deleted})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def receiver_processes(n: int, redis_url: str, fhir_base_url: str) -> Iterator[list[str]]:
    """`researchflow receiver` n times with REDIS_CLUSTER=true; yields their base URLs."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_CLUSTER": "true",
        "RECEIVER_TOKEN": TOKEN,
        "FHIR_BASE_URL": fhir_base_url,
    }
    ports = [free_port() for _ in range(n)]
    command = [sys.executable, "-m", "researchflow_cli", "receiver", "--host", "127.0.0.1"]
    procs = [
        subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_port(port, timeout=30)
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class RoundRobin:
    """One address in front of several receivers: each request goes to the next one."""

    def __init__(self, bases: list[str]) -> None:
        self.clients = [httpx.AsyncClient(base_url=b, timeout=30.0) for b in bases]
        self.turn = itertools.cycle(self.clients)

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await next(self.turn).request(method, path, **kwargs)

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


async def feed(send: Any, deliveries: list[tuple[str, int]], concurrency: int = 16) -> list[int]:
    gate = asyncio.Semaphore(concurrency)

    async def one(pid: str, version: int) -> int:
        async with gate:
            if version == 0:
                response = await send("DELETE", f"/fhir/Patient/{pid}", headers=HEADERS)
            else:
                body = json.dumps(patient(pid, version))
                response = await send("PUT", f"/fhir/Patient/{pid}", content=body, headers=HEADERS)
            return int(response.status_code)

    return list(await asyncio.gather(*(one(i, v) for i, v in deliveries)))


async def snapshot(store: SpeedStore) -> dict[str, Any]:
    versions = await store.versions("Patient")
    views = [name for name, _ in compiled_views()["Patient"]]
    entries = {i: await store.get("Patient", i) for i in versions}
    return {
        "versions": versions,
        "bodies": {i: (e.state, e.version_id, e.body) for i, e in entries.items() if e},
        "rows": {v: await store.rows("Patient", v) for v in views},
        "count": await store.count("Patient"),
    }


async def test_two_receiver_processes_end_where_one_receiver_ends(
    redis_cluster: RedisClusterProcesses,  # noqa: F811
    client: RedisCluster,
    store: SpeedStore,
) -> None:
    ids = [f"q{n}" for n in range(40)]
    deleted = {i: 6 for i in ids[::5]}
    deliveries: list[tuple[str, int]] = [(i, v) for i in ids for v in (1, 2, 3, 4, 5)]
    deliveries += [(i, 0) for i in deleted]
    deliveries += random.Random(3).sample(deliveries, 40)

    with deletion_history(deleted) as fhir:
        # One receiver, in order of versions.
        one = create_app(
            cluster_settings(redis_cluster.url, fhir_base_url=fhir),
            derive=default_deriver(),
            hapi=hapi_lookup(fhir),
        )
        async with running(one) as http:
            statuses = await feed(http.request, sorted(deliveries, key=lambda d: d[1] or 99), 1)
        assert set(statuses) == {204}
        reference = await snapshot(store)
        await check_final_state(store, ids, deleted, newest=5)

        # Two processes behind one round-robin address, shuffled, concurrently.
        redis_cluster.flush()
        shuffled = random.Random(4).sample(deliveries, len(deliveries))
        with receiver_processes(2, redis_cluster.url, fhir) as bases:
            front = RoundRobin(bases)
            try:
                statuses = await feed(front.request, shuffled, 16)
            finally:
                await front.aclose()
        assert set(statuses) == {204}
        assert await snapshot(store) == reference
        await check_final_state(store, ids, deleted, newest=5)


# -- the query API's speed side on a cluster ----------------------------------------------------


async def test_cohort_queries_fan_out_over_the_cluster(
    cluster_url: str,  # noqa: F811
    store: SpeedStore,
    pg_url: str,
) -> None:
    from serving import batch
    from serving.api import create_app as create_api

    batch.init(pg_url)  # an empty batch layer: every member comes from the cluster
    settings = cluster_settings(cluster_url, database_url=pg_url, serving_tokens=("serve",))
    ids = [f"c{n}" for n in range(30)]
    receiver_app = create_app(
        settings, derive=default_deriver(), hapi=hapi_lookup(settings.fhir_base_url)
    )
    async with running(receiver_app) as receiver:
        for n, pid in enumerate(ids):
            body = json.dumps(patient(pid, 1 + n % 2))
            response = await receiver.put(f"/fhir/Patient/{pid}", content=body, headers=HEADERS)
            assert response.status_code == 204
            condition = {
                "resourceType": "Condition",
                "id": f"k{n}",
                "meta": {"versionId": "1", "lastUpdated": "2026-11-25T10:00:00Z"},
                "subject": {"reference": f"Patient/{pid}"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": str(n % 3)}]},
            }
            response = await receiver.put(
                f"/fhir/Condition/k{n}", content=json.dumps(condition), headers=HEADERS
            )
            assert response.status_code == 204
    await store.mark_epoch()  # a complete speed layer, as after a catch-up

    async with running(create_api(settings)) as api:
        auth = {"Authorization": "Bearer serve"}
        male = (await api.get("/cohort", params={"gender": "male"}, headers=auth)).json()
        assert male["sources"] == ["batch_layer", "speed_layer"] and not male["degraded"]
        assert male["patient_ids"] == sorted(ids[0::2])
        assert male["total_count"] == 15 and male["batch_count"] == 0
        both = (
            await api.get(
                "/cohort",
                params=[("gender", "female"), ("condition", "http://snomed.info/sct|1")],
                headers=auth,
            )
        ).json()
        expected = sorted(p for n, p in enumerate(ids) if n % 2 == 1 and n % 3 == 1)
        assert both["patient_ids"] == expected
