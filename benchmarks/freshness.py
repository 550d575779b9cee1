"""Benchmark: freshness on the real HAPI FHIR server -- a write to HAPI until /cohort shows it.

Run: `.venv/bin/python benchmarks/freshness.py [--writes 200] [--interval 0.25] [--append-readme]`

It starts the real HAPI FHIR 8.8 server of `hapi-config/` through `hapi.sh` (a free port and
a private database, stopped and dropped at the end; `--fhir-base URL` uses a running one
instead), the real receiver and the query API (each uvicorn in this process), one rest-hook
Subscription per type (`subscriptions bootstrap`), an empty batch layer and a speed layer in
`BENCH_REDIS_URL` (default db 12, flushed before and after).

Each write is a Condition PUT to HAPI with a code of its own (a create, or an update of an
earlier Condition to a new code, alternating); the clock starts when HAPI has answered the
PUT (the change is committed) and stops at the first `GET /cohort?condition=<that code>`
that counts the patient (polled every 5 ms over a kept-alive connection). Writes are spaced
by `--interval` (0.5 to 1.5 times it, at random) so the figure is latency, not a queue under load. The path measured: HAPI's
commit, matching, its rest-hook delivery (PUT to the receiver), validation and the Redis
write, the query API's mirror of the speed layer and the merged answer.

HAPI settings that give the numbers (hapi-config/application.yaml and its Java classes):
rest-hook on, `immediately_queued: true`, with which hapi-config registers HAPI's after-commit
subscription matcher so every change is matched right after its commit (a stock HAPI parks
non-Subscription changes for a job that runs every 5 s: docs/hapi.md, difference 1),
in-memory channels, HAPI's defaults otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psycopg
import redis.asyncio as aioredis

from benchmarks.common import machine
from core.serve import serve_asgi
from core.settings import Settings
from core.store import SpeedStore
from receiver.app import create_app as create_receiver
from serving import batch
from serving.api import create_app as create_api
from serving.derive import default_deriver
from subscriptions import bootstrap
from subscriptions.fhir_client import FhirClient, hapi_lookup
from tests.procs import free_port, temporary_database

ROOT = Path(__file__).resolve().parents[1]
HAPI_SH = ROOT / "hapi-config" / "hapi.sh"
README = Path(__file__).with_name("README.md")
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://127.0.0.1:5432/postgres")
FHIR_JSON = "application/fhir+json"
SNOMED = "http://snomed.info/sct"


@contextlib.contextmanager
def hapi_server(fhir_base: str | None):  # type: ignore[no-untyped-def]
    """A running HAPI: the given one, or a fresh one through hapi.sh (stopped after)."""
    if fhir_base:
        yield fhir_base
        return
    port = free_port()
    name = f"rf_bench_hapi_{uuid.uuid4().hex[:8]}"
    run_dir = tempfile.mkdtemp(prefix="rf-bench-hapi-")
    env = {
        **os.environ,
        "HAPI_PORT": str(port),
        "HAPI_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name,
        "HAPI_RUN_DIR": run_dir,
    }
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", str(HAPI_SH), "start"], env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit("freshness: hapi.sh start failed (see its message above)")
    print(f"HAPI started in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        yield done.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(HAPI_SH), "stop"], env=env, capture_output=True, check=False)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@dataclasses.dataclass
class Result:
    writes: int
    latencies_ms: list[float]
    hapi_put_ms: list[float]

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies_ms)
        return {
            "writes": self.writes,
            "p50_ms": round(statistics.median(lat), 1),
            "p90_ms": round(lat[int(0.9 * (len(lat) - 1))], 1),
            "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 1),
            "max_ms": round(lat[-1], 1),
            "hapi_put_p50_ms": round(statistics.median(self.hapi_put_ms), 1),
        }


@contextlib.asynccontextmanager
async def services(settings: Settings) -> AsyncIterator[str]:
    """The receiver (where HAPI delivers) and the query API; yields the API's base URL."""
    receiver = create_receiver(
        settings, derive=default_deriver(), hapi=hapi_lookup(settings.fhir_base_url)
    )
    api = create_api(settings)
    async with (
        serve_asgi(receiver, port=int(settings.receiver_url.rsplit(":", 1)[1].split("/")[0])),
        serve_asgi(api) as api_url,
    ):
        yield api_url


async def measure(fhir_base: str, writes: int, interval: float) -> Result:
    redis_client = aioredis.Redis.from_url(BENCH_REDIS_URL)
    await redis_client.flushdb()
    store = SpeedStore(redis_client)
    receiver_port = free_port()
    tag = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    puts: list[float] = []
    rnd = random.Random(11)
    try:
        with temporary_database(PG_ADMIN_URL, "rf_bench_fresh") as batch_db:
            settings = Settings(
                redis_url=BENCH_REDIS_URL,
                database_url=batch_db,
                fhir_base_url=fhir_base,
                receiver_url=f"http://127.0.0.1:{receiver_port}/fhir",
                receiver_tokens=("bench-hook",),
                serving_tokens=("bench",),
                instance=f"freshness-{tag}",
            )
            batch.init(batch_db)
            await store.mark_epoch()
            async with (
                services(settings) as api_url,
                FhirClient(fhir_base) as fhir,
                httpx.AsyncClient(base_url=fhir_base + "/", timeout=30) as hapi,
                httpx.AsyncClient(
                    base_url=api_url, headers={"Authorization": "Bearer bench"}, timeout=30
                ) as api,
            ):
                await bootstrap.bootstrap(settings, fhir, wait=120)
                patient = {"resourceType": "Patient", "id": f"fresh-{tag}", "gender": "male"}
                response = await hapi.put(
                    f"Patient/{patient['id']}", json=patient, headers={"Content-Type": FHIR_JSON}
                )
                response.raise_for_status()
                try:
                    for i in range(writes):
                        cid = f"fresh-{tag}-c{i // 2}"  # even i: create, odd i: update
                        code = f"fresh-{tag}-{i}"
                        condition = {
                            "resourceType": "Condition",
                            "id": cid,
                            "subject": {"reference": f"Patient/{patient['id']}"},
                            "code": {"coding": [{"system": SNOMED, "code": code}]},
                        }
                        t0 = time.perf_counter()
                        response = await hapi.put(
                            f"Condition/{cid}", json=condition, headers={"Content-Type": FHIR_JSON}
                        )
                        response.raise_for_status()
                        committed = time.perf_counter()
                        puts.append((committed - t0) * 1000)
                        params = {"condition": f"{SNOMED}|{code}", "ids": "false"}
                        while True:
                            answer = (await api.get("/cohort", params=params)).json()
                            if answer.get("total_count") == 1:
                                break
                            if time.perf_counter() - committed > 120:
                                raise SystemExit(f"freshness: write {i} not visible after 120 s")
                            await asyncio.sleep(0.005)
                        latencies.append((time.perf_counter() - committed) * 1000)
                        # A random phase, so no write lines up with a periodic job of HAPI's.
                        await asyncio.sleep(interval * (0.5 + rnd.random()))
                finally:
                    await bootstrap.remove(settings, fhir)
    finally:
        await redis_client.flushdb()
        await redis_client.aclose()
    return Result(writes, latencies, puts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between writes")
    parser.add_argument("--fhir-base", help="a running HAPI's FHIR base instead of hapi.sh")
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args()
    with hapi_server(args.fhir_base) as fhir_base:
        result = asyncio.run(measure(fhir_base, args.writes, args.interval))
    summary = result.summary()
    load = os.getloadavg()[0]
    print(json.dumps({**summary, "load_average": round(load, 2), "machine": machine()}))
    if args.append_readme:
        with README.open("a") as handle:
            handle.write(
                f"\n## Freshness on the real HAPI FHIR 8.8 ({time.strftime('%Y-%m-%d')})\n\n"
                "`benchmarks/freshness.py`: hapi-config/ (HAPI FHIR 8.8.0 JPA, PostgreSQL, "
                "rest-hook, `immediately_queued: true`, in-memory channels), the real receiver "
                "and query API; a Condition PUT to HAPI (create or update, a code of its own) "
                "until `GET /cohort?condition=<code>` counts its patient, "
                f"{summary['writes']} writes {args.interval} s apart.\n\n"
                f"- **p50 {summary['p50_ms']} ms**, p90 {summary['p90_ms']} ms, "
                f"p99 {summary['p99_ms']} ms, **max {summary['max_ms']} ms** "
                f"(HAPI's own PUT p50 {summary['hapi_put_p50_ms']} ms, not included)\n"
                f"- load average at the end {load:.2f}; machine: {machine()}\n"
            )


if __name__ == "__main__":
    main()
