"""Cohort query latency: merged (batch + speed) vs. batch-only vs. the seed's SQL and SCAN.

    .venv/bin/python benchmarks/query.py [--patients 1000000] [--conditions 4000000]
        [--speed 100000] [--runs 50] [--database NAME]

The batch layer is built in SQL (benchmarks/synthetic.py; condition texts from 48,000
phrases) and `batch init`. Per query: merged (what GET /cohort does minus HTTP), batch-only
(the same FHIR semantics on the batch layer alone: the answer with USE_SPEED_LAYER=false),
the seed's SQL (condition-text: its ILIKE scan) and the seed's SCAN of the speed layer.
Merged and batch-only runs alternate, so the load of a shared machine hits both alike.

Creates (and drops) its own PostgreSQL database next to TEST_PG_ADMIN_URL and uses Redis
database 14 of TEST_REDIS_URL's server (flushed before and after).
"""

from __future__ import annotations

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
import psycopg
import redis.asyncio as aioredis

from benchmarks import synthetic
from core.store import SpeedStore
from receiver.ingest import ingest, ingest_deletion
from serving import batch
from serving.cohort import parse_query
from serving.derive import default_deriver
from serving.merge import BatchCounts, SpeedView, cohort, read_speed
from serving.mirror import SpeedMirror

ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://127.0.0.1:5432/postgres")
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9").rsplit("/", 1)[0] + "/14"
CODES = [f"{100000 + i}" for i in range(500)]
TEXTS = ["Diabetes mellitus", "Heart failure", "Asthma", "Hypertension", "Migraine"]
LU = "2024-01-01T00:00:01Z"

QUERIES = {
    "gender+condition": ("gender=male&condition=http://snomed.info/sct|100007",),
    "condition-text": ("condition-text=heart",),
    "condition-text-2": ("condition-text=fibrillation",),
    "condition-text-3": ("condition-text=aortic valve sten",),
    "observation-value": ("observation=http://loinc.org|4548-4$gt9",),
    "birthdate-range": ("birthdate=ge1980-01-01&birthdate=lt1980-03-01",),
}


def _ilike(text: str) -> str:
    return (
        "SELECT id FROM sqlonfhir.patient_demographics INTERSECT SELECT patient_id FROM"
        f" sqlonfhir.condition_simple WHERE code_text ILIKE '%{text}%'"
        f" OR code_display ILIKE '%{text}%'"
    )


# The seed's SQL for each query (condition-text: its ILIKE scan; birthdate: a string
# comparison, which is not FHIR's date-range rule).
SEED = {
    "gender+condition": "SELECT id FROM sqlonfhir.patient_demographics WHERE gender = 'male'"
    " INTERSECT SELECT patient_id FROM sqlonfhir.condition_simple"
    " WHERE code_system = 'http://snomed.info/sct' AND code = '100007'",
    "condition-text": _ilike("heart"),
    "condition-text-2": _ilike("fibrillation"),
    "condition-text-3": _ilike("aortic valve sten"),
    "observation-value": "SELECT id FROM sqlonfhir.patient_demographics INTERSECT"
    " SELECT patient_id FROM sqlonfhir.observation_simple WHERE code = '4548-4' AND value > 9",
    "birthdate-range": "SELECT id FROM sqlonfhir.patient_demographics"
    " WHERE birth_date >= '1980-01-01' AND birth_date < '1980-03-01'",
}


def patient(i: int, rng: random.Random, v: int = 1) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"p{i}",
        "meta": {"versionId": str(v), "lastUpdated": f"2024-01-0{v}T00:00:01Z"},
        "gender": rng.choice(["male", "female"]),
        "birthDate": f"{rng.randint(1930, 2015)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }


def condition(i: int, patients: int, rng: random.Random, v: int = 1) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": f"c{i}",
        "meta": {"versionId": str(v), "lastUpdated": f"2024-01-0{v}T00:00:01Z"},
        "subject": {"reference": f"Patient/p{rng.randrange(patients)}"},
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": rng.choice(CODES)}],
            "text": rng.choice(TEXTS),
        },
    }


def observation(i: int, patients: int, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"o{i}",
        "meta": {"versionId": "1", "lastUpdated": LU},
        "status": "final",
        "subject": {"reference": f"Patient/p{rng.randrange(patients)}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "valueQuantity": {"value": round(rng.uniform(4, 11), 1), "unit": "%"},
    }


def load(url: str, patients: int, conditions: int, rng: random.Random) -> float:
    """The batch layer built in SQL (benchmarks/synthetic.py: varied condition texts), then
    `batch init` fills and indexes each view's table; seconds."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute(batch.SCHEMA_SQL.encode())
        synthetic.load(conn, patients, conditions, conditions // 10, last_updated=LU)
        conn.execute(
            "INSERT INTO rf_batch.watermark VALUES (1, '2024-01-01T00:00:00Z', now(),"
            " (SELECT count(*) FROM rf_batch.resources))"
        )
    batch.init(url)
    with psycopg.connect(url) as conn:
        conn.execute("ANALYZE")
        seconds = time.perf_counter() - started
        conn.execute("CREATE TABLE rf_bench_load AS SELECT %s::float8 AS seconds", (seconds,))
    return seconds


def machine() -> str:
    model, memory = platform.machine(), "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), model)
        with open("/proc/meminfo") as f:
            kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
            memory = f"{kb / 1024 / 1024:.1f} GiB"
    return f"{model}, nproc={os.cpu_count()}, RAM {memory}, Python {platform.python_version()}"


def loaded(url: str) -> float | None:
    """The load time recorded by an earlier run's `load` into this database, if it finished."""
    with psycopg.connect(url) as conn:
        try:
            row = conn.execute("SELECT seconds FROM rf_bench_load").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return float(row[0]) if row else None


async def speed_writes(store: SpeedStore, n: int, patients: int, conditions: int) -> float:
    rng = random.Random(2)
    derive = default_deriver()
    started = time.perf_counter()
    for k in range(n):
        pick = rng.random()
        if pick < 0.3:
            resource = patient(patients + k, rng)  # new patients
        elif pick < 0.8:
            resource = condition(conditions + k, patients + n, rng)  # new conditions
        elif pick < 0.95:
            resource = condition(rng.randrange(conditions), patients, rng, v=2)  # updates
        else:
            await ingest_deletion(
                store,
                "Condition",
                f"c{rng.randrange(conditions)}",
                version_id="3",
                last_updated="2024-01-03T00:00:01Z",
            )
            continue
        await ingest(store, orjson.dumps(resource), derive=derive)
    return time.perf_counter() - started


async def scan_baseline(client: aioredis.Redis, query: str) -> int:
    """The seed's speed query: SCAN every rf:* key, read each body, parse, filter."""
    q = parse_query(parse_qsl(query))
    hits = 0
    async for key in client.scan_iter(match="rf:*:r:*", count=1000):
        body = await client.hget(key, "body")
        if not body:
            continue
        data = orjson.loads(body)
        if data.get("resourceType") == "Patient" and q.genders:
            hits += data.get("gender") in q.genders[0]
        elif data.get("resourceType") == "Condition" and q.criteria:
            codings = data.get("code", {}).get("coding", [])
            hits += any(c.get("code") == "100007" for c in codings)
    return hits


async def timed(fn: Callable[[], Awaitable[Any]], runs: int) -> tuple[float, float]:
    return (await alternated([fn], runs))[0]


async def alternated(
    fns: list[Callable[[], Awaitable[Any]]], runs: int
) -> list[tuple[float, float]]:
    """p50 and p99 (ms) of each of `fns`, called in turn `runs` times each: a busy moment of
    the machine hits them alike, so their ratio holds on a shared machine."""
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, samples, strict=True):
            started = time.perf_counter()
            await fn()
            out.append((time.perf_counter() - started) * 1000)
    result = []
    for out in samples:
        out.sort()
        result.append((statistics.median(out), out[min(len(out) - 1, int(len(out) * 0.99))]))
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--conditions", type=int, default=4_000_000)
    parser.add_argument("--speed", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--scan-runs", type=int, default=3)
    parser.add_argument(
        "--database",
        help="keep the batch layer in this database (created and loaded when missing, reused"
        " when present, after a `batch init` that builds only what this release changed: the"
        " full-scale load takes a quarter of an hour)",
    )
    args = parser.parse_args()
    name = args.database or f"rf_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            admin.execute(f'CREATE DATABASE "{name}"'.encode())
    url = ADMIN.rsplit("/", 1)[0] + "/" + name
    client = aioredis.Redis.from_url(REDIS)
    try:
        await client.flushdb()
        store = SpeedStore(client)
        await store.mark_epoch()
        load_s = loaded(url) if exists else None
        if load_s is None:
            load_s = load(url, args.patients, args.conditions, random.Random(1))
        else:
            # A kept database: built by an older release, `batch init` brings it to this one's
            # tables (condition-text's text index included); unchanged views stay as they are.
            for line in batch.init(url):
                print(line, flush=True)
        write_s = await speed_writes(store, args.speed, args.patients, args.conditions)
        mirror, counts = SpeedMirror(), BatchCounts()
        started = time.perf_counter()
        await read_speed(store, mirror, True)
        first_sync = time.perf_counter() - started
        print(f"machine: {machine()}; load average before the queries {os.getloadavg()}")
        print(
            f"batch: {args.patients} patients, {args.conditions} conditions loaded+refreshed in"
            f" {load_s:.1f}s; speed: {args.speed} writes in {write_s:.1f}s"
            f" ({write_s / max(args.speed, 1) * 1000:.2f} ms each); first mirror load"
            f" {first_sync * 1000:.0f} ms"
        )
        async with await psycopg.AsyncConnection.connect(url) as conn:
            for label, (query,) in QUERIES.items():
                q = parse_query(parse_qsl(query))

                async def merged(q: Any = q) -> Any:
                    speed = await read_speed(store, mirror, True, q.resource_types)
                    if speed.mirror is None:
                        raise RuntimeError("Redis db 14 lost the speed layer during the run")
                    async with conn.transaction():
                        return await cohort(conn, q, speed, counts)

                async def speed_side(q: Any = q) -> Any:
                    await read_speed(store, mirror, True, q.resource_types)
                    async with conn.transaction():
                        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        async with mirror.lock:
                            await mirror.sync_batch(conn, mirror.batch_key or ())
                            return mirror.plan(q)

                async def batch_only(q: Any = q) -> Any:
                    # The same FHIR semantics on the batch layer alone: the query API's answer
                    # without the speed layer (USE_SPEED_LAYER=false), one snapshot.
                    async with conn.transaction():
                        return await cohort(conn, q, SpeedView(None, None, False), BatchCounts())

                async def seed(label: str = label) -> Any:
                    async with conn.transaction():
                        cur = await conn.execute(SEED[label].encode())
                        return await cur.fetchall()

                await merged()
                answer = await merged()
                (m50, m99), (b50, b99) = await alternated([merged, batch_only], args.runs)
                s50, s99 = await timed(speed_side, args.runs)
                t50, _ = await timed(seed, max(3, args.runs // 5))

                async def scan(query: str = query) -> int:
                    return await scan_baseline(client, query)

                scan50, _ = await timed(scan, args.scan_runs)
                print(
                    f"{label:18} total={answer.total_count:>7} batch={answer.batch_count:>7}"
                    f" | merged p50 {m50:7.1f} p99 {m99:7.1f} ms | speed side p50 {s50:5.2f}"
                    f" p99 {s99:5.2f} ms | batch-only p50 {b50:7.1f} p99 {b99:7.1f} ms"
                    f" | merged/batch {m50 / b50:4.2f} | seed SQL p50 {t50:7.1f} ms"
                    f" (seed/merged {t50 / m50:5.1f}) | SCAN baseline p50 {scan50:8.1f} ms",
                    flush=True,
                )
    finally:
        await client.flushdb()
        await client.aclose()
        if not args.database:
            with psycopg.connect(ADMIN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


if __name__ == "__main__":
    asyncio.run(main())
