"""Benchmark: `poll --once` catch-up throughput from the stand-in HAPI with 50,000 changes.

Run: `.venv/bin/python benchmarks/poll.py [--changes 50000] [--append-readme]`

The stand-in HAPI runs in its own process (as HAPI would), seeded through its direct Python
methods with realistic Patients, Conditions and Observations (creates, updates, deletes),
and serves `_history` on loopback. This process runs `poll_once` against it with the real
FhirClient and a real Redis (`BENCH_REDIS_URL`, default db 14, flushed before and after).
"""

from __future__ import annotations

import sys
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import multiprocessing
import os
import random
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from benchmarks.common import machine
from core.settings import Settings
from core.store import SpeedStore
from subscriptions.changes import HISTORY_COUNT
from subscriptions.fhir_client import FhirClient
from subscriptions.poller import poll_once
from subscriptions.standin import synthetic

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
README = Path(__file__).with_name("README.md")


async def seed(hapi: Any, changes: int) -> None:
    rnd = random.Random(42)
    creates = int(changes * 0.9) // 3 * 3
    per_type = creates // 3
    for n in range(per_type):
        await hapi.update(synthetic.patient(n, rnd))
        await hapi.update(synthetic.condition(n, n, rnd))
        await hapi.update(synthetic.observation(n, n, rnd))
    left = changes - creates
    deletes = left // 5
    for _ in range(left - deletes):  # updates: new values for existing Observations
        n = rnd.randrange(per_type)
        await hapi.update(synthetic.observation(n, n, rnd))
    deleted = rnd.sample(range(per_type), deletes)
    for n in deleted:
        await hapi.delete("Condition", f"cond-{n}")


def standin_process(changes: int, page_size: int, conn: Connection) -> None:
    from subscriptions.standin.hapi import StandInHapi
    from subscriptions.standin.run import serve_standin

    async def main() -> None:
        hapi = StandInHapi(max_page_size=page_size)
        started = time.perf_counter()
        await seed(hapi, changes)
        seeded = time.perf_counter() - started
        async with serve_standin(hapi) as base_url:
            conn.send((base_url, len(hapi._log), len(hapi.resources), seeded))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(main())


async def run(changes: int, page_size: int) -> dict[str, Any]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(
        target=standin_process, args=(changes, page_size, child), daemon=True
    )
    proc.start()
    base_url, changes, resources, seeded = parent.recv()
    print(f"stand-in HAPI at {base_url}: {changes} changes, {resources} resources ({seeded:.1f} s)")
    redis = aioredis.Redis.from_url(BENCH_REDIS_URL)
    await redis.flushdb()
    try:
        store = SpeedStore(redis)
        await store.mark_epoch()  # a running speed layer: what the poll writes counts as missed
        settings = Settings(redis_url=BENCH_REDIS_URL, fhir_base_url=base_url)
        last = [0.0]

        def progress(read: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 2:
                last[0] = now
                print(f"  ... {read} resources read")

        async with FhirClient(base_url) as client:
            started = time.perf_counter()
            result = await poll_once(settings, store, client, progress=progress)
            seconds = time.perf_counter() - started
    finally:
        await redis.flushdb()
        await redis.aclose()
        parent.send("stop")
        proc.join(10)
    return {
        "changes": changes,
        "resources": resources,
        "read": result.read,
        "written": result.written,
        "deletes": result.deletes,
        "missed": result.missed,
        "seconds": seconds,
        "page_size": min(HISTORY_COUNT, page_size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--changes", type=int, default=50_000)
    parser.add_argument("--page-size", type=int, default=200, help="HAPI's max_page_size")
    parser.add_argument("--append-readme", action="store_true")
    args = parser.parse_args()
    numbers = asyncio.run(run(args.changes, args.page_size))
    per_s = numbers["read"] / numbers["seconds"]
    changes_s = numbers["changes"] / numbers["seconds"]
    print(
        f"poll --once: {numbers['changes']} changes ({numbers['read']} resources, "
        f"{numbers['written']} written, {numbers['deletes']} tombstones) in "
        f"{numbers['seconds']:.1f} s = {per_s:,.0f} resources/s "
        f"({changes_s:,.0f} history entries/s), pages of {numbers['page_size']}"
    )
    if args.append_readme:
        text = README.read_text() if README.exists() else ""
        if not text:
            text = f"# Benchmarks\n\nMachine: {machine()}\n"
        text += (
            f"\n## poll --once catch-up ({time.strftime('%Y-%m-%d')})\n\n"
            f"`benchmarks/poll.py`: stand-in HAPI in its own process, {numbers['changes']:,} "
            f"changes (Patient/Condition/Observation creates, Observation updates, Condition "
            f"deletes), `_history` pages of {numbers['page_size']}, real Redis.\n\n"
            f"- {numbers['read']:,} resources read ({numbers['written']:,} written, "
            f"{numbers['deletes']:,} tombstones) in {numbers['seconds']:.1f} s\n"
            f"- **{per_s:,.0f} resources/s** ({changes_s:,.0f} history entries/s); "
            f"target ≥ 5,000 resources/s\n"
            f"- machine: {machine()}\n"
        )
        README.write_text(text)


if __name__ == "__main__":
    main()
